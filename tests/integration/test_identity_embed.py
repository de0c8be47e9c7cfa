"""`anonloader identity embed SRC OUT` on real photos: faces detected (MTCNN), aligned for dlib's
recognizer, embedded and hashed as the pipeline's identity stage does; a run killed with SIGKILL
resumes to the same store as an uninterrupted run.

Photos: scikit-image's astronaut (one face) in three variants (resized, brightened, mirrored:
the same person, other pixels) and insightface's t1.jpg at half size (six people)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _torchrun import free_port
from PIL import Image, ImageEnhance, ImageOps

from anonloader.cli import main
from anonloader.identity.store import EmbeddingStore

REPO = Path(__file__).parent.parent.parent

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut_pil, t1_pil) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = astronaut_pil.resize((256, 256), Image.BICUBIC)
    astronaut.save(folder / "a0.png")
    ImageEnhance.Brightness(astronaut).enhance(1.2).save(folder / "a1.png")
    ImageOps.mirror(astronaut).save(folder / "a2.png")
    t1_pil.resize((640, 443), Image.BICUBIC).save(folder / "t1.png")
    return folder


@pytest.fixture(scope="module")
def clean(photos, tmp_path_factory) -> EmbeddingStore:
    out = tmp_path_factory.mktemp("clean") / "store"
    assert main(["identity", "embed", str(photos), str(out), "--part-size", "1", "--detector", "mtcnn", "-q"]) == 0
    return EmbeddingStore(out)


def _same_store(a: EmbeddingStore, b: EmbeddingStore) -> None:
    assert a.content_hashes() == b.content_hashes()
    assert np.array_equal(np.asarray(a.embeddings()), np.asarray(b.embeddings()))
    assert np.array_equal(a.samples(), b.samples())


def test_embed_command_resumes_after_sigkill(photos, clean, tmp_path):
    faces_per_sample = np.bincount(clean.samples()[:, 0], minlength=4).tolist()
    assert faces_per_sample[:3] == [1, 1, 1] and faces_per_sample[3] >= 5  # one astronaut each, t1's people
    embeddings = torch.from_numpy(np.asarray(clean.embeddings()))
    sims = embeddings @ embeddings.T
    assert float(sims[:3, :3].min()) >= 0.917  # the astronaut variants: one person to dlib
    assert float(sims[:3, 3:].max()) < 0.917
    assert "biometric" in clean.meta["sensitive"] and clean.meta["recognizer"]["name"] == "dlib"

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "anonloader.cli", "identity", "embed", str(photos), str(out), "--part-size", "1", "--detector", "mtcnn", "-q"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "parts").is_dir() and len(list((out / "parts").glob("*.json"))) >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not EmbeddingStore(out).complete
    done_before = EmbeddingStore(out).done_parts()
    assert 1 <= len(done_before) < 4
    assert main(["identity", "embed", str(photos), str(out), "--part-size", "1", "--detector", "mtcnn", "-q"]) == 0
    _same_store(EmbeddingStore(out), clean)


def test_embed_under_torchrun_two_ranks_equals_one_process(photos, clean, tmp_path):
    out = tmp_path / "ranks"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "anonloader.cli", "identity", "embed", str(photos), str(out), "--part-size", "1", "-q", "--engine", "torchrun",
        "--detector", "mtcnn",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("SENSITIVE") == 1  # rank 0 reports, once
    parts = sorted(json.loads(p.read_text())["part"] for p in (out / "parts").glob("*.json"))
    assert parts == [0, 1, 2, 3]
    _same_store(EmbeddingStore(out), clean)


def test_precompute_cluster_identity_fitted_on_the_store(photos, clean, tmp_path, monkeypatch, capsys):
    """`cache precompute --identity cluster --embeddings STORE`: the clusters of the store key the
    faces, so the three astronaut photos get one synthetic identity and t1's people others; no
    raw embedding reaches the cache; without --embeddings the command says what to run."""
    from anonloader.cache.store import AnonCache
    from anonloader.identity.bank import IdentityBank

    bank = IdentityBank(torch.nn.functional.normalize(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), dim=1))
    bank_path = bank.save(tmp_path / "bank")
    monkeypatch.setenv("TEST_IDENTITY_SECRET", "cluster identity secret 0123456789")
    common = ["precompute", str(photos), "--method", "blur", "--detector", "mtcnn", "--identity", "cluster",
              "--bank", str(bank_path), "--secret-env", "TEST_IDENTITY_SECRET", "-q"]
    assert main([*common, str(tmp_path / "no-store")]) == 2
    assert "anonloader identity embed SRC STORE" in capsys.readouterr().err
    out = tmp_path / "cache"
    assert main([*common, str(out), "--embeddings", str(clean.path)]) == 0
    with AnonCache(out, secret="cluster identity secret 0123456789") as cache:
        ids = {i: [r.synthetic_id for key in cache.get_sample(i).keys for r in cache.get(key).records()] for i in cache.sample_indices()}
    astronauts = [ids[i] for i in range(3)]
    assert all(len(faces) == 1 for faces in astronauts) and len({faces[0] for faces in astronauts}) == 1
    assert len(ids[3]) >= 5 and astronauts[0][0] not in ids[3] and len(set(ids[3])) == len(ids[3])
    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    vectors = np.asarray(clean.embeddings())
    assert not any(vectors[i].tobytes()[:64] in stored for i in range(len(vectors)))
