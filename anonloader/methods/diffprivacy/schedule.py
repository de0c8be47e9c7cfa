"""The noise schedule, DDIM sampling and DDIM inversion, written out.

Notation: ``a_t`` is the cumulative product ᾱ_t of the schedule read from the backbone's
``scheduler_config.json`` (the paper writes α_t for it). With ε̂ = ε_θ(z_t, t, C_t):

- eq. 10, the clean latent: ``ẑ0 = (z_t - √(1-a_t)·ε̂) / √a_t``;
- a DDIM step (η = 0) from level ``a_t`` to level ``a_s``: ``z_s = √a_s·ẑ0 + √(1-a_s)·ε̂``.
  Sampling goes to the previous (smaller) timestep, inversion to the next (larger) one with the
  same formula.

**Where the paper's printed equations differ.** Eqs. 2, 4, 13 and Alg. 1 (l. 6 and 10) print
``z_{t∓1} = √(a_{t∓1}/a_t)·z_t + (√(1/a_{t∓1} - 1) - √(1/a_t - 1))·ε̂``. That is the DDIM update
of the *rescaled* variable ``z/√a`` (Song et al., 2020, eq. 13 there): multiplied back by
``√a_{t∓1}``, the ε̂ term must carry the factor ``√a_{t∓1}``, i.e.
``z_{t∓1} = √(a_{t∓1}/a_t)·z_t + √a_{t∓1}·(√(1/a_{t∓1} - 1) - √(1/a_t - 1))·ε̂``, which is the
two-term form above. We implement the correct form (the printed one would under-denoise by
``√a_{t-1}`` at every step); the tests check it against that closed form and diffusers' DDIM.

v-prediction backbones (``prediction_type="v_prediction"``) are converted to ε:
``ε̂ = √a_t·v̂ + √(1-a_t)·z_t``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from anonloader.errors import ConfigError

__all__ = ["NoiseSchedule", "ddim_invert_step", "ddim_step", "predict_z0", "v_to_eps"]

_SPACINGS = ("leading", "trailing")


def predict_z0(z_t: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """Eq. 10: ``ẑ0 = (z_t - √(1-a_t)·ε̂) / √a_t``; ``z_t``, ``eps``: ``B,4,h,w`` latents."""
    return (z_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step from level ``a_t`` to the previous level ``a_prev`` (> a_t).

    Args:
        z_t: ``B,4,h,w`` latents at timestep t; eps: ``B,4,h,w`` the predicted noise ε̂.
        a_t, a_prev: ᾱ at t and at the previous timestep (both in (0, 1]).

    Returns:
        ``(z_prev, z0_hat)``, both ``B,4,h,w``.
    """
    z0 = predict_z0(z_t, eps, a_t)
    return math.sqrt(a_prev) * z0 + math.sqrt(1.0 - a_prev) * eps, z0


def ddim_invert_step(z_s: torch.Tensor, eps: torch.Tensor, a_s: float, a_t: float) -> torch.Tensor:
    """One DDIM inversion step from level ``a_s`` up to the next level ``a_t`` (< a_s): the same
    formula as :func:`ddim_step` read the other way, ``z_t = √a_t·ẑ0(z_s, ε̂) + √(1-a_t)·ε̂``.
    Exact inverse of :func:`ddim_step` when ``eps`` is the ε̂ the sampler will see at ``z_t``."""
    z0 = predict_z0(z_s, eps, a_s)
    return math.sqrt(a_t) * z0 + math.sqrt(1.0 - a_t) * eps


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, a_t: float) -> torch.Tensor:
    """``ε̂ = √a_t·v̂ + √(1-a_t)·z_t`` for v-prediction networks (all ``B,4,h,w``)."""
    return math.sqrt(a_t) * v + math.sqrt(1.0 - a_t) * z_t


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM noise schedule and its DDIM timesteps.

    Attributes:
        alphas_cumprod: ``T float32`` ᾱ_t for t = 0..T-1, computed exactly as diffusers does
            (float32 betas, float32 cumulative product).
        final_alpha_cumprod: ᾱ used below timestep 0 (1.0 with ``set_alpha_to_one``, else ᾱ_0).
        steps_offset: added to every DDIM timestep (SD v1.x: 1).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        timestep_spacing: ``"leading"`` (SD v1.x) or ``"trailing"``.
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    steps_offset: int
    prediction_type: str
    timestep_spacing: str = "leading"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a ``scheduler_config.json`` dict (DDPM/DDIM/PNDM schedulers of SD v1.x and 2.x)."""
        steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
        else:
            raise ConfigError(f"Diff-Privacy: beta_schedule {kind!r} is not supported; use 'linear' or 'scaled_linear'")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ConfigError(f"Diff-Privacy: prediction_type {prediction!r} is not supported; use 'epsilon' or 'v_prediction'")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in _SPACINGS:
            raise ConfigError(f"Diff-Privacy: timestep_spacing {spacing!r} is not supported; use one of {_SPACINGS}")
        final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, int(config.get("steps_offset", 0)), prediction, spacing)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha(self, t: int) -> float:
        """ᾱ_t as a Python float; ``t < 0`` gives :attr:`final_alpha_cumprod`."""
        return self.final_alpha_cumprod if t < 0 else float(self.alphas_cumprod[t])

    def step_ratio(self, num_steps: int) -> int:
        return self.num_train_timesteps // num_steps

    def timesteps(self, num_steps: int) -> list[int]:
        """The ``num_steps`` DDIM timesteps, descending (diffusers' DDIMScheduler's rule)."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ConfigError(f"Diff-Privacy: num_inference_steps must be in 1..{self.num_train_timesteps}, got {num_steps}")
        ratio = self.step_ratio(num_steps)
        if self.timestep_spacing == "leading":
            ts = [i * ratio + self.steps_offset for i in range(num_steps)]
        else:  # trailing
            ts = [round(self.num_train_timesteps - i * self.num_train_timesteps / num_steps) - 1 for i in range(num_steps)][::-1]
        return sorted(ts, reverse=True)

    def previous(self, t: int, num_steps: int) -> int:
        """The timestep a DDIM step from ``t`` lands on (negative below the first: level
        :attr:`final_alpha_cumprod`)."""
        return t - self.step_ratio(num_steps)

    def start_timesteps(self, num_steps: int, strength: float) -> list[int]:
        """The denoising timesteps from the largest scheduled ``t ≤ strength·T`` down
        (Alg. 1 l. 2-4 with ``S_ns = strength``)."""
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"Diff-Privacy: noise strength S_ns must be in (0, 1], got {strength}")
        limit = strength * self.num_train_timesteps
        ts = [t for t in self.timesteps(num_steps) if t <= limit]
        if not ts:
            raise ConfigError(f"Diff-Privacy: S_ns={strength} leaves no timestep of a {num_steps}-step schedule; raise it")
        return ts

    def to_dict(self) -> dict[str, Any]:
        """What fixes the schedule (for the fingerprint and the recovery-key metadata)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "alphas_cumprod_sha256": _tensor_sha256(self.alphas_cumprod),
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "steps_offset": self.steps_offset,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
        }


def _tensor_sha256(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
