"""DiffDeID (ICLR 2025 submission, "a multi-conditional diffusion-based method for high fidelity
face de-identification with diversity"): LDS identity and 3DMM-identity sampling, a
multi-condition pixel UNet (AdaIN, texture attention).

Parts (one module each): :mod:`.network` (the UNet, AdaIN, texture attention, presets),
:mod:`.conditions` (face reconstructor, renderer and masker protocols, real loaders and offline
stand-ins), :mod:`.model` (the ``Method``), :mod:`.video` (sec. 3.4: one identity and texture per
track, ``DiffDeIDVideo.clip_faces``), :mod:`.training` (Lightning module, eqs. 8-11) and
:mod:`.train` (command line). The LDS lives in :mod:`anonloader.identity.sampler`.
``lightning`` is imported only by :mod:`.training` / :mod:`.train`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DiffDeID", "DiffDeIDUNet", "DiffDeIDVideo"]


def __getattr__(name: str) -> Any:
    if name == "DiffDeID":
        from anonloader.methods.diffdeid.model import DiffDeID

        return DiffDeID
    if name == "DiffDeIDUNet":
        from anonloader.methods.diffdeid.network import DiffDeIDUNet

        return DiffDeIDUNet
    if name == "DiffDeIDVideo":
        from anonloader.methods.diffdeid.video import DiffDeIDVideo

        return DiffDeIDVideo
    raise AttributeError(name)
