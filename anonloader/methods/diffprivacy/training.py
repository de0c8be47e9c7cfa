"""Training MSI (paper eq. 7) and per-face refinement of its pseudo-words.

Eq. 7: ``L = E_{z0, ε, t} ‖ε - ε_θ(z_t, t, C_t)‖²`` with ``C_t = C^{t//100}``: each sample draws
its own t and is conditioned on the C of its own stage, computed from MSI at that stage's
timestep ``100·(t//100) + 50``. Only MSI trains; the UNet, VAE and both CLIP encoders are frozen.
To avoid over-fitting the paper applies dropout 0.05 in every cross-attention layer: we set
``attn2.to_out[1]`` (the UNet's cross-attention output dropout) to p = 0.05 and switch those
modules, and only those, to train mode while training. AdamW, lr 1e-3 (paper: batch 1).

Regimes: amortized (one MSI over a dataset, :class:`MSIModule`, the default of the CLI) and the
paper's per-image optimisation (``--per-image-steps N``). At anonymization time,
:func:`refine_words` tunes one face's 10 pseudo-words directly for ``refine_steps`` steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .msi import (
    MSI,
    PromptSlot,
    anchor_embedding,
    clip_class_tokens,
    encode_stage_words,
    stage_timesteps,
)

if TYPE_CHECKING:
    from .backbone import Backbone

__all__ = ["MSIModule", "cross_attention_dropouts", "denoising_loss", "msi_loss", "per_image_words", "refine_words"]


def cross_attention_dropouts(unet: nn.Module) -> list[nn.Dropout]:
    """The output dropout of every cross-attention layer (``attn2.to_out[1]``)."""
    return [m.to_out[1] for name, m in unet.named_modules() if name.endswith("attn2") and isinstance(m.to_out[1], nn.Dropout)]


def denoising_loss(backbone: Backbone, z0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``‖ε - ε̂(z_t, t, C)‖²`` (mean) for ``B,4,h,w`` z0 and noise, ``B,L,D`` C, ``B int64`` t.
    v-prediction outputs are converted to ε first."""
    a = backbone.schedule.alphas_cumprod.to(z0.device)[t].to(z0.dtype).view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    out = backbone.unet(z_t, t, encoder_hidden_states=cond).sample
    if backbone.schedule.prediction_type == "v_prediction":
        out = a.sqrt() * out + (1 - a).sqrt() * z_t
    return F.mse_loss(out.float(), noise.float())


def msi_loss(
    backbone: Backbone, msi: MSI, slot: PromptSlot, images: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 on ``B,3,R,R [0,1]`` crops at the backbone's resolution: ``(loss, t)`` with each
    sample's own ``t`` (``B int64``) and C^{t//100}."""
    with torch.no_grad():
        z0 = backbone.encode(images)
    features = clip_class_tokens(backbone, images, msi.config.layers)
    T = backbone.schedule.num_train_timesteps
    stages = msi.config.num_stages
    t = torch.randint(0, T, (images.shape[0],), generator=generator).to(images.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    stage_t = torch.tensor(stage_timesteps(stages, T), device=images.device)[t * stages // T]
    words = msi(features, stage_t[:, None], anchor_embedding(backbone, slot))[:, 0]
    cond = encode_stage_words(backbone, slot, words)
    return denoising_loss(backbone, z0, cond, t, noise), t


def per_image_words(
    backbone: Backbone, template: MSI, slot: PromptSlot, image: torch.Tensor, steps: int, *, lr: float = 1e-3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The paper's per-image regime for one face: a fresh copy of ``template`` trained ``steps``
    AdamW steps (batch 1) with eq. 7 on ``image`` (``1,3,R,R [0,1]``, timesteps and noise from a
    generator seeded with ``seed``). Returns its ``10,D`` pseudo-words and the last loss (None
    when ``steps`` is 0)."""
    msi = MSI.from_config(template.config).to(image.device)
    msi.load_state_dict(template.state_dict())
    msi.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(msi.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    loss = None
    with torch.enable_grad():
        for _ in range(steps):
            loss, _ = msi_loss(backbone, msi, slot, image, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    msi.eval()
    with torch.no_grad():
        features = clip_class_tokens(backbone, image, msi.config.layers)
        ts = torch.tensor(stage_timesteps(msi.config.num_stages, backbone.schedule.num_train_timesteps), device=image.device)
        words = msi(features, ts, anchor_embedding(backbone, slot))[0]
    return words, None if loss is None else loss.detach()


def refine_words(
    backbone: Backbone, slot: PromptSlot, z0: torch.Tensor, words: torch.Tensor, steps: int, lr: float, seed: int
) -> torch.Tensor:
    """Per-face tuning of the pseudo-words with eq. 7 (Adam): ``1,4,h,w`` z0 and ``10,D`` words
    -> ``10,D`` words. Timesteps and noise come from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    stages = words.shape[0]
    T = backbone.schedule.num_train_timesteps
    tuned = words.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tuned], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            t = torch.randint(0, T, (1,), generator=generator)
            noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
            cond = encode_stage_words(backbone, slot, tuned[int(t) * stages // T][None])
            loss = denoising_loss(backbone, z0, cond, t.to(z0.device), noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return tuned.detach()


try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the lightning extra is optional
    pl = None  # type: ignore[assignment]


if pl is not None:

    class MSIModule(pl.LightningModule):
        """Lightning wrapper training an :class:`MSI` with eq. 7 (only MSI's weights change).

        Batches are ``B,3,R,R float in [0,1]`` aligned crops at the backbone's resolution R (or a
        dict with them under ``"image"``). The frozen backbone is held outside the module's
        parameters and state dict (checkpoints hold MSI only) and moved with it.

        Args:
            backbone, msi: the networks; lr: AdamW's learning rate (1e-3); dropout: p of the
            cross-attention output dropout while training (0.05); weight_decay: AdamW's (0.01).
        """

        def __init__(self, backbone: Backbone, msi: MSI, *, lr: float = 1e-3, dropout: float = 0.05, weight_decay: float = 0.01) -> None:
            super().__init__()
            from .msi import prompt_slot

            self.msi = msi
            object.__setattr__(self, "_backbone", backbone)  # not a submodule: never trained nor saved
            self.slot = prompt_slot(backbone)
            self.lr, self.dropout, self.weight_decay = float(lr), float(dropout), float(weight_decay)
            self._dropouts = cross_attention_dropouts(backbone.unet)
            self.save_hyperparameters({"lr": lr, "dropout": dropout, "weight_decay": weight_decay, "msi": dict(msi.config)})

        @property
        def backbone(self) -> Backbone:
            return self._backbone  # type: ignore[attr-defined]

        def _set_modes(self, training: bool) -> None:
            """Backbone in eval mode, except the cross-attention dropouts (p = ``dropout``) while training."""
            for network in self.backbone.networks().values():
                network.eval()
            for module in self._dropouts:
                module.p = self.dropout
                module.train(training)

        def train(self, mode: bool = True) -> MSIModule:
            super().train(mode)
            self._set_modes(mode)
            return self

        def on_fit_start(self) -> None:
            if self.backbone.device != self.device:
                self.backbone.to(device=self.device)

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self._set_modes(True)  # Lightning restores module modes itself; make ours hold per step

        def on_fit_end(self) -> None:
            self._set_modes(False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images = batch["image"] if isinstance(batch, dict) else batch
            loss, _ = msi_loss(self.backbone, self.msi, self.slot, images.to(self.device, self.backbone.dtype))
            self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.msi.parameters(), lr=self.lr, weight_decay=self.weight_decay)

else:  # pragma: no cover
    MSIModule = None  # type: ignore[assignment,misc]
