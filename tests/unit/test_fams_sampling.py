"""FAMS sampling on tiny networks: the d control, CFG, seeds, face swap, the Method protocol."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import ConfigError, MethodError  # noqa: E402
from anonloader.methods import Method, get_method  # noqa: E402
from anonloader.methods.fams import FAMS, build_tiny_components  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402

STEPS = 2
_SHARED = {}


def _conditions(seeds, **extra):
    n = len(seeds)
    return FaceConditions(list(seeds), [None] * n, [None] * n, torch.zeros(n, 5, 2), dict(extra))



@pytest.fixture(scope="module")
def crops():
    generator = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 16, 16, generator=generator)


def _fams(**kwargs):
    """A FAMS on one shared set of tiny networks (building them is the slow part)."""
    kwargs.setdefault("num_inference_steps", STEPS)
    if "components" not in _SHARED:
        _SHARED["components"] = build_tiny_components(0)
    return FAMS.from_components(_SHARED["components"], crop_size=16, resolution=16, **kwargs)


def test_is_a_method_and_registered():
    fams = get_method("fams", tiny=True, crop_size=16, num_inference_steps=STEPS)
    assert isinstance(fams, FAMS) and isinstance(fams, Method)
    assert (fams.name, fams.template) == ("fams", "ffhq")
    assert FAMS(tiny=True).crop_size == 512


def test_degree_changes_the_output(crops):
    keep = _fams(anonymization_degree=0.0)(crops, _conditions([5, 6]))
    anonymized = _fams(anonymization_degree=1.4)(crops, _conditions([5, 6]))
    assert keep.shape == anonymized.shape == crops.shape
    assert 0 <= anonymized.min() and anonymized.max() <= 1
    assert (keep - anonymized).abs().mean() > 1e-4


def test_degree_zero_without_cfg_is_the_reconstruction_path(crops):
    fams = _fams(anonymization_degree=0.0, guidance_scale=1.0)
    anonymized = fams.generate(crops, [5, 6])  # eq. 1-2 with d = 0, blend done in the kernel
    reconstructed = fams.generate(crops, [5, 6], anonymize=False)  # plain states, no blend
    torch.testing.assert_close(anonymized, reconstructed, rtol=0, atol=1e-6)
    # and the reconstruction path is the face swap with the crop as its own source
    swapped = fams.generate(crops, [5, 6], source=crops)
    torch.testing.assert_close(swapped, reconstructed, rtol=0, atol=1e-6)


def test_cfg_changes_the_output(crops):
    plain = _fams(guidance_scale=1.0)(crops, _conditions([5, 6]))
    guided = _fams(guidance_scale=4.0)(crops, _conditions([5, 6]))
    assert (plain - guided).abs().mean() > 1e-4


def test_same_key_same_bytes_and_seeds_matter(crops):
    fams = _fams()
    first = fams(crops, _conditions([11, 12]))
    again = FAMS.from_config(tiny=True, crop_size=16, num_inference_steps=STEPS)(crops.clone(), _conditions([11, 12]))
    assert torch.equal(first, again)
    other = fams(crops, _conditions([13, 12]))
    assert (first[0] - other[0]).abs().mean() > 1e-4
    torch.testing.assert_close(first[1], other[1], rtol=0, atol=1e-5)  # per-face generators


def test_ddim_sampler_runs_and_is_deterministic(crops):
    fams = _fams(sampler="ddim")
    assert torch.equal(fams(crops, _conditions([1, 2])), fams(crops, _conditions([1, 2])))


def test_swap_with_different_sources_differs(crops):
    fams = _fams()
    generator = torch.Generator().manual_seed(9)
    source_a = torch.rand(2, 3, 24, 24, generator=generator)  # any size: resized to the model's
    source_b = torch.rand(2, 3, 24, 24, generator=generator)
    out_a = fams(crops, _conditions([5, 6], source_images=source_a))
    out_b = fams(crops, _conditions([5, 6], source_images=source_b))
    assert (out_a - out_b).abs().mean() > 1e-4


def test_config_names_every_pixel_changing_setting():
    config = _fams(anonymization_degree=1.2).config()
    assert config["sampling"]["anonymization_degree"] == 1.2
    assert set(config["sampling"]) >= {"swap_degree", "guidance_scale", "num_inference_steps", "sampler", "resolution"}
    assert set(config["weights"]) >= {"unet", "referencenet", "conditioning_referencenet", "vae", "image_encoder"}
    assert config != _fams(anonymization_degree=1.4).config()
    tiny = FAMS(tiny=True, tiny_seed=0).config()
    assert tiny["weights"]["unet"] == config["weights"]["unet"]  # same seed, same weights
    assert tiny["weights"] != FAMS(tiny=True, tiny_seed=1).config()["weights"]


def test_pickles_without_networks_and_rebuilds(crops):
    fams = FAMS.from_config(tiny=True, crop_size=16, num_inference_steps=STEPS)
    out = fams(crops, _conditions([4, 4]))
    clone = pickle.loads(pickle.dumps(fams))
    assert clone._components is None
    assert torch.equal(clone(crops, _conditions([4, 4])), out)


def test_bad_inputs_raise():
    fams = _fams()
    with pytest.raises(MethodError):
        fams(torch.rand(2, 3, 16, 12), _conditions([1, 2]))
    with pytest.raises(MethodError):
        fams(torch.rand(2, 3, 16, 16), _conditions([1]))
    with pytest.raises(ConfigError):
        _fams(sampler="euler")
    with pytest.raises(ConfigError):
        FAMS(weights=None)
