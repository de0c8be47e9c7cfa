"""Lightning training for IDDiffuse: the identity mapper (stage 1) and the dual-condition
diffusion model (stage 2). Imports ``lightning``; inference (:mod:`.model`) does not.

Stage 2 (``IDDiffuseModule``), per batch of real crops X and paired synthetic-identity crops X̂:

1. ``t ~ U{0..T-1}``, ``x_t = sqrt(ᾱ_t) x + sqrt(1-ᾱ_t) ε`` (x = 2X-1);
2. conditions: identity = E_I(X̂) (and E_I(X) for blended conditions), texture = E_t(X);
   classifier-free dropout replaces each condition by its learned null with probability
   ``condition_dropout`` (independently);
3. loss = MSE(ε, ε̂) (eq. 1) + ``identity_loss_weight`` * L_anon(eq. 7 on x̂0, in E_I space).

Reading chosen for gamma control: eq. 7 already ramps between the real and the synthetic
identity over t; to make the inference-time condition blend ``(1-γ) E_I(X̂) + γ E_I(X)``
meaningful, a fraction of training samples are conditioned on the real identity
(``real_condition_prob``, the reconstruction case, γ=1) or on a random blend
(``blend_condition_prob``); their synthetic target in eq. 7 is the blend actually used.
The overall weight of L_anon is not given in the paper; DCFace-style default 0.05.

EMA: ``torch.optim.swa_utils.AveragedModel`` over the trained parts (texture head + UNet),
exported by :meth:`IDDiffuseModule.export_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from anonloader.methods.iddiffuse.identity_mapper import IdentityMapper, mine_hard_triplets, triplet_loss
from anonloader.methods.iddiffuse.losses import anonymization_loss, predict_x0, time_weights
from anonloader.methods.iddiffuse.network import IDDiffuseNetwork

__all__ = ["IDDiffuseModule", "IdentityMapperModule"]


class IdentityMapperModule(L.LightningModule):
    """Stage 1: trains :class:`IdentityMapper` with the batch-hard triplet loss (eq. 4).

    Batches are ``(embeddings B,input_dim float, labels B int64)`` — concatenated recognizer
    embeddings (precomputed, see :mod:`.train`) of P identities x K images.
    """

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...] = (2048, 1024), output_dim: int = 512,
                 margin: float = 0.2, learning_rate: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mapper = IdentityMapper(input_dim, hidden_dims, output_dim)

    def triplet_step(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.mapper(embeddings)
        anchor, positive, negative = mine_hard_triplets(features, labels)
        if len(anchor) == 0:
            return features.sum() * 0.0
        return triplet_loss(features[anchor], features[positive], features[negative], self.hparams.margin)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.triplet_step(*batch)
        self.log("train/triplet", loss, prog_bar=True, batch_size=len(batch[1]))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/triplet", self.triplet_step(*batch), prog_bar=True, batch_size=len(batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.mapper.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)


class IDDiffuseModule(L.LightningModule):
    """Stage 2: trains the texture head and the UNet; E_I and F_t stay frozen.

    Args:
        network: a built :class:`IDDiffuseNetwork` (recognizers and a trained mapper loaded), or
            a preset name / config dict to build a fresh one.
        learning_rate, weight_decay: AdamW (paper: lr 1e-3, batch 128).
        identity_loss_weight: weight of L_anon against the noise MSE.
        texture_weight: λ of eq. 7 (0.05).
        gamma_order: ``order`` of γ_t = linspace(0,1,T+1)**order (1 = linear).
        condition_dropout: classifier-free dropout probability per condition.
        real_condition_prob, blend_condition_prob: see the module docstring.
        ema_decay: EMA decay of the exported weights.
    """

    def __init__(
        self,
        network: IDDiffuseNetwork | str | dict[str, Any] = "paper",
        *,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        identity_loss_weight: float = 0.05,
        texture_weight: float = 0.05,
        gamma_order: float = 1.0,
        condition_dropout: float = 0.1,
        real_condition_prob: float = 0.1,
        blend_condition_prob: float = 0.1,
        ema_decay: float = 0.9999,
    ) -> None:
        super().__init__()
        self.network = network if isinstance(network, IDDiffuseNetwork) else IDDiffuseNetwork(network)
        self.save_hyperparameters(ignore=["network"])
        self.hparams["network"] = self.network.config()  # load_from_checkpoint rebuilds from it
        self.scheduler = self.network.make_train_scheduler()
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.ema = AveragedModel(self._trained(), multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)

    def _trained(self) -> nn.ModuleDict:
        return nn.ModuleDict({"texture_head": self.network.texture_encoder.head, "unet": self.network.unet})

    def compute_losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses for ``batch = {"image": B,3,S,S [0,1] real X, "id_image": B,3,S,S [0,1] synthetic X̂}``.

        ``generator`` (on the batch's device) fixes t, noise and condition sampling (for tests).
        """
        real, synthetic = batch["image"], batch["id_image"]
        b, device, hp = real.shape[0], real.device, self.hparams
        T = self.network.num_train_timesteps

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=device)

        timesteps = torch.randint(0, T, (b,), generator=generator, device=device)
        noise = torch.randn(real.shape, generator=generator, device=device, dtype=real.dtype)
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(real.dtype)
        x0 = real * 2.0 - 1.0
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise

        with torch.no_grad():
            f_real = self.network.identity_encoder(real)
            f_synthetic = self.network.identity_encoder(synthetic)
        u = uniform(b)
        condition_gamma = torch.where(u < hp.real_condition_prob, torch.ones_like(u),
                                      torch.where(u < hp.real_condition_prob + hp.blend_condition_prob, uniform(b), torch.zeros_like(u)))
        texture = self.network.texture_encoder(real)
        drop_identity = uniform(b) < hp.condition_dropout
        drop_texture = uniform(b) < hp.condition_dropout
        noise_pred = self.network.unet(noisy, timesteps, f_synthetic, texture, identity_b=f_real, gamma=condition_gamma,
                                       drop_identity=drop_identity, drop_texture=drop_texture)
        mse = nn.functional.mse_loss(noise_pred, noise)

        x0_pred = predict_x0(noisy, noise_pred, timesteps, self.alphas_cumprod)
        f_x0 = self.network.identity_encoder((x0_pred + 1.0) / 2.0)
        target = nn.functional.normalize((1 - condition_gamma)[:, None] * f_synthetic + condition_gamma[:, None] * f_real, dim=1)
        gamma_t = time_weights(timesteps, T, hp.gamma_order)
        anon = anonymization_loss(f_x0, f_real, target, gamma_t, hp.texture_weight)
        return {"loss": mse + hp.identity_loss_weight * anon, "mse": mse, "anonymization": anon}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self._trained())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.network.trainable_parameters(), lr=self.hparams.learning_rate,
                                 weight_decay=self.hparams.weight_decay)

    def ema_network(self) -> IDDiffuseNetwork:
        """A copy of the network with the EMA weights in the trained parts (eval mode)."""
        import copy

        network = copy.deepcopy(self.network)
        trained = nn.ModuleDict({"texture_head": network.texture_encoder.head, "unet": network.unet})
        trained.load_state_dict(self.ema.module.state_dict())
        return network.eval()

    def export_pretrained(self, path: str | Path, **sampling: Any) -> Path:
        """Write the EMA network in the ``IDDiffuse.save_pretrained`` layout; returns ``path``."""
        from anonloader.methods.iddiffuse.model import IDDiffuse

        IDDiffuse(network=self.ema_network(), **sampling).save_pretrained(path)
        return Path(path)
