"""DiffDeID training (eqs. 8-11): each loss equals the equation computed a second way, the phase
switch follows the EMA, and a few steps lower the loss."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning")

from anonloader.errors import ConfigError, ModelLoadError
from anonloader.methods.diffdeid.training import (
    DiffDeIDModule,
    PerceptualLoss,
    loss_weights,
)


def _batch(b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    return {"image": torch.rand(b, 3, 32, 32, generator=g), "mask": mask, "rendered": torch.rand(b, 3, 32, 32, generator=g),
            "rho": torch.randn(b, 261, generator=g), "z_id": torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1)}


def _module(**kwargs) -> DiffDeIDModule:
    torch.manual_seed(0)
    module = DiffDeIDModule("tiny", lambda_per=0.0, **kwargs)
    with torch.no_grad():
        module.network.out.weight.normal_(0, 0.1)
    return module


def test_losses_equal_the_equations():
    module = _module().eval()
    batch = _batch()
    t = torch.tensor([5, 30])
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    module.phase.fill_(1)
    out = module.losses(batch, t, noise)
    # second computation, by hand from the schedule
    betas = torch.linspace(1e-3, 0.2, 50, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    x = batch["image"] * 2 - 1
    z_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps = module.network(z_t, t, batch["rendered"] * 2 - 1, batch["rho"], batch["z_id"], batch["image"] * (1 - batch["mask"]) * 2 - 1)
    loss_d = ((eps - noise) ** 2).mean()
    x0 = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    loss_rec = ((x0 - x) ** 2).mean()
    assert torch.allclose(out["loss_d"], loss_d, rtol=1e-5)
    assert torch.allclose(out["loss_rec"], loss_rec, rtol=1e-4)
    assert torch.allclose(out["loss"], 10 * loss_d + loss_rec, rtol=1e-5)  # λ_per L_per is off (lambda_per=0)
    module.phase.fill_(0)
    assert torch.allclose(module.losses(batch, t, noise)["loss"], 10 * loss_d, rtol=1e-5)


def test_perceptual_loss_is_the_sum_over_the_four_relu_layers(tmp_path):
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).features
    loss = PerceptualLoss(vgg)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = 0.0
    with torch.no_grad():
        for end in (4, 9, 16, 23):  # relu1_2, relu2_2, relu3_3, relu4_3 are layers 3, 8, 15, 22
            fa, fb = vgg[:end]((a - mean) / std), vgg[:end]((b - mean) / std)
            expected += float(((fa - fb) ** 2).mean())
        got = float(loss(a, b))
    assert got == pytest.approx(expected, rel=1e-5)
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, tmp_path / "vgg16.pth")
    with torch.no_grad():
        assert float(PerceptualLoss.from_file(tmp_path / "vgg16.pth")(a, b)) == pytest.approx(expected, rel=1e-5)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError):
        PerceptualLoss.from_file(tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="VGG16"):
        DiffDeIDModule("tiny", lambda_per=1.0)


def test_phase_switches_at_the_first_step_the_ema_is_below_threshold():
    module = _module()
    values = [0.3, 0.1, 0.02, 0.01, 0.01] + [0.001] * 200
    ema, switched_at = None, None
    for step, value in enumerate(values):
        ema = value if ema is None else 0.99 * ema + 0.01 * value
        if switched_at is None and ema < 0.05:
            switched_at = step
        phase = module.update_phase(torch.tensor(value))
        assert phase == (0 if switched_at is None else 1), step
        assert float(module.ema_loss) == pytest.approx(ema, rel=1e-5)
    assert switched_at is not None and switched_at > 100  # the EMA lags the raw loss
    module.update_phase(torch.tensor(5.0))  # for good
    assert int(module.phase) == 1
    assert loss_weights(0) == (10.0, 0.0, 0.0) and loss_weights(1) == (10.0, 1.0, 1.0)
    state = module.state_dict()
    assert int(state["phase"]) == 1 and "ema_loss" in state  # kept in checkpoints


def test_twenty_steps_lower_the_loss():
    module = _module(learning_rate=2e-3)
    batch = _batch(4)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (4,), generator=g)
    noise = torch.randn(4, 3, 32, 32, generator=g)
    optimizer = module.configure_optimizers()
    module.eval()
    with torch.no_grad():
        before = float(module.losses(batch, t, noise)["loss_d"])
    module.train()
    for _ in range(20):
        loss = module.losses(batch, t, noise)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        after = float(module.losses(batch, t, noise)["loss_d"])
    assert after < 0.8 * before
