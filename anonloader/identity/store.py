"""Face embeddings computed once and stored, for clustering a whole dataset.

.. warning::
   An embeddings store holds **raw recognizer embeddings of real people** (biometric data:
   anyone with the store and a photo can tell whether that person is in the dataset). It is
   written only where you ask (``anonloader identity embed SRC OUT``), never into an anonymized
   cache or a mapping store. Keep it with the original images, under the same access rules,
   and delete it when the clustering is done.

Layout of ``OUT`` (a folder):

- ``meta.json``: format, version, ``dim``, the recognizer's config and its alignment
  (``crop_size``, ``template``, ``margin``), the source, ``part_size``, a ``"sensitive"`` note,
  and, once complete, ``"complete": true`` with the face and sample counts.
- ``parts/part-NNNNNNNN.npy`` + ``parts/part-NNNNNNNN.json``: the faces of samples
  ``[N * part_size, (N + 1) * part_size)``: ``F,D float32`` L2-normalised embeddings and, per
  face, its content hash (:func:`~anonloader.identity.keys.face_content_hash`), sample index and
  face number. Each file is written to a temporary name and renamed; the ``.json`` comes last
  and marks the part done, so a run killed at any point (even SIGKILL) resumes at the first part
  without one.
- after the last part (:meth:`EmbeddingStore.finalize`): ``embeddings.npy`` (``N,D float32``,
  read memory-mapped), ``hashes.npy`` (``N`` ``S64`` hex content hashes), ``samples.npy``
  (``N,2 int64``: sample index, face number), faces in part order.

Then ``KeyedIdentityAssigner("cluster").fit(embeddings=store.embeddings(),
content_hashes=store.content_hashes())`` (or :meth:`EmbeddingStore.fit`) clusters the dataset
without running the recognizer again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anonloader.errors import AnonloaderError, ConfigError, IdentityError

__all__ = ["STORE_FORMAT", "EmbeddingStore", "embed_source"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "anonloader-identity-embeddings"
_VERSION = 1
_SENSITIVE = (
    "raw face embeddings of real people (biometric data): keep under the same access rules as the "
    "original images, never ship with an anonymized cache, delete after clustering"
)


def _write_atomic(path: Path, write: Any) -> None:
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


class EmbeddingStore:
    """An embeddings store folder (see module doc): write parts, resume, read memory-mapped.

    Args:
        path: the folder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise IdentityError(f"{self.path} is not an embeddings store (no meta.json); create one with EmbeddingStore.create or `anonloader identity embed`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != STORE_FORMAT:
            raise IdentityError(f"{self.path} is not an anonloader embeddings store")
        if self.meta.get("version") != _VERSION:
            raise IdentityError(f"the embeddings store {self.path} has version {self.meta.get('version')}; this anonloader reads {_VERSION}: embed again")
        self.dim = int(self.meta["dim"])

    @classmethod
    def create(cls, path: str | os.PathLike[str], dim: int, meta: dict[str, Any] | None = None) -> EmbeddingStore:
        """Open the store at ``path``, creating it with ``dim`` and ``meta`` (JSON-able: recognizer,
        alignment, source, part size). An existing store must have the same ``dim`` and ``meta``
        (that is what makes a resume safe)."""
        folder = Path(path)
        wanted = {"format": STORE_FORMAT, "version": _VERSION, "dim": int(dim), "sensitive": _SENSITIVE, **(meta or {})}
        if (folder / "meta.json").is_file():
            store = cls(folder)
            mine = {k: v for k, v in store.meta.items() if k not in ("complete", "faces")}
            if mine != json.loads(json.dumps(wanted)):
                raise ConfigError(
                    f"the embeddings store {folder} was started with other settings ({mine}); resume with the same "
                    "source, recognizer and part size, or write to a new folder"
                )
            return store
        (folder / "parts").mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "meta.json", lambda h: h.write(json.dumps(wanted, indent=1, sort_keys=True).encode()))
        logger.warning("writing raw face embeddings (sensitive biometric data) to %s", folder)
        return cls(folder)

    # ------------------------------------------------------------------ writing
    def _part(self, part: int) -> Path:
        return self.path / "parts" / f"part-{int(part):08d}"

    def done_parts(self) -> set[int]:
        """Parts whose ``.json`` marker exists (complete)."""
        return {int(p.name[5:13]) for p in (self.path / "parts").glob("part-*.json")}

    def write_part(self, part: int, embeddings: Any, content_hashes: Sequence[str], samples: Sequence[tuple[int, int]]) -> None:
        """Write one part atomically (embeddings first, then its ``.json`` marker).

        Args:
            part: the part number.
            embeddings: ``F,D`` embeddings (normalised here to unit length, float32).
            content_hashes: ``F`` hex content hashes.
            samples: ``F`` (sample index, face number) pairs.
        """
        vectors = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)).reshape(-1, self.dim)
        vectors = torch.nn.functional.normalize(vectors, dim=1).numpy() if len(vectors) else vectors.numpy()
        if not (len(vectors) == len(content_hashes) == len(samples)):
            raise ConfigError(f"part {part}: {len(vectors)} embeddings, {len(content_hashes)} hashes and {len(samples)} sample ids")
        base = self._part(part)
        _write_atomic(base.with_suffix(".npy"), lambda h: np.save(h, vectors, allow_pickle=False))
        info = {"part": int(part), "faces": len(vectors), "hashes": list(content_hashes), "samples": [[int(s), int(f)] for s, f in samples]}
        _write_atomic(base.with_suffix(".json"), lambda h: h.write(json.dumps(info).encode()))

    def finalize(self, parts: int) -> None:
        """Join parts ``0..parts-1`` into ``embeddings.npy``, ``hashes.npy``, ``samples.npy``
        (streamed through a memory map, so the store never has to fit in memory twice)."""
        missing = sorted(set(range(parts)) - self.done_parts())
        if missing:
            raise IdentityError(f"the embeddings store {self.path} misses parts {missing[:10]}; run the same command again to finish it")
        infos = [json.loads(self._part(p).with_suffix(".json").read_text()) for p in range(parts)]
        total = sum(i["faces"] for i in infos)
        tmp = self.path / "embeddings.npy.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, self.dim))
        row = 0
        for p, info in enumerate(infos):
            block = np.load(self._part(p).with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
            out[row : row + len(block)] = block
            row += len(block)
        out.flush()
        del out
        hashes = np.array([h for i in infos for h in i["hashes"]], dtype="S64").reshape(total)
        samples = np.array([s for i in infos for s in i["samples"]], dtype=np.int64).reshape(total, 2)
        _write_atomic(self.path / "hashes.npy", lambda h: np.save(h, hashes, allow_pickle=False))
        _write_atomic(self.path / "samples.npy", lambda h: np.save(h, samples, allow_pickle=False))
        os.replace(tmp, self.path / "embeddings.npy")
        self.meta.update(complete=True, faces=total)
        _write_atomic(self.path / "meta.json", lambda h: h.write(json.dumps(self.meta, indent=1, sort_keys=True).encode()))

    # ------------------------------------------------------------------ reading
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete")) and (self.path / "embeddings.npy").is_file()

    def _require_complete(self) -> None:
        if not self.complete:
            raise IdentityError(f"the embeddings store {self.path} is not complete; run `anonloader identity embed` again to finish it")

    def embeddings(self) -> np.ndarray:
        """``N,D float32`` unit embeddings, memory-mapped read-only."""
        self._require_complete()
        return np.load(self.path / "embeddings.npy", mmap_mode="r", allow_pickle=False)

    def content_hashes(self) -> list[str]:
        """``N`` hex content hashes, aligned with :meth:`embeddings`."""
        self._require_complete()
        return [h.decode("ascii") for h in np.load(self.path / "hashes.npy", allow_pickle=False)]

    def samples(self) -> np.ndarray:
        """``N,2 int64``: (sample index, face number in the sample) of every face."""
        self._require_complete()
        return np.load(self.path / "samples.npy", allow_pickle=False)

    def __len__(self) -> int:
        self._require_complete()
        return int(self.meta["faces"])

    def fit(self, assigner: Any, **kwargs: Any) -> Any:
        """``assigner.fit`` over every stored face (``kwargs``: ``method``, ``k``, ``shards``);
        checks that the assigner's recognizer is the one the store was written with."""
        recognizer = self.meta.get("recognizer")
        embedder = getattr(assigner, "embedder", None)
        if recognizer is not None and embedder is not None and embedder.config() != recognizer:
            raise ConfigError(f"the embeddings in {self.path} come from {recognizer}, the assigner's recognizer is {embedder.config()}; use the same one")
        return assigner.fit(embeddings=self.embeddings(), content_hashes=self.content_hashes(), **kwargs)


# ---------------------------------------------------------------------------------- computing
def _sample_images(sample: Any, index: int, image_key: Any) -> list[torch.Tensor]:
    from anonloader.data.adapters import split_sample

    images, _ = split_sample(sample, None if image_key is None else [image_key], index=index)
    return [image.tensor for image in images]


def _embed_part(dataset: Any, indices: Sequence[int], detector: Any, embedder: Any, image_key: Any, on_error: str) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Detect, align (the embedder's crop), embed and hash the faces of ``indices``."""
    from anonloader.align import align_faces
    from anonloader.identity.keys import face_content_hash

    vectors: list[torch.Tensor] = []
    hashes: list[str] = []
    samples: list[tuple[int, int]] = []
    for index in indices:
        try:
            images = _sample_images(dataset[index], index, image_key)
            found = detector(images)
        except AnonloaderError as error:
            if on_error == "raise":
                raise
            logger.warning("identity embed: sample %d skipped (%s)", index, error)
            continue
        number = 0
        for image, faces in zip(images, found):
            if len(faces) == 0:
                continue
            aligned = align_faces([image], [faces], crop_size=int(embedder.crop_size), template=str(embedder.template), margin=float(getattr(embedder, "margin", 0.0)))
            embedded = embedder(aligned.crops)
            for crop, vector in zip(aligned.crops, embedded):
                vectors.append(vector.float())
                hashes.append(face_content_hash(crop))
                samples.append((int(index), number))
                number += 1
    dim = int(embedder.dim)
    matrix = torch.stack(vectors).numpy() if vectors else np.zeros((0, dim), dtype=np.float32)
    return matrix, hashes, samples


def embed_source(
    source: Any,
    out: str | os.PathLike[str],
    *,
    embedder: Any = "dlib",
    detector: Any = "default",
    part_size: int = 256,
    limit: int | None = None,
    image_key: Any = None,
    on_error: str = "drop",
    engine: str = "local",
    workers: int = 1,
    progress: bool = False,
    parts_done: Iterable[int] | None = None,
) -> EmbeddingStore:
    """Embed every face of ``source`` into the store ``out`` (resumable; see module doc).

    Args:
        source: anything :func:`anonloader.cache.precompute.load_source` reads (a folder of
            images, a map-style dataset, ``pkg.module:factory``, a saved HF dataset).
        out: the store folder (sensitive: raw embeddings).
        embedder: recognizer name or object (its ``crop_size``, ``template`` and ``margin``
            are the alignment, as the pipeline's identity stage uses).
        detector: detector name or object (:func:`anonloader.detect.load_detector`); use the one
            ``precompute`` will run (default: the pipeline's ``"default"``): then every face
            of the store is the very crop precompute sees, found in its cluster by content hash.
        part_size: samples per part (the unit of resume).
        limit: only the first ``limit`` samples.
        image_key: the image field of a sample (default: every image in it).
        on_error: ``"drop"``: a sample that cannot be read or detected is skipped with a
            warning; ``"raise"``: stop.
        engine: ``"local"``, ``"ray"`` (parts as Ray tasks, ``workers`` at a time) or
            ``"torchrun"`` (run the command under ``torchrun``: rank ``r`` of ``w`` embeds the
            parts ``p`` with ``p % w == r``, rank 0 finalizes after a barrier). Each task or rank
            writes its own part files, so the store must be on storage all of them can reach.
    """
    from anonloader.cache.precompute import load_source
    from anonloader.detect import load_detector
    from anonloader.identity.embedders import load_embedder

    if on_error not in ("drop", "raise"):
        raise ConfigError(f"on_error must be 'drop' or 'raise', got {on_error!r}")
    if engine not in ("local", "ray", "torchrun"):
        raise ConfigError(f"unknown engine {engine!r}; use 'local', 'ray' or 'torchrun'")
    if part_size < 1:
        raise ConfigError(f"part_size must be >= 1, got {part_size}")
    dataset = load_source(source)
    embedder = load_embedder(embedder)
    detector_obj = load_detector(detector)
    total = len(dataset) if limit is None else min(int(limit), len(dataset))
    meta = {
        "recognizer": embedder.config(),
        "crop_size": int(embedder.crop_size),
        "template": str(embedder.template),
        "margin": float(getattr(embedder, "margin", 0.0)),
        "source": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
        "detector": detector if isinstance(detector, str) else type(detector).__name__,
        "samples_total": total,
        "part_size": int(part_size),
    }
    store = EmbeddingStore.create(out, int(embedder.dim), meta)
    parts = (total + part_size - 1) // part_size
    done = store.done_parts()
    todo = [p for p in range(parts) if p not in done]
    logger.info("identity embed: %d parts, %d already done", parts, parts - len(todo))
    if engine == "ray":
        _embed_with_ray(dataset, store.path, todo, part_size, total, detector_obj, embedder, image_key, on_error, workers)
    elif engine == "torchrun":
        _embed_with_torchrun(dataset, store, todo, part_size, total, detector_obj, embedder, image_key, on_error, parts)
        return store
    elif engine == "local":
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=parts, initial=parts - len(todo), unit="part", desc="identity embed")
        for part in todo:
            indices = range(part * part_size, min((part + 1) * part_size, total))
            store.write_part(part, *_embed_part(dataset, indices, detector_obj, embedder, image_key, on_error))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    else:
        raise ConfigError(f"unknown engine {engine!r}; use 'local', 'ray' or 'torchrun'")
    store.finalize(parts)
    return store


def _embed_with_ray(dataset: Any, path: Path, todo: list[int], part_size: int, total: int, detector: Any, embedder: Any, image_key: Any, on_error: str, workers: int) -> None:
    try:
        import ray
    except ImportError as error:
        raise ConfigError("engine='ray' needs Ray: pip install 'anonloader[ray]'") from error
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)

    @ray.remote
    def run(part: int, dataset: Any, detector: Any, embedder: Any) -> int:
        indices = range(part * part_size, min((part + 1) * part_size, total))
        EmbeddingStore(path).write_part(part, *_embed_part(dataset, indices, detector, embedder, image_key, on_error))
        return part

    refs = [ray.put(x) for x in (dataset, detector, embedder)]
    pending: list[Any] = []
    for part in todo:
        if len(pending) >= max(1, workers):
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        pending.append(run.remote(part, *refs))
    ray.get(pending)


def _embed_with_torchrun(dataset: Any, store: EmbeddingStore, todo: list[int], part_size: int, total: int, detector: Any, embedder: Any, image_key: Any, on_error: str, parts: int) -> None:
    """This rank's parts (``p % world_size == rank``), a barrier, then rank 0 finalizes; the
    other ranks wait for it, so every rank returns a complete store."""
    import torch.distributed as dist

    from anonloader.integrations.torchrun_engine import process_group, rank_and_world_size

    rank, world_size = rank_and_world_size()
    with process_group():
        for part in todo:
            if part % world_size == rank:
                indices = range(part * part_size, min((part + 1) * part_size, total))
                store.write_part(part, *_embed_part(dataset, indices, detector, embedder, image_key, on_error))
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            store.finalize(parts)
        if world_size > 1:
            dist.barrier()
    if rank != 0:
        store.meta = EmbeddingStore(store.path).meta
