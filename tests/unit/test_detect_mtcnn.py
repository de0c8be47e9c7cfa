"""MTCNNDetector with facenet-pytorch's real weights on small inputs (no mocked detections)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from anonloader.detect import Detector, MTCNNDetector, load_detector
from anonloader.detect.mtcnn import mtcnn_weight_files
from anonloader.errors import ConfigError, DetectionError, UnsupportedImageError
from anonloader.fingerprint import fingerprint_of, hash_file



@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector()


@pytest.fixture(scope="module")
def astronaut_small(astronaut_image) -> torch.Tensor:
    """The astronaut at 256x256 (face about 45 px wide)."""
    return F.interpolate(astronaut_image[None], size=(256, 256), mode="area")[0]


def test_follows_the_protocol(detector):
    assert isinstance(detector, Detector)
    assert load_detector("mtcnn").__class__ is MTCNNDetector
    assert isinstance(load_detector("MTCNN", min_score=0.9), MTCNNDetector)


def test_model_is_built_lazily_and_dropped_by_pickle(astronaut_small):
    detector = MTCNNDetector()
    assert detector._nets is None
    found = detector([astronaut_small])[0]
    assert detector._nets is not None and len(found) == 1
    clone = pickle.loads(pickle.dumps(detector))
    assert clone._nets is None and detector._nets is not None
    again = clone([astronaut_small])[0]
    torch.testing.assert_close(found.boxes, again.boxes)
    torch.testing.assert_close(found.landmarks, again.landmarks)
    assert fingerprint_of(clone.config()) == fingerprint_of(detector.config())


def test_config_hashes_the_packaged_weights(detector):
    config = detector.config()
    files = mtcnn_weight_files()
    assert config["backend"] == "mtcnn"
    assert config["weights_sha256"] == {name: hash_file(path) for name, path in files.items()}
    assert config["thresholds"] == [0.6, 0.7, 0.7] and config["min_face_size"] == 20
    assert config["factor"] == pytest.approx(0.709) and config["min_score"] == pytest.approx(0.95)


@pytest.mark.parametrize(
    "change",
    [{"min_score": 0.9}, {"min_face_size": 40}, {"thresholds": (0.5, 0.7, 0.7)}, {"factor": 0.6}],
)
def test_every_setting_changes_the_fingerprint(detector, change):
    assert fingerprint_of(MTCNNDetector(**change).config()) != fingerprint_of(detector.config())
    assert fingerprint_of(MTCNNDetector().config()) == fingerprint_of(detector.config())


def test_settings_change_detections(detector, astronaut_small):
    assert len(detector([astronaut_small])[0]) == 1
    assert len(MTCNNDetector(min_face_size=120)([astronaut_small])[0]) == 0  # the face is ~45 px
    assert len(MTCNNDetector(thresholds=(0.6, 0.7, 1.0))([astronaut_small])[0]) == 0


def test_face_outputs_are_consistent(detector, astronaut_small):
    (found,) = detector([astronaut_small])
    assert found.boxes.dtype == found.landmarks.dtype == found.scores.dtype == torch.float32
    x1, y1, x2, y2 = found.boxes[0].tolist()
    landmarks = found.landmarks[0]
    assert ((landmarks[:, 0] > x1) & (landmarks[:, 0] < x2) & (landmarks[:, 1] > y1) & (landmarks[:, 1] < y2)).all()
    assert landmarks[0, 0] < landmarks[1, 0] and landmarks[3, 0] < landmarks[4, 0]  # left before right
    assert found.scores[0] >= 0.95


def test_tiny_blank_and_mixed_size_batch(detector, astronaut_small):
    images = [torch.rand(3, 1, 1), torch.full((3, 120, 90), 0.5), astronaut_small, torch.zeros(3, 0, 0)]
    results = detector(images)
    assert [len(r) for r in results] == [0, 0, 1, 0]
    assert results[0].boxes.shape == (0, 4) and results[0].landmarks.shape == (0, 5, 2)
    torch.testing.assert_close(results[2].boxes, detector([astronaut_small])[0].boxes)
    assert detector([]) == []


def test_same_size_batch_matches_single_images(detector, astronaut_small):
    flipped = astronaut_small.flip(-1)
    together = detector([astronaut_small, flipped])
    alone = [detector([astronaut_small])[0], detector([flipped])[0]]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.scores, b.scores)
    # the flipped face lies mirrored: x -> 256 - x
    assert together[1].boxes[0, 0] == pytest.approx(256 - together[0].boxes[0, 2].item(), abs=6)


def test_bad_inputs_name_the_sample(detector):
    with pytest.raises(UnsupportedImageError, match="sample 1"):
        detector([torch.rand(3, 30, 30), torch.rand(4, 30, 30)])
    with pytest.raises(UnsupportedImageError, match="uint8"):
        detector([torch.zeros(3, 30, 30, dtype=torch.uint8)])
    with pytest.raises(UnsupportedImageError, match="list"):
        detector(torch.rand(2, 3, 30, 30))


class _FailsOnWhite(torch.nn.Module):
    """Wraps the real P-net and fails the way a broken backend would, on an all-white input."""

    def __init__(self, pnet: torch.nn.Module):
        super().__init__()
        self.pnet = pnet

    def forward(self, x: torch.Tensor):
        if (x > 0.99).flatten(1).all(dim=1).any():
            raise RuntimeError("backend failure")
        return self.pnet(x)


def test_backend_failure_is_a_detection_error_naming_the_image():
    detector = MTCNNDetector()
    pnet, rnet, onet = detector._networks()
    detector._nets = (_FailsOnWhite(pnet), rnet, onet)
    images = [torch.full((3, 64, 64), 0.5), torch.ones(3, 64, 64), torch.full((3, 64, 64), 0.2)]
    with pytest.raises(DetectionError, match="image 1 of the batch") as caught:
        detector(images)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert [len(d) for d in detector([images[0], images[2]])] == [0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [{"min_score": 1.2}, {"min_face_size": 0}, {"min_face_size": 2.5}, {"thresholds": (0.6, 0.7)}, {"factor": 1.0}],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ConfigError):
        MTCNNDetector(**kwargs)


class _DetectedFaceCounts(torch.utils.data.Dataset):
    """Counts faces with the detector inside DataLoader workers."""

    def __init__(self, detector: MTCNNDetector, image: torch.Tensor):
        self.detector, self.image = detector, image

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        image = self.image if index == 0 else torch.full_like(self.image, 0.5)
        return len(self.detector([image])[0])


def test_runs_in_spawned_dataloader_workers(detector, astronaut_small):
    detector([astronaut_small])  # the parent's networks are built; workers must build their own
    loader = torch.utils.data.DataLoader(
        _DetectedFaceCounts(detector, astronaut_small),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
    )
    assert [int(n) for n in loader] == [1, 0]
