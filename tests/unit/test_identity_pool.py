"""Nearness-ranked keyed mapping (``KeyedMapper(candidate_pool=K)``; IDDiffuse sec. 3.2): the
synthetic identity is among the K bank identities nearest to the real face in an attribute
space, picked in a keyed order, never a look-alike, and kept for every later photo of the key."""

from __future__ import annotations

import json

import pytest
import torch

from anonloader.errors import ConfigError, IdentityError
from anonloader.identity.assigner import KeyedIdentityAssigner
from anonloader.identity.bank import IdentityBank
from anonloader.identity.mapper import KeyedMapper

SECRET = "pool test secret 0123456789abcdef"
OTHER_SECRET = "another pool secret 9876543210"


def _clustered_bank(n_clusters: int = 8, per_cluster: int = 16, seed: int = 0) -> tuple[IdentityBank, torch.Tensor]:
    """Bank whose features (8-d) form ``n_clusters`` attribute clusters; recognizer embeddings
    (16-d) are unrelated random identities. Returns (bank, cluster centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, 8, generator=g), dim=1)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    features = centres[labels] + 0.15 * torch.randn(len(labels), 8, generator=g)
    embeddings = torch.randn(len(labels), 16, generator=g)
    return IdentityBank(embeddings, features=features), centres


def _k_nearest(bank: IdentityBank, feature: torch.Tensor, k: int) -> set[int]:
    sims = bank.features @ torch.nn.functional.normalize(feature.float(), dim=0)
    return set(sims.topk(k).indices.tolist())


def _photo(centre: torch.Tensor, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    return centre + noise * torch.randn(centre.shape, generator=generator)


def test_chosen_identity_is_among_the_k_nearest_keyed_and_deterministic() -> None:
    bank, centres = _clustered_bank()
    g = torch.Generator().manual_seed(1)
    keys = [f"person-{i}" for i in range(24)]
    feats = [_photo(centres[i % len(centres)], g) for i in range(len(keys))]
    k = 6
    first = KeyedMapper(SECRET, bank, candidate_pool=k)
    ids = [first.map(key, real_feature=f).synthetic_id for key, f in zip(keys, feats)]
    for key, f, sid in zip(keys, feats, ids):
        assert sid in _k_nearest(bank, f, k), key
    assert len(set(ids)) == len(ids)  # distinct while the pools allow (3 keys per cluster, K = 6)

    again = KeyedMapper(SECRET, bank, candidate_pool=k)  # fresh process, same secret: same ids
    assert [again.map(key, real_feature=f).synthetic_id for key, f in zip(keys, feats)] == ids

    other = KeyedMapper(OTHER_SECRET, bank, candidate_pool=k)
    other_ids = [other.map(key, real_feature=f).synthetic_id for key, f in zip(keys, feats)]
    assert all(sid in _k_nearest(bank, f, k) for f, sid in zip(feats, other_ids))
    assert sum(a != b for a, b in zip(ids, other_ids)) >= len(keys) // 2  # another secret, another mapping

    plain = KeyedMapper(SECRET, bank)  # no pool: the keyed order alone ignores nearness
    plain_ids = [plain.map(key, real_feature=f).synthetic_id for key, f in zip(keys, feats)]
    assert sum(sid in _k_nearest(bank, f, k) for f, sid in zip(feats, plain_ids)) < len(keys) // 2


def test_same_person_second_photo_keeps_the_first_assignment(tmp_path) -> None:
    bank, centres = _clustered_bank()
    g = torch.Generator().manual_seed(2)
    store = tmp_path / "map.json"
    photo_1 = _photo(centres[3], g)
    photo_2 = _photo(centres[3], g, noise=0.3)  # another photo: its neighbourhood ranking differs
    assert not torch.equal(KeyedMapper(SECRET, bank, candidate_pool=6).rank(photo_1)[:6],
                           KeyedMapper(SECRET, bank, candidate_pool=6).rank(photo_2)[:6])
    far = centres[5].clone()  # a photo so different it would pool elsewhere

    mapper = KeyedMapper(SECRET, bank, candidate_pool=6, store=store)
    chosen = mapper.map("alice", real_feature=photo_1).synthetic_id
    assert mapper.map("alice", real_feature=photo_2).synthetic_id == chosen
    assert mapper.map("alice", real_feature=far).synthetic_id == chosen
    mapper.save()

    state = json.loads(store.read_text())
    assert state["candidate_pool"] == 6 and list(state["assignments"].values()) == [chosen]
    assert all(not isinstance(v, list) for v in state.values())  # no feature or embedding on disk

    reloaded = KeyedMapper(SECRET, bank, candidate_pool=6, store=store)  # another process
    assert reloaded.map("alice", real_feature=far).synthetic_id == chosen
    # without the table, the far photo would have pooled elsewhere: the table is what keeps it
    fresh = KeyedMapper(SECRET, bank, candidate_pool=6)
    assert fresh.map("alice", real_feature=far).synthetic_id != chosen


def test_keyed_order_within_the_pool_does_not_depend_on_the_ranking() -> None:
    bank, _ = _clustered_bank()
    pool = list(range(10, 16))
    rest = [i for i in range(len(bank)) if i not in pool]
    forward = KeyedMapper(SECRET, bank, candidate_pool=6, ranker=lambda f: torch.tensor(pool + rest))
    backward = KeyedMapper(SECRET, bank, candidate_pool=6, ranker=lambda f: torch.tensor(pool[::-1] + rest[::-1]))
    feature = torch.zeros(8)
    for key in ("a", "b", "c"):
        digest = forward.digest(key)
        assert forward.pool(digest, feature) == backward.pool(digest, feature)
        assert sorted(forward.pool(digest, feature)) == pool
        assert forward.map(key, real_feature=feature).synthetic_id == backward.map(key, real_feature=feature).synthetic_id
    assert len({tuple(forward.pool(forward.digest(k), feature)) for k in "abcdefgh"}) > 1  # keyed: differs per key
    assert "ranker" in forward.config() and forward.config()["candidate_pool"] == 6


def test_pool_skips_lookalikes_then_falls_back_to_the_global_keyed_order() -> None:
    bank, centres = _clustered_bank()
    real_feature = centres[0]
    nearest = KeyedMapper(SECRET, bank, candidate_pool=5).rank(real_feature)[:5].tolist()
    real_embedding = torch.randn(16, generator=torch.Generator().manual_seed(9))
    embeddings = bank.embeddings.clone()
    embeddings[nearest[:2]] = torch.nn.functional.normalize(real_embedding, dim=0)  # two look-alikes in the pool
    bank = IdentityBank(embeddings, features=bank.features)
    mapper = KeyedMapper(SECRET, bank, candidate_pool=5, threshold=0.9)
    ids = [mapper.map(f"key-{i}", real_embedding, real_feature).synthetic_id for i in range(7)]
    assert len(set(ids)) == 7  # distinct keys, distinct ids
    assert not set(ids) & set(nearest[:2])  # never the look-alikes
    assert set(ids[:3]) == set(nearest[2:])  # the pool's admissible members first
    assert all(sid not in nearest for sid in ids[3:])  # then the global keyed order
    order = [c for c in mapper.candidates(mapper.digest("key-3")) if c not in nearest]
    assert ids[3] == order[0]


def test_map_many_with_features_does_not_depend_on_key_order() -> None:
    bank, centres = _clustered_bank()
    g = torch.Generator().manual_seed(4)
    keys = [f"k{i}" for i in range(12)]
    feats = torch.stack([_photo(centres[i % 2], g) for i in range(len(keys))])  # crowded: 6 keys per cluster
    a = KeyedMapper(SECRET, bank, candidate_pool=4).map_many(keys, real_features=feats)
    perm = torch.randperm(len(keys), generator=g).tolist()
    b = KeyedMapper(SECRET, bank, candidate_pool=4).map_many([keys[i] for i in perm], real_features=feats[perm])
    by_key = {keys[i]: x.synthetic_id for i, x in zip(perm, b)}
    assert [x.synthetic_id for x in a] == [by_key[k] for k in keys]
    assert len({x.synthetic_id for x in a}) == len(keys)


def test_bank_features_save_load_and_fingerprint(tmp_path) -> None:
    plain = IdentityBank(torch.eye(4))
    # a bank without features hashes exactly as before features existed (stores stay valid)
    assert plain.fingerprint() == "b941fcfd846c9a3cd48cac6f9aca6e8baa18c68b3ee56aa3b4bf6e00b3ac484f"
    assert plain.features is None
    featured = plain.with_features(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]), {"space": "test"})
    assert featured.meta["features"] == {"space": "test"} and "features" not in plain.meta
    assert torch.allclose(featured.features.norm(dim=1), torch.ones(4))
    assert featured.fingerprint() != plain.fingerprint()
    assert IdentityBank(plain.embeddings, meta=featured.meta, features=featured.features * 1.0).fingerprint() == featured.fingerprint()

    loaded = IdentityBank.load(featured.save(tmp_path / "featured"))
    assert torch.equal(loaded.features, featured.features) and loaded.fingerprint() == featured.fingerprint()
    assert IdentityBank.load(plain.save(tmp_path / "plain")).features is None

    tensors = torch.load(tmp_path / "featured" / "bank.pt", weights_only=True)
    tensors["features"] = torch.flip(tensors["features"], dims=[0])
    torch.save(tensors, tmp_path / "featured" / "bank.pt")
    with pytest.raises(IdentityError, match="fingerprint"):
        IdentityBank.load(tmp_path / "featured")
    with pytest.raises(ConfigError, match="features"):
        IdentityBank(torch.eye(4), features=torch.ones(3, 2))


def test_configuration_errors() -> None:
    bank, _ = _clustered_bank()
    with pytest.raises(ConfigError, match="features"):
        KeyedMapper(SECRET, IdentityBank(bank.embeddings), candidate_pool=4)
    with pytest.raises(ConfigError, match="positive"):
        KeyedMapper(SECRET, bank, candidate_pool=0)
    with pytest.raises(IdentityError, match="dims"):
        KeyedMapper(SECRET, bank, candidate_pool=4).map("x", real_feature=torch.ones(5))
    with pytest.raises(ConfigError, match="candidate_pool"):
        KeyedIdentityAssigner("label", secret=SECRET, bank=bank, embedder=None, feature_fn=lambda c: c.mean((2, 3)))
    # without a pool, config and state are as before (cache fingerprints of existing users hold)
    assert "candidate_pool" not in KeyedMapper(SECRET, bank).config()
    assert "candidate_pool" not in KeyedMapper(SECRET, bank).state()


def _colour_features(crops: torch.Tensor) -> torch.Tensor:
    """A simple attribute space: per-channel mean and standard deviation of the crop (``F,6``)."""
    flat = crops.flatten(2)
    return torch.cat([flat.mean(2), flat.std(2)], dim=1)


def test_assigner_ranks_with_feature_fn_and_keeps_the_first_assignment() -> None:
    g = torch.Generator().manual_seed(6)
    tints = torch.rand(48, 3, 1, 1, generator=g)
    images = (tints * 0.8 + 0.1 + 0.05 * torch.randn(48, 3, 16, 16, generator=g)).clamp(0, 1)
    bank = IdentityBank(torch.randn(48, 16, generator=g), images=images)
    bank = bank.with_features(_colour_features(bank.images), {"space": "colour"})
    calls: list[int] = []

    def feature_fn(crops: torch.Tensor) -> torch.Tensor:
        calls.append(len(crops))
        return _colour_features(crops)

    assigner = KeyedIdentityAssigner("label", secret=SECRET, bank=bank, embedder=None, feature_fn=feature_fn, candidate_pool=4)
    photo = (torch.tensor([0.8, 0.3, 0.2]).view(3, 1, 1) + 0.05 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1)
    other = (torch.tensor([0.2, 0.3, 0.8]).view(3, 1, 1) + 0.05 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1)
    first = assigner.assign(torch.stack([photo, other]), torch.tensor([0, 1]), ["alice", "bob"])
    assert calls == [2]
    for crop, assignment in zip((photo, other), first):
        assert assignment.synthetic_id in _k_nearest(bank, _colour_features(crop[None])[0], 4)
    assert first[0].synthetic_id != first[1].synthetic_id

    changed = (photo * 0.8).clamp(0, 1)  # a changed copy of alice's photo: its own ranking differs
    again = assigner.assign(changed[None], torch.tensor([0]), ["alice"])
    assert again[0].synthetic_id == first[0].synthetic_id and calls == [2]  # no features for known keys

    other_secret = KeyedIdentityAssigner("label", secret=OTHER_SECRET, bank=bank, embedder=None, feature_fn=_colour_features, candidate_pool=4)
    ids = [other_secret.assign(photo[None], torch.tensor([0]), [f"person-{i}"])[0].synthetic_id for i in range(8)]
    mine = [assigner.assign(photo[None], torch.tensor([0]), [f"person-{i}"])[0].synthetic_id for i in range(8)]
    assert ids != mine
    assert assigner.config()["feature_fn"]["name"].endswith("feature_fn")
    assert assigner.config()["mapper"]["candidate_pool"] == 4


class _ColourEmbedder:
    """A toy recognizer for the cluster strategy: the unit mean colour (faces of one tint match)."""

    name, dim, crop_size, template, threshold = "colour", 3, 16, "arcface", 0.995

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(crops.flatten(2).mean(2), dim=1)

    def config(self) -> dict:
        return {"name": self.name, "threshold": self.threshold}


def test_cluster_fit_ranks_each_cluster_by_its_mean_feature_in_any_order() -> None:
    g = torch.Generator().manual_seed(8)
    images = (torch.rand(40, 3, 1, 1, generator=g) * 0.8 + 0.1 + 0.05 * torch.randn(40, 3, 16, 16, generator=g)).clamp(0, 1)
    unlike = -torch.rand(40, 3, generator=g)  # recognizer space of the toy embedder, never a look-alike
    bank = IdentityBank(unlike, images=images).with_features(_colour_features(images))
    tints = torch.tensor([[0.8, 0.3, 0.2], [0.2, 0.3, 0.8], [0.3, 0.8, 0.3]])
    crops = torch.stack([(t.view(3, 1, 1) + 0.04 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1) for t in tints for _ in range(3)])

    def ids(order: list[int]) -> list[int | None]:
        assigner = KeyedIdentityAssigner("cluster", secret=SECRET, bank=bank, embedder=_ColourEmbedder(),
                                         feature_fn=_colour_features, candidate_pool=4)
        assigner.fit(crops[order])
        out = assigner.assign(crops[order], torch.arange(len(order)), None)
        by_face = dict(zip(order, (a.synthetic_id for a in out)))
        return [by_face[i] for i in range(len(crops))]

    first = ids(list(range(9)))
    assert len(set(first)) == 3 and all(len(set(first[3 * p : 3 * p + 3])) == 1 for p in range(3))
    for p in range(3):
        mean = torch.nn.functional.normalize(torch.nn.functional.normalize(_colour_features(crops[3 * p : 3 * p + 3]), dim=1).sum(0), dim=0)
        assert first[3 * p] in _k_nearest(bank, mean, 4)
    assert ids(torch.randperm(9, generator=g).tolist()) == first
