"""``python -m anonloader.methods.diffprivacy.train msi``: amortized and per-image regimes on tiny
backbones, and the trained weights loading into the method."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lightning")

from anonloader.align import template_points
from anonloader.methods.diffprivacy import DiffPrivacy
from anonloader.methods.diffprivacy.backbone import build_tiny_backbone, module_digest
from anonloader.methods.diffprivacy.msi import MSI, default_layers, prompt_slot
from anonloader.methods.diffprivacy.train import main
from anonloader.methods.diffprivacy.training import msi_loss
from anonloader.types import FaceConditions


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("faces")
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(48, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"face{i}.png")
    return root


def _conditions(n: int, **extra) -> FaceConditions:
    return FaceConditions(seeds=list(range(n)), identity_keys=[None] * n, synthetic_ids=[None] * n,
                          landmarks=template_points(32, "ffhq")[None].repeat(n, 1, 1), extra=extra)


def test_amortized_training_writes_an_msi_the_method_loads(faces, tmp_path):
    out = main(["msi", "--images", str(faces), "--out", str(tmp_path / "run"), "--tiny", "--steps", "2",
                "--batch-size", "2", "--num-workers", "0", "--accelerator", "cpu"])
    assert (out / "msi" / "config.json").is_file() and (out / "diffprivacy_config.json").is_file()
    trained = DiffPrivacy(out, tiny=True, num_inference_steps=10, group_size=2)
    untrained = DiffPrivacy(tiny=True, num_inference_steps=10, group_size=2)
    assert module_digest(trained.load()[1]) != module_digest(untrained.load()[1])
    assert trained.config()["weights"]["msi"] != untrained.config()["weights"]["msi"]
    assert trained(torch.rand(1, 3, 32, 32), _conditions(1)).shape == (1, 3, 32, 32)


def test_per_image_training_writes_words_the_method_uses(faces, tmp_path):
    folder = main(["msi", "--images", str(faces), "--out", str(tmp_path / "run"), "--tiny", "--per-image-steps", "2",
                   "--limit", "2", "--accelerator", "cpu"])
    index = json.loads((folder / "index.json").read_text())
    assert sorted(index) == ["face0.png", "face1.png"]
    from safetensors.torch import load_file

    words = load_file(str(folder / index["face0.png"]))["words"]
    assert words.shape == (10, 16)
    method = DiffPrivacy(tiny=True, num_inference_steps=10, group_size=2)
    crop = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    given = method(crop, _conditions(1, stage_words=[words]))
    assert not torch.equal(given, method(crop, _conditions(1)))


def test_a_few_steps_lower_the_loss():
    backbone = build_tiny_backbone(0)
    torch.manual_seed(0)
    vision = backbone.image_encoder.config
    msi = MSI(vision_width=vision.hidden_size, text_width=backbone.text_width, layers=default_layers(vision.num_hidden_layers), num_heads=2)
    slot = prompt_slot(backbone)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:  # the same t and noise every time
        return msi_loss(backbone, msi, slot, images, torch.Generator().manual_seed(5))[0]

    optimizer = torch.optim.AdamW(msi.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(loss())
    for _ in range(8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss())
    assert after < before
