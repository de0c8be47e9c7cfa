"""anonloader: privacy-preserving data loading for PyTorch.

Every face in a training set is replaced by a synthetic person — the same synthetic person for
every image of the same real person — while pose, expression, background and labels are kept.

    >>> import anonloader
    >>> dataset = anonloader.anonymize(dataset, method="blur")  # doctest: +SKIP

The public surface is small and loaded lazily: ``import anonloader`` imports no model code,
no triton, lmdb, diffusers or lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Anonymizer": "anonloader.pipeline",
    "AnonymizationResult": "anonloader.pipeline",
    "anonymize": "anonloader.data.dataset",
    "collate_skip_dropped": "anonloader.data.dataset",
    "Detections": "anonloader.types",
    "FaceConditions": "anonloader.types",
    "FaceRecord": "anonloader.types",
    "AlignedFaces": "anonloader.types",
    "align_faces": "anonloader.align",
    "get_method": "anonloader.methods",
    "load_detector": "anonloader.detect",
    "AnonCache": "anonloader.cache.store",
    "precompute": "anonloader.cache.precompute",
    "IdentityBank": "anonloader.identity.bank",
    "KeyedIdentityAssigner": "anonloader.identity.assigner",
    "errors": "anonloader.errors",
    "audit": "anonloader.audit",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from anonloader import errors
    from anonloader.align import align_faces
    from anonloader.audit import audit
    from anonloader.cache.precompute import precompute
    from anonloader.cache.store import AnonCache
    from anonloader.data.dataset import anonymize, collate_skip_dropped
    from anonloader.detect import load_detector
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.identity.bank import IdentityBank
    from anonloader.methods import get_method
    from anonloader.pipeline import AnonymizationResult, Anonymizer
    from anonloader.types import AlignedFaces, Detections, FaceConditions, FaceRecord


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anonloader' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "errors":
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
