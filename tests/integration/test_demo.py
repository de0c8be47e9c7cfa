"""The README's main job: ``anonloader demo OUT`` on the packaged photos."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from anonloader.assets import sample_photo


def test_demo_cli_replaces_every_face_and_writes_a_contact_sheet(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "anonloader.cli", "demo", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["photos"]["t1"]["faces"] == 6 and summary["photos"]["astronaut"]["faces"] == 1
    assert summary["counters"]["failed"] == 0
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 600 and sheet.height > 600
    for name, info in summary["photos"].items():
        before = np.asarray(sample_photo(name)).astype(float)
        after = np.asarray(Image.open(out / f"{name}.png")).astype(float)
        assert after.shape == before.shape
        changed = np.zeros(before.shape[:2], bool)
        for record in info["records"]:
            x1, y1, x2, y2 = (max(0, int(v)) for v in record["box"])
            assert np.abs(before[y1:y2, x1:x2] - after[y1:y2, x1:x2]).mean() > 2.0, (name, record["box"])
            w, h = x2 - x1, y2 - y1
            changed[max(0, y1 - h) : y2 + h, max(0, x1 - w) : x2 + w] = True
        if (~changed).any():  # background untouched (tom_hanks is all face)
            assert np.abs(before - after).max(axis=2)[~changed].max() == 0
