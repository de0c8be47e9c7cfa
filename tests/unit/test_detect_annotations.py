"""Detections from dataset annotations, and load_detector's handling of names and objects."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from anonloader.detect import (
    DETECTORS,
    MEAN_FACE_IN_BOX,
    Detector,
    detections_from_annotations,
    landmarks_from_boxes,
    load_detector,
)
from anonloader.detect.annotations import check_detections
from anonloader.errors import AnnotationError, ConfigError, InputError
from anonloader.types import Detections

BOXES = [[10.0, 20.0, 110.0, 140.0], [200.0, 50.0, 250.0, 110.0]]
LANDMARKS = [
    [[40, 60], [80, 60], [60, 90], [45, 115], [75, 115]],
    [[215, 75], [235, 75], [225, 88], [217, 98], [233, 98]],
]


@pytest.mark.parametrize("kind", ["list", "numpy", "tensor"])
def test_accepts_lists_numpy_and_tensors(kind):
    convert = {"list": lambda x: x, "numpy": np.asarray, "tensor": torch.tensor}[kind]
    detections = detections_from_annotations(convert(BOXES), convert(LANDMARKS), convert([0.9, 0.8]))
    assert isinstance(detections, Detections) and len(detections) == 2
    assert detections.boxes.dtype == detections.landmarks.dtype == detections.scores.dtype == torch.float32
    torch.testing.assert_close(detections.boxes, torch.tensor(BOXES))
    torch.testing.assert_close(detections.landmarks, torch.tensor(LANDMARKS, dtype=torch.float32))
    torch.testing.assert_close(detections.scores, torch.tensor([0.9, 0.8]))


def test_flat_landmarks_and_default_scores():
    flat = np.asarray(LANDMARKS, dtype=np.float64).reshape(2, 10)
    detections = detections_from_annotations(BOXES, flat)
    torch.testing.assert_close(detections.landmarks, torch.tensor(LANDMARKS, dtype=torch.float32))
    torch.testing.assert_close(detections.scores, torch.ones(2))


def test_estimated_landmarks_follow_the_mean_face_layout():
    detections = detections_from_annotations(BOXES)
    # box 0 is 100 wide, 120 tall from (10, 20): left eye at (10 + 0.31*100, 20 + 0.39*120)
    assert detections.landmarks[0, 0].tolist() == pytest.approx([41.0, 66.8])
    expected = torch.tensor(BOXES)[:, None, :2] + MEAN_FACE_IN_BOX * torch.tensor([[100.0, 120.0], [50.0, 60.0]])[:, None]
    torch.testing.assert_close(detections.landmarks, expected)
    lm = detections.landmarks
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, :2, 1].amax(1) < lm[:, 3:, 1].amin(1)).all()
    torch.testing.assert_close(landmarks_from_boxes(torch.tensor(BOXES)), lm)


def test_no_faces():
    for empty in ([], np.zeros((0, 4)), torch.zeros(0, 4)):
        detections = detections_from_annotations(empty)
        assert len(detections) == 0 and detections.landmarks.shape == (0, 5, 2)
    assert len(detections_from_annotations([], [], [])) == 0


@pytest.mark.parametrize(
    ("boxes", "landmarks", "scores", "match"),
    [
        ([10, 20, 110, 140], None, None, "N,4"),
        ([[10, 20, 110]], None, None, "N,4"),
        ([[10, 20, 5, 140]], None, None, "x2 > x1"),
        ([[10, 20, 110, float("nan")]], None, None, "NaN"),
        ([["a", 1, 2, 3]], None, None, "numbers"),
        (BOXES, LANDMARKS[:1], None, "N,5,2"),
        (BOXES, [[[1, 2]] * 4] * 2, None, "N,5,2"),
        (BOXES, LANDMARKS, [0.5], "one value per box"),
        (BOXES, LANDMARKS, [0.5, 1.5], r"\[0,1\]"),
    ],
)
def test_bad_annotations_raise_input_errors_naming_the_sample(boxes, landmarks, scores, match):
    with pytest.raises(InputError, match=match) as caught:
        detections_from_annotations(boxes, landmarks, scores, index=7)
    assert "sample 7" in str(caught.value)


# BOXES / LANDMARKS sit inside a 300 x 200 (W x H) image
SIZE = (200, 300)


def test_checked_annotations_inside_the_image_pass():
    detections = detections_from_annotations(BOXES, LANDMARKS, image_size=SIZE, index=1)
    assert check_detections(detections, SIZE) is detections
    # a face cut by the border: less than half of the box beyond it is fine
    assert len(detections_from_annotations([[-40, 100, 60, 230]], image_size=SIZE)) == 1


@pytest.mark.parametrize(
    ("boxes", "landmarks", "match"),
    [
        # [0,1] units on a 300x200 image
        ((np.asarray(BOXES) / [300, 200, 300, 200]).tolist(), None, "look normalised.*pass pixels"),
        # pixels, but for another image size (2x)
        ((np.asarray(BOXES) * 2).tolist(), None, "box 1 .* lies mostly outside the 300x200 image"),
        # x and y swapped
        ([[b[1], b[0], b[3], b[2]] for b in BOXES], None, "outside"),
        # landmarks in [0,1] units beside pixel boxes
        (BOXES, (np.asarray(LANDMARKS) / [300, 200]).tolist(), "landmarks look normalised"),
        # one face's landmarks in [0,1] units: box 1 is far from the origin
        (BOXES, [LANDMARKS[0], (np.asarray(LANDMARKS[1]) / [300, 200]).tolist()], "landmark 0 of face 1 .* far from its box"),
        # landmarks of the faces in the other order
        (BOXES, LANDMARKS[::-1], "far from its box"),
    ],
)
def test_annotations_in_the_wrong_units_or_place_are_named_errors(boxes, landmarks, match):
    with pytest.raises(AnnotationError, match=match) as caught:
        detections_from_annotations(boxes, landmarks, index=4, image_size=SIZE, field="['img']")
    assert str(caught.value).startswith("sample 4 / field ['img']: ")


def test_detections_objects_with_nan_landmarks_are_refused():
    landmarks = torch.tensor(LANDMARKS, dtype=torch.float32)
    landmarks[1, 2, 0] = float("nan")
    detections = Detections(torch.tensor(BOXES), landmarks, torch.ones(2))
    with pytest.raises(AnnotationError, match="landmarks of face 1 contain NaN"):
        check_detections(detections, SIZE, index=0)


def test_tiny_images_are_not_taken_for_normalised_boxes():
    # a 2x2-pixel face on a 16x16 image is in pixels, whatever its numbers look like
    assert len(check_detections(detections_from_annotations([[0.2, 0.2, 1.4, 1.4]]), (16, 16))) == 1


class _FixedDetector:
    """A user's own detector following the protocol (real boxes computed from the image size)."""

    name = "centre-box"

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        out = []
        for image in images:
            h, w = image.shape[-2:]
            out.append(detections_from_annotations([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]))
        return out

    def config(self) -> dict[str, Any]:
        return {"backend": self.name}


def test_load_detector_passes_objects_and_none_through():
    own = _FixedDetector()
    assert isinstance(own, Detector)
    assert load_detector(own) is own
    assert load_detector(None) is None
    assert len(load_detector(own)([torch.rand(3, 40, 80)])[0]) == 1


def test_load_detector_rejects_unknown_names_and_misuse():
    with pytest.raises(ConfigError) as caught:
        load_detector("yolo")
    for name in DETECTORS:
        assert name in str(caught.value)
    with pytest.raises(ConfigError, match="keyword"):
        load_detector(None, min_score=0.5)
    with pytest.raises(ConfigError, match="keyword"):
        load_detector(_FixedDetector(), min_score=0.5)
    with pytest.raises(ConfigError, match="name"):
        load_detector(42)
    with pytest.raises(ConfigError, match="mtcnn"):
        load_detector("mtcnn", not_an_argument=1)
