"""Ray Data precompute on a local cluster (``ray.init(num_cpus=2)``) equals a single-process run.

Keys are salted with one secret; seeds come from face content, so any rank or actor computing
a face produces the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _cache_faces import face_annotations, make_dataset

from anonloader.cache.precompute import precompute
from anonloader.cache.store import AnonCache

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SECRET = "engine-test-secret-0123456789"


def _entries(path) -> dict[bytes, bytes]:
    with AnonCache(path) as cache:
        return {key: value for _, key, value in cache.iter_entries()}


def _samples(path) -> dict[int, bytes]:
    with AnonCache(path) as cache:
        return {index: value for _, index, value in cache.iter_samples()}


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
    assert _entries(tmp_path / "ray") == _entries(single)
    assert _samples(tmp_path / "ray") == _samples(single)
