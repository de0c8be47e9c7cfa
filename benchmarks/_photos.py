"""Real-photo benchmark inputs: crops of scikit-image's astronaut with the face box annotated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from anonloader.assets import sample_photo

#: x1, y1, x2, y2 of the astronaut's face in the 512x512 photo (MTCNN, rounded).
FACE_BOX = (181.0, 67.0, 265.0, 172.0)


class AstronautCrops(Dataset):
    """``n`` samples ``{"image": 3,size,size uint8, "label": int, "box": 1,4}``: 300 px windows
    at shifting offsets (every one holds the face), resized to ``size``."""

    def __init__(self, n: int, size: int = 256) -> None:
        self.n, self.size = n, size
        self.photo = torch.from_numpy(np.array(sample_photo("astronaut"), dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        window = 300
        x0, y0 = 3 * (index % 60), 2 * ((index // 60) % 30)
        crop = self.photo[:, y0 : y0 + window, x0 : x0 + window].float()
        image = F.interpolate(crop[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        scale = self.size / window
        x1, y1, x2, y2 = FACE_BOX
        box = torch.tensor([[(x1 - x0) * scale, (y1 - y0) * scale, (x2 - x0) * scale, (y2 - y0) * scale]])
        return {"image": image.round().clamp(0, 255).to(torch.uint8), "label": index % 7, "box": box}


def face_annotations(sample: dict[str, Any]) -> tuple[torch.Tensor]:
    return (sample["box"],)


def write_jpegs(dataset: AstronautCrops, folder: Path, quality: int = 90) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(dataset)):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(dataset[i]["image"].permute(1, 2, 0).numpy()).save(path, quality=quality)
        paths.append(path)
    return paths
