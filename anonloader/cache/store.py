"""``AnonCache``: the content-addressed store of anonymized images, on LMDB.

One cache is one LMDB environment (a folder with ``data.mdb``), or several shards named by a
``manifest.json`` (:mod:`anonloader.cache.manifest`). What is stored, and how, is
:mod:`anonloader.cache.format`; the training view is :mod:`anonloader.cache.dataset`.

Processes: nothing is opened in ``__init__`` (DataLoader workers fork); each process opens
its own environment on first use, one per path and process (py-lmdb allows no more), and a
forked child drops the handles it inherited. Readers open ``readonly=True, lock=False``
(no reader-lock table, so any number of workers read without coordination) with
``readahead=False`` (see ``benchmarks/cache_read.py``: equal on warm pages, and it keeps
shuffled reads on a cold disk from pulling in pages nobody asked for). A writable cache
writes in one transaction per batch, so a process killed mid-write loses nothing it
committed, and the map doubles whenever LMDB reports it full.

Secrets: an ``AnonCache`` holds only the subkeys derived from the secret
(:class:`~anonloader.cache.keys.CacheKeys`: key salt check and MAC key), so pickling it into
a DataLoader worker or a Ray actor never carries the secret.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import torch
import xxhash

from anonloader import __version__
from anonloader.cache.codecs import Codec, get_codec
from anonloader.cache.format import (
    CACHE_FORMAT_VERSION,
    EntryRecord,
    FailureRecord,
    SampleRecord,
    SampleView,
    Sealer,
    index_key,
    old_format_message,
    open_meta,
    pack_meta,
    peek_meta,
)
from anonloader.cache.keys import CacheKeys
from anonloader.cache.manifest import resolve_cache_path
from anonloader.errors import CacheCorruptError, CacheError, CacheFingerprintError, CacheMissError
from anonloader.lmdb_envs import close_env, open_env
from anonloader.types import FaceRecord

__all__ = ["DEFAULT_MAP_SIZE", "AnonCache", "CacheEntry", "SampleRecord", "VerifyReport"]

logger = logging.getLogger(__name__)

#: an entry read back (the :class:`~anonloader.cache.format.EntryRecord` with its pixels).
CacheEntry = EntryRecord

_DATABASES = (b"entries", b"samples", b"meta", b"failures")
_META_KEY = b"cache"
_OLD_META_KEY = b"cache_format"
DEFAULT_MAP_SIZE = 1 << 30


@dataclass
class VerifyReport:
    """What :meth:`AnonCache.verify` found."""

    entries: int = 0
    samples: int = 0
    failures: int = 0
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt


def _open_dbs(path: Path) -> Callable[[lmdb.Environment, bool], dict[bytes, Any]]:
    """The :func:`~anonloader.lmdb_envs.open_env` set-up of a cache shard: its named databases
    (created by a writer; a reader refuses an LMDB that is not a cache)."""

    def setup(env: lmdb.Environment, writable: bool) -> dict[bytes, Any]:
        if writable:
            return {name: env.open_db(name, create=True) for name in _DATABASES}
        dbs: dict[bytes, Any] = {}
        for name in _DATABASES:
            try:
                dbs[name] = env.open_db(name, create=False)
            except lmdb.NotFoundError as error:
                if name != b"failures":  # format 1 caches have none; they fail on their metadata
                    raise CacheError(f"{path} is an LMDB but not an anonloader cache (no {name.decode()} database)") from error
                dbs[name] = None
        return dbs

    return setup


class _Shard:
    """One LMDB environment, opened lazily in each process that uses it (shared per process)."""

    def __init__(self, path: Path, *, writable: bool, map_size: int, readahead: bool) -> None:
        self.path = path
        self.writable = writable
        self.map_size = map_size
        self.readahead = readahead
        self._dbs: dict[bytes, Any] = {}

    def env(self) -> lmdb.Environment:
        try:
            env, self._dbs = open_env(
                self.path, writable=self.writable, map_size=self.map_size, max_dbs=len(_DATABASES),
                readahead=self.readahead, setup=_open_dbs(self.path),
            )
        except lmdb.Error as error:
            if self.writable:
                raise
            raise CacheError(f"cannot open the cache shard {self.path} ({error})") from error
        return env

    def db(self, name: bytes) -> Any:
        self.env()
        return self._dbs[name]

    def read(self, fn: Callable[[lmdb.Transaction], Any], *, buffers: bool = False) -> Any:
        """Runs ``fn(txn)`` in one read transaction; follows a map another process grew.

        With ``buffers``, values are ``memoryview`` s of the memory map, valid only inside ``fn``.
        """
        env = self.env()
        for attempt in range(2):
            try:
                with env.begin(buffers=buffers) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                if attempt:
                    raise
                env.set_mapsize(0)
        return None

    def write(self, fn: Callable[[lmdb.Transaction], None]) -> None:
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
        close_env(self.path)
        self._dbs = {}


def _unsalted_warning(path: Path) -> None:
    logger.warning(
        "writing the cache %s without a secret: its keys are unsalted hashes of the images, so anyone holding a "
        "candidate photo can compute its key and test whether that photo is in the cache (a membership test), and "
        "its values are checksummed but not authenticated. Pass secret= (or set ANONLOADER_SECRET) to salt the "
        "keys and authenticate every value",
        path,
    )


class AnonCache:
    """The anonymized-image cache at ``path``.

    Args:
        path: an LMDB folder (``data.mdb``), a sharded cache folder with ``manifest.json``, or
            a manifest file. A writable cache is created when ``path`` does not exist.
        writable: open for writing (one LMDB only; sharded caches are read-only).
        fingerprint: the pipeline fingerprint this cache must hold; a cache written by another
            pipeline raises :class:`CacheFingerprintError` on first use. Required to create one.
        secret: the secret the cache was (or is to be) written with (``str``, ``bytes``, a
            ``Secret``), or its derived :class:`CacheKeys`; only the subkeys are kept. A cache
            written with a secret authenticates every value (HMAC-SHA256) and cannot be read
            without it; one written without a secret logs a warning (membership tests).
        salt_check: the expected salt check, when only that is known (``keys.salt_check``
            otherwise).
        codec: how new images are encoded (see :func:`~anonloader.cache.codecs.get_codec`;
            default ``"raw"``, lossless); stored entries keep their own codec.
        method: the method's name, stored in every entry's metadata.
        map_size: initial LMDB map size in bytes; it doubles whenever it fills up.
        readahead: LMDB readahead for readers (default off, see the module doc).

    Nothing is opened here: each process opens its own environment on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        fingerprint: str | None = None,
        secret: Any = None,
        salt_check: str | None = None,
        codec: str | Codec | None = None,
        method: str | None = None,
        map_size: int = DEFAULT_MAP_SIZE,
        readahead: bool = False,
    ) -> None:
        self.path = Path(path).expanduser()
        self.writable = writable
        self.codec = get_codec(codec)
        self.keys = CacheKeys.from_secret(secret) if secret is not None else None
        self.sealer = Sealer(None if self.keys is None else self.keys.mac_key)
        self.expected_fingerprint = fingerprint
        self.expected_salt_check = salt_check if salt_check is not None else (None if self.keys is None else self.keys.salt_check)
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
            self._shards = [_Shard(self.path, writable=True, map_size=map_size, readahead=readahead)]
        else:
            _, shard_paths, self.manifest = resolve_cache_path(self.path)
            self._shards = [_Shard(p, writable=False, map_size=map_size, readahead=readahead) for p in shard_paths]
        self._checked_pid = -1
        self._meta: dict[str, Any] | None = None

    # -- opening and metadata ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_checked_pid"] = -1
        return state

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        return f"AnonCache({str(self.path)!r}, {mode}, shards={len(self._shards)}, keyed={self.sealer.keyed})"

    def _read_meta(self, shard: _Shard) -> dict[str, Any] | None:
        what = f"metadata of the cache {shard.path}"

        def read(txn: lmdb.Transaction) -> tuple[bytes | None, bytes | None]:
            db = shard.db(b"meta")
            return txn.get(_META_KEY, db=db), txn.get(_OLD_META_KEY, db=db)

        value, old = shard.read(read)
        if value is None:
            if old is not None:
                raise CacheFingerprintError(old_format_message(shard.path, old.decode(errors="replace")))
            return None
        found = peek_meta(value, what)
        if found.get("format") != CACHE_FORMAT_VERSION:
            raise CacheFingerprintError(old_format_message(shard.path, found.get("format")))
        if self.expected_salt_check is not None and found.get("salt_check") != self.expected_salt_check:
            raise CacheFingerprintError(
                f"the cache {shard.path} was written with another secret (or without one); pass the secret it was "
                "precomputed with, or use another cache path"
            )
        if found["keyed"] and not self.sealer.keyed:
            raise CacheError(
                f"the cache {shard.path} is authenticated with a secret: pass the secret it was precomputed with "
                "(secret=..., or ANONLOADER_SECRET / --secret-env for the command line) to read it"
            )
        return open_meta(self.sealer, value, what)

    def _ensure(self) -> None:
        """Opens this process's environments once and checks format, secret and fingerprint."""
        if self._checked_pid == os.getpid():
            return
        metas = [self._read_meta(shard) for shard in self._shards]
        if self.writable and metas[0] is None:
            meta = {
                "format": CACHE_FORMAT_VERSION,
                "fingerprint": self.expected_fingerprint,
                "salt_check": self.expected_salt_check or "none",
                "codec": self.codec.config(),
                "anonloader_version": __version__,
                "method": self.method,
                "source_size": None,
            }
            if self.expected_salt_check is not None and self.expected_salt_check != "none" and not self.sealer.keyed:
                raise CacheError(f"creating the salted cache {self.path} needs the secret (secret=...), not only its salt check")
            self._put_meta(meta)
            metas = [dict(meta, keyed=self.sealer.keyed)]
        for shard, meta in zip(self._shards, metas, strict=True):
            if meta is None:
                raise CacheError(f"{shard.path} holds no anonloader cache metadata; it is not a cache")
            self._check_meta(shard.path, meta)
        self._meta = metas[0]
        if self.writable and not self.sealer.keyed:
            _unsalted_warning(self.path)
        self._checked_pid = os.getpid()

    def _check_meta(self, path: Path, meta: dict[str, Any]) -> None:
        if self.expected_fingerprint is not None and meta["fingerprint"] != self.expected_fingerprint:
            raise CacheFingerprintError(
                f"the cache {path} was written by another pipeline (fingerprint "
                f"{meta['fingerprint'][:12]}…, method {meta.get('method')!r}); this pipeline's fingerprint is "
                f"{self.expected_fingerprint[:12]}…. Use another cache path, or the settings it was made with"
            )

    def _put_meta(self, meta: dict[str, Any]) -> None:
        shard = self._shards[0]
        stored = {k: v for k, v in meta.items() if k != "keyed"}
        shard.write(lambda txn: txn.put(_META_KEY, pack_meta(self.sealer, stored), db=shard.db(b"meta")))

    @property
    def meta(self) -> dict[str, Any]:
        """Cache-level metadata: format, fingerprint, salt check, codec, version, method, source
        size, and whether values are authenticated (``keyed``)."""
        self._ensure()
        assert self._meta is not None
        return dict(self._meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def set_source_size(self, size: int) -> None:
        """Records how many samples the source has (so missing samples can be counted)."""
        meta = self.meta
        meta["source_size"] = int(size)
        self._put_meta(meta)
        self._meta = meta

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

    def _entry_in(self, shard: _Shard, txn: lmdb.Transaction, key: bytes, what: str) -> CacheEntry | None:
        value = txn.get(key, db=shard.db(b"entries"))
        if value is None:
            return None
        entry = EntryRecord.unpack(self.sealer, key, value, what)
        if entry.ref is not None and entry.codec is not None:
            index, slot = entry.ref
            stored = txn.get(index_key(index), db=shard.db(b"samples"))
            if stored is None:
                raise CacheCorruptError(f"{what}: its pixels are in sample {index}, which is not in the cache; run anonloader precompute")
            view = SampleView.open(self.sealer, index, stored, f"sample {index} in {shard.path}")
            if slot >= len(view.images) or view.keys[slot] != key:
                raise CacheCorruptError(f"{what}: sample {index} image {slot} holds another image; run anonloader cache verify")
            image = view.images[slot].stored
            entry.codec, entry.payload = image.codec, bytes(image.payload)
        return entry

    def get(self, key: bytes, *, what: str | None = None) -> CacheEntry | None:
        """The entry under ``key`` with its pixels, or ``None``.

        Raises:
            CacheCorruptError: the stored bytes are corrupt or (keyed cache) not authentic.
        """
        self._ensure()
        label = what or f"cache entry {key.hex()} in {self.path}"
        for shard in self._shards:
            entry = shard.read(lambda txn, s=shard: self._entry_in(s, txn, key, label))
            if entry is not None:
                return entry
        return None

    def __contains__(self, key: bytes) -> bool:
        return self.get_raw(key) is not None

    def put(self, key: bytes, image: torch.Tensor | None, records: Sequence[FaceRecord] = (), error: str | None = None) -> None:
        """Stores one anonymized image (``C,H,W float in [0,1]`` or ``uint8``, or ``None`` when
        dropped); ``error`` marks it as a failure (never served as a success)."""
        self.write([(key, image, records, error)])

    def encode(self, key: bytes, image: torch.Tensor | None, records: Sequence[FaceRecord] = (), error: str | None = None) -> bytes:
        """The sealed stored bytes of the entry under ``key`` (encode in workers,
        :meth:`write_encoded` in the writer)."""
        return EntryRecord.build(image, records, self.codec, self.entry_meta(), error).pack(self.sealer, key)

    def write(
        self,
        entries: Iterable[tuple[Any, ...]] = (),
        samples: Iterable[tuple[int, SampleRecord]] = (),
    ) -> None:
        """Encodes and stores ``(key, image, records[, error])`` entries and sample records, in one commit."""
        encoded = [(item[0], self.encode(*item)) for item in entries]
        self.write_encoded(encoded, [(i, s.pack(self.sealer, i)) for i, s in samples])

    def write_encoded(
        self,
        entries: Sequence[tuple[bytes, bytes]],
        samples: Sequence[tuple[int, bytes]] = (),
        failures: Sequence[tuple[int, bytes]] = (),
        resolved: Sequence[int] = (),
    ) -> None:
        """Stores sealed entries, sample records and failure records in one transaction (all or
        nothing); ``resolved`` sample indices have their failure record removed."""
        self._ensure()
        shard = self._shards[0]

        def put(txn: lmdb.Transaction) -> None:
            for key, value in entries:
                txn.put(key, value, db=shard.db(b"entries"))
            for index, value in samples:
                txn.put(index_key(index), value, db=shard.db(b"samples"))
            for index in resolved:
                txn.delete(index_key(index), db=shard.db(b"failures"))
            for index, value in failures:
                txn.put(index_key(index), value, db=shard.db(b"failures"))

        shard.write(put)

    # -- samples ----------------------------------------------------------------------------
    def get_sample(self, index: int) -> SampleRecord | None:
        """The stored record of sample ``index`` (a copy), or ``None``."""
        self._ensure()
        packed = index_key(index)
        for shard in self._shards:
            value = shard.read(lambda txn, s=shard: txn.get(packed, db=s.db(b"samples")))
            if value is not None:
                return SampleView.open(self.sealer, index, value, f"sample {index} in {shard.path}").to_record()
        return None

    def _keys_of(self, name: bytes) -> list[list[int]]:
        self._ensure()
        out = []
        for shard in self._shards:

            def keys(txn: lmdb.Transaction, s: _Shard = shard) -> list[int]:
                db = s.db(name)
                if db is None:
                    return []
                return [int.from_bytes(bytes(k), "big") for k in txn.cursor(db=db).iternext(values=False)]

            out.append(shard.read(keys))
        return out

    def sample_indices(self) -> list[int]:
        """Every stored sample index, ascending (over all shards)."""
        return sorted({i for shard in self._keys_of(b"samples") for i in shard})

    def sample_shards(self) -> list[tuple[int, int]]:
        """``(sample index, shard number)`` of every stored sample, by index."""
        found: dict[int, int] = {}
        for number, indices in enumerate(self._keys_of(b"samples")):
            for index in indices:
                found.setdefault(index, number)
        return sorted(found.items())

    def failed_indices(self) -> list[int]:
        """Indices of samples with a recorded failure (retried by a resumed precompute)."""
        return sorted({i for shard in self._keys_of(b"failures") for i in shard})

    def failures(self) -> list[FailureRecord]:
        """Every recorded failure (index, source path, reason), by index."""
        return sorted(
            (FailureRecord.unpack(self.sealer, index, value, f"failure record {index} in {path}") for path, index, value in self.iter_failures()),
            key=lambda f: f.index,
        )

    def read_samples(self, positions: Sequence[tuple[int, int]], build: Callable[[int, SampleView | None], Any]) -> list[Any]:
        """``build(index, view)`` for each ``(sample index, shard number)``, in order, with one
        read transaction per shard touched; ``view`` (or ``None`` when absent) owns a copy of
        its record, checked on that copy (``SampleView.open(owned=True)``)."""
        self._ensure()
        out: list[Any] = [None] * len(positions)
        by_shard: dict[int, list[int]] = {}
        for at, (_, number) in enumerate(positions):
            by_shard.setdefault(number, []).append(at)
        for number, ats in by_shard.items():
            shard = self._shards[number]
            db = shard.db(b"samples")

            def run(txn: lmdb.Transaction, ats: list[int] = ats, shard: _Shard = shard, db: Any = db) -> None:
                for at in ats:
                    index = positions[at][0]
                    value = txn.get(index_key(index), db=db)
                    # the record's one copy out of the map, checked and served from there
                    record = None if value is None else memoryview(bytearray(value))
                    view = None if record is None else SampleView.open(self.sealer, index, record, f"sample {index} in {shard.path}", owned=True)
                    out[at] = build(index, view)

            shard.read(run, buffers=True)
        return out

    def missing_message(self, missing: int, total: int) -> str:
        return (
            f"{missing} of {total} samples are not in the cache at {self.path}; run anonloader precompute "
            "with the same settings to fill it (read-only mode never anonymizes on the fly)"
        )

    def as_dataset(self, *, allow_partial: bool = False) -> Any:
        """The cache as a map-style dataset of whole anonymized samples, in the source's order
        (:class:`~anonloader.cache.dataset.CachedDataset`).

        Needs no original image. Raises :class:`CacheMissError` when samples of the source are
        missing, unless ``allow_partial`` (then only the stored samples are served).
        """
        from anonloader.cache.dataset import CachedDataset

        positions = self.sample_shards()
        total = self.meta.get("source_size")
        if total is not None and len(positions) < total and not allow_partial:
            self.close()
            raise CacheMissError(self.missing_message(total - len(positions), total))
        self.close()  # nothing stays open across the DataLoader's fork
        return CachedDataset(self, positions)

    # -- recovery keys (Diff-Privacy) -------------------------------------------------------
    def recover(
        self,
        index: int,
        password: Any = None,
        method: Any = None,
        *,
        slot: int = 0,
        key_password_file: str | os.PathLike[str] | None = None,
    ) -> torch.Tensor:
        """Image ``slot`` of stored sample ``index`` with its original faces put back.

        Opens the key store ``<cache>/recovery.lmdb`` (never opened by training reads) with
        ``password`` (or ``key_password_file``, or ``$ANONLOADER_KEY_PASSWORD``), decrypts the
        entry's face keys and regenerates the faces with ``method`` (the recoverable method the
        cache was precomputed with, e.g. ``DiffPrivacy(weights_dir, ...)``); pixels outside the
        anonymized faces stay the stored bytes.

        Returns:
            ``3,H,W float32 in [0,1]``.

        Raises:
            SecretError: no password, or the wrong one (checked before any key is read).
            CacheMissError: the sample is not stored. CacheError: the image has no pixels
                (dropped), its anonymized faces have no keys, the cache has no key store, or
                it is sharded.
            ConfigError: ``method`` is missing or is not the one the keys were made with.
        """
        from anonloader.errors import ConfigError
        from anonloader.methods.diffprivacy.recovery import recover_image
        from anonloader.methods.diffprivacy.store import RecoveryKeyStore

        if method is None or not callable(getattr(method, "recover", None)):
            raise ConfigError("recover needs the recoverable method the cache was made with (e.g. method=DiffPrivacy(weights_dir, ...))")
        if self.manifest is not None:
            raise CacheError(f"{self.path} is sharded; recovery keys are written by the local engine into one cache")
        record = self.get_sample(index)
        if record is None:
            raise CacheMissError(f"sample {index} is not in the cache {self.path}")
        if not 0 <= slot < len(record.keys):
            raise CacheError(f"sample {index} has {len(record.keys)} image(s); slot {slot} does not exist")
        pixels = record.images[slot].pixels()
        if pixels is None:
            raise CacheError(f"sample {index} image {slot} was dropped (no pixels stored); there is nothing to recover into")
        store = RecoveryKeyStore.open(self.path, password, key_password_file=key_password_file, fingerprint=self.fingerprint)
        try:
            entry_key = record.keys[slot].hex()
            entry = self.get(record.keys[slot])
            anonymized = 0 if entry is None else sum(r.status == "anonymized" for r in entry.face_records())
            if anonymized and not store.faces(entry_key):
                raise CacheError(
                    f"sample {index} image {slot} has {anonymized} anonymized face(s) but no recovery keys "
                    "(written before a key password was given); rebuild those entries with precompute and "
                    "key_password to make them recoverable"
                )
            return recover_image(method, store, entry_key, pixels.float().div(255.0))
        finally:
            store.close()

    # -- whole-cache operations -------------------------------------------------------------
    def _iter_db(self, name: bytes) -> Iterator[tuple[Path, bytes, bytes]]:
        self._ensure()
        for shard in self._shards:
            db = shard.db(name)
            if db is None:
                continue
            with shard.env().begin() as txn:
                for key, value in txn.cursor(db=db):
                    yield shard.path, bytes(key), bytes(value)

    def iter_entries(self) -> Iterator[tuple[Path, bytes, bytes]]:
        """``(shard path, key, stored bytes)`` of every entry, shard by shard, in key order."""
        return self._iter_db(b"entries")

    def iter_samples(self) -> Iterator[tuple[Path, int, bytes]]:
        """``(shard path, index, stored bytes)`` of every sample record."""
        for path, key, value in self._iter_db(b"samples"):
            yield path, int.from_bytes(key, "big"), value

    def iter_failures(self) -> Iterator[tuple[Path, int, bytes]]:
        """``(shard path, index, stored bytes)`` of every failure record."""
        for path, key, value in self._iter_db(b"failures"):
            yield path, int.from_bytes(key, "big"), value

    def verify(self, *, decode: bool = False) -> VerifyReport:
        """Checks every value's tag and structure (and, with ``decode``, that every image
        decodes); never executes anything stored. Keyed caches need their secret."""
        report = VerifyReport()
        for path, key, value in self.iter_entries():
            report.entries += 1
            try:
                entry = EntryRecord.unpack(self.sealer, key, value, f"entry {key.hex()} in {path}")
                entry.face_records()
                if decode and entry.ref is None:
                    entry.image_uint8()
            except CacheError as error:
                report.corrupt.append(str(error))
        for path, index, value in self.iter_samples():
            report.samples += 1
            try:
                view = SampleView.open(self.sealer, index, value, f"sample {index} in {path}")
                view.skeleton()
                view.alphas()
                if decode:
                    for image in view.images:
                        image.stored.pixels()
            except CacheError as error:
                report.corrupt.append(str(error))
        for path, index, value in self.iter_failures():
            report.failures += 1
            try:
                FailureRecord.unpack(self.sealer, index, value, f"failure record {index} in {path}")
            except CacheError as error:
                report.corrupt.append(str(error))
        if self.manifest is not None:
            for shard_info, shard in zip(self.manifest["shards"], self._shards, strict=True):
                single = AnonCache(shard.path, secret=self.keys)
                try:
                    digest = single.summary()["checksum"]
                finally:
                    single.close()
                if digest != shard_info["checksum"]:
                    report.corrupt.append(f"shard {shard.path}: contents changed since the manifest was written")
        return report

    def summary(self) -> dict[str, Any]:
        """Counts (by status), key and index ranges, failures and a content checksum (one
        shard: its manifest entry)."""
        meta = self.meta
        digest = xxhash.xxh3_128()
        entries = samples = size = 0
        statuses = {"ok": 0, "dropped": 0, "failed": 0}
        key_min = key_max = None
        for path, key, value in self.iter_entries():
            entries += 1
            size += len(value)
            digest.update(key + Sealer.tag_of(value))
            key_min = key if key_min is None else min(key_min, key)
            key_max = key if key_max is None else max(key_max, key)
            status = EntryRecord.unpack(self.sealer, key, value, f"entry {key.hex()} in {path}").status
            statuses[status] = statuses.get(status, 0) + 1
        indices = []
        for _, index, value in self.iter_samples():
            samples += 1
            size += len(value)
            digest.update(index_key(index) + Sealer.tag_of(value))
            indices.append(index)
        failures = []
        for path, index, value in self.iter_failures():
            size += len(value)
            digest.update(b"F" + index_key(index) + Sealer.tag_of(value))
            failure = FailureRecord.unpack(self.sealer, index, value, f"failure record {index} in {path}")
            failures.append({"index": failure.index, "path": failure.path, "reason": failure.reason, "kind": failure.kind})
        return {
            "path": str(self.path),
            "fingerprint": meta["fingerprint"],
            "salt_check": meta["salt_check"],
            "keyed": meta.get("keyed", False),
            "anonloader_version": meta.get("anonloader_version"),
            "method": meta.get("method"),
            "codec": meta.get("codec"),
            "source_size": meta.get("source_size"),
            "entries": entries,
            "failed_entries": statuses["failed"],
            "dropped_entries": statuses["dropped"],
            "samples": samples,
            "failures": failures,
            "bytes": size,
            "key_min": key_min.hex() if key_min else None,
            "key_max": key_max.hex() if key_max else None,
            "sample_min": min(indices) if indices else None,
            "sample_max": max(indices) if indices else None,
            "checksum": digest.hexdigest(),
        }

    def stats(self) -> dict[str, Any]:
        """What ``anonloader cache stats`` prints (failures counted, the first 20 listed)."""
        summaries = []
        for shard in self._shards:
            single = self if len(self._shards) == 1 else AnonCache(shard.path, secret=self.keys)
            summaries.append(single.summary())
            if single is not self:
                single.close()
        source_size = self.meta.get("source_size")
        samples = sum(s["samples"] for s in summaries)
        failures = sorted((f for s in summaries for f in s["failures"]), key=lambda f: f["index"])
        return {
            "path": str(self.path),
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": self.meta["fingerprint"],
            "keyed": self.meta.get("keyed", False),
            "method": self.meta.get("method"),
            "codec": self.meta.get("codec"),
            "anonloader_version": self.meta.get("anonloader_version"),
            "shards": len(summaries),
            "entries": sum(s["entries"] for s in summaries),
            "failed_entries": sum(s["failed_entries"] for s in summaries),
            "dropped_entries": sum(s["dropped_entries"] for s in summaries),
            "samples": samples,
            "failed_samples": len(failures),
            "failures": [f"sample {f['index']} ({f['path'] or 'no path'}): {f['reason']}" for f in failures[:20]],
            "source_size": source_size,
            "missing_samples": None if source_size is None else max(0, source_size - samples),
            "bytes": sum(s["bytes"] for s in summaries),
        }
