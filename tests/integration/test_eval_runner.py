"""The evaluation runner on real photos with the real dlib recognizer and MTCNN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")

from anonloader.assets import sample_photo  # noqa: E402
from anonloader.eval.commands import register  # noqa: E402
from anonloader.eval.runner import evaluate_pairs, format_table  # noqa: E402
from anonloader.pipeline import Anonymizer  # noqa: E402


def _tensor(name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample_photo(name), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def images():
    return [_tensor("astronaut"), torch.nn.functional.interpolate(_tensor("tom_hanks")[None], size=224, mode="bilinear", align_corners=False)[0]]


def test_identity_method_is_fully_reidentified_and_mask_protects(images, tmp_path):
    from anonloader.detect import load_detector

    detector = load_detector("mtcnn")
    faces = detector(images)
    assert [len(f) for f in faces] == [1, 1]
    same = evaluate_pairs(images, [i.clone() for i in images], faces=faces, detector=detector, name="identity")
    assert same["reidentification_rate"] == 1.0 and same["protection_success_rate"] == 0.0
    assert same["leaks"] == 2 and same["detection_recall"] == 1.0 and same["landmark_displacement"] == 0.0
    # The product's mask method, not a hand-drawn grey box over MTCNN's tight box: that box leaves
    # forehead, hair and ears, which dlib's 0.25-padded chip still sees (cosine 0.923 against a
    # 0.917 threshold on the astronaut, the same with dlib 19.24.6 and 20.0.1) — a claim that
    # held only by chance of box rounding.
    masked = Anonymizer("mask", detector=detector)(images, detections=faces).images
    hidden = evaluate_pairs(images, masked, faces=faces, detector=detector, name="mask")
    assert hidden["leaks"] == 0 and hidden["protection_success_rate"] == 1.0
    assert "identity" in format_table([same, hidden])


def test_folders_and_cli(images, tmp_path, capsys):
    import argparse

    from PIL import Image

    for folder, pics in (("orig", images), ("anon", images)):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(pics):
            Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / folder / f"{i}.png")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "folders", str(tmp_path / "orig"), str(tmp_path / "anon"), "--json", str(tmp_path / "r.json")])
    assert args.run(args) == 0
    assert "re-id" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())[0]
    assert report["faces"] == 2 and report["reidentification_rate"] == 1.0
