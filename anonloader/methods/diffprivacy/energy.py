"""Identity energies of Diff-Privacy (eqs. 14, 15, 17) and the recognizer input.

F_θ is a frozen, differentiable recognizer mapping ``B,3,s,s float in [0,1]`` crops aligned with
the ``arcface`` template to ``B,D`` embeddings (``iddiffuse.recognizers.build_recognizer``: an
arcface_torch IResNet; the authors' code guides with an IR-SE50, which differs). Diff-Privacy's
crops use the ``ffhq`` template, so :func:`recognizer_view` warps them (differentiably, with
kornia) to the recognizer's template from each face's 5 landmarks in crop pixels.
"""

from __future__ import annotations

import torch

from anonloader.align import estimate_affine

__all__ = ["cosine", "diversity", "identity_dissimilarity", "identity_similarity", "recognizer_view"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension (``...,D`` with ``...,D`` -> ``...``)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def identity_dissimilarity(original: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Eq. 14, ``L_Idis = Σ_i max(cos(F(x), F(x̂0^i)), 0)``: ``D`` and ``G,D`` -> scalar in [0, G]."""
    return cosine(original[None], generated).clamp_min(0).sum()


def diversity(generated: torch.Tensor) -> torch.Tensor:
    """Eq. 15 over every ordered pair ``i ≠ j`` (the printed index set, j from 2, counts pairs
    unevenly): ``Σ_{i≠j} max(cos(F(x̂0^i), F(x̂0^j)), 0)``; ``G,D`` -> scalar in [0, G(G-1)]."""
    g = generated.shape[0]
    sims = cosine(generated[:, None], generated[None]).clamp_min(0)
    off_diagonal = ~torch.eye(g, dtype=torch.bool, device=generated.device)
    return sims[off_diagonal].sum()


def identity_similarity(original: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Eq. 17, ``L_is = 1 - cos(F(x), F(x̂0))``, summed over ``G,D`` generated -> scalar in [0, 2G]."""
    return (1.0 - cosine(original[None], generated)).sum()


def recognizer_view(crops: torch.Tensor, landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Warps ``B,3,S,S`` crops (any range, differentiable) to ``B,3,size,size`` aligned with the
    ``arcface`` template, from ``B,5,2`` landmarks in the crops' pixels."""
    from kornia.geometry.transform import warp_affine

    affine = estimate_affine(landmarks.detach().float().cpu(), size, "arcface").to(crops.device, crops.dtype)
    return warp_affine(crops, affine, (size, size), mode="bilinear", padding_mode="reflection", align_corners=True)
