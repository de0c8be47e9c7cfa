"""The real MTCNN on real photos (insightface's t1.jpg, skimage's astronaut): no mocked detections."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from anonloader.detect import MTCNNDetector, detections_from_annotations, load_detector
from anonloader.types import Detections



@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return load_detector("mtcnn")


@pytest.fixture(scope="module")
def batch_results(detector, t1_image, astronaut_image) -> list[Detections]:
    """One call on a batch of two photos of different sizes."""
    return detector([t1_image, astronaut_image])


def assert_plausible_faces(detections: Detections) -> None:
    boxes, landmarks = detections.boxes, detections.landmarks
    inside_x = (landmarks[..., 0] > boxes[:, None, 0]) & (landmarks[..., 0] < boxes[:, None, 2])
    inside_y = (landmarks[..., 1] > boxes[:, None, 1]) & (landmarks[..., 1] < boxes[:, None, 3])
    assert (inside_x & inside_y).all(), "every landmark lies inside its face box"
    eye_y = landmarks[:, :2, 1].amax(dim=1)
    mouth_y = landmarks[:, 3:, 1].amin(dim=1)
    assert (eye_y < mouth_y).all(), "eyes above the mouth"
    assert (landmarks[:, 0, 0] < landmarks[:, 1, 0]).all(), "left eye left of the right eye in the image"
    assert (landmarks[:, 3, 0] < landmarks[:, 4, 0]).all(), "left mouth corner left of the right one"
    assert (detections.scores[:-1] >= detections.scores[1:]).all(), "sorted by score"


def test_six_people_on_t1(batch_results, t1_image):
    t1 = batch_results[0]
    assert len(t1) == 6
    assert (t1.scores >= 0.975).all()
    assert_plausible_faces(t1)
    iou = box_iou(t1.boxes, t1.boxes) - torch.eye(6)
    assert iou.max() == 0, "six separate people"
    sizes = t1.boxes[:, 2:] - t1.boxes[:, :2]
    assert ((sizes > 40) & (sizes < 250)).all()
    height, width = t1_image.shape[-2:]
    assert (t1.boxes[:, [0, 2]] > -20).all() and (t1.boxes[:, [0, 2]] < width + 20).all()
    assert (t1.boxes[:, [1, 3]] > -20).all() and (t1.boxes[:, [1, 3]] < height + 20).all()


def test_min_score_removes_the_false_positives_of_t1(t1_image, batch_results):
    loose = MTCNNDetector(min_score=0.8)([t1_image])[0]
    assert len(loose) > 6, "MTCNN also fires on two non-faces at p ~ 0.86-0.90"
    assert (loose.scores[6:] < 0.95).all()
    torch.testing.assert_close(loose.boxes[:6], batch_results[0].boxes)


def test_one_astronaut(batch_results, astronaut_image, detector):
    face = batch_results[1]
    assert len(face) == 1 and face.scores[0] >= 0.99
    assert_plausible_faces(face)
    x1, y1, x2, y2 = face.boxes[0].tolist()
    # her face sits in the upper middle of the 512x512 photo, about 90 px wide
    assert 150 < (x1 + x2) / 2 < 300 and 60 < (y1 + y2) / 2 < 180 and 60 < x2 - x1 < 130
    alone = detector([astronaut_image])[0]
    torch.testing.assert_close(alone.boxes, face.boxes)
    torch.testing.assert_close(alone.landmarks, face.landmarks)


def test_mean_face_landmarks_approximate_the_detected_ones(batch_results):
    """Landmarks estimated from the real boxes land near MTCNN's own (the approximate alignment).

    Errors are in box widths. Measured: astronaut (frontal) 0.075 mean, 0.13 max; t1 (turned
    heads) 0.146 mean, 0.34 max, so t1's bounds are loose.
    """
    bounds = [(0.2, 0.4), (0.1, 0.2)]  # (mean, max) for t1, astronaut
    for detections, (mean_bound, max_bound) in zip(batch_results, bounds):
        estimated = detections_from_annotations(detections.boxes).landmarks
        width = (detections.boxes[:, 2] - detections.boxes[:, 0])[:, None]
        error = (estimated - detections.landmarks).norm(dim=-1) / width
        assert error.mean() < mean_bound and error.max() < max_bound
