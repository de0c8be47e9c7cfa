"""Identity: recognizers, real-identity keys, the keyed real-to-synthetic mapping, synthetic
identity banks. Imported lazily (dlib and onnxruntime load only when an embedder runs)::

    from anonloader.identity import IdentityBank, KeyedIdentityAssigner
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "EmbeddingStore",
    "IdentityAssigner",
    "IdentityAssignment",
    "IdentityBank",
    "KeyedIdentityAssigner",
    "KeyedMapper",
    "VectorIndex",
    "load_embedder",
]

_EXPORTS = {
    "EmbeddingStore": "anonloader.identity.store",
    "IdentityAssigner": "anonloader.identity.base",
    "IdentityAssignment": "anonloader.identity.base",
    "IdentityBank": "anonloader.identity.bank",
    "KeyedIdentityAssigner": "anonloader.identity.assigner",
    "KeyedMapper": "anonloader.identity.mapper",
    "VectorIndex": "anonloader.identity.index",
    "load_embedder": "anonloader.identity.embedders",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anonloader.identity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
