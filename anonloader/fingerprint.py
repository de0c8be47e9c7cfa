"""Stable fingerprints of pipeline settings.

A fingerprint is the SHA-256 of the canonical JSON of every setting that changes output pixels
(method and its parameters, model weight hashes, detector thresholds, alignment, paste-back and
the cache format version). Two pipelines with equal fingerprints produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FORMAT_VERSION", "canonical_json", "fingerprint_of", "hash_file", "hash_path", "state_hash"]

#: Bumped whenever the bytes a cache stores for the same input would change (2: typed records
#: without pickle, HMAC-authenticated values, training view stored with the sample).
CACHE_FORMAT_VERSION = 2


def _normalize(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and small arrays
        return _normalize(value.tolist())
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}: {value!r}")


def canonical_json(config: Mapping[str, Any]) -> str:
    """Sorted-key, whitespace-free JSON of ``config``; the text that fingerprints are taken of."""
    return json.dumps(_normalize(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_of(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def hash_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (model weights go into fingerprints this way)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hash_path(path: str | os.PathLike[str]) -> str:
    """SHA-256 over a file, or over every file of a directory (relative names and contents)."""
    root = Path(path)
    if root.is_file():
        return hash_file(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(hash_file(file).encode())
    return digest.hexdigest()


def state_hash(module: Any) -> str:
    """SHA-256 hex over a ``torch.nn.Module``'s state dict — names, dtypes, shapes and raw bytes
    (any dtype, bfloat16 included; 0-d buffers too), sorted by name: the weights digest of a
    network held in memory."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
