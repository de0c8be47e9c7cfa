"""Honest classical baselines: blur, pixelate and a solid mask.

They are what the privacy evaluation compares the diffusion methods against, and what runs
on any machine with no weights. Each works on aligned crops, so its strength is relative to
the face's size (the crop is the face at a canonical scale), not to the image's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from anonloader.errors import ConfigError
from anonloader.types import FaceConditions

__all__ = ["GaussianBlur", "Pixelate", "SolidMask"]


def _check_crops(crops: torch.Tensor) -> None:
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ConfigError(f"crops must be F,3,S,S, got {tuple(crops.shape)}")


@dataclass(kw_only=True)
class _ClassicalMethod:
    """What the baselines share: a 128 px arcface-template crop with a margin that also covers
    hair and chin, pasted back without colour matching (they keep their own colours)."""

    crop_size: int = 128
    margin: float = 0.35
    template: str = "arcface"
    paste_color_match: bool = False

    def config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GaussianBlur(_ClassicalMethod):
    """Gaussian blur with a standard deviation that is a fraction of the face crop's side.

    Args:
        sigma: standard deviation as a fraction of the crop side (0.08 of a 128 crop is ~10 px).
    """

    sigma: float = 0.08
    name: str = "blur"

    def __post_init__(self) -> None:
        if not 0 < self.sigma <= 1:
            raise ConfigError(f"blur sigma must be in (0, 1] of the crop side, got {self.sigma}")

    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """``F,3,S,S float in [0,1]`` -> blurred crops of the same shape."""
        from kornia.filters import gaussian_blur2d

        _check_crops(crops)
        if crops.shape[0] == 0:
            return crops.clone()
        sigma = self.sigma * crops.shape[-1]
        kernel = 2 * int(3 * sigma) + 1
        kernel = min(kernel, 2 * (crops.shape[-1] // 2) - 1)
        return gaussian_blur2d(crops, (kernel, kernel), (sigma, sigma), border_type="reflect").clamp(0, 1)



@dataclass
class Pixelate(_ClassicalMethod):
    """Averages each face into ``blocks x blocks`` cells.

    Args:
        blocks: cells per side of the face crop (fewer cells, stronger anonymization).
    """

    blocks: int = 8
    name: str = "pixelate"

    def __post_init__(self) -> None:
        if not 1 <= self.blocks <= self.crop_size:
            raise ConfigError(f"pixelate blocks must be in [1, crop_size], got {self.blocks}")

    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """``F,3,S,S float in [0,1]`` -> pixelated crops of the same shape."""
        _check_crops(crops)
        if crops.shape[0] == 0:
            return crops.clone()
        size = crops.shape[-2:]
        cells = F.adaptive_avg_pool2d(crops, self.blocks)
        return F.interpolate(cells, size=size, mode="nearest")



@dataclass
class SolidMask(_ClassicalMethod):
    """Fills the face with one colour.

    Args:
        color: RGB in [0,1].
    """

    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    name: str = "mask"

    def __post_init__(self) -> None:
        if len(self.color) != 3 or not all(0 <= c <= 1 for c in self.color):
            raise ConfigError(f"mask color must be 3 values in [0,1], got {self.color}")
        self.color = tuple(float(c) for c in self.color)

    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """``F,3,S,S float in [0,1]`` -> crops filled with :attr:`color`."""
        _check_crops(crops)
        fill = torch.tensor(self.color, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
        return fill.expand_as(crops).clone()
