"""The anonymized-image cache: on-disk format, LMDB store, training view, keys, codecs, shards
and manifest, precompute.

Imported only when used (``import anonloader`` never imports lmdb or xxhash)::

    from anonloader.cache import AnonCache, precompute
    dataset = AnonCache("faces.lmdb").as_dataset()
"""

from __future__ import annotations

# Bound eagerly: ``precompute`` is both a submodule and a function, and a lazy attribute would
# be shadowed by the submodule as soon as anything imported ``anonloader.cache.precompute``.
from anonloader.cache.codecs import get_codec
from anonloader.cache.dataset import CachedDataset
from anonloader.cache.keys import CacheKeys, cache_key, derive_salt
from anonloader.cache.manifest import write_manifest
from anonloader.cache.precompute import precompute
from anonloader.cache.stage import CachedStage
from anonloader.cache.store import AnonCache

__all__ = [
    "AnonCache",
    "CacheKeys",
    "CachedDataset",
    "CachedStage",
    "cache_key",
    "derive_salt",
    "get_codec",
    "precompute",
    "write_manifest",
]
