"""torchrun (2 ranks, gloo) precompute equals a single-process run.

Keys are salted with one secret; every face gets its synthetic identity from the keyed mapper
(``label`` strategy over a bank), so any rank computing a face must pick the same synthetic
identity and produce the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cache_faces import cache_entries, cache_samples, face_annotations, identity_label, make_dataset
from _torchrun import free_port

from anonloader.cache.precompute import precompute
from anonloader.cache.store import AnonCache
from anonloader.identity.assigner import KeyedIdentityAssigner
from anonloader.identity.bank import IdentityBank

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SECRET = "engine-test-secret-0123456789"



@pytest.fixture(scope="module")
def bank_path(tmp_path_factory) -> Path:
    embeddings = torch.nn.functional.normalize(torch.randn(16, 128, generator=torch.Generator().manual_seed(3)), dim=1)
    return IdentityBank(embeddings).save(tmp_path_factory.mktemp("bank") / "bank")


@pytest.fixture(scope="module")
def single(tmp_path_factory, bank_path) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    identity = KeyedIdentityAssigner("label", secret=SECRET, bank=IdentityBank.load(bank_path))
    precompute(
        make_dataset(8), out, method="blur", annotations=face_annotations, identity=identity,
        identity_label=identity_label, secret=SECRET, progress=False,
    )
    return out


def _synthetic_ids(path) -> dict[int, list]:
    with AnonCache(path, secret=SECRET) as cache:
        return {
            index: [r.synthetic_id for key in cache.get_sample(index).keys for r in cache.get(key).records()]
            for index in cache.sample_indices()
        }


def test_torchrun_two_ranks_equal_one_process(tmp_path, single, bank_path):
    out = tmp_path / "sharded"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), ANONLOADER_SECRET=SECRET, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "anonloader.cache.commands", "precompute", "_cache_faces:make_dataset", str(out), "--engine", "torchrun",
        "--detector", "none", "--annotations", "_cache_faces:face_annotations", "--limit", "8", "-q",
        "--identity", "label", "--identity-label", "_cache_faces:identity_label", "--bank", str(bank_path),
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000-of-00002", "shard-00001-of-00002"]
    with AnonCache(out, secret=SECRET) as cache:
        assert [s["samples"] for s in cache.manifest["shards"]] == [4, 4] and cache.manifest["keyed"]
        assert cache.verify().ok
    ids = _synthetic_ids(single)
    assert all(None not in faces and len(faces) == 1 for faces in ids.values())
    assert all(ids[i] == ids[i + 3] for i in range(5))  # labels cycle 0, 1, 2: same person, same identity
    assert len({ids[i][0] for i in range(3)}) == 3  # three people, three synthetic identities
    assert _synthetic_ids(out) == ids
    assert cache_entries(out, SECRET) == cache_entries(single, SECRET)
    assert cache_samples(out, SECRET) == cache_samples(single, SECRET)
    dataset = AnonCache(out, secret=SECRET).as_dataset()
    reference = AnonCache(single, secret=SECRET).as_dataset()
    assert all((dataset[i]["image"] == reference[i]["image"]).all() for i in range(8))
