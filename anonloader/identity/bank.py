"""Banks of synthetic identities that real people are mapped into.

A bank holds, per synthetic identity, a recognizer embedding (``N,D`` L2-normalised, the space
the mapper compares real faces in) and optionally an aligned face image (``N,3,S,S``) that
face-swap style methods condition on. Sources:

- :meth:`IdentityBank.from_folder`: a folder of synthetic face images (e.g. DCFace's aligned
  112x112 outputs), one identity per image;
- :meth:`IdentityBank.from_sampler`: DiffDeID's latent ID sampler (embeddings, plus 3DMM α'
  ``coefficients`` with its ``shape_sampler``);
- :meth:`IdentityBank.from_method`: a method's own samples from seeded generation.

Optionally a bank also holds ``features`` (``N,D'``): each identity in an *attribute space*
other than the recognizer's, e.g. IDDiffuse's E_I (paper sec. 3.2: the synthetic identity is
chosen near the real face in E_I space so non-identity attributes fit). The keyed mapper ranks
candidates by it (``KeyedMapper(candidate_pool=K)``); :meth:`IdentityBank.with_features` adds
them, and ``meta["features"]`` says how they were made.

Saved as ``<path>/bank.pt`` (tensors, ``torch.save``, loaded with ``weights_only``) plus
``<path>/bank.json`` (names, metadata, fingerprint); the fingerprint is checked on load. A bank
without ``features`` has the same fingerprint, files and format as before they existed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anonloader.errors import ConfigError, IdentityError

__all__ = ["IMAGE_SUFFIXES", "IdentityBank"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _load_image(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        array = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


class IdentityBank:
    """Synthetic identities.

    Attributes:
        embeddings: ``N,D float32`` L2-normalised recognizer embeddings.
        images: ``N,3,S,S float32 in [0,1]`` aligned faces, or None (embedding-only bank).
        names: ``N`` names (file names, sample ids).
        meta: JSON-able provenance (source, recognizer config, sampler settings).
        features: ``N,D' float32`` L2-normalised attribute-space features (e.g. IDDiffuse E_I)
            used to rank candidates by nearness, or None.
        coefficients: ``N,K float32`` per-identity shape coefficients, not normalised (DiffDeID's
            3DMM identity α' from the α sampler, eq. 3), or None.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        images: torch.Tensor | None = None,
        names: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
        features: torch.Tensor | None = None,
        coefficients: torch.Tensor | None = None,
    ) -> None:
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise ConfigError(f"a bank needs N,D embeddings with N >= 1, got {tuple(embeddings.shape)}")
        embeddings = embeddings.detach().float().cpu()
        if float((embeddings.norm(dim=1) - 1).abs().max()) > 1e-5:  # keep stored unit vectors bit-exact
            embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        self.embeddings = embeddings.contiguous()
        if images is not None and (images.ndim != 4 or len(images) != len(embeddings) or images.shape[1] != 3):
            raise ConfigError(f"bank images must be N,3,S,S with N = {len(embeddings)}, got {tuple(images.shape)}")
        self.images = None if images is None else images.detach().float().cpu().clamp(0, 1).contiguous()
        self.names = list(names) if names is not None else [f"synthetic_{i:06d}" for i in range(len(embeddings))]
        if len(self.names) != len(self.embeddings):
            raise ConfigError(f"{len(self.names)} names for {len(self.embeddings)} identities")
        self.meta = dict(meta or {})
        if features is not None:
            if features.ndim != 2 or len(features) != len(self.embeddings) or features.shape[1] == 0:
                raise ConfigError(f"bank features must be N,D' with N = {len(self.embeddings)}, got {tuple(features.shape)}")
            features = features.detach().float().cpu()
            if float((features.norm(dim=1) - 1).abs().max()) > 1e-5:
                features = torch.nn.functional.normalize(features, dim=1)
            features = features.contiguous()
        self.features = features
        if coefficients is not None and (coefficients.ndim != 2 or len(coefficients) != len(self.embeddings) or coefficients.shape[1] == 0):
            raise ConfigError(f"bank coefficients must be N,K with N = {len(self.embeddings)}, got {tuple(coefficients.shape)}")
        self.coefficients = None if coefficients is None else coefficients.detach().float().cpu().contiguous()
        self._fingerprint: str | None = None
        self._index: Any = None  # VectorIndex over embeddings, built on first nearest()

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def fingerprint(self) -> str:
        """SHA-256 over the embeddings (float32 bytes), images (as uint8), names, metadata and,
        when present, the features (float32 bytes; a bank without them hashes as it always did)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(b"anonloader/bank/v1")
            digest.update(self.embeddings.numpy().astype("<f4").tobytes())
            if self.images is not None:
                digest.update((self.images * 255).round().to(torch.uint8).numpy().tobytes())
            digest.update(json.dumps({"names": self.names, "meta": self.meta}, sort_keys=True).encode())
            if self.features is not None:
                digest.update(b"anonloader/bank/features/v1")
                digest.update(self.features.numpy().astype("<f4").tobytes())
            if self.coefficients is not None:
                digest.update(b"anonloader/bank/coefficients/v1")
                digest.update(self.coefficients.numpy().astype("<f4").tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def nearest(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``F,D`` query embeddings: (``F float32`` best cosine similarity, ``F int64`` bank
        index), through the bank's exact :class:`~anonloader.identity.index.VectorIndex`."""
        if self._index is None:
            from anonloader.identity.index import VectorIndex

            self._index = VectorIndex.build(self.embeddings, kind="exact")
        sims, ids = self._index.nearest(torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1))
        return torch.from_numpy(sims), torch.from_numpy(ids)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_index"] = None
        return state

    def with_features(self, features: torch.Tensor, info: dict[str, Any] | None = None) -> IdentityBank:
        """A copy of this bank with attribute-space ``features`` (``N,D'``, normalised here) and
        ``meta["features"] = info`` (JSON-able: what space, which model/weights)."""
        meta = dict(self.meta)
        meta["features"] = dict(info or {})
        return IdentityBank(self.embeddings, self.images, self.names, meta, features=features, coefficients=self.coefficients)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``bank.pt`` + ``bank.json`` into the folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.embeddings}
        if self.images is not None:
            tensors["images"] = self.images
        if self.features is not None:
            tensors["features"] = self.features
        if self.coefficients is not None:
            tensors["coefficients"] = self.coefficients
        torch.save(tensors, folder / "bank.pt")
        info = {"format": "anonloader-identity-bank", "version": 1, "names": self.names, "meta": self.meta, "fingerprint": self.fingerprint()}
        (folder / "bank.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IdentityBank:
        """Read a bank written by :meth:`save`; :class:`IdentityError` when its fingerprint does not match."""
        folder = Path(path)
        try:
            info = json.loads((folder / "bank.json").read_text())
            tensors = torch.load(folder / "bank.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise IdentityError(f"cannot read the identity bank in {folder}: {error}") from error
        bank = cls(tensors["embeddings"], tensors.get("images"), info["names"], info.get("meta"), features=tensors.get("features"),
                   coefficients=tensors.get("coefficients"))
        if bank.fingerprint() != info.get("fingerprint"):
            raise IdentityError(f"the identity bank in {folder} does not match its fingerprint (modified or corrupt); rebuild it")
        return bank

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str],
        embedder: Any,
        crop_size: int = 112,
        *,
        batch_size: int = 32,
        keep_images: bool = True,
        distinct: bool = True,
    ) -> IdentityBank:
        """One identity per image file in ``folder`` (sorted, recursive).

        Images must be aligned faces in the embedder's template (DCFace and similar generators
        write arcface-aligned 112x112 images); they are resized to ``crop_size``. With
        ``distinct``, an image within the recognizer threshold of an earlier one is left out
        (it is the same synthetic person to the recognizer).
        """
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise IdentityError(f"no face images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
        images = torch.stack([_load_image(p, crop_size) for p in files])
        embeddings = torch.cat([embedder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        names = [p.relative_to(root).as_posix() for p in files]
        keep = _distinct_rows(embeddings, embedder.threshold) if distinct else list(range(len(files)))
        meta = {"source": "folder", "recognizer": embedder.config(), "crop_size": crop_size, "dropped_duplicates": len(files) - len(keep)}
        return cls(embeddings[keep], images[keep] if keep_images else None, [names[i] for i in keep], meta)

    @classmethod
    def from_sampler(
        cls,
        sampler: Any,
        n: int,
        *,
        threshold: float,
        avoid: torch.Tensor | None = None,
        steps: int = 50,
        seed: int = 0,
        shape_sampler: Any = None,
    ) -> IdentityBank:
        """``n`` embeddings from a trained :class:`~anonloader.identity.sampler.LatentIDSampler`,
        pairwise distinct at ``threshold`` and never within it of ``avoid`` (real faces, ``M,D``).

        With ``shape_sampler`` (DiffDeID's α sampler, ``unit_norm=False``), identity ``i`` also
        gets ``coefficients[i]`` drawn from seed ``derive_seed(seed, i + 1)``. A sampler that
        records its ``space`` (recognizer) puts it in ``meta["recognizer"]["name"]``, so methods
        can refuse a bank of another space."""
        from anonloader.identity.sampler import derive_seed

        embeddings = sampler.sample_distinct(n, threshold=threshold, avoid=avoid, steps=steps, seed=seed)
        meta: dict[str, Any] = {"source": "latent_id_sampler", "threshold": threshold, "steps": steps, "seed": seed, "sampler_steps": sampler.trained_steps}
        if getattr(sampler, "space", None):
            meta["recognizer"] = {"name": sampler.space}
        coefficients = None
        if shape_sampler is not None:
            if getattr(shape_sampler, "unit_norm", False):
                raise ConfigError("shape_sampler must be built with unit_norm=False (3DMM coefficients are not unit vectors)")
            coefficients = shape_sampler.sample(seeds=[derive_seed(seed, i + 1) for i in range(n)], steps=steps)
            meta["shape_sampler"] = {"space": shape_sampler.space, "sampler_steps": shape_sampler.trained_steps}
        return cls(embeddings, None, [f"lds_{seed}_{i:06d}" for i in range(n)], meta, coefficients=coefficients)

    @classmethod
    def from_method(
        cls,
        method: Callable[..., torch.Tensor],
        n: int,
        embedder: Any,
        *,
        source: torch.Tensor | None = None,
        seed: int = 0,
        batch_size: int = 8,
        distinct: bool = True,
    ) -> IdentityBank:
        """``n`` identities from a method's own seeded samples.

        ``method`` is a :class:`~anonloader.methods.base.Method` (or any callable with its
        signature ``(crops F,3,S,S, conditions) -> F,3,S,S``) that generates a face per seed;
        ``source`` (``3,S,S`` or ``F,3,S,S``) is the crop it starts from (default mid-grey).
        Seeds are ``seed, seed + 1, ...``; near-duplicates (within the recognizer threshold) are
        skipped when ``distinct``.
        """
        from anonloader.types import FaceConditions

        size = int(getattr(method, "crop_size", 112))
        if source is None:
            source = torch.full((3, size, size), 0.5)
        kept_images: list[torch.Tensor] = []
        kept_embeddings: list[torch.Tensor] = []
        names: list[str] = []
        next_seed = seed
        while len(kept_images) < n:
            if next_seed - seed > 20 * n + 100:
                raise IdentityError(f"the method produced only {len(kept_images)} distinct identities of {n} asked for")
            seeds = list(range(next_seed, next_seed + batch_size))
            next_seed += batch_size
            crops = source.expand(len(seeds), *source.shape[-3:]) if source.ndim == 3 else source[: len(seeds)]
            conditions = FaceConditions(seeds, [None] * len(seeds), [None] * len(seeds), torch.zeros(len(seeds), 5, 2))
            generated = method(crops.clone(), conditions).detach().float().clamp(0, 1)
            embeddings = embedder(generated)
            for s, image, vector in zip(seeds, generated, embeddings):
                if distinct and kept_embeddings and float((torch.stack(kept_embeddings) @ vector).max()) >= embedder.threshold:
                    continue
                kept_images.append(image)
                kept_embeddings.append(vector)
                names.append(f"{getattr(method, 'name', 'method')}_seed{s}")
                if len(kept_images) == n:
                    break
        config = method.config() if hasattr(method, "config") else {}
        meta = {"source": "method", "method": config, "recognizer": embedder.config(), "seed": seed}
        return cls(torch.stack(kept_embeddings), torch.stack(kept_images), names, meta)


def _distinct_rows(embeddings: torch.Tensor, threshold: float) -> list[int]:
    """Indices of rows kept greedily in order so that no two kept rows reach ``threshold`` cosine."""
    normalised = torch.nn.functional.normalize(embeddings.float(), dim=1)
    keep: list[int] = []
    for i in range(len(normalised)):
        if keep and float((normalised[keep] @ normalised[i]).max()) >= threshold:
            continue
        keep.append(i)
    return keep
