"""Real-photo datasets with annotated faces for the cache and precompute tests.

Crops of scikit-image's astronaut at shifting offsets, each with the face box carried as an
annotation (``detector=None``), so the pipeline anonymizes a real face without running a
detector on 2 shared CPU cores. The box is MTCNN's on the 512x512 photo (rounded).

Importable in subprocesses (SIGKILL, torchrun) with this folder on ``PYTHONPATH``:
``_cache_faces:make_dataset``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from anonloader.assets import sample_photo

#: x1, y1, x2, y2 of the astronaut's face in the 512x512 photo (MTCNN, rounded).
ASTRONAUT_FACE_BOX = (181.0, 67.0, 265.0, 172.0)
WINDOW = 256


@functools.lru_cache(maxsize=1)
def _astronaut() -> torch.Tensor:
    array = np.array(sample_photo("astronaut"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class AstronautCrops(Dataset):
    """``n`` samples ``{"image": 3,size,size uint8 tensor, "label": int, "box": 1,4 float32}``."""

    def __init__(self, n: int = 12, size: int = 96) -> None:
        self.n = n
        self.size = size

    def __len__(self) -> int:
        return self.n

    def offset(self, index: int) -> tuple[int, int]:
        return 40 + 9 * (index % 12), 4 * ((index // 12) % 6)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        x0, y0 = self.offset(index)
        window = _astronaut()[:, y0 : y0 + WINDOW, x0 : x0 + WINDOW].float()
        image = F.interpolate(window[None], size=(self.size, self.size), mode="area")[0].round().to(torch.uint8)
        scale = self.size / WINDOW
        x1, y1, x2, y2 = ASTRONAUT_FACE_BOX
        box = torch.tensor([[(x1 - x0) * scale, (y1 - y0) * scale, (x2 - x0) * scale, (y2 - y0) * scale]])
        return {"image": image, "label": index % 3, "box": box}


def make_dataset(n: int = 12, size: int = 96) -> AstronautCrops:
    return AstronautCrops(n, size)


def make_dataset_40() -> AstronautCrops:
    return AstronautCrops(40, 128)


def face_annotations(sample: dict[str, Any]) -> tuple[torch.Tensor]:
    """The annotation function: the sample's face boxes (landmarks estimated from them)."""
    return (sample["box"],)


def identity_label(sample: dict[str, Any]) -> int:
    """The sample's identity label (three "people" cycle through the crops)."""
    return int(sample["label"])


def cache_entries(path, secret=None) -> dict[bytes, bytes]:
    """Every image entry of the cache at ``path`` (all shards), key -> stored bytes."""
    from anonloader.cache.store import AnonCache

    with AnonCache(path, secret=secret) as cache:
        return {key: value for _, key, value in cache.iter_entries()}


def cache_samples(path, secret=None) -> dict[int, bytes]:
    """Every sample record of the cache at ``path`` (all shards), index -> stored bytes."""
    from anonloader.cache.store import AnonCache

    with AnonCache(path, secret=secret) as cache:
        return {index: value for _, index, value in cache.iter_samples()}
