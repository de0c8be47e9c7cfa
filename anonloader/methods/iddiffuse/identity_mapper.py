"""E_I: the identity mapper — an MLP over concatenated recognizer embeddings (paper eqs. 3-4).

``v(x) = v_1(x) ⊕ ... ⊕ v_k(x)`` (eq. 3) from frozen recognizers, ``z = MLP(v(x))``, trained with
the triplet loss ``max(|z_a - z_p|² - |z_a - z_n|² + α, 0)`` (eq. 4).

Readings chosen where the paper is terse:

- Sizes: the paper's "[1536, 2048, 1024, 512]" is read as input 1536 (= 3 x 512), hidden 2048
  and 1024, output 512; here the input size is the sum of the recognizers' ``dim``.
  Linear -> BatchNorm -> ReLU between layers, a plain Linear last.
- ``z`` is L2-normalised, so squared distances lie in [0, 4] and the margin ``α`` (default 0.2)
  has a fixed scale; E_I features are compared by cosine similarity in eq. 7 anyway.
- Triplets are mined per batch ("batch hard"): for every anchor the farthest positive and the
  nearest negative of the batch (:func:`mine_hard_triplets`); batches should hold P identities
  x K images (see :class:`anonloader.methods.iddiffuse.training.IdentityMapperModule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError
from anonloader.methods.iddiffuse.recognizers import build_recognizer

__all__ = ["IdentityEncoder", "IdentityMapper", "mine_hard_triplets", "triplet_loss"]


class IdentityMapper(nn.Module):
    """The E_I MLP: ``B,input_dim`` concatenated embeddings -> ``B,output_dim`` unit vectors.

    Args:
        input_dim: sum of the recognizers' embedding sizes (paper: 3 x 512 = 1536).
        hidden_dims: hidden layer sizes (paper: 2048, 1024).
        output_dim: E_I feature size (paper: 512).
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (2048, 1024), output_dim: int = 512) -> None:
        super().__init__()
        if input_dim <= 0 or output_dim <= 0:
            raise ConfigError(f"IdentityMapper sizes must be positive, got {input_dim} -> {output_dim}")
        self.input_dim, self.hidden_dims, self.output_dim = input_dim, list(hidden_dims), output_dim
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, output_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``B,input_dim float`` -> ``B,output_dim float32`` L2-normalised."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise ValueError(f"IdentityMapper expects B,{self.input_dim} embeddings, got {tuple(embeddings.shape)}")
        return nn.functional.normalize(self.mlp(embeddings), dim=1)

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "hidden_dims": self.hidden_dims, "output_dim": self.output_dim}


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Eq. 4 averaged over the batch: ``mean(max(|a-p|² - |a-n|² + margin, 0))``; each input ``B,D``."""
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = (anchor - negative).pow(2).sum(1)
    return torch.relu(d_pos - d_neg + margin).mean()


def mine_hard_triplets(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining: per anchor, the farthest same-label and the nearest other-label sample.

    Args:
        features: ``B,D`` float (mined without gradient).
        labels: ``B`` int identity labels.
    Returns:
        ``(anchor_index, positive_index, negative_index)``, each ``A int64``, over the anchors
        that have at least one positive and one negative in the batch (``A`` may be 0).
    """
    with torch.no_grad():
        dist = torch.cdist(features.float(), features.float()).pow(2)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos_mask, neg_mask = same & ~eye, ~same
        valid = pos_mask.any(1) & neg_mask.any(1)
        positive = dist.masked_fill(~pos_mask, -1.0).argmax(1)
        negative = dist.masked_fill(~neg_mask, float("inf")).argmin(1)
        anchor = torch.nonzero(valid).flatten()
    return anchor, positive[anchor], negative[anchor]


class IdentityEncoder(nn.Module):
    """E_I on images: frozen recognizers -> concatenated embeddings -> :class:`IdentityMapper`.

    Args:
        recognizers: specs for :func:`~anonloader.methods.iddiffuse.recognizers.build_recognizer`
            (each a frozen, differentiable torch recognizer).
        hidden_dims, output_dim: the mapper's sizes; its input size is the recognizers' sum.
    """

    def __init__(self, recognizers: Sequence[dict[str, Any]], hidden_dims: Sequence[int] = (2048, 1024), output_dim: int = 512) -> None:
        super().__init__()
        if not recognizers:
            raise ConfigError("IdentityEncoder needs at least one recognizer spec")
        self.recognizers = nn.ModuleList(build_recognizer(spec) for spec in recognizers)
        self.mapper = IdentityMapper(sum(int(r.dim) for r in self.recognizers), hidden_dims, output_dim)
        self.dim = output_dim

    def train(self, mode: bool = True) -> IdentityEncoder:
        super().train(mode)
        self.recognizers.eval()  # frozen: BatchNorm statistics never move
        return self

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Eq. 3: ``B,3,S,S float in [0,1]`` -> ``B,sum(dim)`` concatenated unit embeddings."""
        return torch.cat([recognizer(crops)[0] for recognizer in self.recognizers], dim=1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``B,3,S,S float in [0,1]`` -> ``B,output_dim`` L2-normalised E_I features (differentiable)."""
        return self.mapper(self.embed(crops))

    def config(self) -> dict[str, Any]:
        return {"recognizers": [r.config() for r in self.recognizers], **self.mapper.config()}
