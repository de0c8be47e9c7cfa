"""Training data for IDDiffuse: identity-folder face sets, P x K batches, real/synthetic pairs.

Layout read by :class:`FaceFolder` (CASIA-WebFace / DCFace style, already aligned to the ArcFace
112 template): ``root/<identity>/<image>.(jpg|jpeg|png|bmp|webp)``; one folder per identity.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from anonloader.errors import ConfigError, ImageDecodeError

__all__ = ["load_face", "FaceFolder", "IdentityBatchSampler", "PairedFaceDataset", "pair_identities"]

_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def load_face(path: Path, crop_size: int) -> torch.Tensor:
    """An aligned face image file -> ``3,S,S float32 in [0,1]`` (bilinear resize to ``S``)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (crop_size, crop_size):
                image = image.resize((crop_size, crop_size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except OSError as exc:
        raise ImageDecodeError(f"cannot decode face image {path}: {exc}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class FaceFolder(Dataset):
    """Aligned face crops in identity sub-folders -> ``(3,S,S float in [0,1], label int)``.

    Args:
        root: the folder holding one sub-folder per identity.
        crop_size: crops are resized to ``S x S`` (bilinear) when they differ.
        min_images: identities with fewer images are skipped (2 for triplets).
    """

    def __init__(self, root: str | Path, crop_size: int = 112, min_images: int = 1) -> None:
        self.root, self.crop_size = Path(root), crop_size
        if not self.root.is_dir():
            raise ConfigError(f"face folder {self.root} does not exist")
        self.paths: list[Path] = []
        self.labels: list[int] = []
        self.names: list[str] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)
            if len(files) < min_images:
                continue
            label = len(self.names)
            self.names.append(folder.name)
            self.paths += files
            self.labels += [label] * len(files)
        if not self.paths:
            raise ConfigError(f"no identity sub-folders with >= {min_images} images under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        return load_face(self.paths[index], self.crop_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index), self.labels[index]

    def indices_by_label(self) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in self.names]
        for i, label in enumerate(self.labels):
            groups[label].append(i)
        return groups


class IdentityBatchSampler(Sampler[list[int]]):
    """Batches of ``identities_per_batch`` identities x ``images_per_identity`` images (P x K),
    for batch-hard triplet mining; identities with fewer images are sampled with replacement."""

    def __init__(self, labels: Sequence[int], identities_per_batch: int, images_per_identity: int, seed: int = 0) -> None:
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(int(label), []).append(i)
        self.groups = [g for g in groups.values()]
        if len(self.groups) < 2:
            raise ConfigError("triplet training needs at least two identities")
        self.p, self.k, self.seed, self.epoch = min(identities_per_batch, len(self.groups)), images_per_identity, seed, 0

    def __len__(self) -> int:
        return max(1, len(self.groups) // self.p)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        order = list(range(len(self.groups)))
        rng.shuffle(order)
        for b in range(len(self)):
            batch: list[int] = []
            for g in order[b * self.p:(b + 1) * self.p]:
                group = self.groups[g]
                batch += rng.sample(group, self.k) if len(group) >= self.k else rng.choices(group, k=self.k)
            yield batch


def pair_identities(real_features: torch.Tensor, synthetic_features: torch.Tensor, min_distance: float = 0.0) -> torch.Tensor:
    """For each real identity, the synthetic identity nearest in E_I space (paper sec. 3.2).

    Args:
        real_features: ``R,D`` per-identity mean E_I features (normalised inside).
        synthetic_features: ``N,D`` per-identity mean E_I features.
        min_distance: candidates with cosine distance below this are skipped (never reuse a
            synthetic identity that looks like the real person).
    Returns:
        ``R int64`` synthetic identity index per real identity.
    """
    sims = torch.nn.functional.normalize(real_features, dim=1) @ torch.nn.functional.normalize(synthetic_features, dim=1).T
    sims = sims.masked_fill(1 - sims < min_distance, float("-inf"))
    if torch.isinf(sims).all(1).any():
        raise ConfigError(f"some real identities have no synthetic identity farther than {min_distance}; lower min_distance")
    return sims.argmax(1)


class PairedFaceDataset(Dataset):
    """Real crops with a synthetic identity crop: ``{"image": 3,S,S, "id_image": 3,S,S}`` in [0,1].

    ``pairing[r]`` is the synthetic identity of real identity ``r``; the synthetic image is
    drawn uniformly among that identity's images with Python's ``random`` (seeded per worker by
    ``lightning.seed_everything(..., workers=True)``).
    """

    def __init__(self, real: FaceFolder, synthetic: FaceFolder, pairing: torch.Tensor) -> None:
        if len(pairing) != len(real.names):
            raise ConfigError(f"pairing has {len(pairing)} entries for {len(real.names)} real identities")
        self.real, self.synthetic, self.pairing = real, synthetic, pairing.tolist()
        self.synthetic_groups = synthetic.indices_by_label()

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        group = self.synthetic_groups[self.pairing[self.real.labels[index]]]
        pick = random.choice(group)
        return {"image": self.real.load(index), "id_image": self.synthetic.load(pick)}
