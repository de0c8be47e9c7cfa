"""Small real face images for the integration tests (built from the packaged photos)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from anonloader.assets import sample_photo


def small_faces(count: int = 4, size: int = 128) -> list[Image.Image]:
    """``count`` small RGB photos with one real face each: the astronaut, resized and mirrored."""
    base = sample_photo("astronaut").resize((size, size), Image.Resampling.BILINEAR)
    variants = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [variants[i % 2] if i < 2 else variants[i % 2].rotate(4 * (i // 2), resample=Image.Resampling.BILINEAR) for i in range(count)]


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``3,H,W uint8``."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def face_region(size: int = 128) -> tuple[slice, slice]:
    """Rows / columns that hold the astronaut's face at ``size`` (either mirror image)."""
    return slice(int(size * 0.12), int(size * 0.45)), slice(int(size * 0.3), int(size * 0.7))
