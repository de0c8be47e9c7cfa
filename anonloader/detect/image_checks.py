"""Checks every detector runs on its input batch, and the empty result on a device."""

from __future__ import annotations

import torch

from anonloader.errors import UnsupportedImageError
from anonloader.types import Detections

__all__ = ["check_images", "empty_detections"]


def check_images(images: list[torch.Tensor], *, detector: str) -> None:
    """Raise unless ``images`` is a list of ``3,H,W`` floating-point tensors.

    Raises:
        UnsupportedImageError: naming the index of the first bad entry and what to pass instead.
    """
    if isinstance(images, torch.Tensor):
        raise UnsupportedImageError(
            f"{detector} detector takes a list of 3,H,W tensors, got one tensor of shape "
            f"{tuple(images.shape)}; pass list(batch) for a B,3,H,W batch"
        )
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor):
            raise UnsupportedImageError(
                f"{detector} detector expects a 3,H,W float tensor in [0,1], got {type(image).__name__}",
                index=index,
            )
        if image.ndim != 3 or image.shape[0] != 3:
            raise UnsupportedImageError(
                f"{detector} detector expects a 3,H,W RGB tensor, got shape {tuple(image.shape)}; "
                "convert grayscale/RGBA to RGB first",
                index=index,
            )
        if not image.is_floating_point():
            raise UnsupportedImageError(
                f"{detector} detector expects float values in [0,1], got dtype {image.dtype}; "
                "divide uint8 images by 255",
                index=index,
            )


def empty_detections(device: torch.device | str = "cpu") -> Detections:
    """No faces: boxes ``0,4``, landmarks ``0,5,2``, scores ``0`` on ``device``."""
    return Detections(
        torch.zeros(0, 4, device=device), torch.zeros(0, 5, 2, device=device), torch.zeros(0, device=device)
    )
