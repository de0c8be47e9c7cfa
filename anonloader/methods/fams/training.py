"""Training FAMS with Lightning (paper 4.1).

- The loss is the paper's single reconstruction loss: the MSE between the UNet's prediction and
  its target (the noise for ``epsilon`` schedules, the velocity for ``v_prediction`` ones such as
  Stable Diffusion 2.1's), at a uniformly drawn timestep.
- On ``unconditional_probability`` (10%) of the samples the source is dropped (zero latents and
  zero image embedding), which gives the unconditional branch CFG and anonymization use.
- Only the UNet and the ReferenceNets' transformer blocks (their attention modules) train; the
  VAE and the CLIP encoder stay frozen. AdamW (paper: lr 1e-5, batch 1, 8 accumulation steps:
  ``Trainer(accumulate_grad_batches=8)``).
- The curriculum is a data option: :class:`TripletDataset` yields (source, driving, target)
  triplets from face-swap records, in stage ``"mixed"`` (real and synthesized driving images)
  or ``"synthetic_driving"`` (synthesized driving images, real targets only);
  :class:`CurriculumTripletData` switches stage at an epoch
  (use ``Trainer(reload_dataloaders_every_n_epochs=1)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .attention import clear_reference_states, route_reference_states
from .components import FAMSComponents
from .pipeline import embed_images, encode_images

__all__ = ["CurriculumTripletData", "FAMSTrainingModule", "SwapRecord", "TripletDataset"]

Stage = Literal["mixed", "synthetic_driving"]


class FAMSTrainingModule(L.LightningModule):
    """Trains a :class:`FAMSComponents` on (source, driving, target) triplets.

    Batches are dicts with ``"source"``, ``"driving"`` and ``"target"``, each
    ``B,3,R,R float in [0,1]`` (the target shows the source's identity with the driving image's
    pose, expression and background).

    Args:
        components: the networks to train (modified in place).
        learning_rate: AdamW's (paper: 1e-5).
        weight_decay: AdamW's.
        unconditional_probability: share of samples trained without a source (paper: 0.1).
        latent_sampling: ``"sample"`` (the authors' training: VAE posterior samples, from torch's
            global generator) or ``"mean"``.
    """

    def __init__(
        self,
        components: FAMSComponents,
        *,
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-2,
        unconditional_probability: float = 0.1,
        latent_sampling: str = "sample",
    ) -> None:
        super().__init__()
        if latent_sampling not in ("mean", "sample"):
            raise ValueError(f"latent_sampling must be 'mean' or 'sample', got {latent_sampling!r}")
        self.latent_sampling = latent_sampling
        self.components = components
        self.unet = components.unet
        self.referencenet = components.referencenet
        self.conditioning_referencenet = components.conditioning_referencenet
        self.vae = components.vae
        self.image_encoder = components.image_encoder
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.unconditional_probability = unconditional_probability
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler_config)
        for network in (self.vae, self.image_encoder, self.referencenet, self.conditioning_referencenet):
            network.requires_grad_(False)
        self.unet.requires_grad_(True)
        for network in (self.referencenet, self.conditioning_referencenet):
            for param in network.attention_parameters():
                param.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reconstruction loss of one batch (randomness from torch's global generator)."""
        source, driving, target = batch["source"], batch["driving"], batch["target"]
        dtype = self.components.dtype
        with torch.no_grad():
            sample = self.latent_sampling == "sample"
            target_latents = encode_images(self.components, target, sample=sample).to(dtype)
            source_latents = encode_images(self.components, source, sample=sample).to(dtype)
            driving_latents = encode_images(self.components, driving, sample=sample).to(dtype)
            source_embeds = embed_images(self.components, source)
            driving_embeds = embed_images(self.components, driving)
        batch_size = target_latents.shape[0]
        keep = (torch.rand(batch_size, device=target_latents.device) >= self.unconditional_probability).to(dtype)
        source_latents = source_latents * keep.view(-1, 1, 1, 1)
        source_embeds = source_embeds * keep.view(-1, 1, 1)

        noise = torch.randn_like(target_latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), device=target_latents.device)
        noisy = self.noise_scheduler.add_noise(target_latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            wanted = self.noise_scheduler.get_velocity(target_latents, noise, timesteps)
        else:
            wanted = noise

        # routed like sampling (``components.reference_routing``): released weights fine-tune with
        # the routing they were trained with
        source_states = self.components.route(self.referencenet(source_latents, source_embeds))
        driving_states = self.components.route(self.conditioning_referencenet(driving_latents, driving_embeds))
        route_reference_states(self.components.processors, [source_states, driving_states])
        try:
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=torch.cat([source_embeds, driving_embeds], dim=1), return_dict=False)[0]
        finally:
            clear_reference_states(self.components.processors)
        return F.mse_loss(prediction.float(), wanted.float())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["target"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.components.clear_cache()  # the source ReferenceNet changed: its null states are stale

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class SwapRecord:
    """One identity's images for the curriculum, each ``3,R,R float in [0,1]``.

    Attributes:
        source: a photo of person A (identity to transfer).
        ground_truth: another real photo of person A.
        swapped: ``ground_truth`` with its face swapped to person B by a face-swap model.
        donor: a real photo of person B (the identity that ``swapped`` shows).
    """

    source: torch.Tensor
    ground_truth: torch.Tensor
    swapped: torch.Tensor
    donor: torch.Tensor


class TripletDataset(Dataset):
    """(source, driving, target) triplets from :class:`SwapRecord` s.

    - every stage: source = ``source``, driving = ``swapped`` (synthesized), target = ``ground_truth``;
    - stage ``"mixed"`` adds: source = ``donor``, driving = ``ground_truth`` (real), target =
      ``swapped`` (the first phase of the paper's curriculum).
    """

    def __init__(self, records: Sequence[SwapRecord], stage: Stage = "mixed") -> None:
        if stage not in ("mixed", "synthetic_driving"):
            raise ValueError(f"stage must be 'mixed' or 'synthetic_driving', got {stage!r}")
        self.records = records  # any sequence; a SwapRecordFolder reads each record when asked
        self.stage = stage

    def __len__(self) -> int:
        return len(self.records) * (2 if self.stage == "mixed" else 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index % len(self.records)]
        if index < len(self.records):
            return {"source": record.source, "driving": record.swapped, "target": record.ground_truth}
        return {"source": record.donor, "driving": record.ground_truth, "target": record.swapped}


class CurriculumTripletData(L.LightningDataModule):
    """The curriculum: ``"mixed"`` triplets before ``switch_epoch``, ``"synthetic_driving"`` after.

    Use with ``Trainer(reload_dataloaders_every_n_epochs=1)`` so the switch takes effect.
    """

    def __init__(self, records: Sequence[SwapRecord], *, switch_epoch: int, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        self.records = records
        self.switch_epoch = switch_epoch
        self.batch_size = batch_size
        self.num_workers = num_workers

    def stage_at(self, epoch: int) -> Stage:
        return "mixed" if epoch < self.switch_epoch else "synthetic_driving"

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        dataset = TripletDataset(self.records, self.stage_at(epoch))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {"switch_epoch": self.switch_epoch}
