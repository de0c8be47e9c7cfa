"""The frozen face-recognition backbone E_t and E_I build on: an ArcFace-style IResNet.

The layout (stem conv 3x3 + BN + PReLU, four stages of pre-activation basic blocks with stride 2
each, BN -> dropout -> FC -> BN1d head) and the parameter names follow insightface's
``arcface_torch`` IResNet, so its public ``.pth`` checkpoints (e.g. ``ms1mv3_arcface_r50``,
``glint360k_r100``) load with :meth:`IResNet.load_arcface_torch`. Sizes come from a config, so
tests build a tiny one in code (``IResNet(widths=(8, 8, 16, 16), depths=(1, 1, 1, 1),
embedding_dim=32, input_size=32)``).

Convention: input ``B,3,S,S float in [0,1]`` RGB, aligned with the ArcFace 5-point template;
``S`` must be a multiple of 16 (four stride-2 stages). It is normalised to ``[-1, 1]`` inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError, ModelLoadError

__all__ = ["IResNet", "IResNetBlock"]


class IResNetBlock(nn.Module):
    """Pre-activation basic block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + skip."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + skip


class IResNet(nn.Module):
    """ArcFace IResNet recognizer returning the embedding and one intermediate feature map.

    Args:
        widths: channels of the four stages (ArcFace: 64, 128, 256, 512).
        depths: blocks per stage (r18: 2,2,2,2; r50: 3,4,14,3; r100: 3,13,30,3).
        embedding_dim: size of the identity embedding (ArcFace: 512).
        input_size: crop side ``S`` (ArcFace: 112), a multiple of 16.
        feature_stage: which stage's output :meth:`forward` also returns (1 = after the first
            stage: ``widths[0]`` channels at ``S/2``, the 64 x 56 x 56 map DCFace's style encoder
            reads at 112 px).
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 14, 3),
        embedding_dim: int = 512,
        input_size: int = 112,
        feature_stage: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ConfigError(f"IResNet needs four stages; got widths={widths}, depths={depths}")
        if input_size % 16:
            raise ConfigError(f"IResNet input_size must be a multiple of 16, got {input_size}")
        if not 1 <= feature_stage <= 4:
            raise ConfigError(f"IResNet feature_stage must be 1..4, got {feature_stage}")
        self.arch = {
            "widths": list(widths), "depths": list(depths), "embedding_dim": embedding_dim,
            "input_size": input_size, "feature_stage": feature_stage,
        }
        self.dim = embedding_dim
        self.feature_stage = feature_stage
        self.feature_channels = int(widths[feature_stage - 1])
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = [IResNetBlock(in_channels, width, 2)]
            blocks += [IResNetBlock(width, width, 1) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = width
        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(in_channels * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-5)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed aligned crops.

        Args:
            crops: ``B,3,S,S float in [0,1]`` RGB (resized to ``input_size`` if ``S`` differs).
        Returns:
            ``(embedding B,D float32 L2-normalised, feature_map B,C,S/2**k,S/2**k)`` with
            ``k = feature_stage``.
        """
        size = self.arch["input_size"]
        if crops.shape[-2:] != (size, size):
            crops = nn.functional.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False)
        x = self.prelu(self.bn1(self.conv1(crops * 2.0 - 1.0)))
        feature_map = x
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i == self.feature_stage:
                feature_map = x
        x = self.dropout(self.bn2(x).flatten(1))
        embedding = self.features(self.fc(x))
        return nn.functional.normalize(embedding, dim=1), feature_map

    def load_arcface_torch(self, path: str | Path) -> IResNet:
        """Load an insightface ``arcface_torch`` checkpoint (a state dict ``.pth``) in place."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(
                f"ArcFace backbone weights not found at {path}; download an arcface_torch "
                "checkpoint (e.g. ms1mv3_arcface_r50_fp16/backbone.pth) and pass its local path"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(
                f"could not load {path.name} into IResNet{self.arch}: {exc}. Check that the "
                "depths/widths match the checkpoint (r50: depths 3,4,14,3)"
            ) from exc
        return self

    def config(self) -> dict[str, Any]:
        return {"kind": "iresnet", **self.arch}
