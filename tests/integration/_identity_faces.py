"""Real faces for the identity and evaluation tests: MTCNN (facenet-pytorch's shipped weights)
landmarks on the packaged photos, aligned with anonloader's own alignment."""

from __future__ import annotations

import functools

import numpy as np
import torch

from anonloader.types import Detections


@functools.lru_cache(maxsize=8)
def _mtcnn():
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, device="cpu")


def detect_faces(image: torch.Tensor, min_score: float = 0.95, scale: float = 0.5) -> Detections:
    """MTCNN detections of ``image`` (``3,H,W float in [0,1]``), sorted left to right; detection
    runs on the image resized by ``scale`` (faster), results are in full-resolution pixels."""
    small = torch.nn.functional.interpolate(image[None], scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)[0]
    array = (small.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    boxes, scores, landmarks = _mtcnn().detect(array, landmarks=True)
    if boxes is None:
        return Detections.empty()
    keep = np.asarray(scores, dtype=np.float64) >= min_score
    boxes = np.asarray(np.stack(list(boxes[keep])), dtype=np.float32) / scale
    landmarks = np.asarray(np.stack(list(landmarks[keep])), dtype=np.float32) / scale
    scores = np.asarray(scores[keep], dtype=np.float32)
    order = np.argsort(boxes[:, 0])
    return Detections(torch.from_numpy(boxes[order]), torch.from_numpy(landmarks[order]), torch.from_numpy(scores[order]))


def aligned_crops(image: torch.Tensor, detections: Detections | None = None, crop_size: int = 112) -> torch.Tensor:
    """``F,3,S,S`` arcface-aligned crops of every face in ``image``."""
    from anonloader.align import align_faces

    detections = detect_faces(image) if detections is None else detections
    return align_faces([image], [detections], crop_size=crop_size, template="arcface").crops


@functools.lru_cache(maxsize=4)
def t1_crops(changed: bool = False) -> torch.Tensor:
    """t1's six arcface-aligned 112 crops (left to right); with ``changed``, from the photo
    rescaled to 80 %, brightened (x1.15 + 0.03) and rotated by 3 degrees (same people, other pixels)."""
    from anonloader.assets import sample_photo

    image = torch.from_numpy(np.asarray(sample_photo("t1"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    if changed:
        image = changed_photo(image)
    return aligned_crops(image)


def changed_photo(image: torch.Tensor) -> torch.Tensor:
    """Rescaled to 80 %, brightened and rotated by 3 degrees."""
    import kornia

    small = torch.nn.functional.interpolate(image[None], scale_factor=0.8, mode="bilinear", antialias=True, align_corners=False)
    bright = (small * 1.15 + 0.03).clamp(0, 1)
    return kornia.geometry.transform.rotate(bright, torch.tensor([3.0]), padding_mode="reflection")[0].clamp(0, 1)
