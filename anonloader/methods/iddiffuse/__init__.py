"""IDDiffuse (Shaheryar, Lee, Jung): dual-conditional diffusion face anonymization.

Parts (one module each): :mod:`.backbone` (ArcFace IResNet, frozen F_t / recognizer),
:mod:`.recognizers` (the frozen, differentiable recognizers of E_I), :mod:`.identity_mapper`
(E_I MLP, triplet loss eq. 4, hard-negative mining), :mod:`.texture` (E_t, eqs. 5-6),
:mod:`.unet` (dual-condition UNet, eq. 8), :mod:`.losses` (eqs. 1 and 7), :mod:`.network` (all
modules from one config; presets), :mod:`.model` (the ``Method``), :mod:`.training` (Lightning
stages) and :mod:`.train` (command line).

Deviations from the paper, and why: FaRL has no offline torch package here, so E_I defaults to
one ArcFace IResNet (FaceNet optional: the paper's ensemble without FaRL); ``gamma`` blends the
identity condition inside the UNet; the keyed identity mapping (on by default in the pipeline)
recognizes people with dlib and ranks the bank by E_I — all in :mod:`.model`'s docstring, with
how to get closer. The mapper's Lightning module lives in :mod:`.training` so that inference
does not import ``lightning``. Readings of ambiguous points are in each module's docstring. ``diffusers`` is imported by :mod:`.unet` and :mod:`.model`; ``lightning``
only by :mod:`.training` / :mod:`.train`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IDDiffuse", "IDDiffuseNetwork"]


def __getattr__(name: str) -> Any:
    if name == "IDDiffuse":
        from anonloader.methods.iddiffuse.model import IDDiffuse

        return IDDiffuse
    if name == "IDDiffuseNetwork":
        from anonloader.methods.iddiffuse.network import IDDiffuseNetwork

        return IDDiffuseNetwork
    raise AttributeError(name)
