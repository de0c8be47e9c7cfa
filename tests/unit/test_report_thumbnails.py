"""Report thumbnails carry no original face by default (the report is a file that gets shared)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from anonloader.assets import sample_photo
from anonloader.commands.report import ReportRow, thumbnail, write_report
from anonloader.detect import load_detector


def _decode(jpeg: bytes) -> torch.Tensor:
    array = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def test_hidden_faces_are_not_found_again_but_plain_thumbnails_are():
    photo = torch.from_numpy(np.asarray(sample_photo("astronaut"), dtype=np.uint8).copy()).permute(2, 0, 1)
    detector = load_detector("mtcnn")
    faces = detector([photo.float() / 255])[0]
    assert len(faces) == 1
    boxes = [tuple(float(v) for v in faces.boxes[0])]
    plain = _decode(thumbnail(photo, boxes, ["anonymized"], side=256))
    hidden = _decode(thumbnail(photo, boxes, ["anonymized"], side=256, hide_faces=True))
    # a detector that is not tuned for thumbnails still finds the face on the plain thumbnail
    assert len(detector([plain])[0]) == 1
    assert len(detector([hidden])[0]) == 0
    # outside the grown box nothing changed (beyond JPEG noise)
    assert (plain[:, 200:, :] - hidden[:, 200:, :]).abs().mean() < 0.01


def test_report_header_says_whether_originals_are_embedded(tmp_path):
    jpeg = thumbnail(torch.zeros(3, 8, 8), [], [])
    rows = [ReportRow("x.png", 0, "no face", jpeg, jpeg)]
    hidden = write_report(tmp_path / "a", rows, {"images": 1}).read_text()
    shown = write_report(tmp_path / "b", rows, {"images": 1}, originals=True).read_text()
    assert "detected faces blurred" in hidden and "detected faces blurred" not in shown
