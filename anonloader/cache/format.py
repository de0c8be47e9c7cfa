"""The on-disk format of an anonloader cache (format :data:`CACHE_FORMAT_VERSION`), in one place.

No pickle anywhere: every stored value is a typed, self-describing record — msgpack for the
structure, raw little-endian array bytes with their dtype and shape for arrays and tensors —
and decoding one can only ever build plain data (numbers, strings, bytes, lists, tuples, dicts,
numpy arrays, tensors, image slots). A type the format does not know is an error when the
value is *written*, naming the field (:class:`~anonloader.errors.InputError`).

Frame of every stored value::

    magic (4 bytes) | scheme (1) | tag (8 or 32 bytes) | body

- scheme 0, no secret: tag = xxh3-64 of (value name, body) — catches corruption, authenticates
  nothing (anyone can recompute it);
- scheme 1, keyed: tag = HMAC-SHA256 of (magic, value name, body) under the cache's MAC key
  (derived from the secret, :class:`~anonloader.cache.keys.CacheKeys`). A reader with the
  key refuses a value with scheme 0 or a wrong tag (:class:`CacheCorruptError`); the value
  name (database and LMDB key) is in the tag, so a value moved to another key is refused too.

Values (LMDB named databases of one environment):

- ``meta`` / ``cache``: :func:`pack_meta` — format version, fingerprint, salt check, codec,
  method, anonloader version, source size, whether keyed;
- ``samples`` / 8-byte big-endian index: the *training view* of one sample, everything
  ``as_dataset()[i]`` needs with one lookup and one decode per image — ``u32 header length |
  header | image and alpha payloads``; the header holds the typed skeleton (the sample with
  each image replaced by its slot, parsed only when the sample is built), each image's key,
  status, failure reason, codec name and payload span, and each alpha channel's span;
- ``entries`` / 16-byte key: one anonymized image with its face records and failure reason
  (``u32 header length | header | payload``); an entry written by ``precompute`` holds no
  pixels but a reference ``(sample index, slot)`` into the sample that holds them, so pixels
  are stored once;
- ``failures`` / 8-byte index: why a sample failed (index, source path, reason), so ``cache
  stats`` counts failures and a resumed ``precompute`` retries them.

An image's status is ``"ok"``, ``"dropped"`` (the ``on_no_face="drop"`` policy: no pixels) or
``"failed"`` (with its reason; the pixels, when present, are the fail-closed policy's obscured
image — never the original). Failures are never served as successes.

Caches of format 1 (pickled sample records, before this module) are refused with the command
that rebuilds them; nothing of format 1 is ever unpickled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
import xxhash

from anonloader.errors import CacheCorruptError, CacheError, InputError
from anonloader.fingerprint import CACHE_FORMAT_VERSION
from anonloader.types import FaceRecord

__all__ = [
    "CACHE_FORMAT_VERSION",
    "ENTRY_MAGIC",
    "FAILURE_MAGIC",
    "META_MAGIC",
    "SAMPLE_MAGIC",
    "EntryRecord",
    "FailureRecord",
    "ImageView",
    "SampleRecord",
    "SampleView",
    "Sealer",
    "StoredImage",
    "image_status",
    "index_key",
    "old_format_message",
    "pack_result",
    "pack_value",
    "unpack_result",
    "unpack_value",
]

ENTRY_MAGIC = b"ALE2"
SAMPLE_MAGIC = b"ALS2"
META_MAGIC = b"ALM2"
FAILURE_MAGIC = b"ALF2"
#: magics of format 1 values (never parsed: their bodies are pickles).
_OLD_MAGICS = (b"ALE1", b"ALS1")

_SCHEME_CHECKSUM = 0
_SCHEME_HMAC = 1
_TAG_SIZE = {_SCHEME_CHECKSUM: 8, _SCHEME_HMAC: 32}
_U32 = struct.Struct("<I")
_INDEX = struct.Struct(">Q")
_MAX_HEADER = 1 << 26


def index_key(index: int) -> bytes:
    """The LMDB key of sample ``index`` (8 bytes big-endian, so keys sort by index)."""
    return _INDEX.pack(index)


def old_format_message(path: Any, found: Any) -> str:
    return (
        f"the cache {path} has format {found}; this anonloader reads and writes format {CACHE_FORMAT_VERSION} "
        "(no pickle, authenticated with the secret). Format 1 caches hold pickled records and are never "
        f"loaded, so they cannot be migrated: rebuild it with `anonloader precompute SOURCE {path}` after "
        "moving the old folder away (or into a new path)"
    )


# -- frame ------------------------------------------------------------------------------------
class Sealer:
    """Seals and opens stored values: xxh3 checksums, or HMAC-SHA256 under ``mac_key``.

    Args:
        mac_key: the cache's MAC key (:attr:`CacheKeys.mac_key`), or ``None`` for checksums only.
    """

    def __init__(self, mac_key: bytes | None = None) -> None:
        self.mac_key = mac_key

    @property
    def keyed(self) -> bool:
        return self.mac_key is not None

    def _tag(self, scheme: int, magic: bytes, name: bytes, body: memoryview | bytes) -> bytes:
        if scheme == _SCHEME_HMAC:
            assert self.mac_key is not None
            mac = hmac.new(self.mac_key, magic + _U32.pack(len(name)) + name, hashlib.sha256)
            mac.update(body)
            return mac.digest()
        hasher = xxhash.xxh3_64(name)
        hasher.update(body)
        return hasher.digest()

    def seal(self, magic: bytes, name: bytes, body: bytes) -> bytes:
        """``magic | scheme | tag | body`` for the value stored under ``name``."""
        scheme = _SCHEME_HMAC if self.keyed else _SCHEME_CHECKSUM
        return magic + bytes([scheme]) + self._tag(scheme, magic, name, body) + body

    @staticmethod
    def scheme_of(value: bytes | memoryview) -> int | None:
        view = memoryview(value)
        return view[4] if len(view) > 4 else None

    def open(self, magic: bytes, name: bytes, value: bytes | memoryview, what: str) -> memoryview:
        """The body of a sealed value, after checking its magic and tag (no copy).

        Raises:
            CacheCorruptError: wrong magic (a format 1 pickle included), wrong tag, or an
                unauthenticated value in a keyed cache (never served).
            CacheError: an authenticated value read without the key.
        """
        view = memoryview(value)
        head = bytes(view[:4])
        if head in _OLD_MAGICS:
            raise CacheCorruptError(
                f"{what}: a format 1 value (a pickle) in a format {CACHE_FORMAT_VERSION} cache; it is never loaded. "
                "Rebuild the cache with anonloader precompute"
            )
        if len(view) < 5 or head != magic or view[4] not in _TAG_SIZE:
            raise CacheCorruptError(f"{what}: not an anonloader cache value (bad header); it is never loaded. Run anonloader cache verify")
        scheme = view[4]
        if scheme == _SCHEME_CHECKSUM and self.keyed:
            raise CacheCorruptError(
                f"{what}: the value is not authenticated (checksum only) in a cache read with a secret; it is "
                "never served — it was not written by the holder of the secret. Rebuild the cache with anonloader precompute"
            )
        if scheme == _SCHEME_HMAC and not self.keyed:
            raise CacheError(f"{what}: the cache is authenticated with a secret; pass secret= (or --secret-env) to read it")
        end = 5 + _TAG_SIZE[scheme]
        if len(view) < end:
            raise CacheCorruptError(f"{what}: truncated value; run anonloader cache verify")
        body = view[end:]
        if not hmac.compare_digest(bytes(view[5:end]), self._tag(scheme, magic, name, body)):
            problem = "authentication tag" if scheme == _SCHEME_HMAC else "checksum"
            raise CacheCorruptError(
                f"{what}: {problem} mismatch, the stored bytes are corrupt or were tampered with; it is never served "
                "(read-through mode recomputes it; otherwise run anonloader precompute again)"
            )
        return body

    @staticmethod
    def tag_of(value: bytes | memoryview) -> bytes:
        """The tag bytes of a sealed value (a shard checksum is taken over them)."""
        view = memoryview(value)
        return bytes(view[5 : 5 + _TAG_SIZE.get(view[4] if len(view) > 4 else 0, 8)])


# -- typed values -----------------------------------------------------------------------------
_EXT_TUPLE = 1
_EXT_DICT = 2
_EXT_NDARRAY = 3
_EXT_TENSOR = 4
_EXT_SLOT = 5
_EXT_NAMEDTUPLE = 6
_EXT_NPSCALAR = 7


def _array_fields(array: np.ndarray, where: str) -> list[Any]:
    if array.dtype.kind in "OVUSMm" or array.dtype.hasobject:
        raise InputError(
            f"field {where} is a numpy array of dtype {array.dtype}, which the cache cannot store without pickle; "
            "convert it to a numeric array, a string or a list"
        )
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return [little.dtype.str, list(array.shape), np.ascontiguousarray(little).tobytes()]


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise InputError(f"field {where} is an integer outside 64 bits ({value}); store it as a string")
        return int(value)
    if isinstance(value, float):
        return float(value)
    from anonloader.data.adapters import ImageSlot

    if isinstance(value, ImageSlot):
        fields = {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return msgpack.ExtType(_EXT_SLOT, msgpack.packb(fields, use_bin_type=True))
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise InputError(f"field {where} is a {tensor.layout} tensor; the cache stores dense tensors only (call .to_dense())")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype == torch.bfloat16:
            data = tensor.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            data = _array_fields(tensor.contiguous().numpy(), where)[2]
        return msgpack.ExtType(_EXT_TENSOR, msgpack.packb([dtype, list(tensor.shape), data], use_bin_type=True))
    if isinstance(value, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb(_array_fields(value, where), use_bin_type=True))
    if isinstance(value, np.generic):
        array = np.asarray(value)
        return msgpack.ExtType(_EXT_NPSCALAR, msgpack.packb(_array_fields(array, where), use_bin_type=True))
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        items = [_encode(v, f"{where}.{n}") for n, v in zip(value._fields, value, strict=True)]
        payload = [type(value).__name__, list(value._fields), items]
        return msgpack.ExtType(_EXT_NAMEDTUPLE, msgpack.packb(payload, use_bin_type=True))
    if isinstance(value, tuple):
        return msgpack.ExtType(_EXT_TUPLE, msgpack.packb([_encode(v, f"{where}[{i}]") for i, v in enumerate(value)], use_bin_type=True))
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if type(value) is dict and all(type(k) is str for k in value):  # the common case: a plain msgpack map
            return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
        pairs = [[_encode(k, f"{where} key {k!r}"), _encode(v, f"{where}[{k!r}]")] for k, v in value.items()]
        return msgpack.ExtType(_EXT_DICT, msgpack.packb(pairs, use_bin_type=True))
    raise InputError(
        f"field {where} holds a {type(value).__module__}.{type(value).__qualname__}, which the cache cannot store "
        "(it stores numbers, strings, bytes, lists, tuples, dicts, numpy arrays and tensors, never pickles); "
        "convert it in the dataset, or leave it out of the sample"
    )


_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _namedtuple_type(name: str, fields: Sequence[str]) -> type:
    key = (str(name), tuple(str(f) for f in fields))
    if key not in _NAMEDTUPLES:
        _NAMEDTUPLES[key] = collections.namedtuple(key[0] if key[0].isidentifier() else "Record", key[1], rename=True)  # type: ignore[misc]
    return _NAMEDTUPLES[key]


def _array_from(fields: Any) -> np.ndarray:
    dtype, shape, data = fields
    dt = np.dtype(str(dtype))
    if dt.kind in "OVUSMm" or dt.hasobject:
        raise ValueError(f"stored array dtype {dt} is not allowed")
    return np.frombuffer(data, dtype=dt).reshape([int(s) for s in shape]).copy()


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(_unpack(data))
    if code == _EXT_DICT:
        return {_hashable(k): v for k, v in _unpack(data)}
    if code == _EXT_NDARRAY:
        return _array_from(_unpack(data))
    if code == _EXT_NPSCALAR:
        return _array_from(_unpack(data))[()]
    if code == _EXT_TENSOR:
        dtype, shape, raw = _unpack(data)
        shape = [int(s) for s in shape]
        if dtype == "bfloat16":
            return torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(np.frombuffer(raw, dtype=_tensor_numpy_dtype(str(dtype))).astype(_native(dtype), copy=True)).reshape(shape)
    if code == _EXT_SLOT:
        return _image_slot(data)
    if code == _EXT_NAMEDTUPLE:
        name, fields, items = _unpack(data)
        return _namedtuple_type(name, fields)(*items)
    raise ValueError(f"unknown typed-record extension {code}")


_SLOTS: dict[bytes, Any] = {}


def _image_slot(data: bytes) -> Any:
    """The (frozen, hence shareable) ``ImageSlot`` packed as ``data``; the samples of a dataset
    repeat a handful of slots, so each is decoded once per process."""
    slot = _SLOTS.get(data)
    if slot is None:
        from anonloader.data.adapters import ImageSlot

        if len(_SLOTS) >= 4096:
            _SLOTS.clear()
        slot = _SLOTS[data] = ImageSlot(**_unpack(data))
    return slot


_TENSOR_DTYPES: dict[str, np.dtype] = {}


def _tensor_numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype of a stored tensor dtype name (``"float32"``, ...)."""
    found = _TENSOR_DTYPES.get(name)
    if found is None:
        torch_dtype = getattr(torch, name, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown stored tensor dtype {name!r}")
        found = _TENSOR_DTYPES[name] = torch.empty(0, dtype=torch_dtype).numpy().dtype.newbyteorder("<")
    return found


def _native(name: str) -> np.dtype:
    return _tensor_numpy_dtype(name).newbyteorder("=")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True)


def pack_value(value: Any, where: str = "sample") -> bytes:
    """Typed msgpack bytes of ``value`` (see the module doc). Raises :class:`InputError`
    naming the field when ``value`` holds a type the format does not store."""
    try:
        return msgpack.packb(_encode(value, where), use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as error:
        raise InputError(f"{where} cannot be stored in the cache ({error})") from error


def unpack_value(data: bytes | memoryview, what: str = "stored value") -> Any:
    """The value :func:`pack_value` stored. Raises :class:`CacheCorruptError` on malformed bytes."""
    try:
        return _unpack(data)
    except Exception as error:  # noqa: BLE001 - any decoding failure of stored bytes is corruption
        raise CacheCorruptError(f"{what}: malformed typed record ({type(error).__name__}: {error}); run anonloader cache verify") from error


# -- records ----------------------------------------------------------------------------------
def image_status(image: torch.Tensor | None, error: str | None) -> str:
    """``"failed"`` when the pipeline gave a reason, ``"dropped"`` without pixels, else ``"ok"``."""
    if error is not None:
        return "failed"
    return "dropped" if image is None else "ok"


def _split_header(body: memoryview, what: str) -> tuple[Any, memoryview]:
    if len(body) < 4:
        raise CacheCorruptError(f"{what}: truncated record; run anonloader cache verify")
    (length,) = _U32.unpack_from(body)
    if length > min(_MAX_HEADER, len(body) - 4):
        raise CacheCorruptError(f"{what}: malformed record header; run anonloader cache verify")
    return unpack_value(body[4 : 4 + length], what), body[4 + length :]


def _join_header(header: Any, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return _U32.pack(len(packed)) + packed + payload


def _records_to_rows(records: Sequence[FaceRecord]) -> list[Any]:
    """Face records as plain maps (``FaceRecord.to_dict``: every field, numbers and strings)."""
    return [r.to_dict() for r in records]


def _records_from_rows(rows: Any) -> list[FaceRecord]:
    known = {f.name for f in dataclasses.fields(FaceRecord)}
    records = []
    for row in rows:
        fields = {k: v for k, v in dict(row).items() if k in known}
        fields["box"] = tuple(float(v) for v in fields["box"])
        fields["landmarks"] = tuple(tuple(float(v) for v in p) for p in fields["landmarks"])
        fields["score"] = float(fields["score"])
        records.append(FaceRecord(**fields))
    return records


def _decoder(codec: str) -> Any:
    from anonloader.cache.codecs import CODECS

    found = _DECODERS.get(codec)
    if found is None:
        if codec not in CODECS:
            raise CacheCorruptError(f"stored image has unknown codec {codec!r}; the cache was written by a newer anonloader, or is corrupt")
        found = _DECODERS[codec] = CODECS[codec]()
    return found


_DECODERS: dict[str, Any] = {}


@dataclass
class StoredImage:
    """One image as stored: status, reason, codec and encoded payload (a view while reading)."""

    status: str
    error: str | None
    codec: str | None
    payload: bytes | memoryview
    #: ``payload`` is a slice of a buffer made for this read alone (:meth:`SampleView.open`
    #: with ``copy``), so its pixels may be served without copying them again
    owned: bool = field(default=False, repr=False, compare=False)

    @property
    def has_pixels(self) -> bool:
        return self.codec is not None and len(self.payload) > 0

    def pixels(self) -> torch.Tensor | None:
        """``C,H,W uint8`` the caller owns and may modify, or ``None`` without pixels."""
        if not self.has_pixels:
            return None
        decoder = _decoder(self.codec)  # type: ignore[arg-type]
        if self.owned and hasattr(decoder, "adopt"):
            return decoder.adopt(self.payload)
        return decoder.decode(self.payload)


@dataclass
class EntryRecord:
    """The ``entries`` value of one key: an anonymized image, its face records, its status.

    Attributes:
        status: ``"ok"``, ``"dropped"`` or ``"failed"``.
        error: why the pipeline failed on the image (``"failed"`` only).
        codec: codec name of the pixels, ``None`` without pixels.
        payload: the encoded pixels (empty for a reference or no pixels).
        face_rows: per-face rows (parsed into :class:`FaceRecord` by :meth:`records`).
        meta: fingerprint, method and anonloader version that wrote it.
        ref: ``(sample index, slot)`` holding the pixels, for entries written by precompute.
    """

    status: str
    error: str | None
    codec: str | None
    payload: bytes | memoryview
    face_rows: list[Any]
    meta: dict[str, Any]
    ref: tuple[int, int] | None = None

    @classmethod
    def build(
        cls,
        image: torch.Tensor | None,
        records: Sequence[FaceRecord],
        codec: Any,
        meta: dict[str, Any],
        error: str | None = None,
        ref: tuple[int, int] | None = None,
        payload: bytes | None = None,
    ) -> EntryRecord:
        """An entry for ``image`` (``C,H,W float in [0,1]`` or ``uint8``, or ``None``)."""
        status = image_status(image, error)
        if ref is not None or image is None:
            data = b""
        else:
            data = payload if payload is not None else codec.encode(image)
        return cls(status, error, None if image is None else codec.name, data, _records_to_rows(records), dict(meta), ref)

    def pack(self, sealer: Sealer, key: bytes) -> bytes:
        header = {
            "status": self.status,
            "error": self.error,
            "codec": self.codec,
            "records": self.face_rows,
            "meta": self.meta,
            "ref": None if self.ref is None else list(self.ref),
        }
        return sealer.seal(ENTRY_MAGIC, b"entries/" + key, _join_header(header, bytes(self.payload)))

    @classmethod
    def unpack(cls, sealer: Sealer, key: bytes, value: bytes | memoryview, what: str) -> EntryRecord:
        body = sealer.open(ENTRY_MAGIC, b"entries/" + key, value, what)
        header, payload = _split_header(body, what)
        try:
            ref = header["ref"]
            entry = cls(
                str(header["status"]), header["error"], header["codec"], bytes(payload), list(header["records"]),
                dict(header["meta"]), None if ref is None else (int(ref[0]), int(ref[1])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise CacheCorruptError(f"{what}: malformed entry ({error}); run anonloader cache verify") from error
        if entry.status not in ("ok", "dropped", "failed"):
            raise CacheCorruptError(f"{what}: unknown status {entry.status!r}; run anonloader cache verify")
        return entry

    @property
    def dropped(self) -> bool:
        """Whether no image is served for this entry (dropped by a policy, or failed without pixels)."""
        return not self.has_pixels

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def has_pixels(self) -> bool:
        return self.codec is not None and len(self.payload) > 0

    def image_uint8(self) -> torch.Tensor | None:
        """The image as ``C,H,W uint8`` (a fresh tensor), or ``None`` without pixels."""
        return StoredImage(self.status, self.error, self.codec, self.payload).pixels()

    def image(self) -> torch.Tensor | None:
        """The image as ``C,H,W float32 in [0,1]`` (multiples of 1/255), or ``None`` without pixels."""
        pixels = self.image_uint8()
        return None if pixels is None else pixels.float().div_(255.0)

    def records(self) -> list[FaceRecord]:
        """The :class:`FaceRecord` of every face found in the source image (parsed on demand)."""
        return self.face_records()

    def face_records(self) -> list[FaceRecord]:
        """The :class:`FaceRecord` of every face found in the source image (parsed on demand)."""
        try:
            return _records_from_rows(self.face_rows)
        except (TypeError, ValueError, KeyError) as error:
            raise CacheCorruptError(f"malformed face records ({error}); run anonloader cache verify") from error


@dataclass
class SampleRecord:
    """A sample's training view, as written: skeleton, image keys and stored images.

    Attributes:
        skeleton: the sample with each image replaced by its ``ImageSlot`` (``None`` for a
            sample that failed before its images were found).
        keys: the cache key of each image, in slot order.
        images: each image as stored (:class:`StoredImage`), in slot order.
        alphas: per image the ``1,H,W uint8`` alpha channel, or ``None``.
        failure: why the whole sample failed (bad input), or ``None``.
    """

    skeleton: Any
    keys: list[bytes]
    images: list[StoredImage] = field(default_factory=list)
    alphas: list[torch.Tensor | None] | None = None
    failure: str | None = None

    def pack(self, sealer: Sealer, index: int, where: str | None = None) -> bytes:
        """Sealed bytes of the record of sample ``index``. Raises :class:`InputError` naming the
        field when the skeleton holds a type the format does not store."""
        skeleton = pack_value(self.skeleton, where or f"sample {index}")
        blob = bytearray()
        images = []
        for image in self.images:
            payload = bytes(image.payload) if image.has_pixels else b""
            images.append([image.status, image.error, image.codec if payload else None, len(blob), len(payload)])
            blob += payload
        alphas = []
        for alpha in self.alphas or []:
            if alpha is None:
                alphas.append(None)
                continue
            a = alpha if alpha.dtype == torch.uint8 else alpha.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            a = a.detach().cpu().contiguous().reshape(-1, a.shape[-2], a.shape[-1])
            alphas.append([len(blob), a.numel(), int(a.shape[-2]), int(a.shape[-1])])
            blob += a.numpy().tobytes()
        header = [skeleton, list(self.keys), images, alphas, self.failure]
        return sealer.seal(SAMPLE_MAGIC, b"samples/" + index_key(index), _join_header(header, bytes(blob)))


@dataclass
class ImageView:
    """One image of a :class:`SampleView` (its payload is a view, valid inside the read txn)."""

    key: bytes
    stored: StoredImage


class SampleView:
    """A stored sample record, parsed without copying its payloads (valid inside the read txn).

    Attributes:
        keys, images, failure: as in :class:`SampleRecord`.
    """

    __slots__ = ("_alphas", "_blob", "_skeleton_bytes", "failure", "images", "keys", "what")

    def __init__(self, body: memoryview, what: str, *, owned: bool = False) -> None:
        header, blob = _split_header(body, what)
        self.what = what
        try:
            skeleton, keys, images, alphas, failure = header
            self._skeleton_bytes = skeleton
            self.keys = [bytes(k) for k in keys]
            self.images = []
            for (status, error, codec, offset, length), key in zip(images, self.keys, strict=True):
                if offset < 0 or offset + length > len(blob):
                    raise ValueError("image span outside the record")
                self.images.append(ImageView(key, StoredImage(status, error, codec, blob[offset : offset + length], owned)))
            self._alphas = alphas
            self.failure = failure
        except (TypeError, ValueError) as error:
            raise CacheCorruptError(f"{what}: malformed sample record ({error}); run anonloader cache verify") from error
        self._blob = blob

    @classmethod
    def open(cls, sealer: Sealer, index: int, value: bytes | memoryview, what: str, *, owned: bool = False) -> SampleView:
        """The checked record. ``owned``: ``value`` is a writable copy made for this read alone
        (e.g. by :meth:`AnonCache.read_samples`): the tag is checked on it (the bytes checked
        are the bytes served), and ``raw`` pixels are served as tensors over it, without a
        second copy."""
        return cls(sealer.open(SAMPLE_MAGIC, b"samples/" + index_key(index), value, what), what, owned=owned)

    def skeleton(self) -> Any:
        """The typed skeleton (decoded on each call; cheap: it holds no pixels)."""
        return unpack_value(self._skeleton_bytes, self.what)

    def alphas(self) -> list[torch.Tensor | None] | None:
        """Per image the ``1,H,W uint8`` alpha channel (fresh tensors), or ``None`` when none has one."""
        if not self._alphas or all(a is None for a in self._alphas):
            return None
        out: list[torch.Tensor | None] = []
        for span in self._alphas:
            if span is None:
                out.append(None)
                continue
            offset, length, height, width = span
            if offset < 0 or offset + length > len(self._blob) or length != height * width:
                raise CacheCorruptError(f"{self.what}: malformed alpha span; run anonloader cache verify")
            array = np.frombuffer(self._blob, dtype=np.uint8, count=length, offset=offset).copy()
            out.append(torch.from_numpy(array).view(1, height, width))
        return out

    def to_record(self) -> SampleRecord:
        """A copy that outlives the read transaction."""
        images = [StoredImage(v.stored.status, v.stored.error, v.stored.codec, bytes(v.stored.payload)) for v in self.images]
        return SampleRecord(self.skeleton(), list(self.keys), images, self.alphas(), self.failure)


@dataclass
class FailureRecord:
    """Why sample ``index`` failed: its source path (when known), the reason and where.

    ``kind`` is ``"input"`` (the sample could not be read: nothing stored) or ``"image"`` (the
    pipeline failed on an image: the fail-closed output is stored with status ``"failed"``).
    """

    index: int
    path: str | None
    reason: str
    kind: str = "input"

    def pack(self, sealer: Sealer) -> bytes:
        body = pack_value({"index": self.index, "path": self.path, "reason": self.reason, "kind": self.kind}, "failure")
        return sealer.seal(FAILURE_MAGIC, b"failures/" + index_key(self.index), body)

    @classmethod
    def unpack(cls, sealer: Sealer, index: int, value: bytes | memoryview, what: str) -> FailureRecord:
        body = sealer.open(FAILURE_MAGIC, b"failures/" + index_key(index), value, what)
        data = unpack_value(body, what)
        try:
            return cls(int(data["index"]), data["path"], str(data["reason"]), str(data["kind"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CacheCorruptError(f"{what}: malformed failure record ({error})") from error


def pack_meta(sealer: Sealer, meta: dict[str, Any]) -> bytes:
    """The sealed ``meta/cache`` value."""
    return sealer.seal(META_MAGIC, b"meta/cache", pack_value(meta, "cache metadata"))


def peek_meta(value: bytes | memoryview, what: str) -> dict[str, Any]:
    """The metadata fields *before* checking the tag (to tell a wrong secret apart from
    tampering); parsing typed records builds plain data only, so this is safe."""
    view = memoryview(value)
    if len(view) < 5 or bytes(view[:4]) != META_MAGIC or view[4] not in _TAG_SIZE:
        raise CacheCorruptError(f"{what}: not anonloader cache metadata (bad header)")
    meta = unpack_value(view[5 + _TAG_SIZE[view[4]] :], what)
    if not isinstance(meta, dict):
        raise CacheCorruptError(f"{what}: malformed cache metadata")
    meta["keyed"] = view[4] == _SCHEME_HMAC
    return meta


def open_meta(sealer: Sealer, value: bytes | memoryview, what: str) -> dict[str, Any]:
    meta = unpack_value(sealer.open(META_MAGIC, b"meta/cache", value, what), what)
    if not isinstance(meta, dict):
        raise CacheCorruptError(f"{what}: malformed cache metadata")
    meta["keyed"] = sealer.keyed
    return meta


# -- results crossing processes (workers, Ray actors -> the writer) ---------------------------
def pack_result(
    index: int,
    entries: Sequence[tuple[bytes, bytes]],
    sample: bytes | None,
    failure: bytes | None,
    dropped: bool,
    failed: bool,
) -> bytes:
    """One computed sample as plain msgpack of sealed values (what crosses process boundaries
    and Ray's object store instead of a pickle)."""
    return msgpack.packb([int(index), [[k, v] for k, v in entries], sample, failure, bool(dropped), bool(failed)], use_bin_type=True)


def unpack_result(data: bytes | memoryview) -> tuple[int, list[tuple[bytes, bytes]], bytes | None, bytes | None, bool, bool]:
    """Inverse of :func:`pack_result` (the sealed values inside are checked when written)."""
    try:
        index, entries, sample, failure, dropped, failed = msgpack.unpackb(data, raw=False, use_list=True)
        return int(index), [(bytes(k), bytes(v)) for k, v in entries], sample, failure, bool(dropped), bool(failed)
    except Exception as error:  # noqa: BLE001 - malformed worker output
        raise CacheCorruptError(f"a worker's result is malformed ({type(error).__name__}: {error})") from error
