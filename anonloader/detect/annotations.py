"""Detections from a dataset's own annotations (``detector=None`` plus boxes/landmarks per sample).

Annotations are checked before they are trusted (:func:`check_detections`): boxes and
landmarks must be finite, each box must have at least half its width and height inside the
image, each landmark must lie within its box grown by half the box's size on every side, and
boxes (or landmarks) whose every coordinate is <= 1.5 on an image larger than 16 pixels are
taken for [0,1] units (a face of 1.5 pixels cannot be anonymized anyway). A bad annotation is an
:class:`~anonloader.errors.AnnotationError` naming the sample, never a face left as it was.

When the annotations give boxes only, the 5 landmarks are estimated from each box with a mean
face layout (:data:`MEAN_FACE_IN_BOX`). Alignment from such estimated points is approximate:
it assumes an upright, frontal face filling a detector-style box, so tilted or profile faces
are aligned loosely (the whole box is still covered by the crop for the usual templates).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anonloader.errors import AnnotationError
from anonloader.types import Detections

__all__ = ["MEAN_FACE_IN_BOX", "NORMALISED_LIMIT", "check_detections", "detections_from_annotations", "landmarks_from_boxes"]

#: Left eye, right eye, nose, left and right mouth corner as fractions of a tight face box
#: (x from the box's left, y from its top). Typical of MTCNN/SCRFD boxes on frontal faces:
#: on skimage's astronaut MTCNN gives (0.28, 0.36), (0.76, 0.38), (0.50, 0.61), (0.24, 0.70),
#: (0.74, 0.73); the layout below is the symmetric, upright average face.
MEAN_FACE_IN_BOX = torch.tensor(
    [[0.31, 0.39], [0.69, 0.39], [0.50, 0.58], [0.34, 0.76], [0.66, 0.76]], dtype=torch.float32
)


#: boxes whose every coordinate is at most this, on an image with a side over 16 pixels, are
#: taken for [0,1] units
NORMALISED_LIMIT = 1.5
#: a box may reach this fraction of its own width / height beyond the image border
BOX_OUTSIDE = 0.5
#: landmarks may lie this fraction of their box's width / height outside it
LANDMARK_OUTSIDE = 0.5


def _as_float_tensor(value: Any, what: str, index: int | None, field: str | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise AnnotationError(
                f"annotation {what} must be numbers (list, numpy array or tensor), got {type(value).__name__}",
                index=index, field=field,
            ) from error
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise AnnotationError(f"annotation {what} must be real numbers, got dtype {tensor.dtype}", index=index, field=field)
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise AnnotationError(f"annotation {what} contain NaN or infinite values", index=index, field=field)
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


def check_detections(
    detections: Detections, image_size: tuple[int, int], *, index: int | None = None, field: str | None = None
) -> Detections:
    """Raise unless ``detections`` can be trusted for an image of ``image_size``.

    Args:
        detections: boxes ``N,4`` xyxy pixels, landmarks ``N,5,2`` pixels, scores ``N`` in [0,1].
        image_size: ``(H, W)`` of the image they belong to, in pixels.
        index: the sample's index, named in error messages.
        field: the image's field in the sample (e.g. ``"['img']"``), named in error messages.

    Returns:
        ``detections`` itself.

    Raises:
        AnnotationError: non-finite values, empty boxes, boxes in [0,1] units, boxes mostly
            outside the image, landmarks far from their box, scores outside [0,1].
    """

    def fail(message: str) -> AnnotationError:
        return AnnotationError(message, index=index, field=field)

    height, width = int(image_size[0]), int(image_size[1])
    boxes = detections.boxes.detach().float().cpu()
    landmarks = detections.landmarks.detach().float().cpu()
    scores = detections.scores.detach().float().cpu()
    if len(boxes) == 0:
        return detections
    for name, values in (("boxes", boxes), ("landmarks", landmarks), ("scores", scores)):
        if not bool(torch.isfinite(values).all()):
            face = int((~torch.isfinite(values.reshape(len(values), -1))).any(1).nonzero()[0, 0])
            raise fail(f"annotation {name} of face {face} contain NaN or infinite values; fix or remove that face's annotation")
    if ((scores < 0) | (scores > 1)).any():
        raise fail("annotation scores must be in [0,1]")
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if degenerate.any():
        bad = int(degenerate.nonzero()[0, 0])
        raise fail(
            f"annotation box {bad} {boxes[bad].tolist()} is empty (needs x2 > x1 and y2 > y1); "
            "are the boxes x, y, width, height? convert them to x1, y1, x2, y2"
        )
    if max(height, width) > 16 and float(boxes.abs().max()) <= NORMALISED_LIMIT:
        raise fail(
            f"annotation boxes look normalised to [0,1] (every coordinate <= {NORMALISED_LIMIT}) on a "
            f"{width}x{height} image; pass pixels: multiply x by the width and y by the height "
            "(landmarks too)"
        )
    if max(height, width) > 16 and float(landmarks.abs().max()) <= NORMALISED_LIMIT:
        raise fail(
            f"annotation landmarks look normalised to [0,1] (every coordinate <= {NORMALISED_LIMIT}) on a "
            f"{width}x{height} image while the boxes are pixels; pass landmarks in pixels: multiply x by "
            "the width and y by the height"
        )
    size = boxes[:, 2:] - boxes[:, :2]  # N,2 (w, h)
    low = -BOX_OUTSIDE * size
    high = torch.tensor([width, height], dtype=torch.float32) + BOX_OUTSIDE * size
    outside = (boxes[:, :2] < low).any(1) | (boxes[:, 2:] > high).any(1)
    if outside.any():
        bad = int(outside.nonzero()[0, 0])
        raise fail(
            f"annotation box {bad} {[round(v, 1) for v in boxes[bad].tolist()]} lies mostly outside the "
            f"{width}x{height} image; are the annotations for another image size, or x and y swapped?"
        )
    grown_low = (boxes[:, None, :2] - LANDMARK_OUTSIDE * size[:, None, :])
    grown_high = (boxes[:, None, 2:] + LANDMARK_OUTSIDE * size[:, None, :])
    far = ((landmarks < grown_low) | (landmarks > grown_high)).any(2)  # N,5
    if far.any():
        face, point = (int(v) for v in far.nonzero()[0])
        raise fail(
            f"annotation landmark {point} of face {face} {[round(v, 1) for v in landmarks[face, point].tolist()]} "
            f"is far from its box {[round(v, 1) for v in boxes[face].tolist()]}; landmarks must be pixels "
            "(not [0,1] units) in the same face order as the boxes"
        )
    return detections


def detections_from_annotations(
    boxes: Any,
    landmarks: Any | None = None,
    scores: Any | None = None,
    *,
    index: int | None = None,
    image_size: tuple[int, int] | None = None,
    field: str | None = None,
) -> Detections:
    """Build :class:`Detections` from a sample's annotated faces.

    Args:
        boxes: ``N,4`` xyxy pixels (list of lists, numpy array or tensor; ``[]`` for no face).
        landmarks: ``N,5,2`` pixels (or ``N,10`` as x1, y1, ..., x5, y5) in the order left eye,
            right eye, nose, left and right mouth corner as seen in the image; None estimates
            them from the boxes with :data:`MEAN_FACE_IN_BOX` (alignment is then approximate).
        scores: ``N`` in [0,1]; None means 1.0 for every face.
        index: the sample's index, named in error messages.
        image_size: ``(H, W)`` of the image; when given the faces are checked against it with
            :func:`check_detections`.
        field: the image's field in the sample, named in error messages.

    Raises:
        AnnotationError: wrong shapes, non-numeric or non-finite values, boxes with x2 <= x1
            or y2 <= y1, scores outside [0,1]; with ``image_size``, everything
            :func:`check_detections` refuses.
    """
    box_tensor = _as_float_tensor(boxes, "boxes", index, field)
    if box_tensor.numel() == 0:
        box_tensor = box_tensor.reshape(0, 4)
    if box_tensor.ndim != 2 or box_tensor.shape[1] != 4:
        raise AnnotationError(
            f"annotation boxes must be N,4 (x1, y1, x2, y2 pixels), got shape {tuple(box_tensor.shape)}; "
            "wrap a single box in a list",
            index=index, field=field,
        )
    count = box_tensor.shape[0]
    degenerate = (box_tensor[:, 2] <= box_tensor[:, 0]) | (box_tensor[:, 3] <= box_tensor[:, 1])
    if degenerate.any():
        bad = int(degenerate.nonzero()[0, 0])
        raise AnnotationError(
            f"annotation box {bad} {box_tensor[bad].tolist()} is empty (needs x2 > x1 and y2 > y1); "
            "are the boxes x, y, width, height? convert them to x1, y1, x2, y2",
            index=index, field=field,
        )
    if landmarks is None:
        landmark_tensor = landmarks_from_boxes(box_tensor)
    else:
        landmark_tensor = _as_float_tensor(landmarks, "landmarks", index, field)
        if landmark_tensor.numel() == 0 and count == 0:
            landmark_tensor = landmark_tensor.reshape(0, 5, 2)
        if landmark_tensor.ndim == 2 and landmark_tensor.shape[1] == 10:
            landmark_tensor = landmark_tensor.reshape(-1, 5, 2)
        if landmark_tensor.shape != (count, 5, 2):
            raise AnnotationError(
                f"annotation landmarks must be N,5,2 (or N,10) for the {count} boxes, got shape "
                f"{tuple(landmark_tensor.shape)}; pass the 5 points eyes, nose, mouth corners or None",
                index=index, field=field,
            )
    if scores is None:
        score_tensor = torch.ones(count, dtype=torch.float32)
    else:
        score_tensor = _as_float_tensor(scores, "scores", index, field).reshape(-1)
        if score_tensor.shape != (count,):
            raise AnnotationError(
                f"annotation scores must have one value per box ({count}), got {score_tensor.numel()}",
                index=index, field=field,
            )
        if ((score_tensor < 0) | (score_tensor > 1)).any():
            raise AnnotationError("annotation scores must be in [0,1]", index=index, field=field)
    device = box_tensor.device
    detections = Detections(
        boxes=box_tensor.contiguous(),
        landmarks=landmark_tensor.to(device).contiguous(),
        scores=score_tensor.to(device).contiguous(),
    )
    return detections if image_size is None else check_detections(detections, image_size, index=index, field=field)
