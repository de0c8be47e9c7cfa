"""IDDiffuse stage-2 training (Lightning): 30 optimizer steps on a handful of crops lower the
loss measured on fixed (t, noise, condition) draws; eq. 7 pieces; EMA export loads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("diffusers")

from anonloader.methods.iddiffuse.losses import anonymization_loss, predict_x0, time_weights



def test_time_weights_ramp_from_zero_to_one() -> None:
    t = torch.tensor([0, 500, 1000])
    torch.testing.assert_close(time_weights(t, 1000), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(time_weights(t, 1000, order=2.0), torch.tensor([0.0, 0.25, 1.0]))


def test_anonymization_loss_weights_real_and_synthetic_by_gamma() -> None:
    real, synthetic = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    at_real = real.clone()
    # gamma_t = 1 (t = T): only the real term (+ lambda) counts -> prediction == real costs 0
    assert anonymization_loss(at_real, real, synthetic, torch.tensor([1.0]), 0.05).item() == pytest.approx(0.0)
    # gamma_t = 0 (t = 0): the synthetic term counts fully: cos distance 1 + lambda * 0
    assert anonymization_loss(at_real, real, synthetic, torch.tensor([0.0]), 0.05).item() == pytest.approx(1.0)
    assert anonymization_loss(synthetic, real, synthetic, torch.tensor([0.0]), 0.05).item() == pytest.approx(0.05)


def test_predict_x0_inverts_the_forward_process() -> None:
    ac = torch.linspace(0.99, 0.1, 10)
    x0, noise, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.tensor([2, 7])
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(predict_x0(a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t, ac), x0)


def test_thirty_steps_lower_the_loss_and_export_loads(tmp_path: Path) -> None:
    import lightning as L

    from anonloader.methods.iddiffuse import IDDiffuse
    from anonloader.methods.iddiffuse.training import IDDiffuseModule

    torch.manual_seed(0)
    module = IDDiffuseModule("tiny", learning_rate=3e-3, ema_decay=0.9)
    g = torch.Generator().manual_seed(0)
    images, id_images = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    # smooth, structured "faces" so that the noise is learnable in a few steps
    images = torch.nn.functional.avg_pool2d(images, 5, 1, 2)
    batch = {"image": images, "id_image": id_images}

    def fixed_loss() -> float:
        module.eval()
        with torch.no_grad():
            values = [module.compute_losses(batch, torch.Generator().manual_seed(s))["loss"].item() for s in range(4)]
        module.train()
        return sum(values) / len(values)

    before = fixed_loss()
    frozen_before = {k: v.clone() for k, v in module.network.identity_encoder.state_dict().items()}
    loader = torch.utils.data.DataLoader(
        torch.utils.data.StackDataset(image=images, id_image=id_images), batch_size=6, shuffle=False)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 30
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)

    # E_I (recognizers + mapper, BatchNorm statistics included) did not move
    for name, tensor in module.network.identity_encoder.state_dict().items():
        assert torch.equal(tensor, frozen_before[name]), name
    # the export carries the EMA weights and loads back
    path = module.export_pretrained(tmp_path / "out", num_inference_steps=2)
    loaded = IDDiffuse.from_pretrained(path)
    assert loaded.num_inference_steps == 2
    ema_unet = module.ema.module["unet"].state_dict()
    for name, tensor in loaded.network.unet.state_dict().items():
        torch.testing.assert_close(tensor, ema_unet[name])
