"""How anonymized images are stored: PNG (default, lossless), lossless WebP, JPEG, raw uint8.

Every codec takes a ``3,H,W float in [0,1]`` tensor quantized to multiples of 1/255 (what the
pipeline returns) and gives back ``3,H,W uint8``; the lossless codecs round-trip it exactly.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from anonloader.errors import CacheCorruptError, ConfigError

__all__ = ["CODECS", "Codec", "JpegCodec", "PngCodec", "RawCodec", "WebpCodec", "get_codec", "to_uint8"]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """``3,H,W float in [0,1]`` -> ``3,H,W uint8`` (round to nearest; exact for k/255 values)."""
    if image.dtype == torch.uint8:
        return image.cpu().contiguous()
    return image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().contiguous()


class Codec(Protocol):
    """Encodes ``3,H,W float in [0,1]`` images to bytes and back to ``3,H,W uint8``."""

    name: str
    lossless: bool

    def encode(self, image: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes) -> torch.Tensor: ...

    def config(self) -> dict: ...


def _pil_encode(image: torch.Tensor, fmt: str, **options) -> bytes:
    from PIL import Image

    array = to_uint8(image).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _pil_decode(data: bytes, what: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.array(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise CacheCorruptError(f"stored {what} bytes do not decode ({error}); run anonloader cache verify") from error
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _torchvision_decode(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(buffer, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise CacheCorruptError(f"stored image bytes do not decode ({error}); run anonloader cache verify") from error


@dataclass(frozen=True)
class PngCodec:
    """Lossless PNG; ``compress_level`` trades write time for size (decode speed barely moves)."""

    compress_level: int = 1
    name: str = "png"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        return _pil_encode(image, "PNG", compress_level=self.compress_level)

    def decode(self, data: bytes) -> torch.Tensor:
        # PIL, not torchvision: torchvision's libpng decodes PIL's level-1 files ~10x slower
        return _pil_decode(data, "PNG")

    def config(self) -> dict:
        return {"name": self.name, "compress_level": self.compress_level}


@dataclass(frozen=True)
class WebpCodec:
    """Lossless WebP: smaller than PNG, slower to write."""

    method: int = 4
    name: str = "webp"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        return _pil_encode(image, "WEBP", lossless=True, quality=100, method=self.method)

    def decode(self, data: bytes) -> torch.Tensor:
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

    def decode(self, data: bytes) -> torch.Tensor:
        return _torchvision_decode(data)

    def config(self) -> dict:
        return {"name": self.name, "quality": self.quality}


_RAW_HEADER = struct.Struct("<III")


@dataclass(frozen=True)
class RawCodec:
    """Raw ``3,H,W uint8`` after a 12-byte shape header: the fastest reads, the largest files."""

    name: str = "raw"
    lossless: bool = True

    def encode(self, image: torch.Tensor) -> bytes:
        pixels = to_uint8(image)
        return _RAW_HEADER.pack(*pixels.shape) + pixels.numpy().tobytes()

    def decode(self, data: bytes) -> torch.Tensor:
        if len(data) < _RAW_HEADER.size:
            raise CacheCorruptError("raw image entry is shorter than its header; run anonloader cache verify")
        channels, height, width = _RAW_HEADER.unpack_from(data)
        if len(data) != _RAW_HEADER.size + channels * height * width:
            raise CacheCorruptError("raw image entry has the wrong length; run anonloader cache verify")
        pixels = torch.frombuffer(bytearray(data[_RAW_HEADER.size :]), dtype=torch.uint8)
        return pixels.view(channels, height, width)

    def config(self) -> dict:
        return {"name": self.name}


CODECS = {"png": PngCodec, "webp": WebpCodec, "jpeg": JpegCodec, "raw": RawCodec}


def get_codec(codec: str | Codec = "png", **options) -> Codec:
    """A codec by name (``"png"``, ``"webp"``, ``"jpeg"``, ``"raw"``) with its options, or itself.

    ``"jpeg:90"`` is shorthand for JPEG at quality 90.
    """
    if not isinstance(codec, str):
        return codec
    name, _, quality = codec.partition(":")
    if quality:
        if name != "jpeg":
            raise ConfigError(f"only jpeg takes a quality suffix, got {codec!r}")
        options["quality"] = int(quality)
    if name not in CODECS:
        raise ConfigError(f"unknown cache codec {codec!r}; choose png, webp, jpeg[:quality] or raw")
    return CODECS[name](**options)
