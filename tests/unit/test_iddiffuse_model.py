"""IDDiffuse method on a tiny random network (32 px, built from the "tiny" preset in code):
determinism, identity and gamma control, bank indexing, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import ConfigError, MethodError, ModelLoadError
from anonloader.methods.base import Method
from anonloader.methods.iddiffuse import IDDiffuse
from anonloader.types import FaceConditions




def _conditions(seeds: list[int], synthetic: torch.Tensor | None = None, ids: list[int | None] | None = None) -> FaceConditions:
    n = len(seeds)
    extra = {} if synthetic is None else {"synthetic_images": synthetic}
    return FaceConditions(seeds=seeds, identity_keys=[None] * n, synthetic_ids=ids or [None] * n,
                          landmarks=torch.zeros(n, 5, 2), extra=extra)


@pytest.fixture(scope="module")
def method() -> IDDiffuse:
    torch.manual_seed(0)
    return IDDiffuse(config="tiny", num_inference_steps=4)


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def synthetic() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_follows_the_method_protocol(method: IDDiffuse) -> None:
    assert isinstance(method, Method)
    assert (method.name, method.crop_size, method.template) == ("iddiffuse", 32, "arcface")
    config = method.config()
    assert len(config["weights_sha256"]) == 64 and config["gamma"] == 0.0


def test_same_seed_gives_identical_bytes_and_seeds_matter(method: IDDiffuse, crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    first = method(crops, _conditions([11, 12], synthetic))
    again = method(crops, _conditions([11, 12], synthetic))
    assert first.shape == crops.shape and first.dtype == torch.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert first.numpy().tobytes() == again.numpy().tobytes()
    other = method(crops, _conditions([13, 12], synthetic))
    assert not torch.equal(other[0], first[0])


def test_synthetic_identity_changes_the_output(method: IDDiffuse, crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    a = method(crops, _conditions([11, 12], synthetic))
    b = method(crops, _conditions([11, 12], synthetic.flip(0)))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-5


def test_gamma_one_and_zero_differ(crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = IDDiffuse(config="tiny", num_inference_steps=4, gamma=0.0)
    synthetic_out = m(crops, _conditions([5, 6], synthetic))
    m.gamma = 1.0
    original_out = m(crops, _conditions([5, 6], synthetic))
    assert (synthetic_out - original_out).abs().amax(dim=(1, 2, 3)).min() > 1e-5


def test_bank_indexing_and_missing_identity(method: IDDiffuse, crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    with pytest.raises(MethodError, match="synthetic identity image"):
        method(crops, _conditions([1, 2]))
    method.bank = _Bank(torch.cat([synthetic.flip(0), synthetic]))
    try:
        by_bank = method(crops, _conditions([11, 12], ids=[2, 3]))
        direct = method(crops, _conditions([11, 12], synthetic))
        assert torch.equal(by_bank, direct)
        with pytest.raises(MethodError, match="outside the bank"):
            method(crops, _conditions([11, 12], ids=[0, 9]))
    finally:
        method.bank = None


class _Bank:
    """The part of IdentityBank the method reads (images, len, fingerprint)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        return "bank"


def test_ddpm_sampler_is_deterministic(crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = IDDiffuse(config="tiny", sampler="ddpm")
    a = m(crops[:1], _conditions([7], synthetic[:1]))
    b = m(crops[:1], _conditions([7], synthetic[:1]))
    assert torch.equal(a, b)
    assert not torch.equal(a, m(crops[:1], _conditions([8], synthetic[:1])))


def test_save_load_round_trip(method: IDDiffuse, crops: torch.Tensor, synthetic: torch.Tensor, tmp_path: Path) -> None:
    method.save_pretrained(tmp_path / "ckpt")
    loaded = IDDiffuse.from_pretrained(tmp_path / "ckpt")
    assert loaded.num_inference_steps == 4
    expected = method(crops, _conditions([11, 12], synthetic))
    assert torch.equal(loaded(crops, _conditions([11, 12], synthetic)), expected)
    assert loaded.config()["network"] == method.config()["network"]


def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        IDDiffuse()
    with pytest.raises(ModelLoadError, match="not an IDDiffuse checkpoint"):
        IDDiffuse(pretrained=tmp_path)
    with pytest.raises(ConfigError, match="preset"):
        IDDiffuse(config="huge")


def test_a_face_does_not_depend_on_its_batch(method: IDDiffuse, crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    both = method(crops, _conditions([11, 12], synthetic))
    alone = method(crops[1:], _conditions([12], synthetic[1:]))
    torch.testing.assert_close(alone[0], both[1], rtol=0, atol=1e-4)


def test_guidance_and_stochastic_ddim_are_seeded(crops: torch.Tensor, synthetic: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain = IDDiffuse(config="tiny", num_inference_steps=3)
    torch.manual_seed(0)
    guided = IDDiffuse(config="tiny", num_inference_steps=3, guidance_scale=3.0, eta=0.5)
    conditions = _conditions([21, 22], synthetic)
    a, b = guided(crops, conditions), guided(crops, conditions)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain(crops, conditions))
    assert guided.config()["guidance_scale"] == 3.0 and guided.config()["eta"] == 0.5


def test_synthetic_sets_pick_the_nearest_image_of_the_keyed_identity(method: IDDiffuse, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for identity in ("id0", "id1"):
        (tmp_path / identity).mkdir()
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / identity / f"{j}.png")
    bank = _Bank(torch.zeros(2, 3, 32, 32))
    bank.names = ["id0/0.png", "id1/0.png"]
    m = IDDiffuse(network=method.network, bank=bank, synthetic_sets=tmp_path, num_inference_steps=2)
    wanted = torch.from_numpy(np.asarray(Image.open(tmp_path / "id1" / "2.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    other = torch.from_numpy(np.asarray(Image.open(tmp_path / "id0" / "1.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    real = torch.stack([wanted, other])
    chosen = m.synthetic_images(_conditions([1, 2], ids=[1, 0]), real)
    assert torch.equal(chosen[0], wanted) and torch.equal(chosen[1], other)  # same images: nearest in E_I
    assert m.config()["synthetic_sets"] == str(tmp_path)
    out = m(real, _conditions([1, 2], ids=[1, 0]))
    assert out.shape == real.shape
