"""The method protocol every anonymization method follows."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from anonloader.types import FaceConditions

__all__ = ["Method"]


@runtime_checkable
class Method(Protocol):
    """Replaces the faces in a batch of aligned crops.

    Attributes:
        name: registry name, e.g. ``"blur"`` or ``"fams"``.
        crop_size: side in pixels of the square crops the method wants.
        template: name of the alignment template (see :mod:`anonloader.align`).

    ``__call__(crops, conditions)`` takes ``F,3,S,S float32 in [0,1]`` crops and one
    :class:`~anonloader.types.FaceConditions` entry per crop, and returns ``F,3,S,S float32 in
    [0,1]`` crops on the same device. It must be deterministic given the conditions' seeds.
    Raises :class:`~anonloader.errors.MethodError` on failure.

    ``config()`` returns a JSON-able dict of every parameter that changes output pixels,
    including hashes of weight files; it feeds the pipeline fingerprint.

    Optional attributes the pipeline reads when present: ``margin`` (alignment margin, default
    0) and ``paste_color_match`` (whether paste-back matches the generated face's colours to the
    original's, default True; the classical baselines keep their own colours).
    """

    name: str
    crop_size: int
    template: str

    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...
