"""The whole pipeline on real photos with the real offline detector (no mocked detections)."""

from __future__ import annotations

import pickle

import pytest
import torch

from anonloader import Anonymizer
from anonloader.align import estimate_affine
from anonloader.errors import AnonymizationFailed
from anonloader.types import Detections


def _box_change(before: torch.Tensor, after: torch.Tensor, box) -> float:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1 = max(x1, 0), max(y1, 0)
    return float((before[:, y1:y2, x1:x2] - after[:, y1:y2, x1:x2]).abs().mean())


def _outside_mask(shape, records, method) -> torch.Tensor:
    """True on pixels outside every face's aligned crop (where paste-back may not write)."""
    _, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    pixels = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)  # H,W,3
    keep = torch.ones(h, w, dtype=torch.bool)
    for r in records:
        affine = estimate_affine(torch.tensor([r.landmarks]), method.crop_size, method.template, method.margin)[0]
        crop_xy = pixels @ affine.T
        inside = (crop_xy >= -1.5).all(-1) & (crop_xy <= method.crop_size + 0.5).all(-1)
        keep &= ~inside
    return keep


@pytest.fixture(scope="module")
def blur() -> Anonymizer:
    return Anonymizer("blur")


def test_every_face_changes_and_background_does_not(blur, t1_image, astronaut_image):
    result = blur([t1_image, astronaut_image])
    assert [len(r) for r in result.records] == [6, 1]
    for before, after, records in zip([t1_image, astronaut_image], result.images, result.records):
        assert after is not None and after.shape == before.shape
        for record in records:
            assert record.status == "anonymized"
            assert _box_change(before, after, record.box) > 0.01, record.box
        outside = _outside_mask(before.shape, records, blur.method)
        assert outside.float().mean() > 0.5
        assert float((before - after).abs().amax(0)[outside].max()) <= 1 / 255 + 1e-6
    assert blur.counters["faces"] == 7 and blur.counters["anonymized"] == 7 and blur.counters["failed"] == 0


@pytest.mark.parametrize("method", ["pixelate", "mask"])
def test_other_baselines_change_every_face(method, astronaut_image):
    anonymizer = Anonymizer(method)
    result = anonymizer([astronaut_image])
    (record,) = result.records[0]
    assert _box_change(astronaut_image, result.images[0], record.box) > 0.03


def test_deterministic_bytes_and_stable_fingerprint(blur, astronaut_image):
    a = blur([astronaut_image]).images[0]
    b = Anonymizer("blur")([astronaut_image]).images[0]
    assert torch.equal(a, b)
    assert blur.fingerprint() == Anonymizer("blur").fingerprint()
    assert blur.fingerprint() != Anonymizer("blur", sigma=0.05).fingerprint()
    assert blur.fingerprint() != Anonymizer("pixelate").fingerprint()
    assert blur.fingerprint() != Anonymizer("blur", feather=0.2).fingerprint()


def test_fingerprint_follows_detector_thresholds():
    from anonloader.detect.mtcnn import MTCNNDetector

    assert Anonymizer(detector=MTCNNDetector(min_score=0.9)).fingerprint() != Anonymizer(detector=MTCNNDetector(min_score=0.95)).fingerprint()


class _BrokenMethod:
    name, crop_size, template = "broken", 64, "arcface"

    def __call__(self, crops, conditions):
        raise RuntimeError("simulated model failure")

    def config(self):
        return {}


class _BrokenDetector:
    name = "broken"

    def __call__(self, images):
        raise RuntimeError("simulated detector failure")

    def config(self):
        return {}


def test_fail_closed_never_passes_the_original(astronaut_image):
    obscured = Anonymizer(_BrokenMethod(), on_error="obscure")
    result = obscured([astronaut_image])
    assert result.images[0] is not None and result.errors[0] is not None
    (record,) = result.records[0]
    assert record.status == "obscured"
    assert _box_change(astronaut_image, result.images[0], record.box) > 0.03
    assert obscured.counters["failed"] == 1 and obscured.counters["obscured"] == 1

    dropped = Anonymizer(_BrokenMethod(), on_error="drop")
    assert dropped([astronaut_image]).images == [None]
    assert dropped.counters["dropped"] == 1

    with pytest.raises(AnonymizationFailed, match="simulated model failure"):
        Anonymizer(_BrokenMethod(), on_error="raise")([astronaut_image])

    detector_down = Anonymizer(detector=_BrokenDetector(), on_error="obscure")([astronaut_image])
    assert "detection failed" in detector_down.errors[0]
    assert (detector_down.images[0] - astronaut_image).abs().mean() > 0.03


def test_on_no_face_policies():
    blank = torch.full((3, 80, 120), 128 / 255)
    none = Detections.empty()
    assert torch.equal(Anonymizer(detector=None)([blank], detections=[none]).images[0], blank)
    assert Anonymizer(detector=None, on_no_face="drop")([blank], detections=[none]).images == [None]
    noisy = torch.rand(3, 80, 120)
    assert not torch.equal(Anonymizer(detector=None, on_no_face="obscure")([noisy], detections=[none]).images[0], noisy)


def test_bad_image_in_a_batch_loses_nothing_else(astronaut_image):
    anonymizer = Anonymizer("blur", on_error="drop")
    result = anonymizer([torch.zeros(3, 0, 10), astronaut_image, torch.full((3, 10, 10), 3.0)])
    assert result.images[0] is None and result.images[2] is None
    assert result.images[1] is not None and len(result.records[1]) == 1
    assert "sample 0" in result.errors[0] and "sample 2" in result.errors[2]


def test_anonymizer_pickles_without_models(blur, astronaut_image):
    blur([astronaut_image])
    clone = pickle.loads(pickle.dumps(blur))
    assert clone.fingerprint() == blur.fingerprint()
    assert torch.equal(clone([astronaut_image]).images[0], blur([astronaut_image]).images[0])


class _FailsOnDarkFaces:
    """Fails for any batch holding a crop darker than ``limit`` (a per-face model failure)."""

    name, crop_size, template = "fails_on_dark", 64, "arcface"

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, crops, conditions):
        if bool((crops.mean(dim=(1, 2, 3)) < self.limit).any()):
            raise RuntimeError("simulated failure on a dark face")
        return 1 - crops

    def config(self):
        return {"limit": self.limit}


def test_one_failing_face_costs_only_its_own_image(astronaut_image):
    dark = astronaut_image * 0.2
    (face,) = Anonymizer("blur")([astronaut_image]).records
    given = [Detections(torch.tensor([face[0].box]), torch.tensor([face[0].landmarks]), torch.ones(1))] * 2
    anonymizer = Anonymizer(_FailsOnDarkFaces(limit=0.15), detector=None, on_error="drop")
    result = anonymizer([astronaut_image, dark], detections=given)
    assert result.images[0] is not None and result.records[0][0].status == "anonymized"
    assert result.images[1] is None and "dark face" in result.errors[1]
    assert anonymizer.counters["anonymized"] == 1 and anonymizer.counters["dropped"] == 1
