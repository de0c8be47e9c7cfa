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

Recovery keys (a method with ``anonymize_with_keys`` built ``recoverable=True``: Diff-Privacy):
``key_password=`` (or ``key_password_file=``, or ``$ANONLOADER_KEY_PASSWORD``) derives the key
once in this process (:class:`~anonloader.methods.diffprivacy.store.RecoveryKeyStore`, its own
LMDB ``<cache>/recovery.lmdb``); workers get only the derived cipher and encrypt each face's key
(under the cache entry's key, hex) before it leaves them; the writer stores an entry's keys in
the key store just before the commit that stores the entry. Training reads never open the key
store. Without a password such a method is refused (build it with ``recoverable=False`` to
write no keys). Every engine writes keys:

- ``"local"``: forked workers get the job with the derived cipher; the writer stores the sealed
  blobs they return;
- ``"ray"``: the driver derives the key and its store ``<cache>/recovery.lmdb``; actors get the
  derived cipher in the job (like the cache's derived subkeys) and return each sample's sealed
  blobs as msgpack bytes beside its result; the driver authenticates every blob (AES-GCM, bound
  to the entry and face) before it stores it with the entry;
- ``"torchrun"``: only rank 0 reads the password; it derives the key and sends the 32-byte
  derived key (with the public Argon2id salt and costs) to the other ranks over the process
  group, as raw bytes in a tensor (no pickle); each rank writes its shard's keys into
  ``<shard>/recovery.lmdb``, all under the same derivation, so ``anonloader cache merge``
  copies them into one store the password opens, and ``anonloader cache recover`` reads them
  from the sample's shard. The process group carries the derived key in the clear (gloo and
  NCCL do not encrypt): run it on a network you trust with the cache's own subkeys.
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
from anonloader.cache.format import (
    EntryRecord,
    FailureRecord,
    SampleRecord,
    Sealer,
    StoredImage,
    image_status,
    pack_result,
    unpack_result,
)
from anonloader.cache.keys import CacheKeys, cache_key
from anonloader.cache.store import DEFAULT_MAP_SIZE, AnonCache
from anonloader.errors import AnonloaderError, CacheError, ConfigError, ImageDecodeError, InputError, UnsupportedImageError

__all__ = ["ImageFolder", "PrecomputeReport", "SampleJob", "load_source", "precompute", "shard_range"]

logger = logging.getLogger(__name__)

#: file suffixes the folder source lists, when Pillow can decode them (see :func:`_decodable_suffixes`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".tga")


def _decodable_suffixes() -> tuple[str, ...]:
    """The suffixes of :data:`IMAGE_SUFFIXES` that this Pillow build can open."""
    from PIL import Image

    Image.init()
    registered = Image.registered_extensions()
    return tuple(s for s in IMAGE_SUFFIXES if registered.get(s) in Image.OPEN)


def shard_range(num_items: int, world_size: int, rank: int) -> range:
    """The contiguous block of item indices rank ``rank`` of ``world_size`` owns.

    Pure function of its arguments: blocks differ in size by at most one and cover
    ``range(num_items)`` exactly once over all ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


class ImageFolder(Dataset):
    """Every image file under ``root`` that Pillow can decode (recursive, sorted by relative path).

    ``dataset[i]`` is ``{"image": 3,H,W uint8 tensor (RGB, values 0-255), "path": relative
    path}``. Files larger than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (decompression bombs),
    corrupt files and 16-bit files raise named errors (:class:`ImageDecodeError`,
    :class:`UnsupportedImageError`), which ``precompute`` records per sample under
    ``on_error="drop"`` / ``"obscure"``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"{self.root} is not a folder of images")
        suffixes = _decodable_suffixes()
        self.files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in suffixes
        )
        if not self.files:
            raise ConfigError(f"no image files ({', '.join(suffixes)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import warnings

        import numpy as np
        from PIL import Image, UnidentifiedImageError

        path = self.root / self.files[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    if opened.mode.startswith("I;16") or opened.mode in ("I", "F"):
                        raise UnsupportedImageError(
                            f"{opened.mode} (16-bit or float) image: the cache stores 8 bits per channel; convert the "
                            "file to 8 bits, or load it through your own dataset and decide there",
                            index=index, source=str(path),
                        )
                    array = np.asarray(opened.convert("RGB"))
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UnsupportedImageError(
                f"larger than PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS} pixels): refused as a possible "
                f"decompression bomb ({error}); raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
                index=index, source=str(path),
            ) from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageDecodeError(f"cannot decode the image ({error}); remove or replace the file", index=index, source=str(path)) from error
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return {"image": image, "path": self.files[index]}


def source_path(dataset: Any, index: int) -> str | None:
    """The file sample ``index`` of ``dataset`` comes from, when the source is a folder."""
    while isinstance(dataset, torch.utils.data.Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    if isinstance(dataset, ImageFolder):
        return str(dataset.root / dataset.files[index])
    return None


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
    """Everything a worker needs to turn sample indices into sealed cache values (picklable).

    Attributes:
        dataset: the source (map-style).
        stage: the pipeline stage (:class:`~anonloader.data.stage.PipelineStage`).
        fingerprint: the pipeline fingerprint (hex).
        keys: the subkeys derived from the secret (key salt, MAC key) — never the secret.
        codec: how images are encoded.
        entry_meta: fields stored with every entry.
        on_error: the pipeline's fail-closed policy; with ``"drop"`` or ``"obscure"`` a sample
            that cannot be read is recorded as a failure and the run goes on.
        image_keys, annotations, identity_label: as in :func:`anonloader.anonymize`.
    """

    dataset: Any
    stage: Any
    fingerprint: str
    keys: CacheKeys
    codec: Codec
    entry_meta: dict[str, Any]
    on_error: str = "obscure"
    image_keys: Sequence[Hashable] | None = None
    annotations: Callable[[Any], Any] | None = None
    identity_label: Callable[[Any], Any] | None = None
    #: the derived recovery-key cipher (a ``KeyCipher``, never the password), when keys are written
    key_cipher: Any = None

    def _failed_input(self, sealer: Sealer, index: int, error: Exception) -> bytes:
        if self.on_error == "raise":
            raise error
        reason = f"{type(error).__name__}: {error}"
        path = source_path(self.dataset, index) or getattr(error, "source", None)
        logger.warning("precompute: sample %d%s failed and is recorded as a failure (on_error=%r): %s",
                       index, f" ({path})" if path else "", self.on_error, reason)
        failure = FailureRecord(index, path, reason, "input")
        sample = SampleRecord(None, [], [], None, failure=reason)
        return pack_result(index, [], sample.pack(sealer, index), failure.pack(sealer), dropped=True, failed=True)

    def compute(self, index: int) -> bytes:
        """Sample ``index`` as :func:`~anonloader.cache.format.pack_result` bytes: its sealed
        entries, sample record and failure record (plain msgpack, no pickle)."""
        return self.compute_with_keys(index)[0]

    def _process(self, index: int, images: Sequence[Any], labels: Any, detections: Any) -> tuple[list[Any], list[list[Any]]]:
        """The stage's output, plus each image's recovery keys when the job writes keys."""
        return self.stage.process_with_keys(index, images, labels, detections, want_keys=self.key_cipher is not None)

    def compute_with_keys(self, index: int) -> tuple[bytes, list[tuple[str, list[bytes]]]]:
        """:meth:`compute`, plus ``(entry key hex, encrypted face keys)`` of every image with
        recovery keys (empty unless the job writes keys)."""
        from PIL import Image

        from anonloader.cache.stage import content_with_conditions
        from anonloader.data.dataset import prepare_sample

        sealer = Sealer(self.keys.mac_key)
        try:
            sample = self.dataset[index]
            prepared = prepare_sample(sample, index, self.image_keys, self.annotations, self.identity_label)
        except AnonloaderError as error:
            return self._failed_input(sealer, index, error), []
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            wrapped = InputError(f"the dataset could not produce the sample ({type(error).__name__}: {error})",
                                 index=index, source=source_path(self.dataset, index))
            wrapped.__cause__ = error
            return self._failed_input(sealer, index, wrapped), []
        images, skeleton, labels, detections = prepared.images, prepared.skeleton, prepared.labels, prepared.detections
        keys = [
            cache_key(
                content_with_conditions(image, None if labels is None else labels[i], None if detections is None else detections[i]),
                self.fingerprint,
                self.keys.salt,
            )
            for i, image in enumerate(images)
        ]
        processed, face_keys = self._process(index, images, labels, detections)
        sealed: list[tuple[str, list[bytes]]] = []
        if self.key_cipher is not None:
            from anonloader.methods.diffprivacy.store import RecoveryKeyStore

            feather = float(getattr(self.stage.anonymizer, "feather", 0.0))
            for key, p, image_keys in zip(keys, processed, face_keys, strict=True):
                if p.image is not None and p.error is None and image_keys:
                    affines = torch.stack([k.affine for k in image_keys])
                    sealed.append((key.hex(), RecoveryKeyStore.seal_entry(self.key_cipher, key.hex(), [k.key for k in image_keys], affines, feather)))
        stored, entries = [], []
        for slot, (key, p) in enumerate(zip(keys, processed, strict=True)):
            payload = b"" if p.image is None else self.codec.encode(p.image)
            stored.append(StoredImage(image_status(p.image, p.error), p.error, None if p.image is None else self.codec.name, payload))
            entry = EntryRecord.build(p.image, p.records, self.codec, self.entry_meta, p.error, ref=(index, slot))
            entries.append((key, entry.pack(sealer, key)))
        try:
            record = SampleRecord(skeleton, keys, stored, [s.alpha for s in images]).pack(sealer, index)
        except InputError as error:  # a field of a type the cache cannot store
            return self._failed_input(sealer, index, error), []
        errors = [f"image {slot}: {p.error}" for slot, p in enumerate(processed) if p.error is not None]
        failure = None
        if errors:
            path = source_path(self.dataset, index)
            failure = FailureRecord(index, path, "; ".join(errors), "image").pack(sealer)
        dropped = any(p.image is None for p in processed)
        return pack_result(index, entries, record, failure, dropped, bool(errors)), sealed

    def compute_many(self, indices: Sequence[int]) -> list[Any]:
        """``compute`` of each index; with recovery keys, ``compute_with_keys`` of each."""
        if self.key_cipher is None:
            return [self.compute(i) for i in indices]
        return [self.compute_with_keys(i) for i in indices]


@dataclass
class PrecomputeReport:
    """What a precompute run did."""

    cache_path: str
    total: int
    skipped: int = 0
    computed: int = 0
    dropped: int = 0
    failed: int = 0
    seconds: float = 0.0
    engine: str = "local"
    shards: list[str] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


_WORKER_JOB: SampleJob | None = None


def _init_worker(job: SampleJob, threads: int) -> None:
    global _WORKER_JOB
    torch.set_num_threads(threads)
    _WORKER_JOB = job


def _worker_compute(indices: Sequence[int]) -> list[bytes]:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.compute_many(indices)


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def write_results(cache: AnonCache, results: Iterable[Any], report: PrecomputeReport, keystore: Any = None) -> None:
    """Commits computed samples (:func:`~anonloader.cache.format.pack_result` bytes) in one
    transaction: entries, sample records, failure records; a sample that now succeeded has its
    old failure record removed. Results with recovery keys (``(bytes, sealed keys)`` pairs) have
    their keys stored in ``keystore`` first, so no committed entry lacks its keys."""
    entries: list[tuple[bytes, bytes]] = []
    samples: list[tuple[int, bytes]] = []
    failures: list[tuple[int, bytes]] = []
    resolved: list[int] = []
    sealed: list[tuple[str, list[bytes]]] = []
    count = 0
    for item in results:
        packed, item_keys = item if isinstance(item, tuple) else (item, [])
        sealed.extend(item_keys)
        index, pairs, sample, failure, dropped, failed = unpack_result(packed)
        count += 1
        entries.extend(pairs)
        if sample is not None:
            samples.append((index, sample))
        if failure is not None:
            failures.append((index, failure))
            report.failures.append(FailureRecord.unpack(cache.sealer, index, failure, f"failure record of sample {index}"))
        else:
            resolved.append(index)
        report.dropped += int(dropped)
        report.failed += int(failed)
    if sealed:
        if keystore is None:
            raise CacheError("computed recovery keys but no key store to write them to")
        keystore.put_sealed(sealed)
    cache.write_encoded(entries, samples, failures, resolved)
    report.computed += count


def run_local(
    job: SampleJob,
    cache: AnonCache,
    pending: Sequence[int],
    report: PrecomputeReport,
    *,
    workers: int = 1,
    batch_size: int = 8,
    progress: Any = None,
    keystore: Any = None,
) -> None:
    """Computes ``pending`` samples with ``workers`` processes; this process writes (and stores
    recovery keys in ``keystore``)."""
    if workers <= 1 or len(pending) <= batch_size:
        for chunk in _chunks(pending, batch_size):
            write_results(cache, job.compute_many(chunk), report, keystore)
            if progress is not None:
                progress.update(len(chunk))
        return
    cache.close()  # nothing LMDB stays open across the fork
    if keystore is not None:
        keystore.close()
    threads = max(1, torch.get_num_threads() // workers)
    context = mp.get_context("fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(job, threads)) as pool:
        for results in pool.imap_unordered(_worker_compute, _chunks(pending, batch_size)):
            write_results(cache, results, report, keystore)
            if progress is not None:
                progress.update(len(results))


def build_job(
    dataset: Any,
    anonymizer: Any,
    cache_path: Path,
    *,
    secret: Any,
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
        keys=CacheKeys.from_secret(secret),
        codec=codec,
        entry_meta={"fingerprint": fingerprint, "anonloader_version": __version__, "method": anonymizer.method.name},
        on_error=getattr(anonymizer, "on_error", "obscure"),
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
        secret=job.keys if job.keys.keyed else None,
        codec=job.codec,
        method=job.entry_meta.get("method"),
        map_size=map_size,
    )
    cache.set_source_size(len(job.dataset))
    return cache


def pending_indices(cache: AnonCache, indices: Iterable[int]) -> list[int]:
    """The indices a (resumed) run computes: not stored yet, or stored with a recorded failure."""
    done = set(cache.sample_indices()) - set(cache.failed_indices())
    return [i for i in indices if i not in done]


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
    keystore: Any = None,
) -> None:
    """Computes every index of ``indices`` not yet in ``cache``, and retries every recorded
    failure (resume), with a progress bar."""
    from tqdm.auto import tqdm

    pending = pending_indices(cache, indices)
    report.skipped += len(indices) - len(pending)
    if report.skipped:
        logger.info("%s: %d of %d samples already in %s, resuming", description, report.skipped, len(indices), cache.path)
    with tqdm(total=len(indices), initial=len(indices) - len(pending), desc=description, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        run_local(job, cache, pending, report, workers=workers, batch_size=batch_size, progress=bar, keystore=keystore)


def _key_secret(recoverable: bool, method: str, key_password: Any, key_password_file: Any, *, read: bool = True) -> Any:
    """The recovery-key password as a ``Secret`` when the method writes keys (``None`` otherwise).

    ``read=False`` (torchrun ranks other than 0) checks only that a source of the password is
    named, so every rank fails alike without one, and reads nothing (returns ``None``)."""
    if not recoverable:
        if key_password is not None or key_password_file is not None:
            raise ConfigError(
                f"key_password was given but method {method!r} writes no recovery keys (it needs anonymize_with_keys "
                "and recoverable=True); drop the password, or use method='diffprivacy'"
            )
        return None
    from anonloader.errors import SecretError
    from anonloader.methods.diffprivacy.crypto import ENV_VARIABLE, Secret

    if not read:
        if key_password is None and key_password_file is None and not os.environ.get(ENV_VARIABLE):
            raise ConfigError(
                f"method {method!r} is recoverable: its recovery keys need a password (key_password=, key_password_file= "
                "or $ANONLOADER_KEY_PASSWORD; CLI --key-password-file); or build the method with recoverable=False to write none"
            )
        return None
    try:
        return Secret.from_sources(key_password, key_password_file)
    except SecretError as error:
        if key_password is None and key_password_file is None:
            raise ConfigError(
                f"method {method!r} is recoverable: its recovery keys need a password (key_password=, key_password_file= "
                "or $ANONLOADER_KEY_PASSWORD; CLI --key-password-file); or build the method with recoverable=False to write none"
            ) from None
        raise error from None


def precompute(
    source: Any,
    cache_path: str | os.PathLike[str],
    anonymizer: Any = None,
    *,
    split: str | None = None,
    image_key: Hashable | Sequence[Hashable] | None = None,
    annotations: Callable[[Any], Any] | None = None,
    identity_label: Callable[[Any], Any] | None = None,
    secret: Any = None,
    codec: str | Codec | None = None,
    workers: int = 1,
    engine: str = "local",
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    map_size: int = DEFAULT_MAP_SIZE,
    key_password: Any = None,
    key_password_file: str | os.PathLike[str] | None = None,
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
        secret: salts the keys and authenticates every stored value (HMAC-SHA256 under a
            derived key); only derived subkeys reach workers, nothing of it is stored. Without
            one the cache is unsalted (a warning says what that allows).
        codec: ``"raw"`` (default, lossless, the fastest to read), ``"lz4"`` (10% smaller on photos),
            ``"zstd"``, ``"raw"``, ``"qoi"``, ``"png"``, ``"webp"`` or ``"jpeg[:quality]"``.
        workers: processes on this machine (``"local"``), or actors (``"ray"``).
        engine: ``"local"``, ``"ray"`` or ``"torchrun"``.
        batch_size: samples per commit (and per Ray batch).
        limit: only the first ``limit`` samples.
        progress: show a progress bar with rate and ETA.
        map_size: initial LMDB map size in bytes (it grows when full).
        key_password, key_password_file: the password of the recovery keys (or
            ``$ANONLOADER_KEY_PASSWORD``), needed by a recoverable method (Diff-Privacy with
            ``recoverable=True``, its default; see the module docstring). It is used once to
            derive the key and is never stored, logged or passed to workers.

    Raises:
        ConfigError: a recoverable method without a password, or a password with a method
            that writes no keys.
        SecretError: the password does not open the cache's existing key store (torchrun:
            rank 0's; the other ranks stop with a :class:`CacheError` naming rank 0).

    Returns:
        A :class:`PrecomputeReport`; ``AnonCache(cache_path).as_dataset()`` then yields the
        anonymized samples in the source's order.

    Failures: with the pipeline's ``on_error="drop"`` or ``"obscure"``, a sample that cannot be
    read (corrupt file, decompression bomb, unsupported image) is recorded as a failure (index,
    path, reason; ``AnonCache.failures()``, ``anonloader cache stats``) and served as dropped
    (``None``); an image the pipeline failed on is stored with its reason and its fail-closed
    output. Either way the run completes, and running ``precompute`` again retries every
    recorded failure. ``on_error="raise"`` stops at the first one (committed batches stay).
    """
    from anonloader.pipeline import Anonymizer

    if engine not in ("local", "ray", "torchrun"):
        raise ConfigError(f"engine must be 'local', 'ray' or 'torchrun', got {engine!r}")
    if workers < 1 or batch_size < 1:
        raise ConfigError(f"workers and batch_size must be >= 1, got {workers} and {batch_size}")
    if anonymizer is None:
        if annotations is not None:
            anonymizer_kwargs.setdefault("detector", None)
        anonymizer = Anonymizer(secret=secret, **anonymizer_kwargs)
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
    recoverable = callable(getattr(anonymizer.method, "anonymize_with_keys", None)) and bool(getattr(anonymizer.method, "recoverable", False))
    method_name = anonymizer.method.name
    report = PrecomputeReport(str(cache_path), total=len(dataset), engine=engine)
    start = time.perf_counter()
    if engine == "torchrun":
        from anonloader.integrations.torchrun_engine import rank_and_world_size, run_torchrun

        # every rank checks that a password is named; only rank 0 reads it, inside the process
        # group (so a bad password file stops every rank instead of leaving them waiting)
        _key_secret(recoverable, method_name, key_password, key_password_file, read=False)
        read_password = None
        if recoverable and rank_and_world_size()[0] == 0:

            def read_password() -> Any:
                return _key_secret(True, method_name, key_password, key_password_file)

        run_torchrun(job, cache_path, report, workers=workers, batch_size=batch_size, progress=progress, map_size=map_size,
                     recovery_keys=recoverable, read_password=read_password)
        report.seconds = time.perf_counter() - start
        return report
    password = _key_secret(recoverable, method_name, key_password, key_password_file)
    if engine == "local" and (cache_path / "manifest.json").is_file():
        raise CacheError(f"{cache_path} is a sharded cache; resume it with the engine that made it (torchrun)")
    cache = open_for_job(job, cache_path, map_size=map_size)
    keystore = None
    try:
        if password is not None:
            from anonloader.methods.diffprivacy.store import RecoveryKeyStore

            keystore = RecoveryKeyStore.create(cache_path, password, fingerprint=job.fingerprint, map_size=map_size)
            job.key_cipher = keystore.cipher
        del password
        if engine == "ray":
            from anonloader.integrations.ray_engine import run_ray

            run_ray(job, cache, report, actors=workers, batch_size=batch_size, progress=progress, keystore=keystore)
        else:
            fill_cache(job, cache, range(len(dataset)), report, workers=workers, batch_size=batch_size, progress=progress, keystore=keystore)
    finally:
        job.key_cipher = None
        cache.close()
        if keystore is not None:
            keystore.close()
    report.seconds = time.perf_counter() - start
    return report
