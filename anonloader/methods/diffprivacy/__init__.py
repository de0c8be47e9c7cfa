"""Diff-Privacy: diffusion-based face anonymization and visual identity hiding with recovery keys.

Imports diffusers and transformers; :mod:`anonloader` imports this package only when
``method="diffprivacy"`` is asked for.
"""

from __future__ import annotations

from .backbone import (
    Backbone,
    build_tiny_backbone,
    load_backbone,
    locate_backbone,
    save_backbone,
)
from .keys import RecoveryKey
from .model import DiffPrivacy
from .msi import MSI
from .sampler import SamplingSettings

__all__ = [
    "MSI",
    "Backbone",
    "DiffPrivacy",
    "RecoveryKey",
    "SamplingSettings",
    "build_tiny_backbone",
    "load_backbone",
    "locate_backbone",
    "save_backbone",
]
