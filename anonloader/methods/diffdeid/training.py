"""Lightning training for DiffDeID's image network (paper sec. 3.3, eqs. 8-11). Imports
``lightning``; inference (:mod:`.model`) does not.

Per batch of prepared faces (:mod:`.train` ``prepare``: image I, mask M, I_3d, ρ, z_id of the
real face — training reconstructs the real face from its own conditions):

1. ``t ~ U{0..T-1}``, ``Z_t = sqrt(ᾱ_t) x + sqrt(1-ᾱ_t) ε`` with ``x = 2I - 1`` (T = 1000, linear
   betas in the ``paper`` preset);
2. ``ε̂ = ε_θ(Z_t, I_m, I_3d, ρ, z_id, t)``; L_d = MSE(ε, ε̂) (eq. 8);
3. ``x̂0 = (Z_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t)`` (the one-step prediction, our reading of Ẑ_0);
   L_rec = MSE(x̂0, x) (eq. 9, in the [-1,1] range); L_per = Σ over VGG16 relu1_2, relu2_2,
   relu3_3, relu4_3 of MSE(Φ(x̂0), Φ(I)) (eq. 10; torchvision's VGG16 layout, ImageNet
   normalisation, x̂0 clamped to [-1,1] then mapped to [0,1]);
4. L = λ_d L_d + λ_rec L_rec + λ_per L_per (eq. 11; 10, 1, 1). Phases (sec. 4.1: "the denoising
   loss is used exclusively during the initial phase"): an EMA (decay 0.99, started at the first
   L_d) of L_d is updated every step; from the first step at which it is below 0.05 the loss
   has all three terms, for good. ``ema_loss`` and ``phase`` are buffers, so checkpoints keep
   them.

Optimiser: Adam, lr 2e-4 (sec. 4.1; batch 8, 200k iterations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from anonloader.errors import ConfigError, ModelLoadError
from anonloader.methods.diffdeid.network import DiffDeIDUNet

__all__ = ["VGG16_LAYERS", "DiffDeIDModule", "PerceptualLoss", "loss_weights"]

#: torchvision ``vgg16().features`` indices of relu1_2, relu2_2, relu3_3, relu4_3.
VGG16_LAYERS = (3, 8, 15, 22)


def loss_weights(phase: int, lambda_d: float = 10.0, lambda_rec: float = 1.0, lambda_per: float = 1.0) -> tuple[float, float, float]:
    """(λ_d, λ_rec, λ_per) in ``phase`` 0 (denoising only) or 1 (eq. 11)."""
    return (lambda_d, 0.0, 0.0) if phase == 0 else (lambda_d, lambda_rec, lambda_per)


class PerceptualLoss(nn.Module):
    """Eq. 10: Σ_l MSE(Φ_l(a), Φ_l(b)) over VGG16 ``features`` up to relu4_3 (frozen).

    Args:
        features: a torchvision ``vgg16().features`` (or its first 23 layers).
    """

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = nn.Sequential(*list(features)[: VGG16_LAYERS[-1] + 1]).eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> PerceptualLoss:
        """Torchvision VGG16 weights from a local file (a full ``vgg16`` state dict or one of its
        ``features``)."""
        import torchvision

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"VGG16 weights not found: {path}; pass the local torchvision vgg16-*.pth")
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or dict(state)
        vgg = torchvision.models.vgg16(weights=None).features
        try:
            vgg.load_state_dict(features)
        except RuntimeError as error:
            raise ModelLoadError(f"{path} does not hold torchvision VGG16 weights: {error}") from error
        return cls(vgg)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``B,3,H,W`` in [0,1] -> the four relu feature maps."""
        h = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_LAYERS:
                out.append(h)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b`` ``B,3,H,W`` in [0,1] -> scalar Σ_l MSE."""
        return sum(nn.functional.mse_loss(x, y) for x, y in zip(self.layers(a), self.layers(b)))  # type: ignore[return-value]

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.features.eval()
        return self


class DiffDeIDModule(L.LightningModule):
    """Trains :class:`DiffDeIDUNet` with eqs. 8-11 and the EMA phase switch.

    Batches: dicts of ``image`` ``B,3,S,S`` in [0,1], ``mask`` ``B,1,S,S`` in {0,1},
    ``rendered`` ``B,3,S,S`` in [0,1], ``rho`` ``B,n_ρ``, ``z_id`` ``B,D``; for the video network
    (``identity_condition=False``, sec. 3.4) ``reference`` ``B,3,S,S`` in [0,1] (another frame of
    the clip, E_t's input) instead of ``mask`` and ``z_id``, and ``rho`` = ρ̂.

    Args:
        config: the network preset / config.
        vgg_weights: local torchvision VGG16 weights for L_per; required when ``lambda_per > 0``.
        lambda_d, lambda_rec, lambda_per: eq. 11 weights (10, 1, 1).
        ema_decay, switch_below: the phase switch (0.99, 0.05).
        learning_rate: Adam's (2e-4).
    """

    def __init__(
        self,
        config: str | dict[str, Any] = "paper",
        *,
        vgg_weights: str | None = None,
        lambda_d: float = 10.0,
        lambda_rec: float = 1.0,
        lambda_per: float = 1.0,
        ema_decay: float = 0.99,
        switch_below: float = 0.05,
        learning_rate: float = 2e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = DiffDeIDUNet(config)
        if lambda_per > 0 and vgg_weights is None:
            raise ConfigError(
                "the perceptual loss (eq. 10) needs VGG16 weights: pass --vgg-weights <local torchvision vgg16-*.pth>, "
                "or --lambda-per 0 to train without it"
            )
        self.perceptual = PerceptualLoss.from_file(vgg_weights) if lambda_per > 0 else None
        betas = torch.linspace(self.network.network_config["schedule"]["beta_start"], self.network.network_config["schedule"]["beta_end"],
                               self.network.num_train_timesteps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.register_buffer("ema_loss", torch.tensor(float("nan")))
        self.register_buffer("phase", torch.tensor(0, dtype=torch.long))

    # ------------------------------------------------------------------ the equations
    def update_phase(self, loss_d: torch.Tensor) -> int:
        """EMA of L_d (started at the first value) and the switch to phase 1 at the first step
        it is below ``switch_below``; returns the phase this step's loss uses."""
        value = loss_d.detach().float()
        ema = self.ema_loss
        new = value if torch.isnan(ema) else self.hparams.ema_decay * ema + (1 - self.hparams.ema_decay) * value
        self.ema_loss.copy_(new)
        if int(self.phase) == 0 and float(new) < self.hparams.switch_below:
            self.phase.fill_(1)
        return int(self.phase)

    def losses(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """All terms for given ``timesteps`` (``B`` int) and ``noise`` (``B,3,S,S``): ``loss``,
        ``loss_d``, ``loss_rec``, ``loss_per`` (0 when off), ``phase``."""
        image = batch["image"].float()
        x = image * 2 - 1
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        z_t = a.sqrt() * x + (1 - a).sqrt() * noise
        if self.network.identity_condition:  # image network: E_t on I_m, C with z_id
            texture = (image * (1 - batch["mask"].float())) * 2 - 1
            identity = batch["z_id"].float()
        else:  # video network (sec. 3.4): E_t on the reference frame, C without z_id
            texture, identity = batch["reference"].float() * 2 - 1, None
        eps = self.network(z_t, timesteps, batch["rendered"].float() * 2 - 1, batch["rho"].float(), identity, texture)
        loss_d = nn.functional.mse_loss(eps, noise)
        phase = self.update_phase(loss_d) if self.training else int(self.phase)
        w_d, w_rec, w_per = loss_weights(phase, self.hparams.lambda_d, self.hparams.lambda_rec, self.hparams.lambda_per)
        zero = loss_d.new_zeros(())
        loss_rec = loss_per = zero
        if phase == 1:
            x0 = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
            loss_rec = nn.functional.mse_loss(x0, x)
            if self.perceptual is not None and w_per > 0:
                loss_per = self.perceptual((x0.clamp(-1, 1) + 1) / 2, image)
        loss = w_d * loss_d + w_rec * loss_rec + w_per * loss_per
        return {"loss": loss, "loss_d": loss_d, "loss_rec": loss_rec, "loss_per": loss_per, "phase": torch.tensor(phase)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image = batch["image"]
        timesteps = torch.randint(0, self.network.num_train_timesteps, (image.shape[0],), device=image.device)
        out = self.losses(batch, timesteps, torch.randn_like(image))
        self.log_dict({k: v.float() for k, v in out.items()}, prog_bar=True, batch_size=image.shape[0])
        return out["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.network.parameters(), lr=self.hparams.learning_rate)

    def train(self, mode: bool = True) -> DiffDeIDModule:
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self
