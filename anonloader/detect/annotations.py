"""Detections from a dataset's own annotations (``detector=None`` plus boxes/landmarks per sample).

When the annotations give boxes only, the 5 landmarks are estimated from each box with a mean
face layout (:data:`MEAN_FACE_IN_BOX`). Alignment from such estimated points is approximate:
it assumes an upright, frontal face filling a detector-style box, so tilted or profile faces
are aligned loosely (the whole box is still covered by the crop for the usual templates).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anonloader.errors import InputError
from anonloader.types import Detections

__all__ = ["MEAN_FACE_IN_BOX", "detections_from_annotations", "landmarks_from_boxes"]

#: Left eye, right eye, nose, left and right mouth corner as fractions of a tight face box
#: (x from the box's left, y from its top). Typical of MTCNN/SCRFD boxes on frontal faces:
#: on skimage's astronaut MTCNN gives (0.28, 0.36), (0.76, 0.38), (0.50, 0.61), (0.24, 0.70),
#: (0.74, 0.73); the layout below is the symmetric, upright average face.
MEAN_FACE_IN_BOX = torch.tensor(
    [[0.31, 0.39], [0.69, 0.39], [0.50, 0.58], [0.34, 0.76], [0.66, 0.76]], dtype=torch.float32
)


def _as_float_tensor(value: Any, what: str, index: int | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise InputError(
                f"annotation {what} must be numbers (list, numpy array or tensor), got {type(value).__name__}",
                index=index,
            ) from error
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InputError(f"annotation {what} must be real numbers, got dtype {tensor.dtype}", index=index)
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise InputError(f"annotation {what} contain NaN or infinite values", index=index)
    return tensor


def landmarks_from_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Estimate 5 landmarks per box with the mean face layout (approximate alignment).

    Args:
        boxes: ``N,4 float32`` xyxy pixels.

    Returns:
        ``N,5,2 float32`` pixels: left eye, right eye, nose, left and right mouth corner.
    """
    origin = boxes[:, None, :2]
    size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    return origin + MEAN_FACE_IN_BOX.to(boxes.device) * size


def detections_from_annotations(
    boxes: Any, landmarks: Any | None = None, scores: Any | None = None, *, index: int | None = None
) -> Detections:
    """Build :class:`Detections` from a sample's annotated faces.

    Args:
        boxes: ``N,4`` xyxy pixels (list of lists, numpy array or tensor; ``[]`` for no face).
        landmarks: ``N,5,2`` pixels (or ``N,10`` as x1, y1, ..., x5, y5) in the order left eye,
            right eye, nose, left and right mouth corner as seen in the image; None estimates
            them from the boxes with :data:`MEAN_FACE_IN_BOX` (alignment is then approximate).
        scores: ``N`` in [0,1]; None means 1.0 for every face.
        index: the sample's index, named in error messages.

    Raises:
        InputError: wrong shapes, non-numeric or non-finite values, boxes with x2 <= x1 or
            y2 <= y1, scores outside [0,1].
    """
    box_tensor = _as_float_tensor(boxes, "boxes", index)
    if box_tensor.numel() == 0:
        box_tensor = box_tensor.reshape(0, 4)
    if box_tensor.ndim != 2 or box_tensor.shape[1] != 4:
        raise InputError(
            f"annotation boxes must be N,4 (x1, y1, x2, y2 pixels), got shape {tuple(box_tensor.shape)}; "
            "wrap a single box in a list",
            index=index,
        )
    count = box_tensor.shape[0]
    degenerate = (box_tensor[:, 2] <= box_tensor[:, 0]) | (box_tensor[:, 3] <= box_tensor[:, 1])
    if degenerate.any():
        bad = int(degenerate.nonzero()[0, 0])
        raise InputError(
            f"annotation box {bad} {box_tensor[bad].tolist()} is empty (needs x2 > x1 and y2 > y1); "
            "are the boxes x, y, width, height? convert them to x1, y1, x2, y2",
            index=index,
        )
    if landmarks is None:
        landmark_tensor = landmarks_from_boxes(box_tensor)
    else:
        landmark_tensor = _as_float_tensor(landmarks, "landmarks", index)
        if landmark_tensor.numel() == 0 and count == 0:
            landmark_tensor = landmark_tensor.reshape(0, 5, 2)
        if landmark_tensor.ndim == 2 and landmark_tensor.shape[1] == 10:
            landmark_tensor = landmark_tensor.reshape(-1, 5, 2)
        if landmark_tensor.shape != (count, 5, 2):
            raise InputError(
                f"annotation landmarks must be N,5,2 (or N,10) for the {count} boxes, got shape "
                f"{tuple(landmark_tensor.shape)}; pass the 5 points eyes, nose, mouth corners or None",
                index=index,
            )
    if scores is None:
        score_tensor = torch.ones(count, dtype=torch.float32)
    else:
        score_tensor = _as_float_tensor(scores, "scores", index).reshape(-1)
        if score_tensor.shape != (count,):
            raise InputError(
                f"annotation scores must have one value per box ({count}), got {score_tensor.numel()}",
                index=index,
            )
        if ((score_tensor < 0) | (score_tensor > 1)).any():
            raise InputError("annotation scores must be in [0,1]", index=index)
    device = box_tensor.device
    return Detections(
        boxes=box_tensor.contiguous(),
        landmarks=landmark_tensor.to(device).contiguous(),
        scores=score_tensor.to(device).contiguous(),
    )
