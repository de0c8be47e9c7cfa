"""Dataset-scale identity clustering: the shared index, the k-NN graph, its components, the
online registry and the bank search through the index (synthetic embeddings, seeded)."""

from __future__ import annotations

import hashlib
import pickle
from collections import deque

import numpy as np
import pytest
import torch

from anonloader.identity.clustering import component_roots, pairwise_precision_recall
from anonloader.identity.index import VectorIndex, faiss_available
from anonloader.identity.keys import IdentityRegistry, cluster_embeddings

THRESHOLD = 0.917  # dlib's same-person cosine


def clustered(n: int, identities: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` unit vectors around ``identities`` random unit centres: ``centre + noise * g / sqrt(D)``
    (pairwise cosine within an identity about ``1 / (1 + noise^2)``), their true identities and
    content hashes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, identities, n)
    x = centres[truth] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = [hashlib.sha256(f"face-{seed}-{i}".encode()).hexdigest() for i in range(n)]
    return x.astype(np.float32), truth, hashes


# ---------------------------------------------------------------------------------- index
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exact_index_matches_brute_force_and_updates(backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss-cpu not installed")
    x, _, _ = clustered(300, 30, 16, 0.5)
    index = VectorIndex.build(x[:200], kind="exact", backend=backend)
    index.add(x[200:])
    index.replace([5], x[7])
    stored = x.copy()
    stored[5] = x[7]
    scores, ids = index.search(x[:40], 6)
    expected = torch.from_numpy(x[:40]) @ torch.from_numpy(stored).T
    top = expected.topk(6, dim=1)
    assert np.allclose(scores, top.values.numpy(), atol=1e-5)
    assert np.allclose(np.take_along_axis(expected.numpy(), ids, axis=1), top.values.numpy(), atol=1e-5)
    small_scores, small_ids = VectorIndex.build(x[:3], backend=backend).search(x[:2], 5)
    assert (small_ids[:, 3:] == -1).all() and np.isinf(small_scores[:, 3:]).all()


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_ivf_index_finds_same_person_neighbours_and_pickles():
    x, _, _ = clustered(4000, 400, 64, 0.3)
    exact = VectorIndex.build(x)
    ivf = VectorIndex.build(x, kind="ivf", nprobe=8)
    e_scores, e_ids = exact.search(x[:500], 16)
    i_scores, i_ids = ivf.search(x[:500], 16)
    true = [set(e_ids[r][e_scores[r] >= THRESHOLD]) for r in range(500)]
    found = sum(len(t & set(i_ids[r])) for r, t in enumerate(true))
    assert found / sum(len(t) for t in true) >= 0.99
    copy = pickle.loads(pickle.dumps(ivf))
    assert np.array_equal(copy.search(x[:50], 16)[1], i_ids[:50])


# ---------------------------------------------------------------------------------- graph
def _bfs_roots(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(left.tolist(), right.tolist()):
        neighbours[a].append(b)
        neighbours[b].append(a)
    roots = np.full(n, -1)
    for start in range(n):  # ascending: the first unvisited row is its component's smallest
        if roots[start] >= 0:
            continue
        queue = deque([start])
        roots[start] = start
        while queue:
            for b in neighbours[queue.popleft()]:
                if roots[b] < 0:
                    roots[b] = start
                    queue.append(b)
    return roots


def test_component_roots_match_breadth_first_search_in_any_edge_order():
    rng = np.random.default_rng(3)
    n = 500
    left, right = rng.integers(0, n, 420), rng.integers(0, n, 420)
    chain = np.arange(100, 160)  # a long path: many hooking rounds
    left, right = np.concatenate([left, chain[:-1]]), np.concatenate([right, chain[1:]])
    expected = _bfs_roots(n, left, right)
    assert np.array_equal(component_roots(n, left, right), expected)
    perm = rng.permutation(len(left))
    assert np.array_equal(component_roots(n, right[perm], left[perm]), expected)


def test_pairwise_precision_recall_counts_pairs():
    rng = np.random.default_rng(4)
    predicted, truth = rng.integers(0, 6, 60), rng.integers(0, 5, 60)
    same_p = predicted[:, None] == predicted[None]
    same_t = truth[:, None] == truth[None]
    upper = np.triu(np.ones((60, 60), dtype=bool), 1)
    both = (same_p & same_t & upper).sum()
    precision, recall = pairwise_precision_recall(predicted, truth)
    assert precision == pytest.approx(both / (same_p & upper).sum())
    assert recall == pytest.approx(both / (same_t & upper).sum())


def test_graph_and_leader_agree_where_both_are_exact():
    """Well-separated identities (every same-person pair above the threshold, every other pair
    far below): both algorithms find the true identities, with the same keys."""
    x, truth, hashes = clustered(600, 40, 128, 0.15, seed=1)
    graph = cluster_embeddings(torch.from_numpy(x), hashes, THRESHOLD, method="graph")
    leader = cluster_embeddings(torch.from_numpy(x), hashes, THRESHOLD, method="leader")
    assert graph.keys == leader.keys and graph.cluster_keys == leader.cluster_keys
    assert pairwise_precision_recall(graph.keys, truth) == (1.0, 1.0)
    members = {}
    for key, h in zip(graph.keys, hashes):
        members.setdefault(key, []).append(h)
    assert all(key == "cluster:" + min(group) for key, group in members.items())
    assert torch.allclose(graph.centroids, leader.centroids, atol=1e-6)


def test_graph_is_not_worse_than_leader_on_noisy_identities():
    """Noise puts same-person pairs on both sides of the threshold (cosine ~0.92 on average)."""
    x, truth, hashes = clustered(1500, 150, 128, 0.3, seed=2)
    results = {m: cluster_embeddings(torch.from_numpy(x), hashes, THRESHOLD, method=m) for m in ("graph", "leader")}
    (gp, gr), (lp, lr) = (pairwise_precision_recall(results[m].keys, truth) for m in ("graph", "leader"))
    assert gp >= lp - 1e-9 and gr >= lr - 1e-9
    assert gr > lr + 0.02  # chains of same-person pairs join what one leader centroid cannot


@pytest.mark.parametrize("index_kind", ["exact", "ivf"])
def test_keys_do_not_depend_on_input_order(index_kind):
    if index_kind == "ivf" and not faiss_available():
        pytest.skip("faiss-cpu not installed")
    x, _, hashes = clustered(1200, 120, 64, 0.3, seed=5)
    result = cluster_embeddings(x, hashes, THRESHOLD, index_kind=index_kind)
    perm = np.random.default_rng(6).permutation(len(x))
    shuffled = cluster_embeddings(x[perm], [hashes[i] for i in perm], THRESHOLD, index_kind=index_kind)
    assert shuffled.keys == [result.keys[i] for i in perm]
    assert shuffled.cluster_keys == result.cluster_keys and torch.equal(shuffled.centroids, result.centroids)
    # every face of one cluster has the key of its smallest content hash
    assert len(set(result.keys)) == len(result.cluster_keys)
    new = result.key_of(torch.from_numpy(x[:20]), THRESHOLD)
    assert all(k is not None for k in new)


# ---------------------------------------------------------------------------------- registry, bank
def _reference_registry(embeddings: torch.Tensor, hashes: list[str], threshold: float) -> list[str]:
    """The registry's rule, written as a plain loop over identities."""
    keys: list[str] = []
    sums: list[torch.Tensor] = []
    out = []
    for vector, content in zip(torch.nn.functional.normalize(embeddings, dim=1), hashes):
        best, best_sim = None, -2.0
        for i, total in enumerate(sums):
            sim = float(torch.nn.functional.normalize(total, dim=0) @ vector)
            if sim > best_sim:
                best, best_sim = i, sim
        if best is None or best_sim < threshold:
            keys.append("online:" + content)
            sums.append(vector.clone())
            best = len(sums) - 1
        else:
            sums[best] = sums[best] + vector
        out.append(keys[best])
    return out


def test_online_registry_through_the_index_matches_the_plain_loop(tmp_path):
    x, _, hashes = clustered(400, 40, 32, 0.3, seed=7)
    registry = IdentityRegistry(None, "registry secret 0123456789", THRESHOLD)
    embeddings = torch.from_numpy(x)
    got = registry.key_of(embeddings[:150], hashes[:150]) + registry.key_of(embeddings[150:], hashes[150:])
    assert got == _reference_registry(embeddings, hashes, THRESHOLD)


def test_mapper_nearest_bank_search_equals_the_full_ranking():
    from anonloader.identity.bank import IdentityBank
    from anonloader.identity.mapper import KeyedMapper

    rng = np.random.default_rng(8)
    embeddings = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((300, 16)).astype(np.float32)), dim=1)
    features = torch.from_numpy(rng.standard_normal((300, 8)).astype(np.float32))
    features[100:140] = features[3]  # duplicates: ties at the pool boundary fall back to the full ranking
    bank = IdentityBank(embeddings, features=features)
    mapper = KeyedMapper("bank search secret 0123456789", bank, candidate_pool=12)
    for row in (3, 17, 250):
        query = bank.features[row] + 0.01 * torch.from_numpy(rng.standard_normal(8).astype(np.float32))
        assert mapper.nearest(query, 12) == mapper.rank(query).tolist()[:12]
    sims, ids = bank.nearest(embeddings[[4, 9]])
    assert ids.tolist() == [4, 9] and torch.allclose(sims, torch.ones(2), atol=1e-5)
    assert "_indexes" in mapper.__dict__ and pickle.loads(pickle.dumps(mapper))._indexes == {}


def test_a_person_with_many_more_faces_than_k_stays_one_cluster():
    """60 photos of one person, k=16 neighbours each: one cluster (a mutual-only graph would
    split it into groups that list only each other)."""
    x, truth, hashes = clustered(60, 1, 128, 0.15, seed=9)
    result = cluster_embeddings(x, hashes, THRESHOLD, k=16)
    assert len(result.cluster_keys) == 1 and result.cluster_keys[0] == "cluster:" + min(hashes)


def test_a_clustered_face_far_from_its_centroid_keeps_its_cluster_by_content_hash():
    """Single linkage chains faces: the ends of a chain are far from the cluster's mean. A face
    of the clustered set is found by its content hash, not only by nearness to the centroid."""
    from anonloader.identity.keys import cluster_embeddings

    angles = torch.arange(10) * (20.0 * torch.pi / 180)  # neighbours at cosine 0.94, ends 180 degrees apart
    chain = torch.zeros(10, 8)
    chain[:, 0], chain[:, 1] = torch.cos(angles), torch.sin(angles)
    hashes = [f"{i:064x}" for i in range(10)]
    result = cluster_embeddings(chain, hashes, 0.917)
    assert len(set(result.keys)) == 1
    end = chain[:1]
    assert result.key_of(end, 0.917) == [None]  # nearness alone loses it
    assert result.key_of(end, 0.917, hashes[:1]) == [result.keys[0]]
    assert result.key_of(end, 0.917, ["f" * 64]) == [None]  # an unknown face: nearness only
    assert pickle.loads(pickle.dumps(result)).key_of(end, 0.917, hashes[:1]) == [result.keys[0]]
