"""paste_back: reference semantics (kornia) and dispatch. The Triton kernel is tested under the
interpreter in test_kernels_triton.py."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from anonloader.kernels.paste_back import crop_mask, paste_back, paste_back_reference


def _similarity(scale: float, angle_deg: float, centre_xy: tuple[float, float], size: int) -> torch.Tensor:
    """``2,3`` image px -> crop px: the image point ``centre_xy`` lands on the crop centre."""
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64) * scale
    c = (size - 1) / 2
    t = torch.tensor([c, c], dtype=torch.float64) - rot @ torch.tensor(centre_xy, dtype=torch.float64)
    return torch.cat([rot, t[:, None]], 1).float()


def _smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    phase = torch.rand(3, 2, generator=g) * 6
    return torch.stack([0.5 + 0.3 * torch.sin(3 * x + phase[c, 0]) * torch.cos(2 * y + phase[c, 1]) for c in range(3)])


def _aligned(images: list[torch.Tensor], affines: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    from kornia.geometry.transform import warp_affine

    return torch.cat(
        [warp_affine(images[int(i)][None], affines[f : f + 1], (size, size), padding_mode="reflection", align_corners=True) for f, i in enumerate(index)]
    )


@pytest.fixture
def scene():
    images = [_smooth_image(70, 90, 0), _smooth_image(53, 41, 1)]
    size = 24
    affines = torch.stack(
        [
            _similarity(0.8, 10, (30, 25), size),
            _similarity(1.3, -20, (70, 50), size),
            _similarity(1.0, 35, (20, 30), size),
            _similarity(0.9, 0, (38, 5), size),  # partly outside the image
        ]
    )
    index = torch.tensor([0, 0, 1, 1])
    return images, affines, index, size


@pytest.mark.parametrize("mask", ["ellipse", "border"])
def test_pasting_the_original_crop_restores_the_image(scene, mask: str) -> None:
    images, affines, index, size = scene
    before = [im.clone() for im in images]
    crops = _aligned(images, affines, index, size)
    out = paste_back(images, crops, affines, index, feather=0.2, color_match=False, mask=mask)
    for im, old, new in zip(images, before, out):
        assert torch.equal(im, old), "inputs must not be modified"
        assert new.shape == old.shape and new is not im
        # two bilinear resamplings of a smooth image (largest next to the image border)
        assert (new - old).abs().max() < 1e-2 and (new - old).abs().mean() < 5e-4


def test_color_match_undoes_a_per_channel_affine_colour_change(scene) -> None:
    images, affines, index, size = scene
    crops = _aligned(images, affines, index, size)
    shifted = crops * torch.tensor([0.5, 0.8, 0.6])[:, None, None] + torch.tensor([0.3, -0.05, 0.1])[:, None, None]
    matched = paste_back(images, shifted, affines, index, feather=0.2, color_match=True)
    unmatched = paste_back(images, shifted, affines, index, feather=0.2, color_match=False)
    restored = paste_back(images, crops, affines, index, feather=0.2, color_match=False)
    for r, m, u in zip(restored, matched, unmatched):
        assert (m - r).abs().max() < 1e-4  # the mask-weighted stats invert the change exactly
        assert (u - r).abs().max() > 0.05


def test_faces_composite_in_order_and_leave_the_rest_untouched() -> None:
    image = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(0))
    size = 16
    affines = torch.stack([_similarity(1.0, 0, (16, 20), size), _similarity(1.0, 0, (26, 20), size)])
    crops = torch.stack([torch.full((3, size, size), 0.2), torch.full((3, size, size), 0.9)])
    (out,) = paste_back([image], crops, affines, torch.tensor([0, 0]), feather=0.25, color_match=False)
    assert torch.allclose(out[:, 20, 21], torch.full((3,), 0.9))  # both masks are 1: the later face wins
    assert torch.allclose(out[:, 20, 13], torch.full((3,), 0.2), atol=1e-6)  # only the first face reaches here
    assert torch.equal(out[:, :, 40:], image[:, :, 40:])  # far from both faces
    assert torch.equal(out[:, 30:, :], image[:, 30:, :])


def test_crop_mask_shapes() -> None:
    ellipse = crop_mask(33, 0.2, "ellipse")
    border = crop_mask(33, 0.0, "border")
    assert ellipse.shape == (33, 33) and ellipse[16, 16] == 1 and ellipse[0, 0] == 0 and ellipse[16, 0] < 0.2
    assert border.min() == 0 and border[1:-1, 1:-1].min() == 1  # hard edge: only the outermost ring is 0
    with pytest.raises(ValueError, match="mask"):
        crop_mask(8, 0.1, "circle")


def test_images_without_faces_are_copies_and_bad_input_raises() -> None:
    images = [torch.rand(3, 8, 9), torch.rand(3, 5, 5)]
    out = paste_back(images, torch.zeros(0, 3, 8, 8), torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.int64))
    assert all(torch.equal(a, b) and a is not b for a, b in zip(images, out))
    with pytest.raises(ValueError, match="image_index"):
        paste_back(images, torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match="crops"):
        paste_back(images, torch.zeros(1, 3, 8, 7), torch.zeros(1, 2, 3), torch.tensor([0]))


def test_dispatch_cpu_uses_reference(scene, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("anonloader.kernels.paste_back")  # the package attribute is the function

    images, affines, index, size = scene
    crops = _aligned(images, affines, index, size)
    calls = []
    monkeypatch.setattr(module, "paste_back_reference", lambda *a, **k: calls.append(1) or paste_back_reference(*a, **k))
    module.paste_back(images, crops, affines, index)
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        module.paste_back(images, crops, affines, index, backend="triton")
