"""Sample adapters: find the images in a sample, and put anonymized ones back.

A sample may be an image itself (PIL, ``torch.Tensor``, ``numpy.ndarray``, encoded ``bytes``),
or a tuple / list / dict holding images beside labels. :func:`split_sample` returns the
images as :class:`SourceImage` (``3,H,W float32 in [0,1]`` RGB plus what is needed to restore
the original type) and a picklable *skeleton*: the sample with each image replaced by an
:class:`ImageSlot`. :func:`join_sample` fills the slots with anonymized images, restoring each
image's type, dtype, channel count and mode exactly as it came in.

Supported images: PIL in modes RGB, L, RGBA, LA, P, I;16 / I / F; tensors ``C,H,W`` or ``H,W``
uint8 / uint16 / float in [0,1] with C in 1, 3, 4; numpy ``H,W,C`` or ``H,W`` of the same
dtypes; bytes of any format PIL decodes (only where ``image_key`` names them). Alpha and
grayscale are kept: the face is anonymized on RGB, then converted back.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from anonloader.errors import ImageDecodeError, InputError, UnsupportedImageError

__all__ = ["ImageSlot", "SourceImage", "join_sample", "split_sample"]


@dataclass(frozen=True)
class ImageSlot:
    """Marks where image ``position`` of a sample goes back, and how to restore it."""

    position: int
    kind: str  # "pil" | "tensor" | "numpy" | "bytes"
    layout: str  # "chw", "hw", "hwc"
    dtype: str  # "uint8", "uint16", "int32", "float32", ...
    channels: int  # 1, 3 or 4 (what came in)
    mode: str | None = None  # PIL mode, or the encoded format for bytes


@dataclass
class SourceImage:
    """One image of a sample, ready for the pipeline.

    Attributes:
        tensor: ``3,H,W float32 in [0,1]`` RGB.
        slot: how to restore the original type.
        alpha: ``1,H,W float32`` alpha channel when the original had one.
        encoded: the original encoded file bytes, when the sample carried them.
    """

    tensor: torch.Tensor
    slot: ImageSlot
    alpha: torch.Tensor | None = None
    encoded: bytes | None = None

    def content_bytes(self) -> bytes:
        """Canonical bytes for content hashing: encoded bytes when known, else pixels + shape."""
        if self.encoded is not None:
            return b"enc:" + self.encoded
        pixels = self.tensor.mul(255).round().to(torch.uint8).contiguous().numpy()
        header = f"px:{pixels.shape}:{pixels.dtype}:".encode()
        return header + pixels.tobytes()


def _is_image(value: Any) -> bool:
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, torch.Tensor):
        return value.ndim == 3 and value.shape[0] in (1, 3, 4) and value.shape[1] > 4 and value.shape[2] > 4
    if isinstance(value, np.ndarray):
        return value.ndim == 3 and value.shape[2] in (1, 3, 4) and value.shape[0] > 4 and value.shape[1] > 4
    return False


def _scale_of(dtype: str) -> float:
    return {"uint8": 255.0, "uint16": 65535.0, "int32": 65535.0}.get(dtype, 1.0)


def _to_rgb(channels_first: torch.Tensor, index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = channels_first.shape[0]
    if c == 1:
        return channels_first.expand(3, -1, -1).contiguous(), None
    if c == 2:
        return channels_first[:1].expand(3, -1, -1).contiguous(), channels_first[1:]
    if c == 3:
        return channels_first, None
    if c == 4:
        return channels_first[:3].contiguous(), channels_first[3:]
    raise UnsupportedImageError(f"images need 1, 3 or 4 channels, got {c}", index=index)


def _from_array(array: np.ndarray | torch.Tensor, layout: str, kind: str, index: int | None, position: int) -> SourceImage:
    if isinstance(array, np.ndarray):  # PIL hands out read-only views; torch wants writable memory
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    else:
        tensor = array
    if tensor.numel() == 0:
        raise UnsupportedImageError(f"image {position} has zero size {tuple(tensor.shape)}", index=index)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if layout == "hw":
        chw = tensor.unsqueeze(0)
    elif layout == "hwc":
        chw = tensor.permute(2, 0, 1)
    else:
        chw = tensor
    if chw.shape[1] == 0 or chw.shape[2] == 0:
        raise UnsupportedImageError(f"image {position} has zero size {tuple(tensor.shape)}", index=index)
    if dtype in ("uint8", "uint16", "int32"):
        values = chw.to(torch.float32) / _scale_of(dtype)
    elif chw.is_floating_point():
        values = chw.to(torch.float32)
        if not bool(torch.isfinite(values).all()) or float(values.min()) < 0 or float(values.max()) > 1:
            raise UnsupportedImageError(
                f"float image {position} must hold values in [0,1]; normalise after anonymization, not before",
                index=index,
            )
    else:
        raise UnsupportedImageError(f"image {position} has unsupported dtype {dtype}", index=index)
    rgb, alpha = _to_rgb(values.clamp(0, 1), index)
    slot = ImageSlot(position, kind, layout, dtype, int(chw.shape[0]))
    return SourceImage(rgb.contiguous(), slot, alpha)


_PIL_MODES_AS = {"RGB": "RGB", "L": "L", "RGBA": "RGBA", "LA": "LA", "P": "RGBA", "1": "L", "CMYK": "RGB", "YCbCr": "RGB"}


def _from_pil(image: Image.Image, index: int | None, position: int, encoded: bytes | None = None, fmt: str | None = None) -> SourceImage:
    if image.width == 0 or image.height == 0:
        raise UnsupportedImageError(f"image {position} has zero size {image.size}", index=index)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint16 if mode.startswith("I;16") else np.int32)
        if mode == "I":
            array = np.clip(array, 0, 65535).astype(np.uint16)
        source = _from_array(array.astype(np.uint16), "hw", "pil", index, position)
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
        source = _from_array(array, "hw", "pil", index, position)
    else:
        target = _PIL_MODES_AS.get(mode)
        if target is None:
            raise UnsupportedImageError(f"image {position} has unsupported PIL mode {mode!r}", index=index)
        array = np.asarray(image.convert(target), dtype=np.uint8)
        source = _from_array(array, "hw" if array.ndim == 2 else "hwc", "pil", index, position)
    slot = ImageSlot(position, "bytes" if encoded is not None else "pil", source.slot.layout, source.slot.dtype, source.slot.channels, fmt if encoded is not None else mode)
    return SourceImage(source.tensor, slot, source.alpha, encoded)


def _decode(data: bytes, index: int | None, position: int) -> SourceImage:
    if len(data) == 0:
        raise ImageDecodeError(f"image {position} is empty (0 bytes); check how the dataset reads its files", index=index)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            fmt = opened.format or "PNG"
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(
            f"image {position} could not be decoded ({error}); the file is corrupt or truncated: "
            "re-download or remove it",
            index=index,
        ) from error
    return _from_pil(image, index, position, encoded=data, fmt=fmt)


def _source_of(value: Any, index: int | None, position: int, named: bool) -> SourceImage:
    if isinstance(value, Image.Image):
        try:
            value.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageDecodeError(f"image {position} could not be decoded ({error}); the file is corrupt or truncated", index=index) from error
        return _from_pil(value, index, position)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), index, position)
    if isinstance(value, dict) and named and "bytes" in value:  # Hugging Face's Image(decode=False)
        return _decode(bytes(value["bytes"]), index, position)
    if isinstance(value, torch.Tensor):
        if value.ndim == 2:
            return _from_array(value, "hw", "tensor", index, position)
        if value.ndim == 3 and value.shape[0] in (1, 2, 3, 4):
            return _from_array(value, "chw", "tensor", index, position)
    if isinstance(value, np.ndarray):
        if value.ndim == 2:
            return _from_array(value, "hw", "numpy", index, position)
        if value.ndim == 3 and value.shape[2] in (1, 2, 3, 4):
            return _from_array(value, "hwc", "numpy", index, position)
    shape = getattr(value, "shape", None)
    raise UnsupportedImageError(
        f"image {position} is a {type(value).__name__}{'' if shape is None else ' of shape ' + str(tuple(shape))}, "
        "not an image; pass image_key= naming the field that holds the image",
        index=index,
    )


def split_sample(
    sample: Any, image_keys: Sequence[Hashable] | None = None, *, index: int | None = None
) -> tuple[list[SourceImage], Any]:
    """The images of a sample and its skeleton.

    Args:
        sample: an image, or a tuple / list / dict holding images.
        image_keys: dict keys or tuple positions holding images; ``None`` finds them: a bare
            image, every image element of a tuple/list, every image value of a dict.
        index: the sample's index, for error messages.

    Raises:
        InputError: the sample holds no image, or a named field is not a decodable image.
    """
    images: list[SourceImage] = []

    def take(value: Any, named: bool) -> ImageSlot:
        source = _source_of(value, index, len(images), named)
        images.append(source)
        return source.slot

    if image_keys is None and (_is_image(sample) or isinstance(sample, (bytes, bytearray))):
        source = _source_of(sample, index, 0, True)
        return [source], source.slot
    if isinstance(sample, dict):
        keys = list(image_keys) if image_keys is not None else [k for k, v in sample.items() if _is_image(v)]
        missing = [k for k in keys if k not in sample]
        if missing:
            raise InputError(f"sample has no field {missing[0]!r}; its fields are {list(sample)}", index=index)
        skeleton = dict(sample)
        for key in keys:
            skeleton[key] = take(sample[key], True)
    elif isinstance(sample, (tuple, list)):
        positions = list(image_keys) if image_keys is not None else [i for i, v in enumerate(sample) if _is_image(v)]
        bad = [p for p in positions if not isinstance(p, int) or not -len(sample) <= p < len(sample)]
        if bad:
            raise InputError(f"image_key {bad[0]!r} is not a position of this {len(sample)}-tuple sample", index=index)
        items = list(sample)
        for position in positions:
            items[position] = take(sample[position], True)
        skeleton = type(sample)(items) if not hasattr(sample, "_fields") else type(sample)(*items)
    elif image_keys is None:
        _source_of(sample, index, 0, False)  # raises the precise error
        raise AssertionError("unreachable")
    else:
        raise InputError(f"image_key={list(image_keys)} needs a dict or tuple sample, got {type(sample).__name__}", index=index)
    if not images:
        raise InputError(
            f"found no image in a {type(sample).__name__} sample; pass image_key= naming the image field",
            index=index,
        )
    return images, skeleton


def _restore(slot: ImageSlot, rgb: torch.Tensor, alpha: torch.Tensor | None) -> Any:
    if slot.channels in (1, 2):
        # ITU-R 601 luma, as PIL's convert("L") computes it
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype).view(3, 1, 1)
        body = (rgb * weights).sum(0, keepdim=True)
    else:
        body = rgb
    values = body if alpha is None else torch.cat([body, alpha.to(body)])
    array = values.permute(1, 2, 0).numpy()  # H,W,C float in [0,1]
    scale = _scale_of(slot.dtype)
    if slot.dtype in ("uint8", "uint16", "int32"):
        array = np.clip(np.round(array * scale), 0, scale).astype(slot.dtype)
    else:
        array = array.astype(slot.dtype)
    if slot.layout == "hw":
        array = array[:, :, 0]
    array = np.ascontiguousarray(array)
    if slot.kind == "numpy":
        return array
    if slot.kind == "tensor":
        tensor = torch.from_numpy(array)
        return tensor if slot.layout == "hw" else tensor.permute(2, 0, 1).contiguous()
    image = Image.fromarray(array)
    if slot.kind == "pil":
        if slot.mode in ("RGB", "L", "RGBA", "LA") and image.mode != slot.mode:
            image = image.convert(slot.mode)
        return image
    buffer = io.BytesIO()
    fmt = slot.mode or "PNG"
    options = {"quality": 95} if fmt.upper() in ("JPEG", "JPG", "WEBP") else {}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def join_sample(skeleton: Any, images: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor | None] | None = None) -> Any:
    """The sample with each :class:`ImageSlot` of ``skeleton`` replaced by its image.

    Args:
        skeleton: from :func:`split_sample`.
        images: ``3,H,W float in [0,1]`` per slot, in slot order.
        alphas: per slot the ``1,H,W`` alpha from :class:`SourceImage`, or None.
    """
    alphas = alphas or [None] * len(images)

    def fill(value: Any) -> Any:
        if isinstance(value, ImageSlot):
            return _restore(value, images[value.position].detach().cpu().float(), alphas[value.position])
        return value

    if isinstance(skeleton, ImageSlot):
        return fill(skeleton)
    if isinstance(skeleton, dict):
        return {k: fill(v) for k, v in skeleton.items()}
    if isinstance(skeleton, (tuple, list)):
        items = [fill(v) for v in skeleton]
        if hasattr(skeleton, "_fields"):
            return type(skeleton)(*items)
        return type(skeleton)(items)
    return skeleton
