"""``anonloader anonymize`` as a user meets it: a folder of images (with a broken file), a video,
a saved HF dataset; summary table, exit codes, and the HTML report checked in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from anonloader.cli import main
from tests.integration._small_faces import face_region, small_faces

ROWS, COLS = face_region()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0",
]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src, dst, report = root / "src", root / "dst", root / "report"
    (src / "nested").mkdir(parents=True)
    faces = small_faces(2)
    faces[0].save(src / "a.png")
    faces[1].save(src / "nested" / "b.jpg", quality=95)
    (src / "broken.png").write_bytes(b"this is not a png")
    code = main(["anonymize", str(src), str(dst), "--method", "pixelate", "--report", str(report), "-q"])
    return code, src, dst, report


def test_folder_of_images_keeps_paths_and_formats(image_run, capsys):
    code, src, dst, _ = image_run
    assert code == 1  # one file could not be read: a failure, and the exit code says so
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == ["a.png", "nested/b.jpg"]
    for name in ("a.png", "nested/b.jpg"):
        before, after = Image.open(src / name), Image.open(dst / name)
        assert after.format == before.format and after.size == before.size
        change = np.abs(np.asarray(before, dtype=float)[ROWS, COLS] - np.asarray(after, dtype=float)[ROWS, COLS]).mean()
        assert change > 3, name


def test_summary_table_and_exit_codes(tmp_path, capsys):
    src = tmp_path / "one"
    src.mkdir()
    small_faces(1)[0].save(src / "face.png")
    assert main(["anonymize", str(src), str(tmp_path / "out"), "-q"]) == 0
    table = capsys.readouterr().out
    for figure in ("images       1", "faces        1", "failures     0", "method       blur"):
        assert figure in table, table
    assert re.search(r"fingerprint\s+[0-9a-f]{64}", table)
    assert main(["anonymize", str(tmp_path / "missing"), str(tmp_path / "out2"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _chromium(args, tmp_path, name):
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
def test_report_in_headless_chromium(image_run, tmp_path):
    _, _, _, report = image_run
    page = report / "index.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    result = _chromium(["--dump-dom", page.as_uri()], tmp_path, "dom")
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # no console message at all: no error, no CSP violation
    dom = result.stdout
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    assert len(re.findall(r'<tr class="image-row', dom)) == 3
    assert len(re.findall(r'<tr class="image-row failed"', dom)) == 1
    assert len(re.findall(r"<img [^>]*src=\"data:image/jpeg;base64,", dom)) == 5  # 2 before/after pairs + the unreadable one
    assert re.search(r'<li><span class="mono">broken.png</span>', dom)
    shot = tmp_path / "report.png"
    _chromium(["--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()], tmp_path, "shot")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape == (1400, 1200, 3) and pixels.std() > 20  # the page rendered, thumbnails included


def test_video_file_with_tracked_identities(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV (pip install av) reads and writes videos")
    import torch

    from anonloader.integrations.video import read_video, write_video

    frames = [torch.from_numpy(np.asarray(p)).permute(2, 0, 1).contiguous() for p in small_faces(2)[:1] * 3]
    src = write_video(tmp_path / "clip.mp4", frames, fps=5)
    secret = tmp_path / "secret"
    secret.write_text("cli-video-secret-0123456789abcdef")
    code = main(["anonymize", str(src), str(tmp_path / "out"), "--secret-file", str(secret), "--method", "pixelate", "-q"])
    assert code == 0
    out, fps = read_video(tmp_path / "out" / "clip.mp4")
    assert len(out) == 3 and fps == pytest.approx(5) and out[0].shape == (3, 128, 128)
    original = read_video(src)[0][0]
    assert (out[0][:, ROWS, COLS].float() - original[:, ROWS, COLS].float()).abs().mean() > 3
    assert "images       3" in capsys.readouterr().out


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": small_faces(2), "label": [0, 1]}, features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert main(["anonymize", str(tmp_path / "saved"), str(tmp_path / "anon"), "--method", "pixelate", "-q"]) == 0
    anon = datasets.load_from_disk(str(tmp_path / "anon"))
    assert anon["label"] == [0, 1]
    change = np.abs(np.asarray(anon[0]["image"], dtype=float)[ROWS, COLS] - np.asarray(small_faces(1)[0], dtype=float)[ROWS, COLS]).mean()
    assert change > 3


def test_files_the_pipeline_refuses_are_failures_not_crashes_or_copies(tmp_path, capsys, monkeypatch):
    src = tmp_path / "mixed"
    src.mkdir()
    small_faces(1)[0].save(src / "face.png")
    sixteen = (np.asarray(small_faces(1)[0].convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(src / "deep.png")  # 16 bits per channel: refused, named
    big = Image.new("RGB", (300, 300))
    big.save(src / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300x300 is a "bomb" now (> 2x the limit)
    code = main(["anonymize", str(src), str(tmp_path / "out"), "-q"])
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["face.png"]
    assert "failures     2" in capsys.readouterr().out
