"""Fused kernels with plain-torch references: multi-source attention, paste-back, patch statistics.

Each op lives in its own module (``attention``, ``paste_back``, ``patch_stats``) holding the
reference, the Triton kernel launcher and the dispatch (Triton for CUDA tensors, the reference
elsewhere). The op modules import only torch at import time; triton, kornia and diffusers load
inside the functions that need them, and nothing queries CUDA at import time.

The functions are bound eagerly (not through a lazy ``__getattr__``) because ``paste_back`` and
``patch_stats`` are also submodule names: a lazy binding would be shadowed by the submodule.
"""

from __future__ import annotations

from .attention import KV, BlendedKV, BlendedStates, MultiSourceAttnProcessor, multi_source_attention
from .paste_back import paste_back
from .patch_stats import patch_stats

__all__ = ["KV", "BlendedKV", "BlendedStates", "MultiSourceAttnProcessor", "multi_source_attention", "patch_stats", "paste_back"]
