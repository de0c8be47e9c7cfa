"""Alignment: the similarity transform is exact on template-shaped landmarks, and warps follow
the documented convention (affine maps image pixels to crop pixels)."""

from __future__ import annotations

import math

import pytest
import torch

from anonloader.align import align_faces, estimate_affine, template_points
from anonloader.errors import AlignmentError, ConfigError
from anonloader.types import Detections


def _rotate(points, angle, scale, shift):
    c, s = math.cos(angle), math.sin(angle)
    r = torch.tensor([[c, -s], [s, c]]) * scale
    return points @ r.T + torch.tensor(shift)


@pytest.mark.parametrize("crop_size,template", [(112, "arcface"), (256, "ffhq"), (512, "ffhq")])
def test_affine_maps_landmarks_onto_the_template(crop_size, template):
    target = template_points(crop_size, template)
    landmarks = _rotate(target, 0.3, 0.7, (40.0, -12.0)).unsqueeze(0)
    affine = estimate_affine(landmarks, crop_size, template)
    mapped = landmarks[0] @ affine[0, :, :2].T + affine[0, :, 2]
    assert torch.allclose(mapped, target, atol=1e-3)


def test_margin_shrinks_the_face_in_the_crop():
    tight, loose = template_points(112), template_points(112, margin=0.5)
    spread = lambda p: float((p - p.mean(0)).norm(dim=1).mean())  # noqa: E731
    assert spread(loose) == pytest.approx(spread(tight) / 1.5, rel=1e-4)


def test_crop_pixels_sample_the_image_at_the_inverse_affine():
    h, w = 200, 300
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    image = torch.stack([xx / w, yy / h, torch.zeros_like(xx)])
    landmarks = (template_points(112) * 1.3 + torch.tensor([40.0, 30.0])).unsqueeze(0)
    faces = align_faces([image], [Detections(torch.zeros(1, 4), landmarks, torch.ones(1))], crop_size=112)
    affine = torch.cat([faces.affines[0], torch.tensor([[0.0, 0.0, 1.0]])])
    for u, v in [(10, 20), (50, 60), (100, 3)]:
        x, y, _ = torch.linalg.solve(affine, torch.tensor([float(u), float(v), 1.0]))
        assert faces.crops[0, 0, v, u] * w == pytest.approx(float(x), abs=1e-3)
        assert faces.crops[0, 1, v, u] * h == pytest.approx(float(y), abs=1e-3)


def test_batch_of_images_of_different_sizes_and_face_counts():
    lm = template_points(112).unsqueeze(0)
    two = Detections(torch.zeros(2, 4), torch.cat([lm, lm + 50]), torch.ones(2))
    none = Detections.empty()
    one = Detections(torch.zeros(1, 4), lm * 0.5, torch.ones(1))
    faces = align_faces([torch.rand(3, 200, 240), torch.rand(3, 64, 64), torch.rand(3, 90, 300)], [two, none, one], crop_size=64)
    assert faces.crops.shape == (3, 3, 64, 64)
    assert faces.image_index.tolist() == [0, 0, 2]
    assert float(faces.crops.min()) >= 0 and float(faces.crops.max()) <= 1


def test_degenerate_landmarks_and_bad_templates_raise():
    with pytest.raises(AlignmentError, match="single point"):
        estimate_affine(torch.ones(1, 5, 2), 112)
    with pytest.raises(AlignmentError, match="N,5,2"):
        estimate_affine(torch.ones(1, 4, 2), 112)
    with pytest.raises(ConfigError, match="unknown alignment template"):
        template_points(112, "nope")
