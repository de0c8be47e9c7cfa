"""The per-face recovery key (plaintext; :mod:`.crypto` encrypts it).

key-I is z_T, the DDIM inversion of the original face's latents (``4,h,w float32``, 64×64 for
SD v1.x at 512 px: 64 KiB); key-E is the face's 10 pseudo-words (``10,D float32``, 30 KiB for
D = 768; C^i are recomputed by the frozen text encoder) or, with ``key_e="embeddings"``, the 10
C^i themselves (``10,77,D``, 2.3 MiB). Serialized as safetensors bytes whose metadata (strings)
records what recovery needs and checks: the models' digests, the schedule, the number of DDIM
steps N, the inversion iterations k, the backbone resolution, and, when the caller adds it, the
face's affine (image pixels -> crop pixels) and paste-back feather.

No pickle: ``from_bytes`` parses the safetensors header as JSON and the tensors as raw arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from anonloader.errors import ConfigError

__all__ = ["KEY_FORMAT", "RecoveryKey"]

KEY_FORMAT = "anonloader.diffprivacy.key/1"


@dataclass(frozen=True)
class RecoveryKey:
    """One face's recovery key.

    Attributes:
        z_T: ``4,h,w float32`` key-I.
        key_e: ``10,D`` pseudo-words (``kind="words"``) or ``10,L,D`` embeddings (``"embeddings"``).
        kind: ``"words"`` or ``"embeddings"``.
        meta: JSON-able settings and digests (see the module docstring).
    """

    z_T: torch.Tensor
    key_e: torch.Tensor
    kind: str = "words"
    meta: dict[str, Any] = field(default_factory=dict)

    def with_placement(self, affine: torch.Tensor, feather: float) -> RecoveryKey:
        """The key with the face's ``2,3`` affine (image pixels -> crop pixels) and paste-back
        feather recorded, as the pipeline knows them."""
        return replace(self, meta={**self.meta, "affine": [[float(v) for v in row] for row in affine.tolist()], "feather": float(feather)})

    def to_bytes(self) -> bytes:
        """Safetensors bytes, written here with a sorted JSON header so the same key always
        gives the same bytes (the library's own writer orders its metadata map arbitrarily)."""
        tensors = {"key_e": self.key_e.detach().float().cpu().contiguous(), "z_T": self.z_T.detach().float().cpu().contiguous()}
        header: dict[str, Any] = {"__metadata__": {"format": KEY_FORMAT, "kind": self.kind, "meta": json.dumps(self.meta, sort_keys=True)}}
        chunks, offset = [], 0
        for name, tensor in tensors.items():
            data = tensor.numpy().astype("<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
            chunks.append(data)
            offset += len(data)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + b"".join(chunks)

    @classmethod
    def from_bytes(cls, data: bytes) -> RecoveryKey:
        from safetensors.torch import load

        try:
            header_size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_size])
            metadata = header.get("__metadata__", {})
            if metadata.get("format") != KEY_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}")
            tensors = load(bytes(data))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"not a Diff-Privacy recovery key ({KEY_FORMAT}): {error}") from error
        return cls(tensors["z_T"], tensors["key_e"], metadata["kind"], json.loads(metadata["meta"]))
