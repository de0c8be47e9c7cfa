"""Classical baselines: they change the face, keep shape and range, and their config is the
fingerprint input."""

from __future__ import annotations

import pytest
import torch

from anonloader.errors import ConfigError
from anonloader.methods import METHODS, Method, get_method
from anonloader.methods.classical import GaussianBlur, Pixelate, SolidMask
from anonloader.types import FaceConditions


def _conditions(n: int) -> FaceConditions:
    return FaceConditions([0] * n, [None] * n, [None] * n, torch.zeros(n, 5, 2))


@pytest.mark.parametrize("name", ["blur", "pixelate", "mask"])
def test_classical_methods_change_crops_and_keep_shape(name):
    method = get_method(name)
    assert isinstance(method, Method)
    crops = torch.rand(3, 3, method.crop_size, method.crop_size)
    out = method(crops, _conditions(3))
    assert out.shape == crops.shape and out.dtype == crops.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert (out - crops).abs().mean() > 0.1  # random noise is destroyed by each
    assert method(crops[:0], _conditions(0)).shape == (0, 3, method.crop_size, method.crop_size)


def test_pixelate_is_constant_within_blocks():
    out = Pixelate(blocks=4, crop_size=64)(torch.rand(1, 3, 64, 64), _conditions(1))
    block = out[0, :, :16, :16]
    assert torch.allclose(block, block[:, :1, :1].expand_as(block))
    assert out[0, :, :16, :16].mean() != out[0, :, 16:32, :16].mean()


def test_blur_strength_scales_with_sigma():
    crops = torch.rand(1, 3, 128, 128)
    weak = GaussianBlur(sigma=0.01)(crops, _conditions(1))
    strong = GaussianBlur(sigma=0.1)(crops, _conditions(1))
    assert strong.std() < weak.std() < crops.std()


def test_mask_fills_with_its_colour():
    out = SolidMask(color=(1.0, 0.0, 0.25))(torch.rand(2, 3, 128, 128), _conditions(2))
    assert torch.equal(out[:, 0], torch.ones(2, 128, 128)) and torch.equal(out[:, 2], torch.full((2, 128, 128), 0.25))


def test_configs_differ_with_parameters():
    assert GaussianBlur(sigma=0.05).config() != GaussianBlur(sigma=0.1).config()
    assert Pixelate(blocks=8).config() != Pixelate(blocks=6).config()


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ConfigError, match="bad options"):
        get_method("blur", strength=3)
    with pytest.raises(ConfigError, match="sigma"):
        get_method("blur", sigma=0)
    with pytest.raises(ConfigError, match="ready method instance"):
        get_method(GaussianBlur(), sigma=0.2)
    assert {"blur", "pixelate", "mask", "fams", "iddiffuse"} <= set(METHODS)
