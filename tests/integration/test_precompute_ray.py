"""Ray Data precompute on a local cluster (``ray.init(num_cpus=2)``) equals a single-process run.

Keys are salted with one secret; seeds come from face content, so any rank or actor computing
a face produces the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _cache_faces import cache_entries, cache_samples, face_annotations, make_dataset

from anonloader.cache.precompute import precompute

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SECRET = "engine-test-secret-0123456789"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    precompute(make_dataset(8), out, method="blur", annotations=face_annotations, secret=SECRET, progress=False)
    return out


def test_ray_local_cluster_equals_one_process(tmp_path, single):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), "OMP_NUM_THREADS": "1"}})
    try:
        report = precompute(make_dataset(8), tmp_path / "ray", method="blur", annotations=face_annotations,
                            secret=SECRET, engine="ray", workers=2, batch_size=2, progress=False)
    finally:
        ray.shutdown()
    assert report.computed == 8
    assert cache_entries(tmp_path / "ray", SECRET) == cache_entries(single, SECRET)
    assert cache_samples(tmp_path / "ray", SECRET) == cache_samples(single, SECRET)
