"""DiffDeID's LDS (eqs. 2-3) as extended for per-face seeds, filtering and the 3DMM α sampler."""

from __future__ import annotations

import functools

import pytest
import torch

from anonloader.errors import IdentityError
from anonloader.identity.sampler import LatentIDSampler, derive_seed


@functools.lru_cache(maxsize=1)
def _alpha_sampler() -> tuple[LatentIDSampler, torch.Tensor]:
    """An α sampler (unit_norm=False) fitted on two well-separated Gaussian clusters in 6-d."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, -2, 1, 0, 3, 5], [-4.0, 2, 1, 2, -3, 5]])
    data = centres[torch.arange(400) % 2] + 0.3 * torch.randn(400, 6, generator=g)
    sampler = LatentIDSampler(6, timesteps=100, hidden=64, depth=2, unit_norm=False, space="landmark-standin")
    sampler.fit(data, steps=600, batch_size=64, lr=3e-3)
    return sampler, data


def test_alpha_samples_are_not_unit_norm_and_destandardise_to_the_data():
    sampler, data = _alpha_sampler()
    samples = sampler.sample(300, steps=25, seed=1)
    norms = samples.norm(dim=1)
    assert (norms - 1).abs().min() > 1.0  # nowhere near the unit sphere (data norms are about 7)
    assert torch.allclose(sampler.mean, data.mean(0)) and torch.allclose(sampler.std, data.std(0).clamp_min(1e-4))
    assert torch.allclose(samples.mean(0), data.mean(0), atol=0.6)
    assert torch.allclose(samples.std(0), data.std(0), rtol=0.25)
    # both clusters are produced: sign of the first coordinate splits them
    share = float((samples[:, 0] > 0).float().mean())
    assert 0.2 < share < 0.8


def test_a_seeds_sample_does_not_depend_on_its_batch():
    sampler, _ = _alpha_sampler()
    batch = sampler.sample(seeds=[11, 12, 13], steps=10)
    assert torch.equal(batch[1:2], sampler.sample(seeds=[12], steps=10))
    assert torch.equal(batch[2:3], sampler.sample(seeds=[13, 99], steps=10)[:1])
    assert not torch.equal(batch[0], batch[1])


def test_filtered_candidates_are_never_returned():
    sampler, _ = _alpha_sampler()
    seeds = [5, 6]
    first = sampler.sample(seeds=[derive_seed(5, 0), derive_seed(6, 0)], steps=10)
    avoid = first.clone()  # the real face equals each seed's first candidate: it must be skipped
    out, used = sampler.sample_filtered(seeds, avoid=avoid, threshold=0.99, steps=10)
    assert all(k >= 1 for k in used)
    for i, k in enumerate(used):
        assert torch.equal(out[i:i + 1], sampler.sample(seeds=[derive_seed(seeds[i], k)], steps=10))
        assert float(torch.nn.functional.cosine_similarity(out[i], avoid[i], dim=0)) < 0.99
        for skipped in range(k):
            cand = sampler.sample(seeds=[derive_seed(seeds[i], skipped)], steps=10)[0]
            assert float(torch.nn.functional.cosine_similarity(cand, avoid[i], dim=0)) >= 0.99
    with pytest.raises(IdentityError, match="face 0"):
        sampler.sample_filtered([5], avoid=avoid[:1], threshold=-1.0, steps=5, max_candidates=3)  # everything too close


def test_ranked_candidates_are_ordered_by_cosine_distance():
    sampler, data = _alpha_sampler()
    ranked = sampler.sample_ranked(3, reference=data[0], threshold=0.999, count=6, steps=10)
    distance = 1 - torch.nn.functional.cosine_similarity(ranked, data[0][None], dim=1)
    assert torch.all(distance[1:] >= distance[:-1])


def test_unit_norm_sampler_and_save_load_keep_space(tmp_path):
    g = torch.Generator().manual_seed(3)
    sampler = LatentIDSampler(8, timesteps=50, hidden=32, depth=1, space="dlib")
    sampler.fit(torch.randn(40, 8, generator=g), steps=20, batch_size=16)
    assert torch.allclose(sampler.sample(seeds=[1, 2], steps=5).norm(dim=1), torch.ones(2), atol=1e-6)
    sampler.save(tmp_path / "lds.pt")
    loaded = LatentIDSampler.load(tmp_path / "lds.pt")
    assert loaded.space == "dlib" and loaded.unit_norm and loaded.digest() == sampler.digest()
    assert torch.equal(loaded.sample(seeds=[7], steps=5), sampler.sample(seeds=[7], steps=5))
    alpha, _ = _alpha_sampler()
    alpha.save(tmp_path / "alpha.pt")
    assert not LatentIDSampler.load(tmp_path / "alpha.pt").unit_norm


def test_derive_seed_is_stable_and_spread():
    assert derive_seed(42, 0) == 42
    assert derive_seed(42, 1) == derive_seed(42, 1) != derive_seed(43, 1)
    assert len({derive_seed(42, k) for k in range(50)}) == 50


def test_bank_from_sampler_stores_shape_coefficients(tmp_path):
    from anonloader.identity.bank import IdentityBank

    g = torch.Generator().manual_seed(5)
    ids = LatentIDSampler(8, timesteps=50, hidden=32, depth=1, space="dlib")
    ids.fit(torch.randn(60, 8, generator=g), steps=20, batch_size=16)
    alpha, _ = _alpha_sampler()
    bank = IdentityBank.from_sampler(ids, 4, threshold=0.99, steps=5, seed=3, shape_sampler=alpha)
    assert bank.coefficients.shape == (4, 6)
    expected = alpha.sample(seeds=[derive_seed(3, i + 1) for i in range(4)], steps=5)
    assert torch.equal(bank.coefficients, expected)  # not normalised, one seed per identity
    assert bank.meta["recognizer"] == {"name": "dlib"}
    plain = IdentityBank(bank.embeddings, names=bank.names, meta=bank.meta)
    assert plain.fingerprint() != bank.fingerprint()  # the coefficients are in the fingerprint
    loaded = IdentityBank.load(bank.save(tmp_path / "bank"))
    assert torch.equal(loaded.coefficients, bank.coefficients) and loaded.fingerprint() == bank.fingerprint()
    assert torch.equal(loaded.with_features(torch.randn(4, 3)).coefficients, bank.coefficients)
    with pytest.raises(Exception, match="unit_norm=False"):
        IdentityBank.from_sampler(ids, 2, threshold=0.99, steps=5, shape_sampler=ids)
