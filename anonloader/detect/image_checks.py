"""Checks every detector runs on its input batch, the empty result on a device, and the
size-grouped batch loop the native backends share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from anonloader.errors import DetectionError, ModelLoadError, UnsupportedImageError
from anonloader.types import Detections

__all__ = ["check_images", "detect_by_size", "empty_detections"]


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


def detect_by_size(
    images: list[torch.Tensor],
    detect_same_size: Callable[[list[torch.Tensor]], list[Detections]],
    *,
    detector: str,
    min_side: int = 1,
) -> list[Detections]:
    """Runs ``detect_same_size`` once per group of equal-sized images (one network batch each).

    Args:
        images: ``3,H,W float in [0,1]`` tensors, already checked; sizes may differ.
        detect_same_size: the backend on a list of images of one size.
        detector: the backend's name, for error messages.
        min_side: images with a shorter side than this get no faces without running the backend.

    Raises:
        DetectionError: the backend failed on an image alone (a failing group is retried one by
            one, so the message names the image); ModelLoadError passes through as it is.
    """
    results: list[Detections | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        height, width = (int(v) for v in image.shape[-2:])
        if min(height, width) < min_side:
            results[index] = empty_detections(image.device)
            continue
        groups.setdefault((height, width), []).append(index)
    for indices in groups.values():
        try:
            found = detect_same_size([images[i] for i in indices])
        except ModelLoadError:
            raise
        except Exception:  # noqa: BLE001 - rerun one by one to name the image that fails
            found = [_detect_one_named(images[i], i, detect_same_size, detector) for i in indices]
        for index, detections in zip(indices, found, strict=True):
            results[index] = detections
    return results  # type: ignore[return-value]


def _detect_one_named(
    image: torch.Tensor, index: int, detect_same_size: Callable[[list[torch.Tensor]], list[Detections]], detector: str
) -> Detections:
    try:
        return detect_same_size([image])[0]
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - backend errors become DetectionError
        raise DetectionError(
            f"{detector} failed on image {index} of the batch (shape {tuple(image.shape)}): "
            f"{type(error).__name__}: {error}; check the image or choose another detector"
        ) from error
