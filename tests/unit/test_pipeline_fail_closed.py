"""The pipeline fails closed, loudly: detector faults are logged and counted, non-finite faces fail.

Images are seeded noise with faces given as explicit detections: what is checked here is the
pipeline's bookkeeping, not a detector's recall (the real-photo tests cover that).
"""

from __future__ import annotations

import logging

import pytest
import torch

from anonloader.pipeline import Anonymizer, obscure_image
from anonloader.types import Detections


def _image(seed: int = 0, size: int = 96) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=generator).mul(255).round().div(255)


def _one_face(landmarks: torch.Tensor | None = None) -> Detections:
    points = torch.tensor([[[35.0, 40.0], [61.0, 40.0], [48.0, 52.0], [38.0, 64.0], [58.0, 64.0]]])
    return Detections(
        boxes=torch.tensor([[24.0, 22.0, 72.0, 80.0]]),
        landmarks=points if landmarks is None else landmarks,
        scores=torch.tensor([0.99]),
    )


class _FlakyDetector:
    """A detector whose backend raises the same fault on every call (e.g. a missing provider)."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        raise RuntimeError("onnxruntime session lost")

    def config(self):
        return {}


class _NaNDetector:
    """A custom detector that returns NaN landmarks for its one face."""

    name = "nan-landmarks"

    def __call__(self, images):
        return [_one_face(torch.full((1, 5, 2), float("nan"))) for _ in images]

    def config(self):
        return {}


def test_detector_fault_is_logged_once_per_cause_and_counted(caplog):
    anonymizer = Anonymizer("blur", detector=_FlakyDetector(), on_error="obscure")
    images = [_image(0), _image(1), _image(2)]
    with caplog.at_level(logging.WARNING, logger="anonloader.pipeline"):
        result = anonymizer(images)
        anonymizer(images)
    warnings = [r for r in caplog.records if "onnxruntime session lost" in r.getMessage()]
    assert len(warnings) == 1, "one warning per distinct cause, not one per image or call"
    assert "flaky" in warnings[0].getMessage()
    assert anonymizer.counters["detector_errors"] == 6
    assert anonymizer.counters["obscured"] == 6
    for image, out in zip(images, result.images, strict=True):
        assert torch.equal(out, obscure_image(image).mul(255).round().div(255))


def test_non_finite_landmarks_fail_the_image_closed():
    image = _image(3)
    result = Anonymizer("blur", detector=_NaNDetector(), on_error="obscure")([image])
    assert result.errors[0] is not None and "non-finite" in result.errors[0]
    assert [r.status for r in result.records[0]] == ["obscured"]
    assert bool(torch.isfinite(result.images[0]).all())
    assert not torch.equal(result.images[0], image)


def test_non_finite_annotations_raise_under_raise_policy():
    from anonloader.errors import AnonymizationFailed

    bad = _one_face(torch.tensor([[[35.0, 40.0], [float("inf"), 40.0], [48.0, 52.0], [38.0, 64.0], [58.0, 64.0]]]))
    with pytest.raises(AnonymizationFailed, match="NaN|inf|finite"):
        Anonymizer("blur", detector=None, on_error="raise")([_image(4)], detections=[bad])


def test_annotations_in_unit_coordinates_fail_closed_instead_of_passing_the_face():
    """Boxes and landmarks in [0,1] on a 96 px image would warp a 1-pixel corner and leave the face."""
    face = _one_face()
    normalised = Detections(face.boxes / 96, face.landmarks / 96, face.scores)
    image = _image(6)
    result = Anonymizer("blur", detector=None, on_error="obscure")([image], detections=[normalised])
    assert result.errors[0] is not None and "normalised" in result.errors[0]
    assert [r.status for r in result.records[0]] == ["obscured"]
    assert torch.equal(result.images[0], obscure_image(image).mul(255).round().div(255))


def test_finite_annotations_are_anonymized():
    image = _image(5)
    result = Anonymizer("blur", detector=None)([image], detections=[_one_face()])
    assert result.errors == [None]
    assert [r.status for r in result.records[0]] == ["anonymized"]
    face = (slice(None), slice(30, 70), slice(30, 66))
    assert not torch.equal(result.images[0][face], image[face])
