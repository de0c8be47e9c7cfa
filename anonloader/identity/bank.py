"""Banks of synthetic identities that real people are mapped into.

A bank holds, per synthetic identity, a recognizer embedding (``N,D`` L2-normalised, the space
the mapper compares real faces in) and optionally an aligned face image (``N,3,S,S``) that
face-swap style methods condition on. Sources:

- :meth:`IdentityBank.from_folder`: a folder of synthetic face images, one identity per image:
  generated photos detected and aligned like the pipeline does it, or (``aligned=True``) crops
  aligned already (e.g. DCFace's 112x112 outputs);
- :meth:`IdentityBank.from_sampler`: DiffDeID's latent ID sampler (embeddings, plus 3DMM α'
  ``coefficients`` with its ``shape_sampler``);
- :meth:`IdentityBank.from_method`: a method's own samples from seeded generation.

Every source keeps identities apart: near-duplicates (recognizer cosine ``>= threshold`` to an
identity kept before) are dropped, and with a *deny list* (``avoid=``: recognizer embeddings of
real faces, e.g. from :func:`embed_photos` on the dataset's own photos) so is every face within
the threshold of a real one, so that no synthetic identity is a real person to the recognizer.

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
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anonloader.errors import ConfigError, IdentityError

__all__ = ["IMAGE_SUFFIXES", "IdentityBank", "embed_crops", "embed_photos", "face_crops", "image_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

logger = logging.getLogger(__name__)


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted); :class:`IdentityError` when none."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise IdentityError(f"no face images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    return files


def _read_photo(path: Path) -> torch.Tensor:
    """``3,H,W float32 in [0,1]`` of an image file."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as error:
        raise IdentityError(f"cannot read the image {path}: {error}; remove or replace it") from error
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def embed_crops(crops: torch.Tensor, embedder: Any, template: str | None = None, *, batch_size: int = 32) -> torch.Tensor:
    """Recognizer embeddings of aligned crops.

    Args:
        crops: ``F,3,S,S float in [0,1]`` faces aligned with ``template``.
        embedder: a recognizer (:mod:`anonloader.identity.embedders`).
        template: the crops' template; None or the embedder's own: embedded as they are, else
            re-aligned to the embedder's template and crop size first (a method's output, e.g.
            FAMS's ``ffhq`` crops, for a recognizer that wants ``arcface``).

    Returns:
        ``F,D float32`` L2-normalised.
    """
    from anonloader.align import align_faces, template_points
    from anonloader.types import Detections

    crops = crops.detach().float().cpu().clamp(0, 1)
    if template is not None and template != str(embedder.template):
        size = crops.shape[-1]
        landmarks = template_points(size, template).unsqueeze(0)
        detections = [Detections(torch.zeros(1, 4), landmarks, torch.ones(1)) for _ in range(crops.shape[0])]
        crops = align_faces(
            list(crops), detections, crop_size=int(embedder.crop_size), template=str(embedder.template),
            margin=float(getattr(embedder, "margin", 0.0)),
        ).crops.clamp(0, 1)
    if len(crops) == 0:
        return torch.zeros(0, int(embedder.dim))
    out = torch.cat([embedder(crops[i : i + batch_size]).float() for i in range(0, len(crops), batch_size)])
    return torch.nn.functional.normalize(out, dim=1)


def _faces_of_photo(image: torch.Tensor, detector: Any, crop_size: int, embedder: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(``K,3,S,S`` crops aligned for ``embedder``, ``K`` scores) of every face ``detector`` finds."""
    from anonloader.align import align_faces

    faces = detector([image])[0]
    if len(faces) == 0:
        return torch.zeros(0, 3, crop_size, crop_size), torch.zeros(0)
    aligned = align_faces(
        [image], [faces], crop_size=crop_size, template=str(embedder.template), margin=float(getattr(embedder, "margin", 0.0)),
    )
    return aligned.crops.clamp(0, 1), faces.scores.float().cpu()


def face_crops(
    photos: str | os.PathLike[str] | Sequence[torch.Tensor], crop_size: int, template: str, *, detector: Any = "default", margin: float = 0.0
) -> torch.Tensor:
    """Every face in photos, detected by the pipeline's detector and aligned.

    Args:
        photos: a folder of images (recursive), or ``3,H,W float in [0,1]`` photos.
        crop_size, template, margin: the alignment (:func:`anonloader.align.align_faces`).
        detector: name or object.

    Returns:
        ``M,3,S,S float32 in [0,1]``, photos in order, faces in detection order.

    Raises:
        IdentityError: no face in any photo.
    """
    from anonloader.align import align_faces
    from anonloader.detect import load_detector

    found = load_detector(detector)
    sources = image_files(photos) if isinstance(photos, (str, os.PathLike)) else list(photos)
    crops = []
    for source in sources:
        image = _read_photo(source) if isinstance(source, Path) else source.detach().float().cpu()
        faces = found([image])[0]
        if len(faces):
            crops.append(align_faces([image], [faces], crop_size=crop_size, template=template, margin=margin).crops.clamp(0, 1))
    if not crops:
        raise IdentityError(f"the detector found no face in the {len(sources)} photo(s); check the photos or the detector")
    return torch.cat(crops)


def embed_photos(
    photos: str | os.PathLike[str] | Sequence[torch.Tensor], embedder: Any, *, detector: Any = "default"
) -> torch.Tensor:
    """Recognizer embeddings of every face in real photos: a deny list for the bank builders.

    Args:
        photos: a folder of images (recursive), or ``3,H,W float in [0,1]`` photos.
        embedder: the recognizer of the bank.
        detector: the pipeline's detector (name or object) that finds and aligns the faces.

    Returns:
        ``M,D float32`` L2-normalised, every face of every photo (a photo may show several people).

    Raises:
        IdentityError: no face in any photo (the deny list would be empty by mistake).
    """
    crops = face_crops(photos, int(embedder.crop_size), str(embedder.template), detector=detector, margin=float(getattr(embedder, "margin", 0.0)))
    return embed_crops(crops, embedder)


def _deny_list(avoid: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """``M,D`` normalised deny-list embeddings, or None; :class:`ConfigError` on another space."""
    if avoid is None or len(avoid) == 0:
        return None
    avoid = torch.as_tensor(avoid).detach().float().cpu()
    if avoid.ndim != 2 or avoid.shape[1] != dim:
        raise ConfigError(
            f"avoid= must be M,{dim} embeddings of real faces by the bank's recognizer, got {tuple(avoid.shape)}; "
            "embed real photos with anonloader.identity.bank.embed_photos(folder, embedder)"
        )
    return torch.nn.functional.normalize(avoid, dim=1)


def _deny_meta(denied: torch.Tensor | None) -> dict[str, Any]:
    digest = None if denied is None else hashlib.sha256(denied.numpy().astype("<f4").tobytes()).hexdigest()
    return {"count": 0 if denied is None else int(denied.shape[0]), "sha256": digest}


class _Keeper:
    """Greedy admission: a face is kept when its cosine to every kept face (``distinct``) and
    to every denied face stays below ``threshold``; counts what it rejects."""

    def __init__(self, threshold: float, denied: torch.Tensor | None, distinct: bool) -> None:
        self.threshold, self.denied, self.distinct = float(threshold), denied, distinct
        self.kept: list[torch.Tensor] = []
        self.rejected = {"duplicate": 0, "denied": 0}

    def admit(self, vector: torch.Tensor) -> bool:
        if self.denied is not None and float((self.denied @ vector).max()) >= self.threshold:
            self.rejected["denied"] += 1
            return False
        if self.distinct and self.kept and float((torch.stack(self.kept) @ vector).max()) >= self.threshold:
            self.rejected["duplicate"] += 1
            return False
        self.kept.append(vector)
        return True


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
        aligned: bool = False,
        detector: Any = "default",
        batch_size: int = 32,
        keep_images: bool = True,
        distinct: bool = True,
        avoid: torch.Tensor | None = None,
        n: int | None = None,
    ) -> IdentityBank:
        """One identity per image file in ``folder`` (sorted, recursive).

        Args:
            folder: synthetic face images.
            embedder: the recognizer whose space the bank's embeddings are in.
            crop_size: side of the stored images.
            aligned: False (default): each file is a photo of a generated face; the pipeline's
                ``detector`` finds it (the most confident face of the file) and it is aligned to
                the embedder's template, as the pipeline aligns faces for its recognizer. Files
                where no face is found are left out (named in ``meta["no_face"]``). True: the
                files are aligned crops in the embedder's template already (DCFace and similar
                generators write arcface-aligned 112x112 images), resized to ``crop_size``.
            detector: name or object of the detector (``aligned=False``).
            batch_size: crops per recognizer call.
            keep_images: store the aligned images (methods that swap faces need them).
            distinct: leave out an image within the recognizer threshold of an earlier one (it
                is the same synthetic person to the recognizer).
            avoid: ``M,D`` recognizer embeddings of real faces (a deny list, e.g.
                :func:`embed_photos`); an image within the threshold of one is left out.
            n: keep at most this many identities (the first in file order), or all.

        Returns:
            the bank; its images (``N,3,S,S float32 in [0,1]``) are in the embedder's template,
            recorded in ``meta["template"]``.

        Raises:
            IdentityError: no image, or no image left.
        """
        root = Path(folder)
        files = image_files(root)
        names_all = [p.relative_to(root).as_posix() for p in files]
        no_face: list[str] = []
        if aligned:
            images = torch.stack([_load_image(p, crop_size) for p in files])
            names = names_all
        else:
            from anonloader.detect import load_detector

            found = load_detector(detector)
            crops, names = [], []
            for path, name in zip(files, names_all):
                faces, scores = _faces_of_photo(_read_photo(path), found, crop_size, embedder)
                if len(faces) == 0:
                    no_face.append(name)
                    continue
                crops.append(faces[int(scores.argmax())])
                names.append(name)
            if no_face:
                logger.warning("no face found in %d of %d images of %s (left out): %s", len(no_face), len(files), root, no_face[:5])
            if not crops:
                raise IdentityError(f"the detector found no face in any of the {len(files)} images of {root}; pass aligned=True if they are aligned crops")
            images = torch.stack(crops)
        embeddings = embed_crops(images, embedder, batch_size=batch_size)
        denied = _deny_list(avoid, embeddings.shape[1])
        keeper = _Keeper(float(embedder.threshold), denied, distinct)
        keep = []
        for i, vector in enumerate(embeddings):
            if n is not None and len(keep) == n:
                break
            if keeper.admit(vector):
                keep.append(i)
        if not keep:
            raise IdentityError(f"every image of {root} is within the recognizer threshold of a denied real face; nothing to keep")
        meta = {
            "source": "folder", "recognizer": embedder.config(), "crop_size": crop_size, "template": str(embedder.template),
            "aligned_by": "given" if aligned else getattr(found, "name", type(found).__name__),
            "dropped_duplicates": keeper.rejected["duplicate"], "rejected": keeper.rejected, "deny": _deny_meta(denied),
        }
        if no_face:
            meta["no_face"] = no_face
        index = torch.tensor(keep, dtype=torch.long)
        return cls(embeddings[index], images[index] if keep_images else None, [names[i] for i in keep], meta)

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
        avoid: torch.Tensor | None = None,
        avoid_images: torch.Tensor | None = None,
        max_attempts: int | None = None,
    ) -> IdentityBank:
        """``n`` identities from a method's own seeded samples.

        Args:
            method: a :class:`~anonloader.methods.base.Method` (or any callable with its
                signature ``(crops F,3,S,S, conditions) -> F,3,S,S``) that generates a face per
                seed, at full anonymization (e.g. FAMS at a high degree ``d``; IDDiffuse
                through its bank/seed path: the synthetic identity ``seed % len(bank)``).
            n: identities wanted.
            embedder: the recognizer; the method's output (in ``method.template``) is re-aligned
                to its template before embedding (:func:`embed_crops`).
            source: ``3,S,S`` or ``F,3,S,S`` driving crops in the method's template, used in
                turn (default: one mid-grey crop).
            seed: first seed; render ``k`` uses ``seed + k``.
            batch_size: renders per call.
            distinct: skip a render within the recognizer threshold of a kept identity.
            avoid: ``M,D`` recognizer embeddings of real faces no identity may be near.
            avoid_images: ``M,3,S,S float in [0,1]`` real faces aligned in the recognizer's
                template, embedded here and added to ``avoid``.
            max_attempts: renders before giving up (default ``20 n + 100``).

        Returns:
            a bank with ``n`` identities, their images (the method's template and crop size,
            ``meta["template"]``) and ``meta`` naming the method, recognizer, seeds, rejections
            and the deny list's size and digest.

        Raises:
            IdentityError: fewer than ``n`` identities within ``max_attempts`` renders.
        """
        from anonloader.types import FaceConditions

        if n < 1:
            raise ConfigError(f"from_method needs n >= 1, got {n}")
        size = int(getattr(method, "crop_size", 112))
        template = getattr(method, "template", None)
        if source is None:
            source = torch.full((3, size, size), 0.5)
        driving = source.unsqueeze(0) if source.ndim == 3 else source
        parts = [avoid, None if avoid_images is None or not len(avoid_images) else embed_crops(avoid_images, embedder)]
        checked = [d for d in (_deny_list(part, int(embedder.dim)) for part in parts) if d is not None]
        denied = torch.cat(checked) if checked else None
        keeper = _Keeper(float(embedder.threshold), denied, distinct)
        limit = max_attempts if max_attempts is not None else 20 * n + 100
        kept_images: list[torch.Tensor] = []
        names: list[str] = []
        attempt = 0
        while len(kept_images) < n:
            if attempt >= limit:
                raise IdentityError(
                    f"the method rendered only {len(kept_images)} distinct identities of {n} in {limit} attempts "
                    f"({keeper.rejected['duplicate']} near-duplicates, {keeper.rejected['denied']} too close to the deny list); "
                    "render at a higher anonymization degree, give more varied driving faces, or ask for fewer"
                )
            count = min(batch_size, limit - attempt)
            seeds = [seed + attempt + i for i in range(count)]
            crops = driving[[(attempt + i) % driving.shape[0] for i in range(count)]]
            attempt += count
            conditions = FaceConditions(seeds, [None] * count, [None] * count, torch.zeros(count, 5, 2))
            generated = method(crops.float().clone(), conditions).detach().float().cpu().clamp(0, 1)
            for s, image, vector in zip(seeds, generated, embed_crops(generated, embedder, template)):
                if not keeper.admit(vector):
                    continue
                kept_images.append(image)
                names.append(f"{getattr(method, 'name', 'method')}_seed{s}")
                if len(kept_images) == n:
                    break
        config = method.config() if hasattr(method, "config") else {}
        meta = {
            "source": "method", "method": config, "recognizer": embedder.config(), "seed": seed, "attempts": attempt,
            "rejected": keeper.rejected, "deny": _deny_meta(denied),
        }
        if template is not None:
            meta["template"] = str(template)
        return cls(torch.stack(keeper.kept), torch.stack(kept_images), names, meta)
