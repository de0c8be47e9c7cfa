"""``anonloader audit``: finds a face a skipping detector left behind; passes a correct folder."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import anonloader
from anonloader.cli import main
from anonloader.pipeline import Anonymizer


class _SkipsEveryFace:
    """A detector stand-in that finds nothing (every face missed)."""

    name = "skips-all"

    def config(self) -> dict:
        return {}

    def __call__(self, images):
        from anonloader.detect.image_checks import empty_detections

        return [empty_detections() for _ in images]


def _save(image: torch.Tensor, path) -> None:
    Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy()).save(path)


def test_audit_cli_flags_a_missed_face_and_passes_a_correct_folder(tmp_path, astronaut_image, capsys):
    leaky, clean = tmp_path / "leaky", tmp_path / "clean"
    leaky.mkdir()
    clean.mkdir()
    missed = Anonymizer("blur", detector=_SkipsEveryFace(), revalidate=False)([astronaut_image]).images[0]
    _save(missed, leaky / "astronaut.png")
    correct = Anonymizer("blur")([astronaut_image]).images[0]
    _save(correct, clean / "astronaut.png")

    report = tmp_path / "audit.html"
    assert main(["audit", str(leaky), "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "residual face: astronaut.png" in out and "1 residual face(s) in 1 image(s)" in out
    page = report.read_text()
    assert "1 residual face(s) found" in page and "data:image/jpeg;base64," in page

    assert main(["audit", str(clean)]) == 0
    assert "0 residual face(s) in 1 image(s)" in capsys.readouterr().out


def test_audit_python_api_takes_a_dataset(astronaut_image):
    """A list of samples as a dataset: uint8 HWC arrays in dicts; the face is found in place."""
    sample = {"image": astronaut_image.mul(255).round().byte().permute(1, 2, 0).numpy(), "label": 3}
    blank = {"image": np.full((128, 128, 3), 90, np.uint8), "label": 4}
    report = anonloader.audit([sample, blank])
    assert report.images == 2 and len(report.faces) == 1
    face = report.faces[0]
    assert face.image == "0/image"
    x1, y1, x2, y2 = face.box
    assert 150 < (x1 + x2) / 2 < 300 and 60 < (y1 + y2) / 2 < 180  # the astronaut's face
    assert not report.clean and "0/image" in report.thumbnails
