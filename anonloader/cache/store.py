"""``AnonCache``: the content-addressed store of anonymized images, on LMDB.

Layout of one LMDB environment (a folder with ``data.mdb``), three named databases:

- ``entries``: 16-byte key (see :mod:`anonloader.cache.keys`) -> one anonymized image;
- ``samples``: 8-byte big-endian sample index -> the sample's non-image fields (the picklable
  skeleton from ``split_sample``) and the keys of its images, so ``as_dataset()`` rebuilds
  whole samples in the source's order without touching an original image;
- ``meta``: the cache's fingerprint, salt check, codec, anonloader version, method name,
  source size.

Every stored value is ``magic(4) | xxh3-64 checksum(8) | body``; a value whose checksum does
not match is never served (:class:`~anonloader.errors.CacheCorruptError`). An entry body is
``codec id(1) | meta length(4) | meta JSON | image bytes`` with the face boxes, synthetic ids,
fingerprint, anonloader version and method name in its meta.

Processes: nothing is opened in ``__init__`` (DataLoader workers fork); each process opens its
own environment on first use. Readers open read-only and lock-free; a writable cache writes in
one transaction per batch, so a process killed mid-write loses nothing it committed, and the
map doubles whenever LMDB reports it full.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import torch
import xxhash

from anonloader import __version__
from anonloader.cache.codecs import Codec, get_codec
from anonloader.cache.manifest import resolve_cache_path
from anonloader.errors import CacheCorruptError, CacheError, CacheFingerprintError, CacheMissError
from anonloader.fingerprint import CACHE_FORMAT_VERSION
from anonloader.types import FaceRecord

__all__ = ["AnonCache", "CacheEntry", "CachedDataset", "SampleRecord", "VerifyReport", "pack_entry", "unpack_entry"]

ENTRY_MAGIC = b"ALE1"
SAMPLE_MAGIC = b"ALS1"
_CHECKSUM = struct.Struct("<Q")
_ENTRY_HEAD = struct.Struct("<BI")
_INDEX = struct.Struct(">Q")
_DATABASES = (b"entries", b"samples", b"meta")
#: codec ids as stored in entry bodies; 0 marks a dropped image (no pixels).
_CODEC_IDS = {"none": 0, "png": 1, "webp": 2, "jpeg": 3, "raw": 4}
_CODEC_NAMES = {v: k for k, v in _CODEC_IDS.items()}
DEFAULT_MAP_SIZE = 1 << 30


def _checksum(body: bytes | memoryview) -> bytes:
    return _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _seal(magic: bytes, body: bytes) -> bytes:
    return magic + _checksum(body) + body


def _open_seal(magic: bytes, value: bytes | memoryview, what: str) -> memoryview:
    view = memoryview(value)
    if len(view) < 12 or bytes(view[:4]) != magic:
        raise CacheCorruptError(f"{what}: not an anonloader cache value (bad header); run anonloader cache verify")
    body = view[12:]
    if bytes(view[4:12]) != _checksum(body):
        raise CacheCorruptError(
            f"{what}: checksum mismatch, the stored bytes are corrupt; it is never served "
            "(read-through mode recomputes it; otherwise run anonloader precompute again)"
        )
    return body


def _records_from_meta(meta: dict[str, Any]) -> list[FaceRecord]:
    records = []
    for r in meta.get("records", []):
        records.append(
            FaceRecord(
                box=tuple(r["box"]),
                landmarks=tuple(tuple(p) for p in r["landmarks"]),
                score=r["score"],
                status=r["status"],
                synthetic_id=r.get("synthetic_id"),
                error=r.get("error"),
            )
        )
    return records


@dataclass
class CacheEntry:
    """One stored anonymized image.

    Attributes:
        codec: codec name, or ``"none"`` for an image the pipeline dropped.
        payload: the encoded image bytes (empty when dropped).
        meta: face records, fingerprint, anonloader version, method name, shape.
    """

    codec: str
    payload: bytes
    meta: dict[str, Any]

    @property
    def dropped(self) -> bool:
        return self.codec == "none"

    def image_uint8(self) -> torch.Tensor | None:
        """The image as ``3,H,W uint8``, or ``None`` when it was dropped."""
        if self.dropped:
            return None
        return get_codec(self.codec).decode(self.payload)

    def image(self) -> torch.Tensor | None:
        """The image as ``3,H,W float32 in [0,1]`` (multiples of 1/255), or ``None`` if dropped."""
        pixels = self.image_uint8()
        return None if pixels is None else pixels.float().div_(255.0)

    def records(self) -> list[FaceRecord]:
        """The :class:`FaceRecord` of every face found in the source image."""
        return _records_from_meta(self.meta)


def pack_entry(
    image: torch.Tensor | None,
    records: Sequence[FaceRecord],
    codec: Codec,
    meta: dict[str, Any],
    error: str | None = None,
) -> bytes:
    """The stored bytes of one anonymized image.

    Args:
        image: ``3,H,W float in [0,1]`` (quantized to k/255), or ``None`` when dropped.
        records: the faces of the image.
        codec: how to encode the pixels.
        meta: fields stored with it (fingerprint, anonloader version, method name).
        error: why the pipeline failed on the image, when it did.
    """
    full = dict(meta)
    full["records"] = [r.to_dict() for r in records]
    full["error"] = error
    if image is None:
        codec_name, payload = "none", b""
    else:
        codec_name, payload = codec.name, codec.encode(image)
        full["shape"] = list(image.shape)
    meta_bytes = json.dumps(full, sort_keys=True, separators=(",", ":")).encode()
    body = _ENTRY_HEAD.pack(_CODEC_IDS[codec_name], len(meta_bytes)) + meta_bytes + payload
    return _seal(ENTRY_MAGIC, body)


def unpack_entry(value: bytes | memoryview, what: str = "cache entry") -> CacheEntry:
    """Checks and splits stored entry bytes. Raises :class:`CacheCorruptError` when corrupt."""
    body = _open_seal(ENTRY_MAGIC, value, what)
    try:
        codec_id, meta_len = _ENTRY_HEAD.unpack_from(body)
        start = _ENTRY_HEAD.size
        meta = json.loads(bytes(body[start : start + meta_len]))
        payload = bytes(body[start + meta_len :])
        codec = _CODEC_NAMES[codec_id]
    except (struct.error, ValueError, KeyError) as error:
        raise CacheCorruptError(f"{what}: malformed entry ({error}); run anonloader cache verify") from error
    return CacheEntry(codec, payload, meta)


def _tensor_from_numpy(array: Any, requires_grad: bool) -> torch.Tensor:
    return torch.from_numpy(array).requires_grad_(requires_grad)


class _StablePickler(pickle.Pickler):
    """Pickles CPU tensors through numpy: ``torch.save`` stamps a fresh serialization id into
    every tensor's bytes, which would make equal sample records differ between runs."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.dtype != torch.bfloat16 and not obj.is_complex():
            return _tensor_from_numpy, (obj.detach().cpu().numpy(), obj.requires_grad)
        return NotImplemented


def _stable_dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _StablePickler(buffer, protocol=4).dump(value)
    return buffer.getvalue()


@dataclass
class SampleRecord:
    """A sample's non-image fields and the keys of its images, in slot order."""

    skeleton: Any
    keys: list[bytes]
    alphas: list[torch.Tensor | None] | None = None  # per image ``1,H,W uint8`` alpha, if any

    def pack(self) -> bytes:
        alphas = None
        if self.alphas is not None and any(a is not None for a in self.alphas):
            alphas = [None if a is None else a.mul(255).round().to(torch.uint8) if a.is_floating_point() else a for a in self.alphas]
        return _seal(SAMPLE_MAGIC, _stable_dumps((self.skeleton, list(self.keys), alphas)))

    @classmethod
    def unpack(cls, value: bytes | memoryview, what: str = "sample record") -> SampleRecord:
        body = _open_seal(SAMPLE_MAGIC, value, what)
        skeleton, keys, alphas = pickle.loads(body)
        return cls(skeleton, keys, alphas)


@dataclass
class VerifyReport:
    """What :meth:`AnonCache.verify` found."""

    entries: int = 0
    samples: int = 0
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt


#: this process's open environments by real path: py-lmdb allows one handle per path and
#: process, so every AnonCache on the same path shares it. Entries of another pid (inherited
#: through fork) are dropped, never used or closed.
_OPEN_ENVS: dict[str, tuple[int, bool, lmdb.Environment, dict[bytes, Any]]] = {}


def _open_env(key: str, path: Path, writable: bool, map_size: int) -> tuple[lmdb.Environment, dict[bytes, Any]]:
    found = _OPEN_ENVS.get(key)
    pid = os.getpid()
    if found is not None and found[0] == pid and (found[1] or not writable):
        return found[2], found[3]
    if found is not None:  # a read-only handle is upgraded to a writable one
        del _OPEN_ENVS[key]
        found[2].close()
    if writable:
        path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=map_size, max_dbs=len(_DATABASES), subdir=True)
        dbs = {name: env.open_db(name, create=True) for name in _DATABASES}
    else:
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=len(_DATABASES), subdir=True)
        except lmdb.Error as error:
            raise CacheError(f"cannot open the cache shard {path} ({error})") from error
        try:
            dbs = {name: env.open_db(name, create=False) for name in _DATABASES}
        except lmdb.NotFoundError as error:
            env.close()
            raise CacheError(f"{path} is an LMDB but not an anonloader cache") from error
    _OPEN_ENVS[key] = (pid, writable, env, dbs)
    return env, dbs


def _drop_inherited_envs() -> None:
    """In a forked child: close the handles inherited from the parent (py-lmdb refuses to open a
    path twice per process). Closing only unmaps and closes the child's own descriptors; the
    parent's handles and locks are untouched."""
    inherited = list(_OPEN_ENVS.values())
    _OPEN_ENVS.clear()
    for _, _, env, _ in inherited:
        try:
            env.close()
        except lmdb.Error:
            pass


os.register_at_fork(after_in_child=_drop_inherited_envs)


def _close_env(key: str) -> None:
    found = _OPEN_ENVS.pop(key, None)
    if found is not None and found[0] == os.getpid():
        found[2].close()


class _Shard:
    """One LMDB environment, opened lazily in each process that uses it (shared per process)."""

    def __init__(self, path: Path, *, writable: bool, map_size: int) -> None:
        self.path = path
        self.writable = writable
        self.map_size = map_size
        self.key = str(path.resolve())
        self._dbs: dict[bytes, Any] = {}

    def env(self) -> lmdb.Environment:
        env, self._dbs = _open_env(self.key, self.path, self.writable, self.map_size)
        return env

    def db(self, name: bytes) -> Any:
        self.env()
        return self._dbs[name]

    def read(self, fn: Any) -> Any:
        """Runs ``fn(txn)`` in a read transaction; follows a map another process grew."""
        env = self.env()
        for attempt in range(2):
            try:
                with env.begin(buffers=False) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                if attempt:
                    raise
                env.set_mapsize(0)
        return None

    def write(self, fn: Any) -> None:
        """Runs ``fn(txn)`` in one write transaction, doubling the map while LMDB says it is full."""
        if not self.writable:
            raise CacheError(f"the cache {self.path} is open read-only; open it with writable=True to write")
        env = self.env()
        while True:
            try:
                with env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                env.set_mapsize(0)

    def close(self) -> None:
        _close_env(self.key)
        self._dbs = {}


class AnonCache:
    """The anonymized-image cache at ``path``.

    Args:
        path: an LMDB folder (``data.mdb``), a sharded cache folder with ``manifest.json``, or
            a manifest file. A writable cache is created when ``path`` does not exist.
        writable: open for writing (one LMDB only; sharded caches are read-only).
        fingerprint: the pipeline fingerprint this cache must hold; a cache written by another
            pipeline raises :class:`CacheFingerprintError` on first use. Required to create one.
        salt_check: :func:`anonloader.cache.keys.salt_check` of the secret's salt, checked the
            same way (a wrong secret would silently miss every entry otherwise).
        codec: how new images are encoded (``"png"``, ``"webp"``, ``"jpeg[:quality]"``,
            ``"raw"`` or a codec object); stored entries keep their own codec.
        method: the method's name, stored in every entry's metadata.
        map_size: initial LMDB map size in bytes; it doubles whenever it fills up.

    Nothing is opened here: each process opens its own environment on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        fingerprint: str | None = None,
        salt_check: str | None = None,
        codec: str | Codec = "png",
        method: str | None = None,
        map_size: int = DEFAULT_MAP_SIZE,
    ) -> None:
        self.path = Path(path).expanduser()
        self.writable = writable
        self.codec = get_codec(codec)
        self.expected_fingerprint = fingerprint
        self.expected_salt_check = salt_check
        self.method = method
        self.manifest: dict[str, Any] | None = None
        if writable:
            if self.path.exists() and not (self.path / "data.mdb").is_file():
                if (self.path / "manifest.json").is_file():
                    raise CacheError(
                        f"{self.path} is a sharded cache; it is read-only. Write to a new path, or "
                        "merge its shards with anonloader cache merge first"
                    )
                if not self.path.is_dir() or any(self.path.iterdir()):
                    raise CacheError(f"cannot create a cache at {self.path}: it exists and is not an anonloader cache")
            if not (self.path / "data.mdb").is_file() and fingerprint is None:
                raise CacheError(f"creating a cache at {self.path} needs the pipeline fingerprint")
            self._shards = [_Shard(self.path, writable=True, map_size=map_size)]
        else:
            _, shard_paths, self.manifest = resolve_cache_path(self.path)
            self._shards = [_Shard(p, writable=False, map_size=map_size) for p in shard_paths]
        self._checked_pid = -1
        self._meta: dict[str, Any] | None = None

    # -- opening and metadata ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_checked_pid"] = -1
        return state

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        return f"AnonCache({str(self.path)!r}, {mode}, shards={len(self._shards)})"

    def _read_meta(self, shard: _Shard) -> dict[str, Any]:
        def read(txn: lmdb.Transaction) -> dict[str, Any]:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=shard.db(b"meta"))}

        return shard.read(read)

    def _ensure(self) -> None:
        """Opens this process's environments once and checks fingerprint and secret."""
        if self._checked_pid == os.getpid():
            return
        metas = [self._read_meta(shard) for shard in self._shards]
        if self.writable and not metas[0]:
            meta = {
                "fingerprint": self.expected_fingerprint,
                "salt_check": self.expected_salt_check or "none",
                "codec": self.codec.config(),
                "anonloader_version": __version__,
                "cache_format": CACHE_FORMAT_VERSION,
                "method": self.method,
                "source_size": None,
            }
            self._put_meta(meta)
            metas = [meta]
        for shard, meta in zip(self._shards, metas, strict=True):
            if not meta:
                raise CacheError(f"{shard.path} holds no anonloader cache metadata; it is not a cache")
            self._check_meta(shard.path, meta)
        self._meta = metas[0]
        self._checked_pid = os.getpid()

    def _check_meta(self, path: Path, meta: dict[str, Any]) -> None:
        if meta.get("cache_format") != CACHE_FORMAT_VERSION:
            raise CacheFingerprintError(
                f"the cache {path} has format {meta.get('cache_format')}, this anonloader writes "
                f"format {CACHE_FORMAT_VERSION}; precompute it again with this version"
            )
        if self.expected_fingerprint is not None and meta["fingerprint"] != self.expected_fingerprint:
            raise CacheFingerprintError(
                f"the cache {path} was written by another pipeline (fingerprint "
                f"{meta['fingerprint'][:12]}…, method {meta.get('method')!r}); this pipeline's fingerprint is "
                f"{self.expected_fingerprint[:12]}…. Use another cache path, or the settings it was made with"
            )
        if self.expected_salt_check is not None and meta["salt_check"] != self.expected_salt_check:
            raise CacheFingerprintError(
                f"the cache {path} was written with another secret (or without one); pass the secret it was "
                "precomputed with, or use another cache path"
            )

    def _put_meta(self, meta: dict[str, Any]) -> None:
        shard = self._shards[0]

        def put(txn: lmdb.Transaction) -> None:
            for name, value in meta.items():
                txn.put(name.encode(), json.dumps(value).encode(), db=shard.db(b"meta"))

        shard.write(put)

    @property
    def meta(self) -> dict[str, Any]:
        """Cache-level metadata: fingerprint, salt check, codec, version, method, source size."""
        self._ensure()
        assert self._meta is not None
        return dict(self._meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def set_source_size(self, size: int) -> None:
        """Records how many samples the source has (so missing samples can be counted)."""
        self._ensure()
        self._put_meta({"source_size": int(size)})
        assert self._meta is not None
        self._meta["source_size"] = int(size)

    def entry_meta(self) -> dict[str, Any]:
        """The fields stored in every new entry's metadata."""
        meta = self.meta
        return {"fingerprint": meta["fingerprint"], "anonloader_version": __version__, "method": meta.get("method")}

    def close(self) -> None:
        """Closes this process's environments (they reopen on next use)."""
        for shard in self._shards:
            shard.close()
        self._checked_pid = -1

    def __enter__(self) -> AnonCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- entries ----------------------------------------------------------------------------
    def get_raw(self, key: bytes) -> bytes | None:
        """The stored bytes under ``key`` (not checked), or ``None``."""
        self._ensure()
        for shard in self._shards:
            value = shard.read(lambda txn, s=shard: txn.get(key, db=s.db(b"entries")))
            if value is not None:
                return value
        return None

    def get(self, key: bytes, *, what: str | None = None) -> CacheEntry | None:
        """The entry under ``key`` or ``None``. Raises :class:`CacheCorruptError` when corrupt."""
        value = self.get_raw(key)
        if value is None:
            return None
        return unpack_entry(value, what or f"cache entry {key.hex()} in {self.path}")

    def __contains__(self, key: bytes) -> bool:
        return self.get_raw(key) is not None

    def put(self, key: bytes, image: torch.Tensor | None, records: Sequence[FaceRecord] = ()) -> None:
        """Stores one anonymized image (``3,H,W float in [0,1]``, or ``None`` when dropped)."""
        self.write([(key, image, records)])

    def encode(self, image: torch.Tensor | None, records: Sequence[FaceRecord] = (), error: str | None = None) -> bytes:
        """The stored bytes of an image (encode in workers, :meth:`write_encoded` in the writer)."""
        return pack_entry(image, records, self.codec, self.entry_meta(), error)

    def write(
        self,
        entries: Iterable[tuple[bytes, torch.Tensor | None, Sequence[FaceRecord]]] = (),
        samples: Iterable[tuple[int, SampleRecord]] = (),
    ) -> None:
        """Encodes and stores ``(key, image, records)`` entries and sample records, in one commit."""
        encoded = [(key, self.encode(image, records)) for key, image, records in entries]
        self.write_encoded(encoded, [(i, s.pack()) for i, s in samples])

    def write_encoded(self, entries: Sequence[tuple[bytes, bytes]], samples: Sequence[tuple[int, bytes]] = ()) -> None:
        """Stores already packed entries and samples in one transaction (all or nothing)."""
        self._ensure()
        shard = self._shards[0]

        def put(txn: lmdb.Transaction) -> None:
            for key, value in entries:
                txn.put(key, value, db=shard.db(b"entries"))
            for index, value in samples:
                txn.put(_INDEX.pack(index), value, db=shard.db(b"samples"))

        shard.write(put)

    # -- samples ----------------------------------------------------------------------------
    def get_sample(self, index: int) -> SampleRecord | None:
        """The stored record of sample ``index``, or ``None``."""
        self._ensure()
        packed = _INDEX.pack(index)
        for shard in self._shards:
            value = shard.read(lambda txn, s=shard: txn.get(packed, db=s.db(b"samples")))
            if value is not None:
                return SampleRecord.unpack(value, f"sample {index} in {shard.path}")
        return None

    def sample_indices(self) -> list[int]:
        """Every stored sample index, ascending (over all shards)."""
        self._ensure()
        indices: list[int] = []
        for shard in self._shards:

            def keys(txn: lmdb.Transaction, s: _Shard = shard) -> list[int]:
                return [_INDEX.unpack(k)[0] for k in txn.cursor(db=s.db(b"samples")).iternext(values=False)]

            indices.extend(shard.read(keys))
        return sorted(set(indices))

    def missing_message(self, missing: int, total: int) -> str:
        return (
            f"{missing} of {total} samples are not in the cache at {self.path}; run anonloader precompute "
            "with the same settings to fill it (read-only mode never anonymizes on the fly)"
        )

    def as_dataset(self, *, allow_partial: bool = False) -> CachedDataset:
        """The cache as a map-style dataset of whole anonymized samples, in the source's order.

        Needs no original image. Raises :class:`CacheMissError` when samples of the source are
        missing, unless ``allow_partial`` (then only the stored samples are served).
        """
        indices = self.sample_indices()
        total = self.meta.get("source_size")
        if total is not None and len(indices) < total and not allow_partial:
            self.close()
            raise CacheMissError(self.missing_message(total - len(indices), total))
        self.close()  # nothing stays open across the DataLoader's fork
        return CachedDataset(self, indices)

    # -- whole-cache operations -------------------------------------------------------------
    def iter_entries(self) -> Iterator[tuple[Path, bytes, bytes]]:
        """``(shard path, key, stored bytes)`` of every entry, shard by shard, in key order."""
        self._ensure()
        for shard in self._shards:
            with shard.env().begin() as txn:
                for key, value in txn.cursor(db=shard.db(b"entries")):
                    yield shard.path, bytes(key), bytes(value)

    def iter_samples(self) -> Iterator[tuple[Path, int, bytes]]:
        """``(shard path, index, stored bytes)`` of every sample record."""
        self._ensure()
        for shard in self._shards:
            with shard.env().begin() as txn:
                for key, value in txn.cursor(db=shard.db(b"samples")):
                    yield shard.path, _INDEX.unpack(key)[0], bytes(value)

    def verify(self, *, decode: bool = False) -> VerifyReport:
        """Checks every checksum (and, with ``decode``, that every image decodes)."""
        report = VerifyReport()
        for path, key, value in self.iter_entries():
            report.entries += 1
            try:
                entry = unpack_entry(value, f"entry {key.hex()} in {path}")
                if decode:
                    entry.image_uint8()
            except CacheCorruptError as error:
                report.corrupt.append(str(error))
        for path, index, value in self.iter_samples():
            report.samples += 1
            try:
                SampleRecord.unpack(value, f"sample {index} in {path}")
            except (CacheCorruptError, pickle.UnpicklingError) as error:
                report.corrupt.append(str(error))
        if self.manifest is not None:
            for shard_info, shard in zip(self.manifest["shards"], self._shards, strict=True):
                single = AnonCache(shard.path)
                try:
                    digest = single.summary()["checksum"]
                finally:
                    single.close()
                if digest != shard_info["checksum"]:
                    report.corrupt.append(f"shard {shard.path}: contents changed since the manifest was written")
        return report

    def summary(self) -> dict[str, Any]:
        """Counts, key and index ranges and a content checksum (one shard: its manifest entry)."""
        meta = self.meta
        digest = xxhash.xxh3_128()
        entries = samples = size = 0
        key_min = key_max = None
        for _, key, value in self.iter_entries():
            entries += 1
            size += len(value)
            digest.update(key + value[4:12])
            key_min = key if key_min is None else min(key_min, key)
            key_max = key if key_max is None else max(key_max, key)
        indices = []
        for _, index, value in self.iter_samples():
            samples += 1
            size += len(value)
            digest.update(_INDEX.pack(index) + value[4:12])
            indices.append(index)
        return {
            "path": str(self.path),
            "fingerprint": meta["fingerprint"],
            "salt_check": meta["salt_check"],
            "anonloader_version": meta.get("anonloader_version"),
            "method": meta.get("method"),
            "codec": meta.get("codec"),
            "source_size": meta.get("source_size"),
            "entries": entries,
            "samples": samples,
            "bytes": size,
            "key_min": key_min.hex() if key_min else None,
            "key_max": key_max.hex() if key_max else None,
            "sample_min": min(indices) if indices else None,
            "sample_max": max(indices) if indices else None,
            "checksum": digest.hexdigest(),
        }

    def stats(self) -> dict[str, Any]:
        """What ``anonloader cache stats`` prints."""
        summaries = []
        for shard in self._shards:
            single = self if len(self._shards) == 1 else AnonCache(shard.path)
            summaries.append(single.summary())
            if single is not self:
                single.close()
        source_size = self.meta.get("source_size")
        samples = sum(s["samples"] for s in summaries)
        return {
            "path": str(self.path),
            "fingerprint": self.meta["fingerprint"],
            "method": self.meta.get("method"),
            "codec": self.meta.get("codec"),
            "anonloader_version": self.meta.get("anonloader_version"),
            "shards": len(summaries),
            "entries": sum(s["entries"] for s in summaries),
            "samples": samples,
            "source_size": source_size,
            "missing_samples": None if source_size is None else max(0, source_size - samples),
            "bytes": sum(s["bytes"] for s in summaries),
        }


class CachedDataset(torch.utils.data.Dataset):
    """Whole anonymized samples read from an :class:`AnonCache`, in the source's order.

    ``dataset[i]`` is the ``i``-th stored sample rebuilt with ``join_sample`` (the original
    types and non-image fields), or ``None`` when the pipeline dropped one of its images (use
    ``anonloader.collate_skip_dropped``). Safe in forked DataLoader workers.
    """

    def __init__(self, cache: AnonCache, indices: list[int]) -> None:
        self.cache = cache
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def source_index(self, i: int) -> int:
        """The index in the original dataset of stored sample ``i``."""
        return self.indices[i]

    def __getitem__(self, i: int) -> Any:
        from anonloader.data.adapters import join_sample

        index = self.indices[i]
        record = self.cache.get_sample(index)
        if record is None:
            raise CacheMissError(self.cache.missing_message(1, len(self.indices)) + f" (sample {index})")
        images = []
        for slot, key in enumerate(record.keys):
            entry = self.cache.get(key, what=f"sample {index} image {slot} ({key.hex()})")
            if entry is None:
                raise CacheMissError(f"sample {index}: image {slot} is not in the cache at {self.cache.path}; run anonloader precompute")
            pixels = entry.image_uint8()
            if pixels is None:
                return None
            images.append(pixels)
        if record.alphas is None and _uint8_rgb_slots_only(record.skeleton):
            return _fill_slots(record.skeleton, images)  # the stored uint8 pixels are the answer
        alphas = None if record.alphas is None else [None if a is None else a.float().div(255.0) for a in record.alphas]
        return join_sample(record.skeleton, [p.float().div_(255.0) for p in images], alphas)


def _slots_of(skeleton: Any) -> list[Any]:
    from anonloader.data.adapters import ImageSlot

    if isinstance(skeleton, ImageSlot):
        return [skeleton]
    values = skeleton.values() if isinstance(skeleton, dict) else skeleton if isinstance(skeleton, (tuple, list)) else []
    return [v for v in values if isinstance(v, ImageSlot)]


def _uint8_rgb_slots_only(skeleton: Any) -> bool:
    """Whether every image slot is a ``3,H,W uint8`` tensor (restored without a float round trip)."""
    slots = _slots_of(skeleton)
    return bool(slots) and all(
        s.kind == "tensor" and s.layout == "chw" and s.dtype == "uint8" and s.channels == 3 for s in slots
    )


def _fill_slots(skeleton: Any, images: list[torch.Tensor]) -> Any:
    from anonloader.data.adapters import ImageSlot

    def fill(value: Any) -> Any:
        return images[value.position] if isinstance(value, ImageSlot) else value

    if isinstance(skeleton, ImageSlot):
        return fill(skeleton)
    if isinstance(skeleton, dict):
        return {k: fill(v) for k, v in skeleton.items()}
    items = [fill(v) for v in skeleton]
    return type(skeleton)(*items) if hasattr(skeleton, "_fields") else type(skeleton)(items)
