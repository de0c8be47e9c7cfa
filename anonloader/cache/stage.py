"""``CachedStage``: a pipeline stage that looks in the cache before it anonymizes.

It has the same ``process`` as :class:`~anonloader.data.stage.PipelineStage`, so the dataset
wrappers hold either one. Modes:

- ``"read-through"``: a hit is served; a miss, a corrupt entry or a stored *failure* is
  computed (again) and stored — a transient fault is never made permanent;
- ``"read-only"``: a hit is served; a miss raises :class:`~anonloader.errors.CacheMissError`
  ("N of M samples are not in the cache; run anonloader precompute") and a corrupt entry
  raises :class:`~anonloader.errors.CacheCorruptError` — nothing is ever computed (fail
  closed: a training cluster never starts running diffusion by surprise). A stored failure
  is served as what its fail-closed policy produced (obscured, or dropped) with its reason,
  counted under ``"failed"``; never as a success, never as the original;
- ``"write-only"``: every sample is computed and stored (refreshing the cache).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from anonloader.cache.codecs import Codec
from anonloader.cache.keys import CacheKeys, cache_key
from anonloader.cache.store import AnonCache
from anonloader.data.adapters import SourceImage
from anonloader.data.stage import ProcessedImage
from anonloader.errors import CacheCorruptError, CacheMissError, ConfigError
from anonloader.types import Detections

__all__ = ["CacheMode", "CachedStage", "content_with_conditions"]

logger = logging.getLogger(__name__)

CacheMode = Literal["read-through", "read-only", "write-only"]


def content_with_conditions(image: SourceImage, label: Any = None, detections: Detections | None = None) -> bytes:
    """The bytes a key is taken of: the image's content, plus what else changes its output.

    A dataset label (``label`` identity strategy) and annotation faces (``detections``) change
    the anonymized pixels without changing the image, so they are part of the key too.
    """
    parts = [image.content_bytes()]
    if label is not None:
        parts.append(b"|label:" + repr(label).encode())
    if detections is not None:
        parts.append(b"|faces:")
        for tensor in (detections.boxes, detections.landmarks, detections.scores):
            array = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
            parts.append(f"{array.shape}".encode() + array.tobytes())
    return b"".join(parts)


class CachedStage:
    """Serves anonymized images from an :class:`AnonCache`, computing misses with ``inner``.

    Args:
        inner: the stage that anonymizes (``process`` and ``fingerprint()``).
        cache: an :class:`AnonCache` or the path of one (created in the writing modes).
        mode: ``"read-through"``, ``"read-only"`` or ``"write-only"``.
        secret: salts the keys and authenticates stored values; only the derived subkeys
            (:class:`CacheKeys`) are kept, so pickling the stage into workers never carries it.
        codec: how new entries are encoded when the cache is created from a path (default
            ``"raw"``).
    """

    def __init__(
        self,
        inner: Any,
        cache: AnonCache | str | os.PathLike[str],
        mode: CacheMode = "read-through",
        secret: Any = None,
        codec: str | Codec | None = None,
    ) -> None:
        if mode not in ("read-through", "read-only", "write-only"):
            raise ConfigError(f"cache_mode must be 'read-through', 'read-only' or 'write-only', got {mode!r}")
        self.inner = inner
        self.mode: CacheMode = mode
        self.fingerprint_hex = inner.fingerprint()
        self.keys = CacheKeys.from_secret(secret)
        method = getattr(getattr(getattr(inner, "anonymizer", None), "method", None), "name", None)
        if isinstance(cache, AnonCache):
            if mode != "read-only" and not cache.writable:
                raise ConfigError(f"cache_mode={mode!r} needs a writable cache; open it with writable=True")
            if secret is not None and cache.keys is None:
                raise ConfigError("pass the secret to the AnonCache too (AnonCache(path, secret=...)), or only here with a path")
            cache.expected_fingerprint = cache.expected_fingerprint or self.fingerprint_hex
            cache.expected_salt_check = cache.expected_salt_check or self.keys.salt_check
            cache.method = cache.method or method
            self.cache = cache
        else:
            self.cache = AnonCache(
                Path(cache),
                writable=mode != "read-only",
                fingerprint=self.fingerprint_hex,
                secret=self.keys if self.keys.keyed else None,
                salt_check=self.keys.salt_check,
                codec=codec,
                method=method,
            )
        self.counters: Counter[str] = Counter()
        self._warned_failed = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["counters"] = Counter()
        return state

    def fingerprint(self) -> str:
        return self.fingerprint_hex

    def keys_of(
        self,
        images: Sequence[SourceImage],
        labels: Sequence[Any] | None = None,
        detections: Sequence[Detections] | None = None,
    ) -> list[bytes]:
        """The cache key of every image of a sample."""
        return [
            cache_key(
                content_with_conditions(
                    image, None if labels is None else labels[i], None if detections is None else detections[i]
                ),
                self.fingerprint_hex,
                self.keys.salt,
            )
            for i, image in enumerate(images)
        ]

    def lookup(self, index: int, keys: Sequence[bytes]) -> list[ProcessedImage] | None:
        """The stored results for ``keys``, or ``None`` when any is missing (or, read-through,
        corrupt or a stored failure)."""
        results = []
        for slot, key in enumerate(keys):
            try:
                entry = self.cache.get(key, what=f"sample {index} image {slot}")
            except CacheCorruptError:
                self.counters["corrupt"] += 1
                if self.mode == "read-only":
                    raise
                logger.warning("sample %d image %d: corrupt cache entry, recomputing it", index, slot)
                return None
            if entry is None:
                return None
            if entry.failed:
                if self.mode != "read-only":
                    self.counters["failed_recomputed"] += 1
                    return None
                self.counters["failed"] += 1
                if not self._warned_failed:
                    self._warned_failed = True
                    logger.warning(
                        "sample %d image %d: the cache holds a failure (%s); read-only mode serves its fail-closed "
                        "output (obscured or dropped). Run anonloader precompute again to retry failures",
                        index, slot, entry.error,
                    )
            results.append(ProcessedImage(entry.image(), entry.face_records(), entry.error))
        return results

    def _miss_error(self, index: int) -> CacheMissError:
        stored = len(self.cache.sample_indices())
        total = self.cache.meta.get("source_size")
        if total is None or total <= stored:
            message = self.cache.missing_message(1, 1)
        else:
            message = self.cache.missing_message(total - stored, total)
        return CacheMissError(f"sample {index}: {message}")

    def process(
        self,
        index: int,
        images: Sequence[SourceImage],
        labels: Sequence[Any] | None,
        detections: Sequence[Detections] | None = None,
    ) -> list[ProcessedImage]:
        """Anonymized images of sample ``index``: from the cache, or computed and stored."""
        keys = self.keys_of(images, labels, detections)
        if self.mode != "write-only":
            hit = self.lookup(index, keys)
            if hit is not None:
                self.counters["hits"] += 1
                return hit
            if self.mode == "read-only":
                self.counters["misses"] += 1
                raise self._miss_error(index)
        self.counters["computed"] += 1
        processed = self.inner.process(index, images, labels, detections)
        encoded = [(key, self.cache.encode(key, p.image, p.records, p.error)) for key, p in zip(keys, processed, strict=True)]
        self.cache.write_encoded(encoded)
        return processed
