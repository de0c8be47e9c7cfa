"""The offline attribute models in the evaluation on packaged photos: blur-strong against the
identity "method", with MTCNN's faces and the real dlib recognizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
pytest.importorskip("cv2")

from anonloader.assets import sample_photo  # noqa: E402
from anonloader.eval import utility_models  # noqa: E402
from anonloader.eval.runner import evaluate_pairs, format_table  # noqa: E402

if "landmarks68" not in utility_models.available_attribute_models():
    pytest.skip("dlib's 68-point model or insightface's mean face is not installed", allow_module_level=True)
EXPRESSION = "expression" in utility_models.available_attribute_models()


def _tensor(name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample_photo(name), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def photos():
    from anonloader.detect import load_detector
    from anonloader.identity.embedders import load_embedder
    from anonloader.pipeline import Anonymizer

    images = [_tensor("t1"), _tensor("astronaut")]
    detector = load_detector("mtcnn")
    faces = detector(images)
    assert [len(f) for f in faces] == [6, 1]
    blurred = Anonymizer("blur", detector=None, sigma=0.10)(images, detections=faces).images
    return images, faces, blurred, detector, load_embedder("dlib")


def test_identity_vs_blur_strong_on_the_offline_attribute_models(photos, tmp_path):
    images, faces, blurred, detector, embedder = photos
    kwargs = {"faces": faces, "detector": detector, "embedder": embedder}
    same = evaluate_pairs(images, [i.clone() for i in images], name="identity", **kwargs)
    blur = evaluate_pairs(images, blurred, name="blur-strong", **kwargs)
    # no change: the models read identical pixels in identical boxes
    assert same["landmark68_displacement"] == 0.0 and same["head_pose68_difference"] == 0.0
    assert "dlib" in same["attribute_models"]["landmarks68"]
    # a strong blur moves the 68 points and the pose they give
    assert 0.02 < blur["landmark68_displacement"] < 2.0
    assert 0.5 < blur["head_pose68_difference"] < 90.0
    assert all(v >= 0 for v in blur["head_pose68_difference_ypr"])
    if EXPRESSION:
        assert same["expression_agreement"] == 1.0
        assert 0.0 <= blur["expression_agreement"] < 1.0  # the smiles are blurred away for some faces
    else:
        assert "not installed" in same["attribute_models"]["expression"]
    table = format_table([same, blur])
    assert "lmk68/IOD" in table and "pose68(deg)" in table and "expr.agree" in table
    (tmp_path / "r.json").write_text(json.dumps([same, blur], default=str))
    assert json.loads((tmp_path / "r.json").read_text())[1]["landmark68_displacement"] == blur["landmark68_displacement"]


def test_attribute_models_can_be_switched_off(photos):
    images, faces, blurred, detector, embedder = photos
    report = evaluate_pairs(images[1:], blurred[1:], faces=faces[1:], detector=detector, embedder=embedder, attribute_models=None)
    assert "landmark68_displacement" not in report and "expression_agreement" not in report
    only = evaluate_pairs(images[1:], blurred[1:], faces=faces[1:], detector=detector, embedder=embedder, attribute_models=["landmarks68"])
    assert not math.isnan(only["landmark68_displacement"]) and "expression_agreement" not in only


@pytest.mark.parametrize("choice", ["landmarks68", "none"])
def test_cli_attribute_models_option(photos, tmp_path, choice):
    import argparse

    from PIL import Image

    from anonloader.eval.commands import register

    images, _, blurred, _, _ = photos
    for folder, image in (("orig", images[1]), ("anon", blurred[1])):
        (tmp_path / folder).mkdir()
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / folder / "astronaut.png")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    argv = ["eval", "folders", str(tmp_path / "orig"), str(tmp_path / "anon"), "--json", str(tmp_path / "r.json"), "--attribute-models", choice]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())[0]
    if choice == "none":
        assert "landmark68_displacement" not in report
    else:
        assert report["landmark68_displacement"] > 0.02 and "expression_agreement" not in report
