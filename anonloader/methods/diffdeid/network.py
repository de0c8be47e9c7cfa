"""DiffDeID's multi-condition denoiser ε_θ(Z_t, I_m, I_3d, ρ', z'_id, t) (paper sec. 3.3).

A pixel-space UNet of our own (no published code):

- **Encoder E** on ``concat(Z_t, I_3d)`` (6 channels), one level per resolution, down-sampling
  by 2 between levels (``paper``: 256 -> 128 -> 64 -> 32 -> 16, five levels, factor 16).
- **AdaIN in every ResBlock** (eq. 7): ``σ_c(C) (x - μ(x)) / σ(x) + μ_c(C)`` with μ, σ the
  per-channel instance moments of ``x`` in moment form (``sqrt(E[x²] - E[x]² + 1e-6)``, as
  IDDiffuse's texture head, finite gradients on constant maps), by
  :func:`anonloader.kernels.patch_stats.patch_stats` with ``grid=1`` on CUDA and ``torch.mean``
  on the CPU (faster there, see :func:`instance_moments`); σ_c, μ_c are Linear maps of ``C``
  initialised to 1 and 0.
- **Condition** ``C = z'_id + W_ρ ρ' + W_t emb(t)`` (sec. 3.3): ``C`` has the width of the
  identity embedding, ``emb`` the sinusoidal timestep features, ``W_ρ``, ``W_t`` Linear maps.
  With ``identity_condition=False`` (the video network, sec. 3.4) ``C = W_ρ ρ̂ + W_t emb(t)``.
- **E_t**, the background texture encoder: E's layout on the masked image I_m, with no C and no
  t (its ResBlocks use an instance norm with a learned per-channel affine instead of AdaIN);
  run once per face (:meth:`DiffDeIDUNet.texture_kv`), its keys/values reused at every step.
- **Texture attention** (eqs. 5-6) after E's levels listed in ``attention_levels`` (``paper``:
  the 64, 32 and 16 px levels): 1x1 convolutions give Q from E's feature F_n and K, V from E_t's
  F_b at the same level; heads of 64 channels (one head below 64); scale ``1/sqrt(d)``; computed
  by :func:`anonloader.kernels.attention.multi_source_attention` (Triton on CUDA). The output is
  ``F̂_n = τ F_{b->n} + F_n`` with τ a learned scalar per layer initialised to 0. **Deviation:**
  eq. 6 prints ``+ F_b``, which at τ = 0 would throw away the noisy input at that level; we take
  the residual on F_n (so at τ = 0 the module is the identity and training starts from a plain
  UNet).
- **Decoder D**: mirrored levels, each ResBlock on ``concat(h, skip)``, nearest up-sampling and a
  3x3 convolution; a final GroupNorm-free SiLU + 3x3 convolution to 3 channels (predicted ε).

Shapes: crops are ``B,3,S,S``; Z_t, I_3d in the diffusion range ``[-1,1]``; I_m in ``[-1,1]``
(the masked crop mapped as ``2 I_m - 1``); ρ' ``B,rho_dim``; z'_id ``B,id_dim`` (unit vectors).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError
from anonloader.kernels.attention import KV, multi_source_attention
from anonloader.kernels.patch_stats import patch_stats

__all__ = ["PRESETS", "AdaIN", "DiffDeIDUNet", "TextureAttention", "instance_moments", "resolve_config", "timestep_features"]

_STD_EPS = 1e-6

#: ρ = {α, β, δ, γ, p, ω} sizes (eq. 1): identity, expression, texture, SH light, pose, gaze.
RHO_PARTS: dict[str, int] = {"alpha": 80, "beta": 64, "delta": 80, "gamma": 27, "pose": 6, "omega": 4}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "crop_size": 256,
        "channels": [64, 128, 256, 256, 512],
        "layers_per_block": 2,
        "attention_levels": [2, 3, 4],  # 64, 32, 16 px
        "head_dim": 64,
        "id_dim": 512,
        "rho_parts": dict(RHO_PARTS),
        "time_features": 256,
        "identity_condition": True,
        "schedule": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
    },
    "tiny": {
        "crop_size": 32,
        "channels": [8, 8, 16, 16, 16],
        "layers_per_block": 1,
        "attention_levels": [2, 3, 4],  # 8, 4, 2 px
        "head_dim": 8,
        "id_dim": 128,
        "rho_parts": dict(RHO_PARTS),
        "time_features": 32,
        "identity_condition": True,
        "schedule": {"num_train_timesteps": 50, "beta_start": 1e-3, "beta_end": 0.2},
    },
}


def resolve_config(config: str | dict[str, Any]) -> dict[str, Any]:
    """A full network config from a preset name or a dict (a dict may name ``"preset"`` and
    override its top-level keys)."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown DiffDeID preset {config!r}; choose one of {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[config])
    config = copy.deepcopy(dict(config))
    base = copy.deepcopy(PRESETS[config.pop("preset")]) if "preset" in config else {}
    base.update(config)
    missing = set(PRESETS["tiny"]) - set(base)
    if missing:
        raise ConfigError(f"DiffDeID config lacks {sorted(missing)}; start from preset 'paper' or 'tiny'")
    levels = len(base["channels"])
    if base["crop_size"] % (2 ** (levels - 1)):
        raise ConfigError(f"crop_size {base['crop_size']} must be divisible by {2 ** (levels - 1)} for {levels} levels")
    if any(not 0 <= a < levels for a in base["attention_levels"]):
        raise ConfigError(f"attention_levels {base['attention_levels']} must lie in [0, {levels})")
    return base


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features ``emb(t)``: ``B`` int timesteps -> ``B,dim float32`` in [-1,1]
    (``[sin(t f_k), cos(t f_k)]``, ``f_k = 10000^(-k/(dim/2))``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def instance_moments(x: torch.Tensor, *, use_patch_stats: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ``sqrt(var + 1e-6)`` of ``x`` (``B,C,H,W``) -> two ``B,C,1,1``.

    Moment form, ``var = E[x²] - E[x]²`` (finite gradients on constant channels). The moments
    come from :func:`patch_stats` with ``grid=1`` (the Triton kernel, one read of the map) for
    CUDA tensors, and from ``torch.mean`` elsewhere (``use_patch_stats`` forces either): on the
    CPU patch_stats' torch reference took 110 ms for ``1,128,128,128`` against 1.2 ms for
    ``torch.mean`` (and 25 ms for ``F.instance_norm``), same formula.
    """
    if use_patch_stats if use_patch_stats is not None else x.is_cuda:
        mean, _ = patch_stats(x, 1)
        second, _ = patch_stats(x * x, 1)
    else:
        mean = x.mean(dim=(2, 3), keepdim=True)
        second = (x * x).mean(dim=(2, 3), keepdim=True)
    return mean, (second - mean * mean).clamp_min(0.0).add(_STD_EPS).sqrt()


class AdaIN(nn.Module):
    """Eq. 7: ``σ_c(C) (x - μ(x)) / σ(x) + μ_c(C)``.

    Args:
        channels: channels of ``x``.
        condition_dim: width of ``C``; None gives a plain instance norm with a learned
            per-channel affine (E_t's ResBlocks, which see no condition).
    """

    def __init__(self, channels: int, condition_dim: int | None) -> None:
        super().__init__()
        self.channels = channels
        if condition_dim is None:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
            self.to_style = None
        else:
            self.to_style = nn.Linear(condition_dim, 2 * channels)
            nn.init.zeros_(self.to_style.weight)
            with torch.no_grad():  # σ_c = 1, μ_c = 0 at initialisation
                self.to_style.bias.copy_(torch.cat([torch.ones(channels), torch.zeros(channels)]))

    def style(self, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(σ_c, μ_c)``, each ``B,C`` (or ``1,C`` without a condition)."""
        if self.to_style is None:
            return self.weight[None], self.bias[None]
        if condition is None:
            raise ValueError("this AdaIN needs the condition C")
        sigma, mu = self.to_style(condition).chunk(2, dim=1)
        return sigma, mu

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``B,C,H,W`` float, ``condition`` ``B,condition_dim`` -> ``B,C,H,W`` whose
        per-channel mean is μ_c and standard deviation σ_c (up to the 1e-6 variance epsilon)."""
        mean, std = instance_moments(x)
        sigma, mu = self.style(condition)
        return sigma[:, :, None, None] * (x - mean) / std + mu[:, :, None, None]


class ResBlock(nn.Module):
    """``AdaIN -> SiLU -> conv3x3 -> AdaIN -> SiLU -> conv3x3`` plus a (1x1 when the width
    changes) skip: ``B,C_in,H,W -> B,C_out,H,W``."""

    def __init__(self, in_channels: int, out_channels: int, condition_dim: int | None) -> None:
        super().__init__()
        self.norm1 = AdaIN(in_channels, condition_dim)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaIN(out_channels, condition_dim)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x, condition)))
        h = self.conv2(nn.functional.silu(self.norm2(h, condition)))
        return self.skip(x) + h


class TextureAttention(nn.Module):
    """Eqs. 5-6: ``F̂_n = τ softmax(Q_n K_bᵀ / sqrt(d)) V_b + F_n`` (residual on F_n, see the
    module docstring), Q = 1x1 conv of F_n, K, V = 1x1 convs of F_b, τ a scalar initialised 0.

    Args:
        channels: ``C`` of F_n and F_b.
        head_dim: channels per head; ``C // head_dim`` heads, one head when ``C < head_dim``.
    """

    def __init__(self, channels: int, head_dim: int = 64) -> None:
        super().__init__()
        self.channels = channels
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            raise ConfigError(f"texture attention: {channels} channels do not split into {self.heads} heads")
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.to_k = nn.Conv2d(channels, channels, 1)
        self.to_v = nn.Conv2d(channels, channels, 1)
        self.tau = nn.Parameter(torch.zeros(()))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``B,C,H,W`` -> ``B,heads,H*W,C/heads``."""
        b, c, h, w = x.shape
        return x.reshape(b, self.heads, c // self.heads, h * w).transpose(2, 3)

    def project_kv(self, background: torch.Tensor) -> KV:
        """K_b, V_b of E_t's feature ``B,C,H,W`` -> :class:`KV` of ``B,heads,H*W,d`` each."""
        return KV(self._heads(self.to_k(background)), self._heads(self.to_v(background)))

    def forward(self, x: torch.Tensor, kv: KV, *, backend: str | None = None) -> torch.Tensor:
        """``x`` = F_n ``B,C,H,W``, ``kv`` from :meth:`project_kv` -> F̂_n ``B,C,H,W``."""
        b, c, h, w = x.shape
        q = self._heads(self.to_q(x))
        attended = multi_source_attention(q, [kv], backend=backend)  # B,heads,HW,d
        attended = attended.transpose(2, 3).reshape(b, c, h, w)
        return self.tau * attended + x


class _Encoder(nn.Module):
    """E (``condition_dim`` set) or E_t (None): levels of ResBlocks with stride-2 down-sampling
    between them; returns the feature after each ResBlock (the skips) and after each level."""

    def __init__(self, in_channels: int, channels: Sequence[int], layers: int, condition_dim: int | None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = channels[0]
        for i, width in enumerate(channels):
            self.levels.append(nn.ModuleList(ResBlock(previous if j == 0 else width, width, condition_dim) for j in range(layers)))
            previous = width
            if i + 1 < len(channels):
                self.downs.append(nn.Conv2d(width, width, 3, stride=2, padding=1))


class DiffDeIDUNet(nn.Module):
    """The multi-condition UNet; ``config`` a preset name or dict (see :data:`PRESETS`)."""

    def __init__(self, config: str | dict[str, Any] = "tiny") -> None:
        super().__init__()
        self.network_config = cfg = resolve_config(config)
        self.crop_size = int(cfg["crop_size"])
        channels, layers = list(cfg["channels"]), int(cfg["layers_per_block"])
        self.id_dim = int(cfg["id_dim"])
        self.rho_dim = int(sum(cfg["rho_parts"].values()))
        self.time_dim = int(cfg["time_features"])
        self.identity_condition = bool(cfg["identity_condition"])
        self.attention_levels = sorted(int(a) for a in cfg["attention_levels"])
        self.num_train_timesteps = int(cfg["schedule"]["num_train_timesteps"])
        self.w_rho = nn.Linear(self.rho_dim, self.id_dim)
        self.w_t = nn.Linear(self.time_dim, self.id_dim)
        self.encoder = _Encoder(6, channels, layers, self.id_dim)
        self.texture_encoder = _Encoder(3, channels, layers, None)
        self.attention = nn.ModuleDict(
            {str(level): TextureAttention(channels[level], int(cfg["head_dim"])) for level in self.attention_levels}
        )
        self.middle = ResBlock(channels[-1], channels[-1], self.id_dim)
        self.up_levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        skip_widths = [channels[0]]  # the encoder's skips, in push order (stem, blocks, downs)
        for i, width in enumerate(channels):
            skip_widths += [width] * (layers + (1 if i + 1 < len(channels) else 0))
        previous = channels[-1]
        for i in reversed(range(len(channels))):
            width = channels[i]
            blocks = nn.ModuleList()
            for _ in range(layers + 1):
                blocks.append(ResBlock(previous + skip_widths.pop(), width, self.id_dim))
                previous = width
            self.up_levels.append(blocks)
            if i > 0:
                self.ups.append(nn.Conv2d(width, width, 3, padding=1))
        self.out = nn.Conv2d(channels[0], 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------ conditions
    def condition(self, timesteps: torch.Tensor, rho: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
        """``C = z'_id + W_ρ ρ' + W_t emb(t)``: ``timesteps`` ``B`` int, ``rho`` ``B,rho_dim``,
        ``identity`` ``B,id_dim`` (ignored by the video network) -> ``B,id_dim``."""
        if rho.ndim != 2 or rho.shape[1] != self.rho_dim:
            raise ValueError(f"ρ must be B,{self.rho_dim}, got {tuple(rho.shape)}")
        c = self.w_rho(rho) + self.w_t(timestep_features(timesteps, self.time_dim).to(self.w_t.weight.dtype))
        if self.identity_condition:
            if identity is None or identity.ndim != 2 or identity.shape[1] != self.id_dim:
                raise ValueError(f"z'_id must be B,{self.id_dim}, got {None if identity is None else tuple(identity.shape)}")
            c = c + identity
        return c

    def texture_features(self, masked: torch.Tensor) -> dict[int, torch.Tensor]:
        """E_t on I_m (``B,3,S,S`` in [-1,1]) -> F_b per attention level (``B,C_l,S/2^l,S/2^l``)."""
        h = self.texture_encoder.stem(masked)
        out: dict[int, torch.Tensor] = {}
        for i, blocks in enumerate(self.texture_encoder.levels):
            for block in blocks:
                h = block(h)
            if str(i) in self.attention:
                out[i] = h
            if i == max(self.attention_levels, default=-1):
                break
            if i < len(self.texture_encoder.downs):
                h = self.texture_encoder.downs[i](h)
        return out

    def texture_kv(self, masked: torch.Tensor) -> dict[int, KV]:
        """E_t and the K_b, V_b projections, once per face: ``B,3,S,S`` in [-1,1] -> per
        attention level a :class:`KV` of ``B,heads,L,d`` tensors, reused at every step."""
        return {level: self.attention[str(level)].project_kv(f) for level, f in self.texture_features(masked).items()}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        rendered: torch.Tensor,
        rho: torch.Tensor,
        identity: torch.Tensor | None,
        texture: dict[int, KV] | torch.Tensor,
        *,
        attention_backend: str | None = None,
    ) -> torch.Tensor:
        """Predict ε.

        Args:
            sample: Z_t ``B,3,S,S`` (data in [-1,1]).
            timesteps: ``B`` int64 in ``[0, T)``.
            rendered: I_3d ``B,3,S,S`` in [-1,1].
            rho: ρ' ``B,rho_dim`` (eq. 4; the video network's ρ̂).
            identity: z'_id ``B,id_dim`` (None for the video network).
            texture: I_m ``B,3,S,S`` in [-1,1], or its :meth:`texture_kv` (cached per face).
            attention_backend: passed to :func:`multi_source_attention`.
        Returns:
            ε̂ ``B,3,S,S``.
        """
        if isinstance(texture, torch.Tensor):
            texture = self.texture_kv(texture)
        c = self.condition(timesteps, rho, identity)
        h = self.encoder.stem(torch.cat([sample, rendered], dim=1))
        skips = [h]
        for i, blocks in enumerate(self.encoder.levels):
            for block in blocks:
                h = block(h, c)
                skips.append(h)
            if str(i) in self.attention:
                h = self.attention[str(i)](h, texture[i], backend=attention_backend)
                skips[-1] = h
            if i < len(self.encoder.downs):
                h = self.encoder.downs[i](h)
                skips.append(h)
        h = self.middle(h, c)
        for j, blocks in enumerate(self.up_levels):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), c)
            if j < len(self.ups):
                h = self.ups[j](nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(nn.functional.silu(h))

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self.network_config)
