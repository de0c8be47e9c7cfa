"""IDDiffuse's E_I features for the nearness-ranked keyed mapping (paper sec. 3.2): the bank's
features and the real face's come from the same identity encoder, and the mapper picks among
the nearest bank identities in that space."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import MethodError
from anonloader.identity.bank import IdentityBank
from anonloader.identity.mapper import KeyedMapper
from anonloader.methods.iddiffuse.model import IDDiffuse


def _model_and_bank(n: int = 24) -> tuple[IDDiffuse, IdentityBank]:
    torch.manual_seed(0)
    model = IDDiffuse(config="tiny", num_inference_steps=2)
    g = torch.Generator().manual_seed(3)
    tints = torch.rand(n, 3, 1, 1, generator=g)
    images = (0.6 * tints + 0.4 * torch.nn.functional.avg_pool2d(torch.rand(n, 3, 32, 32, generator=g), 5, 1, 2)).clamp(0, 1)
    return model, IdentityBank(torch.randn(n, 16, generator=g), images=images)


def test_identity_features_are_e_i_unit_vectors_at_any_crop_size() -> None:
    model, bank = _model_and_bank()
    features = model.identity_features(bank.images)
    assert features.shape == (len(bank), model.network.identity_encoder.dim) and features.device.type == "cpu"
    assert torch.allclose(features.norm(dim=1), torch.ones(len(bank)), atol=1e-5)
    with torch.no_grad():
        direct = model.network.identity_encoder(bank.images)
    assert torch.allclose(features, direct, atol=1e-6)
    assert torch.equal(model.identity_features(bank.images, batch_size=5), features)  # batch independent
    big = torch.nn.functional.interpolate(bank.images, size=(112, 112), mode="bilinear", align_corners=False)
    cosine = (model.identity_features(big) * features).sum(1)  # the assigner's 112 px crops: resized to 32
    assert float(cosine.min()) > 0.95
    with pytest.raises(MethodError):
        model.identity_features(bank.images[:, 0])


def test_with_bank_features_feeds_the_mapper_pool() -> None:
    model, bank = _model_and_bank()
    with pytest.raises(MethodError, match="images"):
        model.bank_features(IdentityBank(bank.embeddings))
    featured = model.with_bank_features(bank)
    assert torch.allclose(featured.features, model.identity_features(bank.images), atol=1e-6)
    assert featured.meta["features"]["space"] == "iddiffuse/E_I"
    assert featured.meta["features"]["weights_sha256"] == model.config()["weights_sha256"]
    assert featured.fingerprint() != bank.fingerprint()

    real = (bank.images[7] * 0.9 + 0.05).clamp(0, 1)  # a face that looks like bank identity 7
    feature = model.identity_features(real[None])[0]
    mapper = KeyedMapper("iddiffuse pool secret 0123456789", featured, candidate_pool=3)
    nearest = (featured.features @ feature).topk(3).indices.tolist()
    assert 7 in nearest
    chosen = [mapper.map(key, real_feature=feature).synthetic_id for key in ("ann", "ben", "cat")]
    assert sorted(chosen) == sorted(nearest)  # three people who look alike fill the 3-nearest pool
    other = model.with_bank_features(bank)  # same weights, same features, same fingerprint
    assert other.fingerprint() == featured.fingerprint()
