"""``precompute``: fill a cache once, so training jobs never run the pipeline.

Sources: a dataset object, a folder of images, a ``pkg.module:factory`` import path (called
with no arguments; must return a map-style dataset), or a Hugging Face datasets name / saved
dataset folder with a split.

Engines:

- ``"local"``: ``workers`` processes on this machine compute and encode; the calling process
  is the one writer and commits every batch in one transaction;
- ``"ray"``: Ray Data ``map_batches`` over an actor pool, one model per actor (GPU actors when
  GPUs exist); the driver writes (:mod:`anonloader.integrations.ray_engine`);
- ``"torchrun"``: each rank takes its share of the samples (:func:`shard_range`, a pure
  function of world size, rank and sample count) into its own shard LMDB; rank 0 writes the
  manifest (:mod:`anonloader.integrations.torchrun_engine`).

Resumable: samples whose record is already in the cache are skipped, so a killed run picks up
where its last commit left it and no committed sample is computed twice.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from anonloader.cache.codecs import Codec, get_codec
from anonloader.cache.keys import cache_key, derive_salt, salt_check
from anonloader.cache.store import DEFAULT_MAP_SIZE, AnonCache, SampleRecord, pack_entry
from anonloader.errors import CacheError, ConfigError, InputError

__all__ = ["ImageFolder", "PrecomputeReport", "SampleJob", "load_source", "precompute", "shard_range"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def shard_range(num_items: int, world_size: int, rank: int) -> range:
    """The contiguous block of item indices rank ``rank`` of ``world_size`` owns.

    Pure function of its arguments: blocks differ in size by at most one and cover
    ``range(num_items)`` exactly once over all ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursive, sorted by relative path).

    ``dataset[i]`` is ``{"image": 3,H,W uint8 tensor (RGB), "path": relative path}``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"{self.root} is not a folder of images")
        self.files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise ConfigError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        path = self.root / self.files[index]
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise InputError(f"cannot decode the image ({error}); remove or replace the file", index=index, source=str(path)) from error
        return {"image": image, "path": self.files[index]}


def _import_object(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {module_name!r} from {spec!r} ({error}); is it on PYTHONPATH?") from error
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{module_name!r} has no attribute {attribute!r} (from {spec!r})")
        value = getattr(value, part)
    return value


def load_source(source: Any, *, split: str | None = None) -> Any:
    """A map-style dataset from a dataset object, a folder, an import path or an HF dataset.

    Args:
        source: a dataset (``__getitem__`` + ``__len__``); a folder of images; a folder saved
            with ``datasets``' ``save_to_disk``; ``"pkg.module:factory"`` (called with no
            arguments); or a Hugging Face datasets name.
        split: the split of a Hugging Face dataset (default ``"train"``).
    """
    if not isinstance(source, (str, os.PathLike)):
        if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            raise ConfigError(
                f"precompute needs a map-style dataset (with __getitem__ and __len__), got {type(source).__name__}"
            )
        return source
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split or "train"]
            return loaded
        return ImageFolder(path)
    if ":" in text and not text.startswith(("hf:", "/")):
        factory = _import_object(text)
        dataset = factory() if callable(factory) else factory
        return load_source(dataset)
    if path.suffix or text.startswith(("./", "../", "~")):
        raise ConfigError(f"precompute source {text!r} does not exist")
    import datasets

    name = text.removeprefix("hf:")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; name the source
        raise ConfigError(f"cannot load the Hugging Face dataset {name!r} split {split or 'train'!r}: {error}") from error


@dataclass
class SampleJob:
    """Everything a worker needs to turn sample indices into packed cache values (picklable).

    Attributes:
        dataset: the source (map-style).
        stage: the pipeline stage (``process(index, images, labels, detections)``).
        fingerprint: the pipeline fingerprint (hex).
        salt: key salt derived from the secret (never the secret).
        codec: how images are encoded.
        entry_meta: fields stored with every entry.
        image_keys, annotations, identity_label: as in :func:`anonloader.anonymize`.
    """

    dataset: Any
    stage: Any
    fingerprint: str
    salt: bytes
    codec: Codec
    entry_meta: dict[str, Any]
    image_keys: Sequence[Hashable] | None = None
    annotations: Callable[[Any], Any] | None = None
    identity_label: Callable[[Any], Any] | None = None

    def compute(self, index: int) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """``(index, [(key, packed entry)], packed sample record, dropped)`` of sample ``index``."""
        from anonloader.cache.stage import content_with_conditions
        from anonloader.data.dataset import prepare_sample

        prepared = prepare_sample(self.dataset[index], index, self.image_keys, self.annotations, self.identity_label)
        images, skeleton, labels, detections = prepared.images, prepared.skeleton, prepared.labels, prepared.detections
        keys = [
            cache_key(
                content_with_conditions(image, None if labels is None else labels[i], None if detections is None else detections[i]),
                self.fingerprint,
                self.salt,
            )
            for i, image in enumerate(images)
        ]
        processed = self.stage.process(index, images, labels, detections)
        entries = [
            (key, pack_entry(p.image, p.records, self.codec, self.entry_meta, p.error))
            for key, p in zip(keys, processed, strict=True)
        ]
        record = SampleRecord(skeleton, keys, [s.alpha for s in images])
        return index, entries, record.pack(), any(p.image is None for p in processed)

    def compute_many(self, indices: Sequence[int]) -> list[tuple[int, list[tuple[bytes, bytes]], bytes, bool]]:
        return [self.compute(i) for i in indices]


@dataclass
class PrecomputeReport:
    """What a precompute run did."""

    cache_path: str
    total: int
    skipped: int = 0
    computed: int = 0
    dropped: int = 0
    seconds: float = 0.0
    engine: str = "local"
    shards: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


_WORKER_JOB: SampleJob | None = None


def _init_worker(job: SampleJob, threads: int) -> None:
    global _WORKER_JOB
    torch.set_num_threads(threads)
    _WORKER_JOB = job


def _worker_compute(indices: Sequence[int]) -> list[tuple[int, list[tuple[bytes, bytes]], bytes, bool]]:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.compute_many(indices)


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def write_results(cache: AnonCache, results: Iterable[tuple[int, list[tuple[bytes, bytes]], bytes, bool]], report: PrecomputeReport) -> None:
    """Commits computed samples (entries first, then their sample records) in one transaction."""
    results = list(results)
    entries = [pair for _, pairs, _, _ in results for pair in pairs]
    samples = [(index, record) for index, _, record, _ in results]
    cache.write_encoded(entries, samples)
    report.computed += len(results)
    report.dropped += sum(1 for *_, dropped in results if dropped)


def run_local(
    job: SampleJob,
    cache: AnonCache,
    pending: Sequence[int],
    report: PrecomputeReport,
    *,
    workers: int = 1,
    batch_size: int = 8,
    progress: Any = None,
) -> None:
    """Computes ``pending`` samples with ``workers`` processes; this process writes."""
    if workers <= 1 or len(pending) <= batch_size:
        for chunk in _chunks(pending, batch_size):
            write_results(cache, job.compute_many(chunk), report)
            if progress is not None:
                progress.update(len(chunk))
        return
    cache.close()  # nothing LMDB stays open across the fork
    threads = max(1, torch.get_num_threads() // workers)
    context = mp.get_context("fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(job, threads)) as pool:
        for results in pool.imap_unordered(_worker_compute, _chunks(pending, batch_size)):
            write_results(cache, results, report)
            if progress is not None:
                progress.update(len(results))


def build_job(
    dataset: Any,
    anonymizer: Any,
    cache_path: Path,
    *,
    secret: str | bytes | None,
    codec: Codec,
    image_keys: Sequence[Hashable] | None,
    annotations: Callable[[Any], Any] | None,
    identity_label: Callable[[Any], Any] | None,
) -> SampleJob:
    from anonloader import __version__
    from anonloader.data.stage import PipelineStage

    stage = PipelineStage(anonymizer)
    fingerprint = stage.fingerprint()
    return SampleJob(
        dataset=dataset,
        stage=stage,
        fingerprint=fingerprint,
        salt=derive_salt(secret),
        codec=codec,
        entry_meta={"fingerprint": fingerprint, "anonloader_version": __version__, "method": anonymizer.method.name},
        image_keys=image_keys,
        annotations=annotations,
        identity_label=identity_label,
    )


def open_for_job(job: SampleJob, path: Path, *, map_size: int = DEFAULT_MAP_SIZE) -> AnonCache:
    """The writable cache at ``path`` for ``job`` (checks fingerprint and secret)."""
    cache = AnonCache(
        path,
        writable=True,
        fingerprint=job.fingerprint,
        salt_check=salt_check(job.salt),
        codec=job.codec,
        method=job.entry_meta.get("method"),
        map_size=map_size,
    )
    cache.set_source_size(len(job.dataset))
    return cache


def fill_cache(
    job: SampleJob,
    cache: AnonCache,
    indices: Sequence[int],
    report: PrecomputeReport,
    *,
    workers: int,
    batch_size: int,
    progress: bool,
    description: str = "precompute",
) -> None:
    """Computes every index of ``indices`` not yet in ``cache`` (resume), with a progress bar."""
    from tqdm.auto import tqdm

    done = set(cache.sample_indices())
    pending = [i for i in indices if i not in done]
    report.skipped += len(indices) - len(pending)
    if report.skipped:
        logger.info("%s: %d of %d samples already in %s, resuming", description, report.skipped, len(indices), cache.path)
    with tqdm(total=len(indices), initial=len(indices) - len(pending), desc=description, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        run_local(job, cache, pending, report, workers=workers, batch_size=batch_size, progress=bar)


def precompute(
    source: Any,
    cache_path: str | os.PathLike[str],
    anonymizer: Any = None,
    *,
    split: str | None = None,
    image_key: Hashable | Sequence[Hashable] | None = None,
    annotations: Callable[[Any], Any] | None = None,
    identity_label: Callable[[Any], Any] | None = None,
    secret: str | bytes | None = None,
    codec: str | Codec = "png",
    workers: int = 1,
    engine: str = "local",
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    map_size: int = DEFAULT_MAP_SIZE,
    **anonymizer_kwargs: Any,
) -> PrecomputeReport:
    """Anonymizes every sample of ``source`` into the cache at ``cache_path``.

    Args:
        source: a dataset, folder, ``pkg.module:factory`` or HF dataset (see :func:`load_source`).
        cache_path: where the cache goes (one LMDB; with ``engine="torchrun"`` a folder of
            shards and a manifest).
        anonymizer: an :class:`~anonloader.pipeline.Anonymizer`, or ``None`` to build one from
            ``anonymizer_kwargs`` (``method=``, ``detector=``, ...).
        split: the split of a Hugging Face dataset.
        image_key, annotations, identity_label: as in :func:`anonloader.anonymize`.
        secret: salts the keys (and must match the identity mapping's secret); never stored.
        codec: ``"png"`` (default, lossless), ``"webp"``, ``"jpeg[:quality]"`` or ``"raw"``.
        workers: processes on this machine (``"local"``), or actors (``"ray"``).
        engine: ``"local"``, ``"ray"`` or ``"torchrun"``.
        batch_size: samples per commit (and per Ray batch).
        limit: only the first ``limit`` samples.
        progress: show a progress bar with rate and ETA.
        map_size: initial LMDB map size in bytes (it grows when full).

    Returns:
        A :class:`PrecomputeReport`; ``AnonCache(cache_path).as_dataset()`` then yields the
        anonymized samples in the source's order.
    """
    from anonloader.pipeline import Anonymizer

    if engine not in ("local", "ray", "torchrun"):
        raise ConfigError(f"engine must be 'local', 'ray' or 'torchrun', got {engine!r}")
    if workers < 1 or batch_size < 1:
        raise ConfigError(f"workers and batch_size must be >= 1, got {workers} and {batch_size}")
    if anonymizer is None:
        if annotations is not None:
            anonymizer_kwargs.setdefault("detector", None)
        anonymizer = Anonymizer(**anonymizer_kwargs)
    elif anonymizer_kwargs:
        raise ConfigError(f"options {sorted(anonymizer_kwargs)} given with a ready Anonymizer")
    if anonymizer.detector is None and annotations is None:
        raise ConfigError("detector=None needs annotations=f(sample) giving the faces of each sample")
    dataset = load_source(source, split=split)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    keys = None if image_key is None else ([image_key] if isinstance(image_key, (str, int)) else list(image_key))
    cache_path = Path(cache_path).expanduser()
    job = build_job(
        dataset, anonymizer, cache_path, secret=secret, codec=get_codec(codec),
        image_keys=keys, annotations=annotations, identity_label=identity_label,
    )
    report = PrecomputeReport(str(cache_path), total=len(dataset), engine=engine)
    start = time.perf_counter()
    if engine == "torchrun":
        from anonloader.integrations.torchrun_engine import run_torchrun

        run_torchrun(job, cache_path, report, workers=workers, batch_size=batch_size, progress=progress, map_size=map_size)
    elif engine == "ray":
        from anonloader.integrations.ray_engine import run_ray

        cache = open_for_job(job, cache_path, map_size=map_size)
        try:
            run_ray(job, cache, report, actors=workers, batch_size=batch_size, progress=progress)
        finally:
            cache.close()
    else:
        if (cache_path / "manifest.json").is_file():
            raise CacheError(f"{cache_path} is a sharded cache; resume it with the engine that made it (torchrun)")
        cache = open_for_job(job, cache_path, map_size=map_size)
        try:
            fill_cache(job, cache, range(len(dataset)), report, workers=workers, batch_size=batch_size, progress=progress)
        finally:
            cache.close()
    report.seconds = time.perf_counter() - start
    return report
