"""The embeddings store: atomic parts, resume markers, memory-mapped reading, fit from it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from anonloader.errors import ConfigError, IdentityError
from anonloader.identity.store import EmbeddingStore


def _part(rng: np.random.Generator, part: int, faces: int, dim: int = 8):
    vectors = rng.standard_normal((faces, dim)).astype(np.float32)
    hashes = [hashlib.sha256(b"%d-%d" % (part, f)).hexdigest() for f in range(faces)]
    return vectors, hashes, [(part * 10 + f, 0) for f in range(faces)]


def test_parts_finalize_into_memory_mapped_columns(tmp_path):
    rng = np.random.default_rng(0)
    store = EmbeddingStore.create(tmp_path / "emb", 8, {"recognizer": None, "part_size": 10})
    parts = [_part(rng, p, faces) for p, faces in enumerate([3, 0, 5])]
    for p in (2, 0):  # any order
        store.write_part(p, *parts[p])
    assert store.done_parts() == {0, 2} and not store.complete
    with pytest.raises(IdentityError, match="misses parts \\[1\\]"):
        store.finalize(3)
    with pytest.raises(IdentityError, match="not complete"):
        store.embeddings()
    # a half-written part (no .json marker) is not done and is simply written again
    (tmp_path / "emb" / "parts" / "part-00000001.npy").write_bytes(b"torn")
    assert store.done_parts() == {0, 2}
    store.write_part(1, *parts[1])
    store.finalize(3)
    again = EmbeddingStore(tmp_path / "emb")
    vectors = np.concatenate([p[0] for p in parts])
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    got = again.embeddings()
    assert isinstance(got, np.memmap) and np.allclose(got, expected, atol=1e-6)
    assert again.content_hashes() == [h for p in parts for h in p[1]]
    assert again.samples().tolist() == [list(s) for p in parts for s in p[2]]
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["complete"] and meta["faces"] == 8 and "biometric" in meta["sensitive"]


def test_resume_needs_the_same_settings(tmp_path):
    EmbeddingStore.create(tmp_path / "emb", 8, {"recognizer": {"name": "dlib"}, "part_size": 10})
    assert EmbeddingStore.create(tmp_path / "emb", 8, {"recognizer": {"name": "dlib"}, "part_size": 10}).dim == 8
    with pytest.raises(ConfigError, match="other settings"):
        EmbeddingStore.create(tmp_path / "emb", 8, {"recognizer": {"name": "dlib"}, "part_size": 20})
    with pytest.raises(IdentityError, match="not an embeddings store"):
        EmbeddingStore(tmp_path)


def test_fit_from_the_store_equals_fit_from_arrays_and_stores_no_embedding(tmp_path):
    from anonloader.identity.assigner import KeyedIdentityAssigner

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 8)).astype(np.float32)
    store = EmbeddingStore.create(tmp_path / "emb", 8, {"recognizer": None, "part_size": 4})
    all_vectors, all_hashes = [], []
    for p in range(3):
        vectors = centres[rng.integers(0, 6, 4)] + 0.01 * rng.standard_normal((4, 8)).astype(np.float32)
        hashes = [hashlib.sha256(b"fit-%d-%d" % (p, f)).hexdigest() for f in range(4)]
        store.write_part(p, vectors, hashes, [(p * 4 + f, 0) for f in range(4)])
        all_vectors.append(vectors)
        all_hashes += hashes
    store.finalize(3)
    secret = "store fit secret 0123456789abcdef"
    from_store = KeyedIdentityAssigner("cluster", secret=secret, bank=64, embedder=None, store=tmp_path / "map.json",
                                       registry_path=tmp_path / "registry.json")
    result = store.fit(from_store)
    direct = KeyedIdentityAssigner("cluster", secret=secret, bank=64, embedder=None)
    assert direct.fit(embeddings=torch.from_numpy(np.concatenate(all_vectors)), content_hashes=all_hashes).keys == result.keys
    from_store.save()
    # the mapping store and the registry hold keyed digests and ids, no embedding value
    for path in (tmp_path / "map.json", tmp_path / "registry.json"):
        text = path.read_text()
        state = json.loads(text)
        assert "embeddings" not in state and all(h not in text for h in all_hashes)
        for vector in np.concatenate(all_vectors)[:4]:
            assert f"{float(vector[0] / np.linalg.norm(vector)):.6f}"[:8] not in text
