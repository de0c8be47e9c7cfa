"""The dual-condition denoiser ε_θ(x_t, t, E_I(x̂), E_t(x)) (paper sec. 3.4, eq. 8; DCFace-style).

A pixel-space ADM-like UNet (diffusers ``UNet2DModel``; 112 x 112 by default, any size the
down-sampling divides) with two conditions:

- the identity feature (E_I output) is added to the timestep embedding (through a Linear, as
  DCFace does with its recognizer feature), and is also turned into ``num_identity_tokens``
  tokens;
- identity tokens and the texture tokens of E_t enter **every attention layer** of the UNet as
  extra keys/values concatenated to the layer's own (eq. 8: ``softmax(Q [K, K_c]^T) [V, V_c]``),
  through :class:`anonloader.kernels.attention.MultiSourceAttnProcessor` (the concatenation is
  never materialized). Each layer projects the tokens with its own Linear into K_c and V_c (the
  role of DCFace's Conv1d).

Reading chosen: the paper calls this "cross-attention"; the UNet's attention layers are
self-attention over the feature map, and the condition K/V are prepended to them as DCFace
does, which is eq. 8 with ``K, V`` the layer's own.

gamma control: with both a real (``identity_b``) and a synthetic (``identity``) feature and a
``gamma``, the identity keys/values are ``(1 - gamma) * synthetic + gamma * real``, blended while
loading (:class:`~anonloader.kernels.attention.BlendedKV`), and the timestep term is blended the
same way. Classifier-free guidance uses learned null conditions (``drop_identity`` /
``drop_texture`` per sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError
from anonloader.kernels.attention import KV, BlendedKV, MultiSourceAttnProcessor

__all__ = ["DualConditionUNet"]


class DualConditionUNet(nn.Module):
    """Noise predictor with identity and texture conditions.

    Args:
        sample_size: crop side ``S``.
        block_out_channels, layers_per_block, down_block_types, up_block_types,
        attention_head_dim, norm_num_groups: ``UNet2DModel`` settings.
        identity_dim: size of the E_I feature.
        token_dim: size of the texture tokens (identity tokens are made the same size).
        num_identity_tokens: how many tokens the identity feature becomes.
    """

    def __init__(
        self,
        sample_size: int = 112,
        block_out_channels: Sequence[int] = (128, 256, 256, 512),
        layers_per_block: int = 1,
        down_block_types: Sequence[str] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        identity_dim: int = 512,
        token_dim: int = 512,
        num_identity_tokens: int = 4,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention

        factor = 2 ** (len(block_out_channels) - 1)
        if sample_size % factor:
            raise ConfigError(f"sample_size {sample_size} must be divisible by {factor} for {len(block_out_channels)} UNet levels")
        self.arch = {
            "sample_size": sample_size, "block_out_channels": list(block_out_channels),
            "layers_per_block": layers_per_block, "down_block_types": list(down_block_types),
            "up_block_types": list(up_block_types), "attention_head_dim": attention_head_dim,
            "norm_num_groups": norm_num_groups, "identity_dim": identity_dim, "token_dim": token_dim,
            "num_identity_tokens": num_identity_tokens,
        }
        time_dim = block_out_channels[0] * 4
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=3, out_channels=3,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            resnet_time_scale_shift="scale_shift", class_embed_type="identity",
        )
        self.identity_to_time = nn.Linear(identity_dim, time_dim)
        self.identity_to_tokens = nn.Linear(identity_dim, num_identity_tokens * token_dim)
        self.identity_token_norm = nn.LayerNorm(token_dim)
        self.null_identity = nn.Parameter(torch.zeros(identity_dim))
        self.null_texture = nn.Parameter(torch.zeros(token_dim))
        self.num_identity_tokens, self.token_dim = num_identity_tokens, token_dim

        self.condition_kv = nn.ModuleDict()
        self._processors: dict[str, tuple[Any, MultiSourceAttnProcessor]] = {}
        for name, module in self.unet.named_modules():
            if isinstance(module, Attention):
                key = name.replace(".", "_")
                processor = MultiSourceAttnProcessor()
                module.set_processor(processor)
                inner = module.to_k.out_features
                self.condition_kv[key] = nn.Linear(token_dim, 2 * inner)
                self._processors[key] = (module, processor)
        if not self._processors:
            raise ConfigError("DualConditionUNet needs at least one attention block (AttnDownBlock2D / AttnUpBlock2D)")

    def identity_tokens(self, identity: torch.Tensor) -> torch.Tensor:
        """``B,identity_dim`` -> ``B,num_identity_tokens,token_dim``."""
        tokens = self.identity_to_tokens(identity).view(-1, self.num_identity_tokens, self.token_dim)
        return self.identity_token_norm(tokens)

    def _project(self, key: str, attn: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.condition_kv[key](tokens).chunk(2, dim=-1)
        b, n, inner = k.shape
        head_dim = inner // attn.heads
        return (k.view(b, n, attn.heads, head_dim).transpose(1, 2), v.view(b, n, attn.heads, head_dim).transpose(1, 2))

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        identity: torch.Tensor,
        texture: torch.Tensor,
        *,
        identity_b: torch.Tensor | None = None,
        gamma: torch.Tensor | float | None = None,
        drop_identity: torch.Tensor | None = None,
        drop_texture: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise.

        Args:
            sample: ``B,3,S,S`` noisy image x_t (data range [-1,1]).
            timesteps: ``B int64`` in ``[0, T)``.
            identity: ``B,identity_dim`` E_I feature of the identity to generate (the synthetic one).
            texture: ``B,L,token_dim`` E_t tokens of the real image.
            identity_b: ``B,identity_dim`` second identity (the real one) blended in by ``gamma``.
            gamma: float or ``B`` tensor; the identity condition is ``(1-gamma) a + gamma b``.
            drop_identity, drop_texture: ``B bool``; True replaces that condition by its learned
                null (classifier-free guidance).
        Returns:
            ``B,3,S,S`` predicted noise.
        """
        b = sample.shape[0]
        if drop_identity is not None:
            identity = torch.where(drop_identity[:, None], self.null_identity.expand_as(identity), identity)
            if identity_b is not None:
                identity_b = torch.where(drop_identity[:, None], self.null_identity.expand_as(identity_b), identity_b)
        if drop_texture is not None:
            texture = torch.where(drop_texture[:, None, None], self.null_texture.expand_as(texture), texture)
        blend = identity_b is not None and gamma is not None
        if blend:
            g = torch.as_tensor(gamma, dtype=identity.dtype, device=identity.device).expand(b)
            time_condition = (1 - g)[:, None] * self.identity_to_time(identity) + g[:, None] * self.identity_to_time(identity_b)
            tokens_b = self.identity_tokens(identity_b)
        else:
            time_condition = self.identity_to_time(identity)
        tokens_a = self.identity_tokens(identity)
        try:
            for key, (attn, processor) in self._processors.items():
                k_t, v_t = self._project(key, attn, texture)
                k_a, v_a = self._project(key, attn, tokens_a)
                identity_kv: KV | BlendedKV = KV(k_a, v_a)
                if blend:
                    k_b, v_b = self._project(key, attn, tokens_b)
                    identity_kv = BlendedKV(k_a, v_a, k_b, v_b, g)
                processor.extra_kv = [identity_kv, KV(k_t, v_t)]
            return self.unet(sample, timesteps, class_labels=time_condition).sample
        finally:
            for _, processor in self._processors.values():
                processor.clear()

    def config(self) -> dict[str, Any]:
        return dict(self.arch)
