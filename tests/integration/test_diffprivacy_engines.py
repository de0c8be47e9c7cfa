"""Diff-Privacy recovery keys from the Ray and torchrun engines recover what the local engine's do.

Ray (a local cluster, ``ray.init(num_cpus=2)``): the driver derives the key; actors get the
derived cipher and return sealed blobs the driver authenticates and stores in
``<cache>/recovery.lmdb``. torchrun (2 ranks, gloo, through the CLI with ``--method-options``):
only rank 0 reads the password file; every shard gets ``<shard>/recovery.lmdb`` under the one
derivation; ``cache merge`` copies the keys into one store; ``cache recover`` finds the shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cache_faces import face_annotations, make_dataset
from _torchrun import free_port

pytest.importorskip("diffusers")
pytest.importorskip("cryptography")

from anonloader.cache.commands import merge_caches, recover_sample
from anonloader.cache.precompute import precompute
from anonloader.cache.store import AnonCache
from anonloader.errors import SecretError
from anonloader.methods.diffprivacy import DiffPrivacy
from anonloader.methods.diffprivacy.store import RECOVERY_DB, RecoveryKeyStore

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SECRET = "engine-test-secret-0123456789"
PASSWORD = "engines pw 5d0e9a"
OPTIONS = {"tiny": True, "num_inference_steps": 10, "group_size": 2, "inversion_iters": 2}
SAMPLES = 4



def _keys(path: Path) -> dict[tuple[str, int], bytes]:
    """Every decrypted key payload of the cache at ``path`` (each shard's store, or the one)."""
    stores = [p.parent for p in sorted(path.rglob(RECOVERY_DB))]
    out: dict[tuple[str, int], bytes] = {}
    for directory in stores:
        store = RecoveryKeyStore.open(directory, PASSWORD)
        try:
            out.update({(entry, face): store.get_bytes(entry, face) for entry, face in store.entries()})
        finally:
            store.close()
    return out


def _same_keys(got: dict[tuple[str, int], bytes], expected: dict[tuple[str, int], bytes]) -> None:
    """Same entries and faces; each key's z_T and words equal to float32 rounding (another
    process may sum in another order) and the same metadata (models, schedule, affine)."""
    from anonloader.methods.diffprivacy.keys import RecoveryKey

    assert sorted(got) == sorted(expected) and len(got) == SAMPLES
    for slot, data in expected.items():
        a, b = RecoveryKey.from_bytes(got[slot]), RecoveryKey.from_bytes(data)
        assert a.meta == b.meta
        assert torch.allclose(a.z_T, b.z_T, atol=1e-4, rtol=0) and torch.allclose(a.key_e, b.key_e, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def options(tmp_path_factory) -> dict:
    """The constructor options of a Diff-Privacy loaded from tiny weights directories (what the
    CLI's --method-options and cache recover --method-dir name)."""
    root = tmp_path_factory.mktemp("weights")
    tiny = DiffPrivacy(**OPTIONS)
    _, _, recognizer = tiny.load()
    tiny.save_pretrained(root / "dp", with_backbone=True)
    torch.save(recognizer.state_dict(), root / "rec.pth")
    spec = {"kind": "iresnet", "weights": str(root / "rec.pth"), **{k: v for k, v in recognizer.arch.items() if k != "feature_stage"}}
    fast = {k: v for k, v in OPTIONS.items() if k != "tiny"}
    return {"weights": str(root / "dp"), "base_model": str(root / "dp"), "recognizer": spec, "recognizer_size": 16, "crop_size": 32, "resolution": 32, **fast}


@pytest.fixture(scope="module")
def method(options) -> DiffPrivacy:
    return DiffPrivacy(**options)


@pytest.fixture(scope="module")
def single(tmp_path_factory, options) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    precompute(make_dataset(SAMPLES), out, method="diffprivacy", annotations=face_annotations, secret=SECRET,
               key_password=PASSWORD, progress=False, **options)
    return out


def test_ray_actors_seal_keys_the_driver_stores(tmp_path, single, method, options):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), "OMP_NUM_THREADS": "1"}})
    try:
        report = precompute(make_dataset(SAMPLES), tmp_path / "ray", method="diffprivacy", annotations=face_annotations,
                            secret=SECRET, key_password=PASSWORD, engine="ray", workers=2, batch_size=2, progress=False, **options)
    finally:
        ray.shutdown()
    assert report.computed == SAMPLES and report.failed == 0
    assert (tmp_path / "ray" / RECOVERY_DB / "data.mdb").is_file()
    _same_keys(_keys(tmp_path / "ray"), _keys(single))
    with AnonCache(tmp_path / "ray", secret=SECRET) as ray_cache, AnonCache(single, secret=SECRET) as local:
        for index in (0, SAMPLES - 1):
            got, expected = ray_cache.recover(index, PASSWORD, method), local.recover(index, PASSWORD, method)
            assert (got - expected).abs().max() <= 2 / 255
        with pytest.raises(SecretError, match="wrong key password"):
            ray_cache.recover(0, PASSWORD + "?", method)
    for file in (tmp_path / "ray").rglob("*"):
        assert not file.is_file() or PASSWORD.encode() not in file.read_bytes()


def test_torchrun_ranks_write_shard_keys_merge_and_recover(tmp_path, single, method, options, monkeypatch):
    out = tmp_path / "sharded"
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), ANONLOADER_SECRET=SECRET, OMP_NUM_THREADS="1")
    env.pop("ANONLOADER_KEY_PASSWORD", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "anonloader.cache.commands", "precompute", "_cache_faces:make_dataset", str(out), "--engine", "torchrun",
        "--detector", "none", "--annotations", "_cache_faces:face_annotations", "--limit", str(SAMPLES), "-q",
        "--method", "diffprivacy", "--method-options", json.dumps({k: v for k, v in options.items() if k != "inversion_iters"}),
        "--method-option", f"inversion_iters={options['inversion_iters']}", "--key-password-file", str(tmp_path / "pw"),
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr
    shards = sorted(p for p in out.iterdir() if p.name.startswith("shard-"))
    assert [p.name for p in shards] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert all((shard / RECOVERY_DB / "data.mdb").is_file() for shard in shards)
    metas = [RecoveryKeyStore.read_meta(shard) for shard in shards]
    assert metas[0] == metas[1]  # one derivation: same salt, costs and check value
    sharded = _keys(out)
    _same_keys(sharded, _keys(single))
    with AnonCache(single, secret=SECRET) as local:
        expected = local.recover(SAMPLES - 1, PASSWORD, method)
    from_shard = recover_sample(out, SAMPLES - 1, PASSWORD, method, secret=SECRET)
    assert (from_shard - expected).abs().max() <= 2 / 255
    # merged into one LMDB, the keys are copied as they are and open with the same password
    counts = merge_caches([out], tmp_path / "merged", secret=SECRET)
    assert counts["recovery_keys"] == SAMPLES and counts["samples"] == SAMPLES
    assert _keys(tmp_path / "merged") == sharded
    with AnonCache(tmp_path / "merged", secret=SECRET) as merged:
        assert torch.equal(merged.recover(SAMPLES - 1, PASSWORD, method), from_shard)
    # the recover command on the sharded cache (the models from their directories)
    from anonloader.cli import main

    monkeypatch.setenv("ANONLOADER_SECRET", SECRET)
    assert main(["cache", "recover", str(out), str(SAMPLES - 1), str(tmp_path / "r.png"), "--method-dir", options["weights"],
                 "--key-password-file", str(tmp_path / "pw")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "r.png") as opened:
        written = torch.from_numpy(__import__("numpy").asarray(opened).copy()).permute(2, 0, 1).float() / 255
    assert (written - from_shard).abs().max() <= 1 / 255 + 1e-6


def test_torchrun_bad_password_file_stops_every_rank(tmp_path, single):
    """Rank 0 cannot read the password file: it says so, and rank 1 stops too instead of
    waiting for a key."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), ANONLOADER_SECRET=SECRET, OMP_NUM_THREADS="1")
    env.pop("ANONLOADER_KEY_PASSWORD", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "anonloader.cache.commands", "precompute", "_cache_faces:make_dataset", str(tmp_path / "out"), "--engine", "torchrun",
        "--detector", "none", "--annotations", "_cache_faces:face_annotations", "--limit", "2", "-q",
        "--method", "diffprivacy", "--method-options", json.dumps(OPTIONS), "--key-password-file", str(tmp_path / "absent"),
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "cannot read the key password file" in result.stderr and "rank 0 could not open the recovery-key store" in result.stderr
