"""IDDiffuse's default identity: given a bank and no ``identity=``, the pipeline keys every face
by the real person (dlib, offline), so two photos of one person get one synthetic identity,
chosen near the person in E_I space. Same-person cases: t1.jpg (six people) and a changed copy
(rescaled to 80 %, brightened, rotated by 3 degrees) — no package ships several photos per
person."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("dlib")

from _identity_faces import changed_photo  # noqa: E402

from anonloader import Anonymizer  # noqa: E402
from anonloader.errors import ConfigError  # noqa: E402
from anonloader.identity.bank import IdentityBank  # noqa: E402
from anonloader.methods.iddiffuse.model import DEFAULT_CANDIDATE_POOL, IDDiffuse  # noqa: E402

SECRET = "correct horse battery staple"


def _left_to_right(records):
    return [r.synthetic_id for r in sorted(records, key=lambda r: r.box[0])]


def _bank(n: int = 40, dim: int = 128) -> IdentityBank:
    g = torch.Generator().manual_seed(5)
    tints = torch.rand(n, 3, 1, 1, generator=g)
    images = (0.6 * tints + 0.4 * torch.nn.functional.avg_pool2d(torch.rand(n, 3, 32, 32, generator=g), 5, 1, 2)).clamp(0, 1)
    return IdentityBank(torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1), images=images)


@pytest.fixture(scope="module")
def model() -> IDDiffuse:
    torch.manual_seed(0)
    model = IDDiffuse(config="tiny", num_inference_steps=2)
    model.bank = _bank()
    return model


def test_two_photos_of_one_person_get_one_synthetic_identity_by_default(model, t1_image, monkeypatch):
    monkeypatch.setenv("ANONLOADER_SECRET", SECRET)
    anonymizer = Anonymizer(model)  # no identity=: IDDiffuse's keyed default
    assigner = anonymizer.identity
    assert assigner is not None and assigner.strategy == "online" and assigner.embedder.name == "dlib"
    assert assigner.mapper.candidate_pool == DEFAULT_CANDIDATE_POOL and assigner.feature_fn == model.identity_features
    assert anonymizer.config()["identity"]["feature_fn"]["weights_sha256"] == model.config()["weights_sha256"]

    torch.testing.assert_close(assigner.mapper.bank.features, model.identity_features(model.bank.images))  # the bank's E_I
    seen: list[torch.Tensor] = []
    features_of = assigner.feature_fn
    assigner.feature_fn = lambda crops: seen.append(features_of(crops)) or seen[-1]  # record the real faces' E_I

    first = anonymizer([t1_image]).records[0]
    second = anonymizer([changed_photo(t1_image)]).records[0]
    assert [r.status for r in first] == ["anonymized"] * 6
    ids = _left_to_right(first)
    assert None not in ids and len(set(ids)) == 6  # six people, six synthetic identities
    assert _left_to_right(second) == ids  # the same six people in another photo: the same identities
    assert len(seen) == 1 and len(seen[0]) == 6  # known people: no E_I features computed again
    # each identity is among the person's 16 nearest bank identities in E_I space, unless earlier
    # faces took every one of those
    bank_features = assigner.mapper.bank.features
    in_order = [r.synthetic_id for r in first]  # the order the assigner mapped them
    for f, (feature, sid) in enumerate(zip(seen[0], in_order)):
        nearest = set((bank_features @ feature).topk(DEFAULT_CANDIDATE_POOL).indices.tolist())
        assert sid in nearest or nearest <= set(in_order[:f]), f

    # the same secret in another process maps the same photo the same way; another secret otherwise
    assert _left_to_right(Anonymizer(model)([t1_image]).records[0]) == ids
    monkeypatch.setenv("ANONLOADER_SECRET", "another secret")
    assert _left_to_right(Anonymizer(model)([t1_image]).records[0]) != ids
    assert SECRET not in str(anonymizer.config())


def test_without_a_secret_the_default_is_a_config_error_and_false_opts_out(model, t1_image, monkeypatch):
    monkeypatch.delenv("ANONLOADER_SECRET", raising=False)
    monkeypatch.delenv("ANONLOADER_SECRET_FILE", raising=False)
    with pytest.raises(ConfigError, match="ANONLOADER_SECRET"):
        Anonymizer(model)
    plain = Anonymizer(model, identity=False)  # content seeds: each photo its own identity
    assert plain.identity is None and plain.config()["identity"] is None
    records = plain([t1_image]).records[0]
    assert len(records) == 6 and all(r.synthetic_id is None for r in records)
    # an explicit secret instead of the environment
    assigner = model.default_identity(secret=SECRET)
    assert Anonymizer(model, identity=assigner).identity is assigner
    # or the pipeline's secret=, as anonymize(..., secret=) and precompute pass it
    assert Anonymizer(model, secret=SECRET).identity is not None


def test_a_bank_in_another_recognizer_space_is_refused(monkeypatch):
    monkeypatch.setenv("ANONLOADER_SECRET", SECRET)
    torch.manual_seed(0)
    model = IDDiffuse(config="tiny", num_inference_steps=2, bank=_bank(dim=16))
    with pytest.raises(ConfigError, match="16-d"):
        Anonymizer(model)
    assert IDDiffuse(config="tiny").default_identity(secret=SECRET) is None  # no bank: nothing to map into
