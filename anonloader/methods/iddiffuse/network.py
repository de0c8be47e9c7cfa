"""All IDDiffuse modules in one ``nn.Module``, built from one JSON-able config.

``IDDiffuseNetwork(config)`` holds E_I (:class:`IdentityEncoder`: frozen recognizers + mapper
MLP), E_t (:class:`TextureEncoder`: frozen backbone + trainable head) and the
:class:`DualConditionUNet`, plus the diffusion schedule settings. Presets:

- ``"paper"``: 112 px; E_I over an ArcFace IResNet-50 (512-d; the paper also uses FaRL and
  FaceNet — add ``{"kind": "facenet", ...}`` to ``identity.recognizers``), MLP 2048-1024-512;
  E_t over the same IResNet-50's first stage (64 x 56 x 56), 5 x 5 grid; an ADM-like UNet
  (128-256-256-512 channels, attention at 28 and 14 px); T = 1000, linear betas.
- ``"tiny"``: 32 px, a few thousand parameters per part, for tests and smoke runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError
from anonloader.methods.iddiffuse.identity_mapper import IdentityEncoder
from anonloader.methods.iddiffuse.texture import TextureEncoder
from anonloader.methods.iddiffuse.unet import DualConditionUNet

__all__ = ["PRESETS", "IDDiffuseNetwork", "resolve_config"]

_IRESNET50 = {"kind": "iresnet", "widths": [64, 128, 256, 512], "depths": [3, 4, 14, 3],
              "embedding_dim": 512, "input_size": 112, "feature_stage": 1}
_TINY_RESNET = {"kind": "iresnet", "widths": [8, 8, 16, 16], "depths": [1, 1, 1, 1],
                "embedding_dim": 32, "input_size": 32, "feature_stage": 1}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "crop_size": 112,
        "identity": {"recognizers": [_IRESNET50], "hidden_dims": [2048, 1024], "output_dim": 512},
        "texture": {"backbone": _IRESNET50, "channels": 64, "grid": 5, "token_dim": 512, "dropout": 0.3},
        "unet": {"block_out_channels": [128, 256, 256, 512], "layers_per_block": 1,
                 "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                 "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
                 "attention_head_dim": 64, "norm_num_groups": 32, "num_identity_tokens": 4},
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    },
    "tiny": {
        "crop_size": 32,
        "identity": {"recognizers": [_TINY_RESNET, {**_TINY_RESNET, "widths": [8, 16, 16, 16]}],
                     "hidden_dims": [48], "output_dim": 32},
        "texture": {"backbone": _TINY_RESNET, "channels": 8, "grid": 5, "token_dim": 32, "dropout": 0.3},
        "unet": {"block_out_channels": [8, 16], "layers_per_block": 1,
                 "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                 "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
                 "attention_head_dim": 8, "norm_num_groups": 4, "num_identity_tokens": 2},
        "schedule": {"num_train_timesteps": 50, "beta_schedule": "linear", "beta_start": 1e-3, "beta_end": 0.2},
    },
}


def resolve_config(config: str | dict[str, Any]) -> dict[str, Any]:
    """A full network config from a preset name or a dict (a dict may name ``"preset"`` and
    override its top-level sections)."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown IDDiffuse preset {config!r}; choose one of {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[config])
    config = copy.deepcopy(dict(config))
    base = copy.deepcopy(PRESETS[config.pop("preset")]) if "preset" in config else {}
    base.update(config)
    missing = {"crop_size", "identity", "texture", "unet", "schedule"} - set(base)
    if missing:
        raise ConfigError(f"IDDiffuse config lacks {sorted(missing)}; start from preset 'paper' or 'tiny'")
    return base


class IDDiffuseNetwork(nn.Module):
    """E_I + E_t + dual-condition UNet; see the module docstring for ``config``."""

    def __init__(self, config: str | dict[str, Any]) -> None:
        super().__init__()
        self.network_config = resolve_config(config)
        cfg = self.network_config
        self.crop_size = int(cfg["crop_size"])
        self.identity_encoder = IdentityEncoder(**cfg["identity"])
        self.texture_encoder = TextureEncoder(**cfg["texture"])
        self.unet = DualConditionUNet(
            sample_size=self.crop_size, identity_dim=self.identity_encoder.dim,
            token_dim=self.texture_encoder.head.token_dim, **cfg["unet"],
        )
        self.num_train_timesteps = int(cfg["schedule"]["num_train_timesteps"])
        self.identity_encoder.requires_grad_(False)  # E_I is trained beforehand (mapper stage)
        self.texture_encoder.backbone.requires_grad_(False)
        self.identity_encoder.eval()

    def train(self, mode: bool = True) -> IDDiffuseNetwork:
        super().train(mode)
        self.identity_encoder.eval()  # frozen in the diffusion stage, BatchNorm included
        return self

    def make_train_scheduler(self) -> Any:
        """The DDPM noise schedule (diffusers ``DDPMScheduler``) of this network."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.network_config["schedule"], clip_sample=True, prediction_type="epsilon")

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self.network_config)

    def frozen_state_keys(self) -> list[str]:
        """Names of parameters that never train in the diffusion stage (recognizers, mapper)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("identity_encoder.", "texture_encoder.backbone."))]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the diffusion stage trains: the texture head and the UNet."""
        return [*self.texture_encoder.head.parameters(), *self.unet.parameters()]

    @torch.no_grad()
    def identity_features(self, crops: torch.Tensor) -> torch.Tensor:
        """E_I of ``B,3,S,S float in [0,1]`` crops (resized to the E_I recognizers' size) -> ``B,D``."""
        return self.identity_encoder(crops)
