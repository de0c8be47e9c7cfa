"""Recall passes (rotation, low light, upscale, large-image tiles) and the ensemble, on real photos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anonloader.detect import CenterFaceDetector, DetectorStage, EnsembleDetector, MTCNNDetector, load_detector
from anonloader.detect.robust import _rotate, equalize_for_detection, merge_detections
from anonloader.errors import ConfigError
from anonloader.types import Detections


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    return CenterFaceDetector(threads=1)


@pytest.mark.parametrize("degrees", [90.0, -90.0, 180.0, 25.0, -40.0])
def test_rotation_back_map_points_at_the_same_content(degrees):
    """A pixel of the rotated copy, mapped back, holds the same value in the original (exact for
    quarter turns; bilinear resampling of a smooth ramp for other angles)."""
    ys, xs = torch.meshgrid(torch.arange(30.0), torch.arange(50.0), indexing="ij")
    image = torch.stack([xs / 49, ys / 29, (xs + ys) / 78])
    rotated, back = _rotate(image, degrees)
    for v, u in [(rotated.shape[1] // 2, rotated.shape[2] // 2), (rotated.shape[1] // 2 + 3, rotated.shape[2] // 2 - 4)]:
        x, y = (back @ torch.tensor([float(u), float(v), 1.0])).tolist()
        expected = torch.stack([torch.tensor(x / 49), torch.tensor(y / 29), torch.tensor((x + y) / 78)])
        torch.testing.assert_close(rotated[:, v, u], expected, atol=2e-3, rtol=0)


def test_equalize_brightens_a_dark_copy_and_leaves_the_input(astronaut_image):
    dark = astronaut_image * 0.15
    kept = dark.clone()
    bright = equalize_for_detection(dark)
    assert torch.equal(dark, kept)
    assert bright.shape == dark.shape and float(bright.min()) >= 0 and float(bright.max()) <= 1
    luma = 0.299 * bright[0] + 0.587 * bright[1] + 0.114 * bright[2]
    assert abs(float(luma.mean()) - 0.5) < 0.1


def test_ensemble_nms_keeps_one_box_per_face(centerface, astronaut_image, t1_image):
    members = [centerface, MTCNNDetector()]
    ensemble = EnsembleDetector(members)
    astronaut, t1 = ensemble([astronaut_image, t1_image])
    assert len(astronaut) == 1 and len(t1) == 6
    # each member alone finds the same faces: the union adds no duplicate box
    for member in members:
        alone = member([t1_image])[0]
        assert len(alone) == 6
        iou = _box_iou(alone.boxes, t1.boxes)
        assert bool((iou.max(dim=1).values > 0.5).all())
    # duplicates given explicitly are merged to the higher score
    face = astronaut
    twice = merge_detections([face, Detections(face.boxes + 2.0, face.landmarks + 2.0, face.scores * 0.5)], iou=0.3)
    assert len(twice) == 1 and float(twice.scores[0]) == pytest.approx(float(face.scores[0]))


def test_large_image_tiles_find_a_small_face_and_map_it_back(centerface, astronaut_image):
    """The astronaut (face ~90 px) pasted at native size into a 3000x2000 canvas: detected on a
    640-pixel copy alone the face is ~19 px; the tiles at twice that scale find it."""
    canvas = torch.full((3, 2000, 3000), 0.5)
    canvas[:, 1300:1812, 2300:2812] = astronaut_image
    native = centerface([astronaut_image])[0].boxes[0] + torch.tensor([2300.0, 1300.0, 2300.0, 1300.0])
    stage = DetectorStage(centerface, max_side=640, tile_zoom=2.0, upscale="off", low_light="off", rotation="off")
    found = stage([canvas])[0]
    assert len(found) >= 1
    assert float(_box_iou(native[None], found.boxes).max()) > 0.5


def test_upscale_pass_finds_a_tiny_face(centerface, astronaut_image):
    """The astronaut shrunk to 72x72 (face ~13 px): the upscaled pass maps its box back into place."""
    tiny = F.interpolate(astronaut_image[None], size=(72, 72), mode="bilinear", antialias=True)[0]
    stage = DetectorStage(centerface, max_side=None, upscale="always", upscale_factor=4.0, low_light="off", rotation="off")
    found = stage([tiny])[0]
    reference = centerface([astronaut_image])[0].boxes * (72 / 512)
    assert len(found) >= 1
    assert float(_box_iou(reference, found.boxes).max()) > 0.4


def test_rotation_fallback_runs_only_for_turned_images(centerface, astronaut_image, t1_image):
    """Upright: one detector call. t1 upside down: the upright pass finds some faces turned by
    ~180 degrees, which triggers one rotated copy (the angle that turns them upright); the merged
    result has one box per person, each where that person is in the turned photo."""
    calls: list[int] = []

    class Counting:
        name = "counting"

        def config(self):
            return {}

        def __call__(self, images):
            calls.append(len(images))
            return centerface(images)

    stage = DetectorStage(Counting(), max_side=None, upscale="off", low_light="off", rotation="fallback")
    upright = stage([astronaut_image])[0]
    assert len(upright) == 1 and calls == [1]
    calls.clear()
    upside_down = torch.rot90(t1_image, 2, dims=(1, 2)).contiguous()
    found = stage([upside_down])[0]
    assert calls == [1, 1]
    height, width = t1_image.shape[-2:]
    reference = centerface([t1_image])[0].boxes
    expected = torch.stack([width - reference[:, 2], height - reference[:, 3], width - reference[:, 0], height - reference[:, 1]], 1)
    iou = _box_iou(expected, found.boxes)
    assert bool((iou.max(dim=1).values > 0.5).all()), iou  # every person found
    assert len(found) == 6  # once each


def test_presets_load_and_bad_settings_raise():
    for name in ("default", "fast", "strong", "ensemble"):
        detector = load_detector(name)
        assert detector.config()["backend"] in ("stage", "ensemble")
    assert load_detector("default", rotation="always").rotation == "always"
    with pytest.raises(ConfigError, match="rotation"):
        load_detector("default", rotation="sometimes")
    with pytest.raises(ConfigError, match="two or more"):
        EnsembleDetector([CenterFaceDetector()])
    with pytest.raises(ConfigError, match="Detector"):
        DetectorStage("centerface")  # type: ignore[arg-type]


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a.float(), b.float())


class _Recording:
    """The real CenterFace detector, recording the sizes of the views it is handed."""

    name = "centerface-recording"

    def __init__(self, inner: CenterFaceDetector) -> None:
        self.inner, self.sizes = inner, []

    def __call__(self, images):
        self.sizes += [tuple(image.shape[-2:]) for image in images]
        return self.inner(images)

    def config(self):
        return self.inner.config()


def test_coarse_level_adds_one_smaller_view_and_maps_faces_back(centerface, astronaut_image):
    recording = _Recording(centerface)
    stage = DetectorStage(recording, max_side=None, coarse_side=256, upscale="off", low_light="off", rotation="off")
    found = stage([astronaut_image])[0]
    assert recording.sizes == [(512, 512), (256, 256)]
    plain = centerface([astronaut_image])[0]
    assert len(found) == len(plain) == 1  # the two levels' boxes of one face merge into one
    assert (found.landmarks - plain.landmarks).abs().max() < 8  # pixels of the 512 px image
    recording.sizes.clear()
    DetectorStage(recording, max_side=None, coarse_side=640, upscale="off", low_light="off", rotation="off")([astronaut_image])
    assert recording.sizes == [(512, 512)]  # no coarse level for an image already small enough
    with pytest.raises(ConfigError, match="coarse_side"):
        DetectorStage(centerface, coarse_side=10)
