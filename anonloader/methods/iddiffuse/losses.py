"""The IDDiffuse training losses: DDPM noise MSE (eq. 1) and the time-dependent anonymization
loss (eq. 7).

Eq. 7 as implemented, with ``CS`` the cosine similarity turned into a distance ``1 - CS`` (the
paper writes similarities but minimises the sum; a loss must fall as the features agree):

    L_anon = γ_t (1 - CS(F(X), F(X̂0))) + (1 - γ_t)(1 - CS(F(X̂), F(X̂0))) + λ (1 - CS(F(X), F(X̂0)))

- ``F`` is E_I (the mapper over the recognizers), ``X`` the real image, ``X̂`` the synthetic
  identity image, ``X̂0`` the x0 predicted from the noise estimate at step ``t`` (clipped to
  [-1,1]).
- ``γ_t = linspace(0, 1, T+1)[t] ** order`` (DCFace's weights; order 1 = the paper's linear
  ramp): at ``t`` near ``T`` (γ≈1) the prediction is pulled to the real identity, near 0 to the
  synthetic one — the paper's description of the first two terms.
- ``λ = 0.05`` weights the texture/consistency term.
- When training also conditions on blends of the two identities (see
  :mod:`anonloader.methods.iddiffuse.training`), ``F(X̂)`` is replaced by the normalised blend
  ``(1-c) F(X̂) + c F(X)`` of the condition actually used, so ``c = 0`` is exactly eq. 7.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["anonymization_loss", "predict_x0", "time_weights"]


def time_weights(timesteps: torch.Tensor, num_train_timesteps: int, order: float = 1.0) -> torch.Tensor:
    """γ_t for ``B int64`` timesteps: ``linspace(0, 1, T+1) ** order`` indexed by t -> ``B float32``."""
    table = torch.linspace(0.0, 1.0, num_train_timesteps + 1, device=timesteps.device) ** order
    return table[timesteps]


def predict_x0(noisy: torch.Tensor, noise_pred: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0 from an ε estimate (DDPM eq. 15): ``(x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t)``, clipped to [-1,1].

    ``noisy``, ``noise_pred``: ``B,3,S,S``; ``timesteps``: ``B int64``; ``alphas_cumprod``: ``T``.
    """
    a = alphas_cumprod.to(noisy.device, noisy.dtype)[timesteps].view(-1, 1, 1, 1)
    return ((noisy - (1 - a).sqrt() * noise_pred) / a.sqrt()).clamp(-1.0, 1.0)


def anonymization_loss(
    feature_x0: torch.Tensor,
    feature_real: torch.Tensor,
    feature_synthetic: torch.Tensor,
    gamma_t: torch.Tensor,
    texture_weight: float = 0.05,
) -> torch.Tensor:
    """Eq. 7 averaged over the batch.

    Args:
        feature_x0: ``B,D`` E_I features of the predicted x0 (carries the gradient).
        feature_real: ``B,D`` E_I features of the real images X.
        feature_synthetic: ``B,D`` E_I features of the synthetic identity images X̂.
        gamma_t: ``B`` weights γ_t in [0,1] (:func:`time_weights`).
        texture_weight: λ.
    """
    cos = nn.functional.cosine_similarity
    d_real = 1 - cos(feature_real, feature_x0, dim=1)
    d_synthetic = 1 - cos(feature_synthetic, feature_x0, dim=1)
    return (gamma_t * d_real + (1 - gamma_t) * d_synthetic + texture_weight * d_real).mean()
