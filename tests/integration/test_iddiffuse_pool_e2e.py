"""IDDiffuse with the nearness-ranked keyed mapping through the pipeline: real detector, the real
offline recognizer (dlib) for keys and look-alike skipping, the tiny network's E_I for nearness.
Same people (t1.jpg and a changed copy) keep their synthetic identities, across a reloaded
store too; each identity is among the K nearest in E_I space while the pool has free ones."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from _identity_faces import changed_photo

from anonloader import Anonymizer
from anonloader.identity.assigner import KeyedIdentityAssigner
from anonloader.identity.bank import IdentityBank
from anonloader.methods.iddiffuse.model import IDDiffuse

SECRET = "correct horse battery staple"
K = 8


def _left_to_right(records):
    return [r.synthetic_id for r in sorted(records, key=lambda r: r.box[0])]


def _bank(model: IDDiffuse, n: int = 48) -> IdentityBank:
    g = torch.Generator().manual_seed(5)
    tints = torch.rand(n, 3, 1, 1, generator=g)
    images = (0.6 * tints + 0.4 * torch.nn.functional.avg_pool2d(torch.rand(n, 3, 32, 32, generator=g), 5, 1, 2)).clamp(0, 1)
    embeddings = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=1)  # dlib space
    return model.with_bank_features(IdentityBank(embeddings, images=images))


def test_iddiffuse_maps_people_near_in_e_i_space_and_keeps_them(t1_image, tmp_path):
    torch.manual_seed(0)
    model = IDDiffuse(config="tiny", num_inference_steps=2)
    model.bank = bank = _bank(model)  # the same bank (with E_I features) for the method and the mapper
    seen: list[torch.Tensor] = []

    def recorded_features(crops: torch.Tensor) -> torch.Tensor:
        features = model.identity_features(crops)
        seen.append(features)
        return features

    store, registry = tmp_path / "map.json", tmp_path / "registry.json"
    options = {"secret": SECRET, "bank": bank, "candidate_pool": K, "store": store, "registry_path": registry, "store_embeddings": True}
    assigner = KeyedIdentityAssigner("online", feature_fn=recorded_features, **options)
    anonymizer = Anonymizer(model, identity=assigner)
    first = anonymizer([t1_image])
    assert [r.status for r in first.records[0]] == ["anonymized"] * 6
    ids = [r.synthetic_id for r in first.records[0]]  # in the order the assigner mapped them
    assert len(set(ids)) == 6
    features = torch.cat(seen)
    assert len(features) == 6
    in_pool = 0
    for f, (feature, sid) in enumerate(zip(features, ids)):
        nearest = set((bank.features @ feature).topk(K).indices.tolist())
        if sid in nearest:
            in_pool += 1
        else:  # only when every pool member went to an earlier face
            assert nearest <= set(ids[:f]), f
    assert in_pool >= 4

    second = anonymizer([changed_photo(t1_image)])  # the same six people, other pixels
    assert _left_to_right(second.records[0]) == _left_to_right(first.records[0])
    assert len(seen) == 1  # known people: no features computed again
    assigner.save()
    assert "correct horse" not in store.read_text()

    reloaded = KeyedIdentityAssigner("online", feature_fn=model.identity_features, **options)  # another process
    again = Anonymizer(model, identity=reloaded)([changed_photo(t1_image)])
    assert _left_to_right(again.records[0]) == _left_to_right(first.records[0])

    other = KeyedIdentityAssigner("online", secret="another secret", bank=bank, feature_fn=model.identity_features, candidate_pool=K)
    other_ids = _left_to_right(Anonymizer(model, identity=other)([t1_image]).records[0])
    assert other_ids != _left_to_right(first.records[0])
    assert reloaded.config()["feature_fn"]["weights_sha256"] == model.config()["weights_sha256"]
