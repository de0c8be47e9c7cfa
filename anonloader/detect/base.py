"""The detector protocol every backend follows."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from anonloader.types import Detections

__all__ = ["Detector"]


@runtime_checkable
class Detector(Protocol):
    """Finds faces and their 5 landmarks in a batch of images.

    ``__call__(images)`` takes a list of ``3,H,W float32 in [0,1]`` RGB tensors (sizes may
    differ) and returns one :class:`~anonloader.types.Detections` per image, in pixels of that
    image. Raises :class:`~anonloader.errors.DetectionError` when the backend fails.

    ``config()`` returns a JSON-able dict of everything that changes the detections (backend,
    weights hash, thresholds, input size, NMS); it feeds the pipeline fingerprint.
    """

    name: str

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]: ...

    def config(self) -> dict[str, Any]: ...
