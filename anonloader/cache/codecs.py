"""How anonymized images are stored: raw (default), lz4, zstd, PNG, lossless WebP, QOI, JPEG.

Every codec takes a ``C,H,W`` image, ``float in [0,1]`` quantized to multiples of 1/255 (what
the pipeline returns) or ``uint8``, and gives back a ``C,H,W uint8`` tensor that the caller
owns (writable, not a view of the cache's memory map). The lossless codecs round-trip it
exactly. ``decode`` takes ``bytes`` or any buffer (an LMDB ``memoryview``), so the compressed
bytes are read in place and the decoded pixels are the only copy.

Measured on 20 crops of five real photos (scikit-image's astronaut, coffee, chelsea, rocket
and insightface's ``t1.jpg``), one thread, per image, on the project's shared 2-core machine
(``python benchmarks/cache_read.py --codecs``)::

    256 px      encode   decode    size     | 512 px  encode   decode    size
    lz4         0.54 ms  0.068 ms  173 KiB  |         3.8 ms   0.53 ms   655 KiB
    zstd (1)    0.99 ms  0.316 ms  160 KiB  |         5.5 ms   1.79 ms   590 KiB
    raw         0.07 ms  0.031 ms  192 KiB  |         0.4 ms   0.37 ms   768 KiB
    qoi         0.98 ms  0.698 ms  118 KiB  |         9.3 ms   3.05 ms   425 KiB
    png (1)     10.5 ms  3.58 ms   108 KiB  |         43 ms    16.5 ms   381 KiB
    webp (m0)   8.4 ms   2.60 ms    85 KiB  |         26 ms    10.5 ms   296 KiB
    jpeg q90*   1.3 ms   1.50 ms    24 KiB  |         5.3 ms   2.03 ms    72 KiB   (*lossy)

The default is ``raw``. Decoding is not where a training read spends its time: the sample
records of an epoch do not fit in the CPU cache, so every pass over the pixels goes to memory.
``raw`` needs one pass, the copy out of LMDB's map (the checksum is then computed on the copy,
still in cache, and the tensor is served over the copy: :meth:`RawCodec.adopt`); ``lz4`` adds a
decompression into a second buffer. Measured through ``CachedDataset.__getitems__`` over 512
anonymized 256 px photos (``benchmarks/cache_read.py``), CPU per image in one process: ``raw``
74 us, ``lz4`` 166 us; ``lz4`` saves 10% of the disk on photos. Every other codec stays
selectable (``codec=`` / ``--codec``) for caches where disk matters more than read speed; no
lossless codec comes near JPEG's size on photos (4-8x).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from anonloader.errors import CacheCorruptError, ConfigError

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "Codec",
    "JpegCodec",
    "Lz4Codec",
    "PngCodec",
    "QoiCodec",
    "RawCodec",
    "WebpCodec",
    "ZstdCodec",
    "get_codec",
    "to_uint8",
]

#: the codec ``precompute`` and ``anonymize(cache=...)`` use unless told otherwise.
DEFAULT_CODEC = "raw"

Buffer = Any  # bytes, bytearray or memoryview


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """``C,H,W float in [0,1]`` (or ``uint8``) -> contiguous CPU ``C,H,W uint8`` (round to nearest;
    exact for k/255 values)."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().contiguous()
    return image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().contiguous()


class Codec(Protocol):
    """Encodes ``C,H,W`` images (``float in [0,1]`` or ``uint8``) to bytes and back to ``C,H,W uint8``."""

    name: str
    lossless: bool

    def encode(self, image: torch.Tensor) -> bytes: ...

    def decode(self, data: Buffer) -> torch.Tensor: ...

    def config(self) -> dict: ...


def _corrupt(what: str, error: Exception | str) -> CacheCorruptError:
    return CacheCorruptError(f"stored {what} bytes do not decode ({error}); run anonloader cache verify")


def _pil_encode(image: torch.Tensor, fmt: str, **options: Any) -> bytes:
    from PIL import Image

    pixels = to_uint8(image)
    if pixels.shape[0] != 3:
        raise ConfigError(f"the {fmt} cache codec stores 3-channel images, got {tuple(pixels.shape)}; use codec='zstd'")
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _hwc_to_owned_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _pil_decode(data: Buffer, what: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise _corrupt(what, error) from error
    return _hwc_to_owned_chw(array)


@dataclass(frozen=True)
class PngCodec:
    """Lossless PNG; ``compress_level`` trades write time for size (decode speed barely moves)."""

    compress_level: int = 1
    name: str = "png"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        return _pil_encode(image, "PNG", compress_level=self.compress_level)

    def decode(self, data: Buffer) -> torch.Tensor:
        # PIL, not torchvision: torchvision's libpng decodes PIL's level-1 files ~10x slower
        return _pil_decode(data, "PNG")

    def config(self) -> dict:
        return {"name": self.name, "compress_level": self.compress_level}


@dataclass(frozen=True)
class WebpCodec:
    """Lossless WebP: the smallest lossless files, ~8x slower to decode than ``zstd``."""

    method: int = 0
    name: str = "webp"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        return _pil_encode(image, "WEBP", lossless=True, quality=100 if self.method else 0, method=self.method)

    def decode(self, data: Buffer) -> torch.Tensor:
        return _pil_decode(data, "WebP")

    def config(self) -> dict:
        return {"name": self.name, "method": self.method}


@dataclass(frozen=True)
class JpegCodec:
    """Lossy JPEG at ``quality`` (1-100): smallest, not bit-exact."""

    quality: int = 95
    name: str = "jpeg"
    lossless: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality must be in 1..100, got {self.quality}")

    def encode(self, image: torch.Tensor) -> bytes:
        return _pil_encode(image, "JPEG", quality=self.quality, subsampling=0 if self.quality >= 90 else 2)

    def decode(self, data: Buffer) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            return decode_jpeg(buffer, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise _corrupt("JPEG", error) from error

    def config(self) -> dict:
        return {"name": self.name, "quality": self.quality}


@dataclass(frozen=True)
class QoiCodec:
    """Lossless QOI ("quite OK image"): PNG's size class at ~4x its decode speed."""

    name: str = "qoi"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        import qoi

        pixels = to_uint8(image)
        if pixels.shape[0] not in (3, 4):
            raise ConfigError(f"the qoi cache codec stores 3- or 4-channel images, got {tuple(pixels.shape)}")
        return qoi.encode(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))

    def decode(self, data: Buffer) -> torch.Tensor:
        import qoi

        try:
            array = qoi.decode(bytes(data))
        except (ValueError, RuntimeError) as error:
            raise _corrupt("QOI", error) from error
        if not isinstance(array, np.ndarray) or array.ndim != 3:
            raise _corrupt("QOI", "not an image")
        return _hwc_to_owned_chw(array)

    def config(self) -> dict:
        return {"name": self.name}


#: planar codecs: ``C, H, W`` as three little-endian uint32, then the (compressed) pixel bytes.
_SHAPE = struct.Struct("<III")


def _planar_header(pixels: torch.Tensor) -> bytes:
    if pixels.ndim != 3:
        raise ConfigError(f"cache codecs store C,H,W images, got shape {tuple(pixels.shape)}")
    return _SHAPE.pack(*pixels.shape)


def _planar_shape(view: memoryview, what: str) -> tuple[int, int, int]:
    if len(view) < _SHAPE.size:
        raise _corrupt(what, "shorter than its shape header")
    return _SHAPE.unpack_from(view)


def _raw_shape(view: memoryview) -> tuple[int, int, int]:
    c, h, w = _planar_shape(view, "raw image")
    if len(view) != _SHAPE.size + c * h * w:
        raise _corrupt("raw image", "wrong length for its shape")
    return c, h, w


@dataclass(frozen=True)
class RawCodec:
    """Raw ``C,H,W uint8`` after a 12-byte shape header: the default; no decode work, the fastest
    training reads, 10% larger than ``lz4`` on photos."""

    name: str = "raw"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        pixels = to_uint8(image)
        return _planar_header(pixels) + pixels.numpy().tobytes()

    def decode(self, data: Buffer) -> torch.Tensor:
        view = memoryview(data)
        c, h, w = _raw_shape(view)
        out = torch.empty((c, h, w), dtype=torch.uint8)
        out.numpy().reshape(-1)[:] = np.frombuffer(view, dtype=np.uint8, offset=_SHAPE.size)
        return out

    def adopt(self, data: memoryview) -> torch.Tensor:
        """Like :meth:`decode`, without the copy: a tensor over ``data``'s bytes, for a writable
        buffer that the caller made for this read and hands over (no one else may hold it)."""
        view = memoryview(data)
        c, h, w = _raw_shape(view)
        return torch.frombuffer(view, dtype=torch.uint8, offset=_SHAPE.size).view(c, h, w)

    def config(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class ZstdCodec:
    """Planar ``C,H,W uint8`` compressed with Zstandard at ``level``: 8% smaller than lz4, 4.6x its decode time."""

    level: int = 1
    name: str = "zstd"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        import zstandard

        pixels = to_uint8(image)
        return _planar_header(pixels) + zstandard.ZstdCompressor(level=self.level).compress(pixels.numpy().tobytes())

    def decode(self, data: Buffer) -> torch.Tensor:
        import zstandard

        view = memoryview(data)
        c, h, w = _planar_shape(view, "zstd image")
        try:
            raw = _zstd_decompressor().decompress(view[_SHAPE.size :], max_output_size=c * h * w)
        except zstandard.ZstdError as error:
            raise _corrupt("zstd image", error) from error
        if len(raw) != c * h * w:
            raise _corrupt("zstd image", "wrong length for its shape")
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(c, h, w)

    def config(self) -> dict:
        return {"name": self.name, "level": self.level}


_ZSTD: list[Any] = []


def _zstd_decompressor() -> Any:
    if not _ZSTD:
        import zstandard

        _ZSTD.append(zstandard.ZstdDecompressor())
    return _ZSTD[0]


@dataclass(frozen=True)
class Lz4Codec:
    """Planar ``C,H,W uint8`` compressed with LZ4 (block format): the fastest compressed decode."""

    name: str = "lz4"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        import lz4.block

        pixels = to_uint8(image)
        return _planar_header(pixels) + lz4.block.compress(pixels.numpy().tobytes(), store_size=False)

    def decode(self, data: Buffer) -> torch.Tensor:
        import lz4.block

        view = memoryview(data)
        c, h, w = _planar_shape(view, "lz4 image")
        try:
            raw = lz4.block.decompress(view[_SHAPE.size :], uncompressed_size=c * h * w, return_bytearray=True)
        except lz4.block.LZ4BlockError as error:
            raise _corrupt("lz4 image", error) from error
        if len(raw) != c * h * w:
            raise _corrupt("lz4 image", "wrong length for its shape")
        return torch.frombuffer(raw, dtype=torch.uint8).view(c, h, w)

    def config(self) -> dict:
        return {"name": self.name}


CODECS = {
    "lz4": Lz4Codec,
    "zstd": ZstdCodec,
    "raw": RawCodec,
    "qoi": QoiCodec,
    "png": PngCodec,
    "webp": WebpCodec,
    "jpeg": JpegCodec,
}


def get_codec(codec: str | Codec | None = None, **options: Any) -> Codec:
    """A codec by name with its options, or the codec itself; ``None`` is :data:`DEFAULT_CODEC`.

    Names: ``"lz4"`` (default), ``"zstd"``, ``"raw"``, ``"qoi"``, ``"png"``, ``"webp"``,
    ``"jpeg"``. A suffix sets the one numeric option: ``"jpeg:90"`` (quality), ``"zstd:3"``
    (level), ``"png:6"`` (compress level), ``"webp:4"`` (method).
    """
    if codec is None:
        codec = DEFAULT_CODEC
    if not isinstance(codec, str):
        return codec
    name, _, number = codec.partition(":")
    if name not in CODECS:
        raise ConfigError(f"unknown cache codec {codec!r}; choose one of {', '.join(CODECS)} (e.g. 'jpeg:90')")
    if number:
        option = {"jpeg": "quality", "zstd": "level", "png": "compress_level", "webp": "method"}.get(name)
        if option is None or not number.isdigit():
            raise ConfigError(f"cache codec {codec!r}: only jpeg:Q, zstd:L, png:L and webp:M take a number")
        options[option] = int(number)
    return CODECS[name](**options)


def codec_from_config(config: dict) -> Codec:
    """The codec an entry or a cache's metadata names (``{"name": ..., option: value}``)."""
    options = {k: v for k, v in config.items() if k != "name"}
    name = config.get("name")
    if name not in CODECS:
        raise CacheCorruptError(f"unknown stored codec {name!r}; the cache was written by a newer anonloader, or is corrupt")
    try:
        return CODECS[name](**options)
    except TypeError as error:
        raise CacheCorruptError(f"stored codec options {config} are invalid ({error})") from error
