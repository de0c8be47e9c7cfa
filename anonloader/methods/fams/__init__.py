"""FAMS ("Face Anonymization Made Simple"): ReferenceNet diffusion anonymization and face swap.

Imports diffusers and transformers; :mod:`anonloader` imports this package only when
``method="fams"`` is asked for.
"""

from __future__ import annotations

from .components import ClipInput, FAMSComponents, build_tiny_components
from .model import FAMS
from .pipeline import SamplingSettings, sample_faces
from .referencenet import ReferenceNet

__all__ = ["FAMS", "ClipInput", "FAMSComponents", "ReferenceNet", "SamplingSettings", "build_tiny_components", "sample_faces"]
