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


def detect_faces(image: torch.Tensor, min_score: float = 0.95) -> Detections:
    """MTCNN detections of ``image`` (``3,H,W float in [0,1]``), sorted left to right."""
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    boxes, scores, landmarks = _mtcnn().detect(array, landmarks=True)
    if boxes is None:
        return Detections.empty()
    keep = np.asarray(scores, dtype=np.float64) >= min_score
    boxes = np.asarray(np.stack(list(boxes[keep])), dtype=np.float32)
    landmarks = np.asarray(np.stack(list(landmarks[keep])), dtype=np.float32)
    scores = np.asarray(scores[keep], dtype=np.float32)
    order = np.argsort(boxes[:, 0])
    return Detections(torch.from_numpy(boxes[order]), torch.from_numpy(landmarks[order]), torch.from_numpy(scores[order]))


def aligned_crops(image: torch.Tensor, detections: Detections | None = None, crop_size: int = 112) -> torch.Tensor:
    """``F,3,S,S`` arcface-aligned crops of every face in ``image``."""
    from anonloader.align import align_faces

    detections = detect_faces(image) if detections is None else detections
    return align_faces([image], [detections], crop_size=crop_size, template="arcface").crops
