"""``precompute`` on one machine: folders, HF datasets, processes, SIGKILL + resume, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cache_faces import cache_entries, cache_samples, face_annotations, make_dataset

from anonloader.cache.commands import main as cache_main
from anonloader.cache.precompute import precompute
from anonloader.cache.store import AnonCache
from anonloader.errors import CacheError, ConfigError

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def test_folder_of_jpegs_precomputes_and_reads_back_in_order(tmp_path):
    from PIL import Image

    source = make_dataset(5)
    boxes = {}
    for i in range(5):
        sample = source[i]
        name = f"img_{i:02d}.jpg"
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(tmp_path / name, quality=92)
        boxes[name] = sample["box"]
    report = precompute(tmp_path, tmp_path / "out", method="pixelate", annotations=lambda s: (boxes[s["path"]],), progress=False)
    assert (report.total, report.computed, report.skipped) == (5, 5, 0)
    dataset = AnonCache(tmp_path / "out").as_dataset()
    assert [dataset[i]["path"] for i in range(5)] == sorted(boxes)
    assert dataset[0]["image"].dtype == torch.uint8 and dataset[0]["image"].shape == (3, 96, 96)
    again = precompute(tmp_path, tmp_path / "out", method="pixelate", annotations=lambda s: (boxes[s["path"]],), progress=False)
    assert (again.computed, again.skipped) == (0, 5)


def test_two_processes_write_the_same_cache_as_one(tmp_path):
    kwargs = dict(method="blur", annotations=face_annotations, progress=False, batch_size=2)
    precompute(make_dataset(8), tmp_path / "one", workers=1, **kwargs)
    report = precompute(make_dataset(8), tmp_path / "two", workers=2, **kwargs)
    assert report.computed == 8
    assert cache_entries(tmp_path / "one") == cache_entries(tmp_path / "two")
    assert cache_samples(tmp_path / "one") == cache_samples(tmp_path / "two")


def test_sigkill_mid_precompute_then_resume_is_complete_and_computes_nothing_twice(tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "anonloader.cache.commands", "precompute", "_cache_faces:make_dataset_40", str(out),
        "--detector", "none", "--annotations", "_cache_faces:face_annotations", "--batch-size", "1", "-q",
    ]
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    committed = 0
    deadline = time.monotonic() + 120
    try:
        while committed < 6 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            if (out / "data.mdb").exists():
                try:
                    with AnonCache(out) as probe:
                        committed = len(probe.sample_indices())
                except CacheError:
                    committed = 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    with AnonCache(out) as cache:
        survived = len(cache.sample_indices())
    assert 6 <= survived < 40
    assert AnonCache(out).verify().ok
    from _cache_faces import make_dataset_40

    report = precompute(make_dataset_40(), out, method="blur", annotations=face_annotations, progress=False)
    assert report.skipped == survived and report.computed == 40 - survived
    verify = AnonCache(out).verify()
    assert verify.ok and verify.entries == 40 and verify.samples == 40
    dataset = AnonCache(out).as_dataset()
    assert len(dataset) == 40 and [dataset.source_index(i) for i in range(40)] == list(range(40))


def test_hugging_face_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    source = make_dataset(4)
    images = [Image.fromarray(source[i]["image"].permute(1, 2, 0).numpy()) for i in range(4)]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 3], "box": [source[i]["box"][0].tolist() for i in range(4)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"), "box": datasets.Sequence(datasets.Value("float32"))}),
    )
    table.save_to_disk(str(tmp_path / "hf"))
    report = precompute(str(tmp_path / "hf"), tmp_path / "out", method="mask", image_key="image",
                        annotations=lambda s: ([s["box"]],), progress=False)
    assert report.computed == 4
    dataset = AnonCache(tmp_path / "out").as_dataset()
    assert [dataset[i]["label"] for i in range(4)] == [0, 1, 2, 3]
    assert isinstance(dataset[0]["image"], Image.Image) and dataset[0]["image"].size == (96, 96)


def test_cli_precompute_stats_verify_merge_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    secret = "s3cret-value-for-tests"
    monkeypatch.setenv("ANONLOADER_SECRET", secret)
    code = cache_main(["precompute", "_cache_faces:make_dataset", str(tmp_path / "c"), "--detector", "none",
                       "--annotations", "_cache_faces:face_annotations", "--limit", "3", "-q", "--codec", "webp"])
    assert code == 0
    assert "3 computed, 0 already cached" in capsys.readouterr().out
    assert cache_main(["cache", "stats", str(tmp_path / "c")]) == 0
    stats = capsys.readouterr().out
    assert "entries" in stats and "'webp'" in stats and "s3cret" not in stats and "keyed" in stats
    assert cache_main(["cache", "verify", str(tmp_path / "c")]) == 0
    assert "0 corrupt" in capsys.readouterr().out
    assert cache_main(["cache", "merge", str(tmp_path / "c"), str(tmp_path / "m")]) == 0
    assert cache_entries(tmp_path / "c", secret) == cache_entries(tmp_path / "m", secret)
    capsys.readouterr()
    assert cache_main(["cache", "stats", str(tmp_path / "nowhere")]) == 2
    assert "does not exist; run anonloader precompute" in capsys.readouterr().err
    # a keyed cache is unreadable without its secret, and another secret is another cache
    monkeypatch.delenv("ANONLOADER_SECRET")
    assert cache_main(["cache", "verify", str(tmp_path / "c")]) == 2
    assert "authenticated with a secret" in capsys.readouterr().err
    monkeypatch.setenv("ANONLOADER_SECRET", "another-secret")
    assert cache_main(["precompute", "_cache_faces:make_dataset", str(tmp_path / "c"), "--detector", "none",
                       "--annotations", "_cache_faces:face_annotations", "--limit", "3", "-q"]) == 2
    assert "another secret" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        precompute("./no/such/folder.jpg", tmp_path / "x", method="blur", annotations=face_annotations)
