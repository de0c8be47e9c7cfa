"""E_t: the patch-wise texture extractor (paper sec. 3.3, eqs. 5-6).

A frozen recognizer backbone F_t gives an intermediate map ``I_tex`` (``C,H,W``; with the
ArcFace IResNet at 112 px and ``feature_stage=1``: 64 x 56 x 56, as in DCFace). A trainable head
applies dropout -> BatchNorm -> Conv -> ReLU, splits the result into an ``m x m`` grid (paper:
5 x 5) and keeps only each cell's channel mean and standard deviation (eq. 6, through
:func:`anonloader.kernels.patch_stats.patch_stats`); the ``m²`` (plus one global) ``2C'`` vectors
are projected to tokens, given a learned position embedding and LayerNorm.

Readings chosen:

- The convolution is 1 x 1 (DCFace's style encoder), so the head is pointwise in space and a
  cell's statistics do not depend on where inside the cell a feature sits: the extractor is
  invariant to permutations within a cell but not across cells — the property that removes
  detailed (identity) layout while keeping texture.
- Order BN -> Conv -> ReLU as in the paper's text (DCFace puts the conv first).
- A global (whole-map) mean/std token is added to the ``m²`` cell tokens, as in DCFace.
- "std" is the biased per-cell standard deviation, ``sqrt(E[x²] - E[x]² + 1e-6)`` (see
  :func:`_mean_std`: finite gradients on constant cells).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError
from anonloader.methods.iddiffuse.recognizers import build_recognizer

__all__ = ["TextureEncoder", "TextureExtractor"]


_STD_EPS = 1e-6


def _mean_std(patch_stats: Any, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell mean and ``sqrt(var + eps)`` from the cell means of ``x`` and ``x²``.

    The std output of ``patch_stats`` has an infinite gradient on constant cells (common after
    the ReLU), so the variance is taken from the first and second moments (DCFace's mean /
    second-moment statistics) and square-rooted with an epsilon here.
    """
    mean, _ = patch_stats(x, grid)
    second, _ = patch_stats(x * x, grid)
    return mean, (second - mean * mean).clamp_min(0.0).add(_STD_EPS).sqrt()


class TextureExtractor(nn.Module):
    """The trainable head of E_t: ``B,C,H,W`` feature map -> ``B,m*m+1,token_dim`` texture tokens.

    Args:
        in_channels: ``C`` of the backbone's feature map.
        channels: ``C'`` after the 1x1 convolution.
        grid: ``m`` (paper: 5); ``H`` and ``W`` need not be multiples of it.
        token_dim: size of each output token.
        dropout: dropout on the feature map during training (DCFace: 0.3).
    """

    def __init__(self, in_channels: int, channels: int = 64, grid: int = 5, token_dim: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        if grid < 1:
            raise ConfigError(f"TextureExtractor grid must be >= 1, got {grid}")
        self.in_channels, self.channels, self.grid, self.token_dim = in_channels, channels, grid, token_dim
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout)
        self.norm_in = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=1)
        self.to_token = nn.Linear(2 * channels, token_dim)
        self.position = nn.Parameter(torch.randn(1, grid * grid + 1, token_dim) * 0.02)
        self.norm_out = nn.LayerNorm(token_dim)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + 1

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``B,C,H,W float`` backbone features -> ``B,m*m+1,token_dim`` tokens (global token first)."""
        from anonloader.kernels.patch_stats import patch_stats

        if feature_map.ndim != 4 or feature_map.shape[1] != self.in_channels:
            raise ValueError(f"TextureExtractor expects B,{self.in_channels},H,W, got {tuple(feature_map.shape)}")
        x = torch.relu(self.conv(self.norm_in(self.dropout(feature_map))))
        cell_mean, cell_std = _mean_std(patch_stats, x, self.grid)  # B,C',m,m each
        global_mean, global_std = _mean_std(patch_stats, x, 1)
        mean = torch.cat([global_mean.flatten(2), cell_mean.flatten(2)], dim=2)  # B,C',1+m*m
        std = torch.cat([global_std.flatten(2), cell_std.flatten(2)], dim=2)
        stats = torch.cat([mean, std], dim=1).transpose(1, 2)  # B,1+m*m,2C'
        return self.norm_out(self.to_token(stats) + self.position)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "channels": self.channels, "grid": self.grid,
                "token_dim": self.token_dim, "dropout": self.dropout_p}


class TextureEncoder(nn.Module):
    """E_t on images: frozen recognizer backbone (F_t) -> :class:`TextureExtractor`.

    Args:
        backbone: a recognizer spec with a feature map (``{"kind": "iresnet", ...}``).
        channels, grid, token_dim, dropout: the head's settings.
    """

    def __init__(self, backbone: dict[str, Any], channels: int = 64, grid: int = 5, token_dim: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        self.backbone = build_recognizer(backbone)
        if not hasattr(self.backbone, "feature_channels"):
            raise ConfigError(f"the texture backbone must expose a feature map; {backbone.get('kind')!r} does not")
        self.head = TextureExtractor(self.backbone.feature_channels, channels, grid, token_dim, dropout)

    def train(self, mode: bool = True) -> TextureEncoder:
        super().train(mode)
        self.backbone.eval()  # F_t is frozen
        return self

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``B,3,S,S float in [0,1]`` -> ``B,m*m+1,token_dim`` texture tokens."""
        with torch.no_grad():
            _, feature_map = self.backbone(crops)
        return self.head(feature_map)

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.config(), **self.head.config()}
