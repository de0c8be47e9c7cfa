"""The keyed mapper, secrets, banks and the latent ID sampler (no recognizer needed)."""

from __future__ import annotations

import json

import pytest
import torch

from anonloader.errors import IdentityError, SecretError
from anonloader.identity.bank import IdentityBank
from anonloader.identity.keys import cluster_embeddings, label_key
from anonloader.identity.mapper import KeyedMapper, resolve_secret, seed_from_digest
from anonloader.identity.sampler import LatentIDSampler


def test_distinct_keys_distinct_ids_until_the_bank_is_full_and_order_free():
    keys = [f"label:{i}" for i in range(20)]
    a = KeyedMapper("s3cret-0123456789", 20).map_many(keys)
    b = KeyedMapper("s3cret-0123456789", 20).map_many(list(reversed(keys)))[::-1]
    assert [x.synthetic_id for x in a] == [x.synthetic_id for x in b]
    assert sorted(x.synthetic_id for x in a) == list(range(20))
    other = KeyedMapper("other-secret-987654", 20).map_many(keys)
    assert [x.synthetic_id for x in other] != [x.synthetic_id for x in a]
    assert all(x.seed == seed_from_digest(x.key_digest) and 0 <= x.seed < 2**63 for x in a)


def test_store_round_trip_and_wrong_secret(tmp_path):
    mapper = KeyedMapper("s3cret-0123456789", 50, store=tmp_path / "m.json")
    first = mapper.map("label:alice")
    mapper.save()
    again = KeyedMapper("s3cret-0123456789", 50, store=tmp_path / "m.json").map("label:alice")
    assert again == first
    text = (tmp_path / "m.json").read_text()
    assert "alice" not in text and "s3cret" not in text
    with pytest.raises(SecretError) as caught:
        KeyedMapper("wrong-secret-0000", 50, store=tmp_path / "m.json")
    assert "wrong-secret" not in str(caught.value)
    with pytest.raises(IdentityError):
        KeyedMapper("s3cret-0123456789", 51, store=tmp_path / "m.json")  # another bank


def test_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("ANONLOADER_SECRET", raising=False)
    monkeypatch.delenv("ANONLOADER_SECRET_FILE", raising=False)
    with pytest.raises(SecretError, match="ANONLOADER_SECRET"):
        resolve_secret()
    (tmp_path / "key").write_text("from-file-secret\n")
    assert resolve_secret(secret_file=tmp_path / "key") == resolve_secret("from-file-secret")
    monkeypatch.setenv("ANONLOADER_SECRET", "from-env")
    assert resolve_secret() == resolve_secret("from-env")
    assert "from-env" not in repr(resolve_secret())


def test_skips_bank_identities_that_look_like_the_real_face():
    bank = IdentityBank(torch.eye(8))
    mapper = KeyedMapper("s3cret-0123456789", bank, threshold=0.9)
    for i in range(20):
        key = f"label:{i}"
        first = next(iter(mapper.candidates(mapper.digest(key))))
        chosen = KeyedMapper("s3cret-0123456789", bank, threshold=0.9).map(key, torch.eye(8)[first])
        assert chosen.synthetic_id != first


def test_cluster_keys_do_not_depend_on_order():
    torch.manual_seed(1)
    people = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    faces = torch.nn.functional.normalize(people.repeat_interleave(4, 0) + 0.05 * torch.randn(12, 16), dim=1)
    hashes = [f"{i:02d}" for i in range(12)]
    result = cluster_embeddings(faces, hashes, threshold=0.9)
    perm = torch.randperm(12)
    shuffled = cluster_embeddings(faces[perm], [hashes[i] for i in perm], threshold=0.9)
    assert [shuffled.keys[list(perm).index(i)] for i in range(12)] == result.keys
    assert len(set(result.keys)) == 3 and result.keys[0] == "cluster:00" and result.keys[4] == "cluster:04"
    assert label_key(torch.tensor(7)) == "label:7"


def test_bank_save_load_fingerprint(tmp_path):
    bank = IdentityBank(torch.randn(5, 8), torch.rand(5, 3, 16, 16), meta={"source": "test"})
    bank.save(tmp_path / "b")
    loaded = IdentityBank.load(tmp_path / "b")
    assert loaded.fingerprint() == bank.fingerprint() and torch.equal(loaded.embeddings, bank.embeddings)
    info = json.loads((tmp_path / "b" / "bank.json").read_text())
    info["names"][0] = "tampered"
    (tmp_path / "b" / "bank.json").write_text(json.dumps(info))
    with pytest.raises(IdentityError, match="fingerprint"):
        IdentityBank.load(tmp_path / "b")


def test_latent_id_sampler_trains_and_samples_distinct_identities(tmp_path):
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    data = torch.nn.functional.normalize(centres.repeat(32, 1) + 0.1 * torch.randn(256, 16), dim=1)
    sampler = LatentIDSampler(16, timesteps=100, hidden=64, depth=2)
    losses = sampler.fit(data, steps=300, batch_size=64)
    assert sum(losses[-30:]) / 30 < sum(losses[:30]) / 30
    avoid = data[:1]
    bank = IdentityBank.from_sampler(sampler, 5, threshold=0.95, avoid=avoid, steps=20)
    sims = bank.embeddings @ bank.embeddings.T - 2 * torch.eye(5)
    assert len(bank) == 5 and sims.max() < 0.95 and (bank.embeddings @ avoid[0]).max() < 0.95
    # samples look like the training distribution: most are near one of the training centres
    assert (bank.embeddings @ centres.T).max(dim=1).values.mean() > 0.5
    sampler.save(tmp_path / "lds.pt")
    assert torch.allclose(LatentIDSampler.load(tmp_path / "lds.pt").sample(3, seed=4), sampler.sample(3, seed=4))
