"""The DiffDeID training command end to end on a tiny folder: face-model -> prepare -> lds ->
image --max-steps 2, and the written checkpoint loads and anonymizes.

Faces: scikit-image's astronaut (ffhq-aligned from MTCNN landmarks) with photometric changes as
one identity and its mirror image as a second one (no package ships several photos per person)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")


def _write_faces(root: Path) -> torch.Tensor:
    from facenet_pytorch import MTCNN
    from skimage import data
    from torchvision.io import write_png

    from anonloader.align import align_faces
    from anonloader.types import Detections

    array = data.astronaut()
    boxes, scores, points = MTCNN(keep_all=True, device="cpu").detect(array, landmarks=True)
    best = int(np.argmax(scores))
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    det = Detections(torch.tensor(np.asarray(boxes[best], dtype=np.float32))[None], torch.tensor(np.asarray(points[best], dtype=np.float32))[None], torch.ones(1))
    crop = align_faces([image], [det], crop_size=128, template="ffhq").crops[0]
    for person, face in enumerate((crop, crop.flip(-1))):
        folder = root / f"id{person}"
        folder.mkdir(parents=True)
        for k, (gain, bias) in enumerate(((1.0, 0.0), (0.9, 0.05), (1.1, -0.03))):
            write_png(((face * gain + bias).clamp(0, 1) * 255).round().to(torch.uint8), str(folder / f"{k}.png"))
    return crop


def test_training_command_writes_a_loadable_checkpoint(tmp_path):
    from anonloader.align import template_points
    from anonloader.methods.diffdeid.model import DiffDeID
    from anonloader.methods.diffdeid.train import main
    from anonloader.types import FaceConditions

    crop = _write_faces(tmp_path / "faces")
    face_model = main(["face-model", "--data", str(tmp_path / "faces"), "--out", str(tmp_path / "fm.safetensors"), "--size", "128"])
    prepared = main(["prepare", "--images", str(tmp_path / "faces" / "id0"), "--face-model", str(face_model), "--config", "tiny",
                     "--out", str(tmp_path / "prepared.pt")])
    data = torch.load(prepared, weights_only=True)
    assert data["image"].shape == (3, 3, 32, 32) and data["rho"].shape == (3, 261) and data["z_id"].shape == (3, 128)
    lds = main(["lds", "--prepared", str(prepared), "--out", str(tmp_path / "lds"), "--steps", "10", "--hidden", "32", "--depth", "1",
                "--batch-size", "4"])
    final = main(["image", "--prepared", str(prepared), "--config", "tiny", "--out", str(tmp_path / "run"), "--face-model", str(face_model),
                  "--lds", str(lds), "--lambda-per", "0", "--max-steps", "2", "--batch-size", "2", "--accelerator", "cpu", "--devices", "1"])
    assert final == tmp_path / "run" / "final" and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    method = DiffDeID.from_pretrained(final, num_inference_steps=2)
    assert method.id_sampler is not None and method.shape_sampler is not None and method.face_model.fitted
    small = torch.nn.functional.interpolate(crop[None], size=(32, 32), mode="bilinear", antialias=True)
    conditions = FaceConditions([5], [None], [None], template_points(32, "ffhq")[None])
    out = method(small, conditions)
    assert out.shape == (1, 3, 32, 32) and torch.equal(out, method(small, conditions))
    # two optimiser steps were taken and the loss phase is in the checkpoint
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and "phase" in checkpoint["state_dict"]


def test_video_training_command_writes_a_loadable_video_network(tmp_path):
    from anonloader.methods.diffdeid.model import DiffDeID
    from anonloader.methods.diffdeid.network import DiffDeIDUNet
    from anonloader.methods.diffdeid.train import main
    from anonloader.methods.diffdeid.video import DiffDeIDVideo

    _write_faces(tmp_path / "clips")  # two 'clips' of three frames each
    face_model = main(["face-model", "--data", str(tmp_path / "clips"), "--out", str(tmp_path / "fm.safetensors"), "--size", "128"])
    final = main(["video", "--clips", str(tmp_path / "clips"), "--config", "tiny", "--face-model", str(face_model), "--out", str(tmp_path / "run"),
                  "--lambda-per", "0", "--max-steps", "2", "--batch-size", "4", "--accelerator", "cpu", "--devices", "1"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    from anonloader.methods.diffdeid.train import _face_model

    image_method = DiffDeID(config="tiny", face_model=_face_model(str(face_model)))
    video = DiffDeIDVideo(image_method, final)
    assert not video.network.identity_condition
    assert video.config()["weights_sha256"]
    state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}
    reloaded = DiffDeIDUNet({"preset": "tiny", "identity_condition": False})
    reloaded.load_state_dict({k[len("network."):]: v for k, v in state.items()})
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), video.network.state_dict().values()))
