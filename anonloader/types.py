"""Shared types the pipeline stages talk through.

Conventions used everywhere in anonloader:

- ``images``: a list of ``3,H,W float32 in [0,1]`` RGB tensors, sizes may differ per image.
- ``boxes``: ``N,4 float32`` as ``x1, y1, x2, y2`` in pixels of the image they belong to.
- ``landmarks``: ``N,5,2 float32`` in pixels, ordered left eye, right eye, nose, left mouth
  corner, right mouth corner (left/right as seen in the image).
- ``affine``: ``N,2,3 float32`` mapping image pixel coordinates to crop pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["AlignedFaces", "Detections", "FaceConditions", "FaceRecord", "FaceStatus"]

FaceStatus = Literal["anonymized", "failed", "obscured"]


@dataclass(frozen=True)
class Detections:
    """The faces found in one image.

    Attributes:
        boxes: ``N,4 float32``, ``x1, y1, x2, y2`` in pixels.
        landmarks: ``N,5,2 float32`` in pixels (eyes, nose, mouth corners).
        scores: ``N float32`` in [0,1].
    """

    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.shape != (n, 4) or self.landmarks.shape != (n, 5, 2) or self.scores.shape != (n,):
            raise ValueError(
                "Detections expects boxes N,4, landmarks N,5,2 and scores N; got "
                f"{tuple(self.boxes.shape)}, {tuple(self.landmarks.shape)}, {tuple(self.scores.shape)}"
            )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(torch.zeros(0, 4), torch.zeros(0, 5, 2), torch.zeros(0))

    def select(self, keep: torch.Tensor) -> Detections:
        """The detections at the boolean mask or index tensor ``keep``."""
        return Detections(self.boxes[keep], self.landmarks[keep], self.scores[keep])


@dataclass(frozen=True)
class AlignedFaces:
    """Faces of a batch of images warped to canonical crops.

    Attributes:
        crops: ``F,3,S,S float32 in [0,1]``, one per face of the whole batch.
        affines: ``F,2,3 float32``, image pixels -> crop pixels.
        image_index: ``F int64``, which image of the batch each face came from.
    """

    crops: torch.Tensor
    affines: torch.Tensor
    image_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.crops.shape[0])


@dataclass
class FaceConditions:
    """Per-face inputs a method may use besides the crop; every list has one entry per face.

    Attributes:
        seeds: 63-bit integer seeds derived from the face's identity key (deterministic).
        identity_keys: keyed digests (hex) of the real identity, or None when unknown.
        synthetic_ids: index into the synthetic identity bank, or None when no mapper is used.
        landmarks: ``F,5,2 float32`` landmarks in crop pixels.
        extra: method-specific conditions (e.g. source images for face swap), by name.
    """

    seeds: list[int]
    identity_keys: list[str | None]
    synthetic_ids: list[int | None]
    landmarks: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class FaceRecord:
    """What happened to one face: where it was, and whether it was anonymized.

    ``box`` is ``4 float32`` (x1, y1, x2, y2 pixels), ``landmarks`` ``5,2 float32`` pixels.
    ``revalidated`` is True for a face the detector missed and revalidation found on the output.
    """

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float
    status: FaceStatus
    synthetic_id: int | None = None
    error: str | None = None
    revalidated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "landmarks": [list(p) for p in self.landmarks],
            "score": self.score,
            "status": self.status,
            "synthetic_id": self.synthetic_id,
            "error": self.error,
            "revalidated": self.revalidated,
        }
