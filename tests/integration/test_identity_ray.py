"""The cluster strategy's k-NN graph sharded over a local Ray cluster (``ray.init(num_cpus=2)``,
Ray Data blocks) gives the same clusters, keys and synthetic identities as one process."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from anonloader.identity.assigner import KeyedIdentityAssigner

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SECRET = "ray identity secret 0123456789abcdef"


def _clustered(n: int, dim: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((n // 8, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [hashlib.sha256(b"ray-face-%d" % i).hexdigest() for i in range(n)]


def test_ray_sharded_fit_equals_one_process():
    ray = pytest.importorskip("ray")
    x, hashes = _clustered(1200, 64)

    def fit(shards: int, order: np.ndarray) -> KeyedIdentityAssigner:
        assigner = KeyedIdentityAssigner("cluster", secret=SECRET, bank=4096, embedder=None)
        assigner.fit(embeddings=torch.from_numpy(x[order]), content_hashes=[hashes[i] for i in order], shards=shards)
        return assigner

    identity = np.arange(len(x))
    local = fit(1, identity)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), "OMP_NUM_THREADS": "1"}})
    try:
        reverse = identity[::-1].copy()
        sharded = fit(3, reverse)  # other input order and 3 blocks
    finally:
        ray.shutdown()
    assert sharded.clusters.keys[::-1] == local.clusters.keys
    assert sharded.clusters.cluster_keys == local.clusters.cluster_keys
    assert torch.equal(sharded.clusters.centroids, local.clusters.centroids)
    assert sharded._assigned == local._assigned  # same keyed digests -> same synthetic ids and seeds
    assert 1 < len(local.clusters.cluster_keys) < len(x)
