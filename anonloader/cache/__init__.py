"""The anonymized-image cache: LMDB store, keys, codecs, shards and manifest, precompute.

Imported only when used (``import anonloader`` never imports lmdb or xxhash)::

    from anonloader.cache import AnonCache, precompute
    dataset = AnonCache("faces.lmdb").as_dataset()
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AnonCache", "CachedStage", "cache_key", "derive_salt", "get_codec", "precompute", "write_manifest"]

_EXPORTS = {
    "AnonCache": "anonloader.cache.store",
    "CachedStage": "anonloader.cache.stage",
    "cache_key": "anonloader.cache.keys",
    "derive_salt": "anonloader.cache.keys",
    "get_codec": "anonloader.cache.codecs",
    "precompute": "anonloader.cache.precompute",
    "write_manifest": "anonloader.cache.manifest",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anonloader.cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
