"""Sample adapters: find every image in a sample, and put anonymized ones back.

A sample may be an image itself or any nesting of tuples / lists / dicts (named tuples too)
holding images beside labels. :func:`split_sample` walks all of it and returns the images as
:class:`SourceImage` (``3,H,W float32 in [0,1]`` RGB plus what is needed to restore the
original) and a *skeleton*: the sample with each image replaced by an :class:`ImageSlot`.
:func:`join_sample` fills the slots with anonymized images, restoring each image's type,
layout, dtype, channel count and mode as it came in. An image in which nothing changed (no
face, ``on_no_face="keep"``) comes back as the very object that went in.

Fail closed: every field that *looks like an image* is anonymized or is an error that names
the sample and the field (``sample 3 / field ['views'][1]: ...``). Nothing image-like passes
silently. The user declares the exceptions: ``image_keys`` (these fields are images, decode
them whatever they look like) and ``passthrough_keys`` (these fields hold no face; leave them).

What looks like an image (the ambiguity rule):

- a PIL image, any mode;
- bytes (``bytes``, ``bytearray``, ``memoryview``) that PIL opens as JPEG, PNG, GIF, BMP, TIFF,
  WebP, PPM/PGM, JPEG 2000, ICO, AVIF/HEIF, QOI, PSD, DDS, ICNS or SGI (formats with a strong
  signature; bytes PIL would take for a TGA or PCX file are too often something else), or
  that start with a JPEG, PNG, GIF, TIFF, WebP, JPEG 2000 or QOI signature (then undecodable
  bytes are an :class:`~anonloader.errors.ImageDecodeError`);
  a Hugging Face ``{"bytes": ..., "path": ...}`` dict holding such bytes;
- a ``torch.Tensor`` or ``numpy.ndarray`` with no zero-length axis whose last two (rank 2),
  or whose spatial (rank 3 and 4) axes are all at least :data:`MIN_IMAGE_SIDE` pixels, and:

  - rank 2 ``H,W``: dtype uint8, uint16 or floating point (signed or wide integers and bools
    are label maps, masks or indices, never images);
  - rank 3 ``C,H,W`` or ``H,W,C`` with C in 1..4 (the channel axis is whichever end is <= 4;
    both ends cannot be since the other axes are >= 16): uint8, uint16, floating point; for
    C in 3..4 any integer dtype too (three or four channels of integers is a picture; the
    dtype is then refused with a message saying how to convert);
  - rank 4 ``N,C,H,W`` or ``N,H,W,C`` by the same rule: a stack of N images (a clip, a
    multi-view set), each frame anonymized.

  So label vectors, one-hot rows, class-id maps, boxes ``N,4`` and landmarks ``N,2`` /
  ``5,2`` / ``N,5,2`` are never taken for images, while an embedding matrix with both sides
  >= 16 is (declare it in ``passthrough_keys``). A field named in ``image_keys`` is read by
  the same rule without the size limit (channels-first wins where both ends could be C).

What is anonymized, and what is refused:

- 1 channel (grayscale) and 3 channels (RGB): anonymized, channels-first or channels-last.
- PIL modes with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency): RGB anonymized,
  alpha kept. Arrays with 2 or 4 channels: nothing says whether the extra channel is alpha or
  another band (near infrared, depth), so they are an error unless ``alpha_channel=True``
  declares it alpha (then it is kept as it is) or the field is in ``passthrough_keys``.
- uint8 and floating point (float16, bfloat16, float32, float64; values in [0,1]); other
  dtypes are an error saying how to convert.
- 16-bit input (uint16 arrays, PIL modes ``I;16*`` / ``I``, 16-bit PNG and TIFF files) is
  refused with :class:`~anonloader.errors.UnsupportedImageError`: the pipeline and the cache
  work at 8 bits per channel, and reducing the depth is a choice the user should make and see
  (the message says how), not one anonloader makes silently.
- Encoded images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused before they
  are decoded (:class:`~anonloader.errors.ImageTooLargeError`).

Containers walked: tuples, lists, dicts (named tuples and subclasses kept), dataclass
instances (fields, shown as ``.name`` in paths) and numpy object arrays. Objects of other
types (strings, numbers, ``None``, other classes) are left as they are: the walker does not
look inside them. Python lists of numbers are never images (convert pixel data to arrays).
torchvision's ``Mask``, ``BoundingBoxes`` and ``KeyPoints`` are never images.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from anonloader.errors import (
    AnonloaderError,
    ConfigError,
    ImageDecodeError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
)

__all__ = [
    "MIN_IMAGE_SIDE",
    "ImageSlot",
    "SourceImage",
    "as_keys",
    "field_name",
    "image_layout",
    "iter_slots",
    "join_sample",
    "looks_like_image",
    "split_sample",
]

#: the smallest side (pixels) of an array that is taken for an image
MIN_IMAGE_SIDE = 16


def as_keys(keys: Hashable | Sequence[Hashable] | None) -> list[Hashable] | None:
    """One key (a string or a position) or a list / tuple of keys -> a list, or None. A tuple
    path such as ``("views", 1)`` is one key only inside a list: ``[("views", 1)]``."""
    if keys is None:
        return None
    if isinstance(keys, (str, int)):
        return [keys]
    return list(keys)

#: formats whose files carry a signature strong enough to tell them from other bytes
ENCODED_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "JPEG2000", "ICO", "AVIF", "HEIF", "QOI",
     "PSD", "DDS", "ICNS", "SGI"}
)
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
    b"\xffO\xffQ",  # JPEG 2000 codestream
    b"qoif",
)
_SCALARS = (int, float, complex, str, type(None))
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_PIL_AS = {
    "RGB": "RGB", "L": "L", "1": "L", "RGBA": "RGBA", "LA": "LA", "La": "LA", "RGBa": "RGBA",
    "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "RGBX": "RGB",
}
#: PIL modes an anonymized image is converted back to (others come back in the mode they were read as)
_PIL_BACK = frozenset({"RGB", "L", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "1"})
_HOW_TO_8_BIT = (
    "anonloader works at 8 bits per channel and does not reduce the depth silently; convert it "
    "first, e.g. numpy: (a >> 8).astype(np.uint8) for uint16, or a float32 array a / 65535 in [0,1] "
    "(anonymized images come back quantized to 1/255 steps)"
)


@dataclass(frozen=True)
class ImageSlot:
    """Marks where image ``position`` of a sample goes back, and how to restore it.

    Attributes:
        position: index of the (first) image in the list :func:`split_sample` returns.
        kind: ``"pil"``, ``"tensor"``, ``"numpy"``, ``"bytes"`` or ``"bytes_dict"`` (a Hugging
            Face ``{"bytes", "path"}`` dict).
        layout: ``"hw"``, ``"chw"``, ``"hwc"``, ``"nchw"`` or ``"nhwc"``.
        dtype: ``"uint8"``, ``"float32"``, ``"bfloat16"`` ...
        channels: channels that came in: 1, 2, 3 or 4.
        mode: the PIL mode, or the encoded format for bytes.
        frames: images in a stack (``n...`` layouts; they are ``position .. position+frames-1``).
        field: where it sits in the sample, e.g. ``"['views'][1]"`` (``""`` for the sample itself).
    """

    position: int
    kind: str
    layout: str
    dtype: str
    channels: int
    mode: str | None = None
    frames: int = 1
    field: str = ""


@dataclass
class SourceImage:
    """One image of a sample, ready for the pipeline.

    Attributes:
        tensor: ``3,H,W float32 in [0,1]`` RGB.
        slot: how to restore the original (shared by the frames of a stack).
        alpha: ``1,H,W float32 in [0,1]`` alpha (or declared extra channel) when there is one.
        encoded: the original encoded file bytes, when the sample carried them.
        original: the sample's own value for this image (not pickled), returned untouched by
            :func:`join_sample` when anonymization changed nothing.
    """

    tensor: torch.Tensor
    slot: ImageSlot
    alpha: torch.Tensor | None = None
    encoded: bytes | None = None
    original: Any = field(default=None, repr=False, compare=False)

    def content_bytes(self) -> bytes:
        """Canonical bytes for content hashing: encoded bytes when known, else pixels + shape."""
        if self.encoded is not None:
            return b"enc:" + self.encoded
        pixels = self.tensor.mul(255).round().to(torch.uint8).contiguous().numpy()
        header = f"px:{pixels.shape}:{pixels.dtype}:".encode()
        return header + pixels.tobytes()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["original"] = None
        return state


class _Attribute(str):
    """A dataclass field's name in a path: equal to the plain name, shown as ``.name``."""

    __slots__ = ()


def field_name(path: Sequence[Hashable]) -> str:
    """``("views", 1)`` -> ``"['views'][1]"``; ``()`` -> ``""`` (the sample itself); dataclass
    fields show as ``.name``."""
    return "".join(f".{part}" if isinstance(part, _Attribute) else f"[{part!r}]" for part in path)


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_object_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == object


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, tuple, list)) or _is_dataclass_instance(value) or _is_object_array(value)


def _framework_non_image(value: Any) -> bool:
    """torchvision's masks, boxes and keypoints: geometry and labels, never pictures (checked
    by name so that importing anonloader does not import torchvision)."""
    kind = type(value)
    return kind.__module__.startswith("torchvision.tv_tensors") and kind.__name__ in ("Mask", "BoundingBoxes", "KeyPoints")


def _dtype_name(value: torch.Tensor | np.ndarray) -> str:
    return str(value.dtype).removeprefix("torch.")


def _is_unsigned_8_or_16(dtype: str) -> bool:
    return dtype in ("uint8", "uint16")


def image_layout(value: Any, min_side: int = MIN_IMAGE_SIDE) -> str | None:
    """The layout of an array that looks like an image (see the module docstring), else None.

    Args:
        value: anything; only ``torch.Tensor`` and ``numpy.ndarray`` can have a layout.
        min_side: the smallest spatial side taken for an image (1 for a field the user named).

    Returns:
        ``"hw"``, ``"chw"``, ``"hwc"``, ``"nchw"``, ``"nhwc"`` or None.
    """
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        return None
    shape = tuple(int(s) for s in value.shape)
    if len(shape) < 2 or len(shape) > 4 or 0 in shape:
        return None
    dtype = _dtype_name(value)
    if dtype == "bool" or "complex" in dtype or (isinstance(value, np.ndarray) and value.dtype.kind not in "uif"):
        return None
    if len(shape) == 4:
        inner = image_layout(value[0], min_side)
        return None if inner not in ("chw", "hwc") else "n" + inner
    integer = not (dtype in _FLOAT_DTYPES or _is_unsigned_8_or_16(dtype))

    def big(*sides: int) -> bool:
        return all(side >= min_side for side in sides)

    if len(shape) == 2:
        return "hw" if big(*shape) and not integer else None
    for layout, channels, sides in (("chw", shape[0], shape[1:]), ("hwc", shape[2], shape[:2])):
        if 1 <= channels <= 4 and big(*sides) and (not integer or channels >= 3):
            return layout
    return None


def _signature(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _sniff(data: bytes) -> bool:
    """Whether ``data`` is (or claims to be, by its signature) an encoded image."""
    if len(data) == 0:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as opened:
                return opened.format in ENCODED_FORMATS or _signature(data)
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - not an image PIL can open; the signature decides
        return _signature(data)


def _is_bytes(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _is_hf_image(value: Any) -> bool:
    return isinstance(value, dict) and "bytes" in value and set(value) <= {"bytes", "path"} and _is_bytes(value["bytes"])


def looks_like_image(value: Any) -> bool:
    """Whether one value (not a container) looks like an image by the module's rule."""
    if isinstance(value, Image.Image):
        return True
    if _is_bytes(value):
        return _sniff(bytes(value))
    if _is_hf_image(value):
        return _sniff(bytes(value["bytes"]))
    return image_layout(value) is not None


def _describe(value: Any) -> str:
    if isinstance(value, Image.Image):
        return f"a PIL image ({value.mode}, {value.width}x{value.height})"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {_dtype_name(value)}"
    if _is_bytes(value) or _is_hf_image(value):
        return f"encoded image bytes ({len(value if _is_bytes(value) else value['bytes'])} bytes)"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class _Where:
    """What errors about one field say: the sample's index and the field's path."""

    index: int | None
    field: str

    def error(self, kind: type[InputError], message: str) -> InputError:
        return kind(message, index=self.index, field=self.field or None)


# -- arrays -------------------------------------------------------------------------------------


def _channels_first(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "hw":
        return tensor.unsqueeze(0)
    if layout == "hwc":
        return tensor.permute(2, 0, 1)
    return tensor


def _check_dtype(dtype: str, where: _Where) -> None:
    if dtype == "uint8" or dtype in _FLOAT_DTYPES:
        return
    if dtype == "uint16" or dtype == "int32":
        raise where.error(UnsupportedImageError, f"the image has 16 or more bits per channel ({dtype}); {_HOW_TO_8_BIT}")
    raise where.error(
        UnsupportedImageError,
        f"the image has dtype {dtype}; pass uint8 pixels (0..255) or floating point values in [0,1]",
    )


def _split_channels(chw: torch.Tensor, alpha_channel: bool, where: _Where) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = chw.shape[0]
    if c in (2, 4) and not alpha_channel:
        raise where.error(
            UnsupportedImageError,
            f"the image has {c} channels and nothing says whether channel {c} is alpha or another band "
            "(near infrared, depth); pass alpha_channel=True if it is alpha (RGB or gray is anonymized, "
            "the extra channel kept as it is), or name the field in passthrough_keys= if it cannot show a face",
        )
    if c == 1:
        return chw.expand(3, -1, -1).contiguous(), None
    if c == 2:
        return chw[:1].expand(3, -1, -1).contiguous(), chw[1:].contiguous()
    if c == 3:
        return chw.contiguous(), None
    if c == 4:
        return chw[:3].contiguous(), chw[3:].contiguous()
    raise where.error(UnsupportedImageError, f"images need 1 to 4 channels, got {c}")


def _frame(chw: torch.Tensor, dtype: str, alpha_channel: bool, where: _Where) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``C,H,W`` frame of any accepted dtype -> (``3,H,W float32 in [0,1]``, alpha or None)."""
    if dtype == "uint8":
        values = chw.to(torch.float32) / 255.0
    else:
        values = chw.to(torch.float32)
        if not bool(torch.isfinite(values).all()) or float(values.min()) < 0 or float(values.max()) > 1:
            raise where.error(
                UnsupportedImageError,
                f"floating point images must hold finite values in [0,1] (got {float(values.min()):.3g} .. "
                f"{float(values.max()):.3g}); normalise after anonymization, not before, or declare the "
                "field in passthrough_keys= if it is not a picture",
            )
    return _split_channels(values.detach().cpu(), alpha_channel, where)


def _from_array(
    value: torch.Tensor | np.ndarray, layout: str, kind: str, alpha_channel: bool, where: _Where, position: int
) -> list[SourceImage]:
    if isinstance(value, np.ndarray):
        _check_dtype(value.dtype.name, where)  # before torch sees dtypes it has no type for
        native = value.astype(value.dtype.newbyteorder("=")) if value.dtype.byteorder == ">" else value
        if not native.flags.writeable or any(stride < 0 for stride in native.strides):
            native = native.copy()  # torch takes neither read-only nor negatively strided memory
        tensor = torch.from_numpy(native)
    else:
        tensor = value.detach()
        if type(tensor) is not torch.Tensor:
            tensor = tensor.as_subclass(torch.Tensor)
    dtype = _dtype_name(tensor)
    if tensor.numel() == 0:
        raise where.error(UnsupportedImageError, f"the image has zero size {tuple(tensor.shape)}; remove it from the dataset")
    _check_dtype(dtype, where)
    frames = [tensor] if not layout.startswith("n") else list(tensor.unbind(0))
    inner = layout.removeprefix("n")
    out = []
    for k, frame in enumerate(frames):
        chw = _channels_first(frame, inner)
        rgb, alpha = _frame(chw, dtype, alpha_channel, where)
        out.append((rgb, alpha, int(chw.shape[0])))
    slot = ImageSlot(position, kind, layout, dtype, out[0][2], None, len(frames), where.field)
    return [SourceImage(rgb, slot, alpha) for rgb, alpha, _ in out]


# -- PIL and encoded bytes ---------------------------------------------------------------------


def _from_pil(image: Image.Image, where: _Where, position: int, alpha_channel: bool) -> SourceImage:
    if image.width == 0 or image.height == 0:
        raise where.error(UnsupportedImageError, f"the image has zero size {image.size}; remove it from the dataset")
    mode = image.mode
    if mode.startswith("I") or ";16" in mode:
        raise where.error(UnsupportedImageError, f"the PIL image has mode {mode!r} (16 or more bits per channel); {_HOW_TO_8_BIT}")
    if mode == "F":
        source = _from_array(np.asarray(image, dtype=np.float32), "hw", "pil", alpha_channel, where, position)[0]
        return SourceImage(source.tensor, ImageSlot(position, "pil", "hw", "float32", 1, "F", 1, where.field))
    target = _PIL_AS.get(mode)
    if target is None:
        raise where.error(UnsupportedImageError, f"the PIL image has mode {mode!r}, which anonloader cannot read; convert it to RGB")
    if mode == "P" and ("transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"):
        target = "RGBA"
    array = np.asarray(image.convert(target), dtype=np.uint8)
    layout = "hw" if array.ndim == 2 else "hwc"
    # a PIL alpha channel is alpha by definition: no declaration needed
    source = _from_array(array, layout, "pil", True, where, position)[0]
    slot = ImageSlot(position, "pil", layout, "uint8", source.slot.channels, mode, 1, where.field)
    return SourceImage(source.tensor, slot, source.alpha)


def _bit_depth_over_8(opened: Image.Image, data: bytes) -> bool:
    if opened.format == "PNG" and len(data) > 24 and data[12:16] == b"IHDR":
        return data[24] > 8
    if opened.format == "TIFF":
        bits = getattr(opened, "tag_v2", {}).get(258)
        values = bits if isinstance(bits, tuple) else (bits,) if bits is not None else ()
        return any(int(b) > 8 for b in values)
    return False


def _decode(data: bytes, where: _Where, position: int, kind: str, alpha_channel: bool) -> SourceImage:
    if len(data) == 0:
        raise where.error(ImageDecodeError, "the image is empty (0 bytes); check how the dataset reads its files")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                fmt = opened.format or "PNG"
                if limit is not None and opened.width * opened.height > limit:
                    raise Image.DecompressionBombError(f"{opened.width}x{opened.height} pixels")
                if _bit_depth_over_8(opened, data):
                    raise where.error(UnsupportedImageError, f"the {fmt} file has 16 bits per channel; {_HOW_TO_8_BIT}")
                opened.load()
                image = opened.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise where.error(
            ImageTooLargeError,
            f"the encoded image is larger than PIL.Image.MAX_IMAGE_PIXELS={limit} ({error}), which guards "
            "against decompression bombs; remove the file, or raise the limit if you trust it",
        ) from error
    except AnonloaderError:
        raise
    except Exception as error:
        raise where.error(
            ImageDecodeError,
            f"the image could not be decoded ({type(error).__name__}: {error}); the file is corrupt or "
            "truncated: re-download or remove it",
        ) from error
    source = _from_pil(image, where, position, alpha_channel)
    slot = ImageSlot(position, kind, source.slot.layout, source.slot.dtype, source.slot.channels, fmt, 1, where.field)
    return SourceImage(source.tensor, slot, source.alpha, data)


# -- the walker --------------------------------------------------------------------------------


def _normalise_key(key: Hashable, sample: Any) -> tuple[Hashable, ...]:
    """A declared key as a path: a top-level key / position, or a tuple path."""
    if isinstance(sample, dict) and key in sample:
        return (key,)
    if isinstance(sample, (tuple, list)) and isinstance(key, int) and not isinstance(key, bool):
        return (key % len(sample),) if -len(sample) <= key < len(sample) else (key,)
    if isinstance(key, tuple):
        return key
    return (key,)


def _resolve(sample: Any, path: tuple[Hashable, ...]) -> bool:
    value = sample
    for part in path:
        in_dict = isinstance(value, dict) and part in value
        in_sequence = isinstance(value, (tuple, list)) and isinstance(part, int) and 0 <= part < len(value)
        if in_dict or in_sequence:
            value = value[part]
        elif _is_dataclass_instance(value) and part in {f.name for f in dataclasses.fields(value)}:
            value = getattr(value, str(part))
        else:
            return False
    return True


class _Walker:
    def __init__(
        self,
        index: int | None,
        image_paths: list[tuple[Hashable, ...]] | None,
        passthrough_paths: list[tuple[Hashable, ...]],
        alpha_channel: bool,
        strict: bool,
        skip: Callable[[Any], bool] | None,
    ) -> None:
        self.index = index
        self.image_paths = image_paths
        self.passthrough_paths = passthrough_paths
        self.alpha_channel = alpha_channel
        self.strict = strict
        self.skip = skip
        self.images: list[SourceImage] = []
        self.active: set[int] = set()  # containers on the current path (reference cycles)

    def _take(self, value: Any, path: tuple[Hashable, ...], declared: bool) -> ImageSlot:
        where = _Where(self.index, field_name(path))
        if not declared and self.strict:
            named = [field_name(p) for p in self.image_paths or []]
            raise where.error(
                UnsupportedImageError,
                f"this field looks like an image ({_describe(value)}) but image_key= names only {named}; "
                "add it to image_key= to anonymize it too, or to passthrough_keys= if it cannot show a face",
            )
        position = len(self.images)
        try:
            if isinstance(value, Image.Image):
                try:
                    value.load()
                except Exception as error:
                    raise where.error(ImageDecodeError, f"the PIL image could not be read ({type(error).__name__}: {error})") from error
                sources = [_from_pil(value, where, position, self.alpha_channel)]
            elif _is_bytes(value):
                sources = [_decode(bytes(value), where, position, "bytes", self.alpha_channel)]
            elif isinstance(value, dict):
                sources = [_decode(bytes(value["bytes"]), where, position, "bytes_dict", self.alpha_channel)]
            else:
                layout = image_layout(value, 1)
                if layout is None and 0 in tuple(value.shape):
                    raise where.error(UnsupportedImageError, f"the image has zero size {tuple(value.shape)}; remove it from the dataset")
                if layout is None:
                    raise where.error(
                        UnsupportedImageError,
                        f"image_key= names this field but it is {_describe(value)}, not an image (an image is "
                        f"H,W / C,H,W / H,W,C with C in 1..4 and sides >= {MIN_IMAGE_SIDE}, PIL, or encoded bytes)",
                    )
                sources = _from_array(value, layout, "numpy" if isinstance(value, np.ndarray) else "tensor", self.alpha_channel, where, position)
        except AnonloaderError:
            raise
        except Exception as error:
            raise where.error(UnsupportedImageError, f"could not read {_describe(value)} as an image ({type(error).__name__}: {error})") from error
        sources[0].original = value
        self.images.extend(sources)
        return sources[0].slot

    def walk(self, value: Any, path: tuple[Hashable, ...], declared: bool) -> Any:
        """``value``'s skeleton. ``declared``: inside a field named in ``image_keys`` (so
        image-like values here are expected); a field named itself is also *forced*: it must
        be an image (or hold one), whatever it looks like."""
        if any(path[: len(p)] == p for p in self.passthrough_paths):
            return value
        forced = self.image_paths is not None and path in self.image_paths
        declared = declared or forced
        if _framework_non_image(value) or (self.skip is not None and self.skip(value)):
            return value
        if isinstance(value, Image.Image) or (_is_bytes(value) and (forced or _sniff(bytes(value)))):
            return self._take(value, path, declared)
        if _is_hf_image(value) and (forced or _sniff(bytes(value["bytes"]))):
            return self._take(value, path, declared)
        if _is_container(value):
            if id(value) in self.active:
                raise _Where(self.index, field_name(path)).error(
                    InputError, "the sample contains itself (a reference cycle); samples must be trees"
                )
            before = len(self.images)
            self.active.add(id(value))
            try:
                skeleton = self._walk_container(value, path, declared)
            finally:
                self.active.discard(id(value))
            if forced and len(self.images) == before:
                raise _Where(self.index, field_name(path)).error(
                    UnsupportedImageError, f"image_key= names this field but it holds no image ({_describe(value)})"
                )
            return skeleton
        if isinstance(value, (torch.Tensor, np.ndarray)) and (forced or image_layout(value) is not None):
            return self._take(value, path, declared)
        if forced:
            raise _Where(self.index, field_name(path)).error(
                UnsupportedImageError, f"image_key= names this field but it is {_describe(value)}, not an image"
            )
        return value

    def _walk_container(self, value: Any, path: tuple[Hashable, ...], declared: bool) -> Any:
        if _is_dataclass_instance(value):
            changed = {}
            for item in dataclasses.fields(value):
                inner = getattr(value, item.name, None)
                out = self.walk(inner, (*path, _Attribute(item.name)), declared)
                if out is not inner:
                    changed[item.name] = out
            return _replace_fields(value, changed) if changed else value
        if _is_object_array(value):
            cells = {}
            for at in np.ndindex(value.shape):
                out = self.walk(value[at], (*path, at), declared)
                if out is not value[at]:
                    cells[at] = out
            if not cells:
                return value
            skeleton = value.copy()
            for at, out in cells.items():
                skeleton[at] = out
            return skeleton
        if isinstance(value, dict):
            changed = {}
            for key, item in value.items():
                out = self.walk(item, (*path, key), declared)
                if out is not item:
                    changed[key] = out
            if not changed:
                return value
            skeleton = copy.copy(value)
            skeleton.update(changed)
            return skeleton
        if len(value) > 16 and all(isinstance(item, _SCALARS) for item in value):
            return value  # numbers / strings: nothing to walk into
        items = [self.walk(item, (*path, i), declared) for i, item in enumerate(value)]
        if all(a is b for a, b in zip(items, value)):
            return value
        if hasattr(value, "_fields"):
            return type(value)(*items)
        try:
            return type(value)(items)
        except TypeError:
            return list(items) if isinstance(value, list) else tuple(items)


def _replace_fields(value: Any, changed: dict[str, Any]) -> Any:
    """A shallow copy of dataclass ``value`` with ``changed`` fields (bypassing ``__init__``,
    ``__post_init__`` checks and ``frozen``: a skeleton holds slots where images were)."""
    out = copy.copy(value)
    for name, item in changed.items():
        object.__setattr__(out, name, item)
    return out


def split_sample(
    sample: Any,
    image_keys: Sequence[Hashable] | None = None,
    *,
    index: int | None = None,
    passthrough_keys: Sequence[Hashable] | None = None,
    alpha_channel: bool = False,
    strict: bool | None = None,
    require_image: bool = True,
    skip: Callable[[Any], bool] | None = None,
) -> tuple[list[SourceImage], Any]:
    """The images of a sample and its skeleton.

    Args:
        sample: an image, or any nesting of tuples / lists / dicts holding images.
        image_keys: fields that are images (decoded whatever they look like): top-level dict
            keys or tuple positions, or tuple paths such as ``("views", 1)``. A named field
            that is a container has every image inside it taken.
        index: the sample's index, named in error messages.
        passthrough_keys: fields (same forms) that hold no face and are left as they are,
            whatever they look like.
        alpha_channel: arrays with 2 or 4 channels carry alpha in the last one (kept as it
            is, the rest anonymized). Without it such arrays are an error.
        strict: image-like fields outside ``image_keys`` are an error (instead of being
            anonymized too). Default: strict when ``image_keys`` is given.
        require_image: a sample holding no image is an error.
        skip: ``f(value) -> True`` for values that are never images (framework types such as
            torchvision's masks and boxes).

    Returns:
        ``(images, skeleton)``: one :class:`SourceImage` per image (stacks give one per
        frame), and the sample with :class:`ImageSlot` where the images were.

    Raises:
        InputError: naming the sample and the field: an image-like field that cannot be
            anonymized as it is (ambiguous channels, 16-bit, unsupported dtype or range,
            corrupt or oversized file), a named field that is missing or not an image, or
            a sample with no image at all.
    """
    passthrough = [_normalise_key(k, sample) for k in passthrough_keys or ()]
    image_paths = None
    if image_keys is not None:
        if not isinstance(sample, (dict, tuple, list)):
            raise InputError(f"image_key={list(image_keys)} needs a dict or tuple sample, got {type(sample).__name__}", index=index)
        image_paths = [_normalise_key(k, sample) for k in image_keys]
        for path in image_paths:
            if not _resolve(sample, path):
                fields = list(sample) if isinstance(sample, dict) else f"positions 0..{len(sample) - 1}"
                raise InputError(f"sample has no field {field_name(path)}; its fields are {fields}", index=index)
        both = [p for p in image_paths if p in passthrough]
        if both:
            raise ConfigError(f"field {field_name(both[0])} is in both image_key= and passthrough_keys=")
    walker = _Walker(index, image_paths, passthrough, alpha_channel, bool(image_keys is not None if strict is None else strict), skip)
    skeleton = walker.walk(sample, (), False)
    if not walker.images and require_image:
        raise InputError(
            f"found no image in the sample, {_describe(sample)} (images are PIL images, encoded image bytes, "
            f"and arrays H,W / C,H,W / H,W,C with C in 1..4 and sides >= {MIN_IMAGE_SIDE}); "
            "pass image_key= naming the image field",
            index=index,
        )
    return walker.images, skeleton


# -- putting images back -----------------------------------------------------------------------


def _restore_frame(slot: ImageSlot, rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """``3,H,W float`` (+ alpha) -> the frame in its own channels, layout (without ``n``) and dtype."""
    if slot.channels in (1, 2):
        # ITU-R 601 luma, as PIL's convert("L") computes it
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype).view(3, 1, 1)
        body = (rgb * weights).sum(0, keepdim=True)
    else:
        body = rgb
    values = body if alpha is None else torch.cat([body, alpha.to(body)])
    if slot.dtype == "uint8":
        out = values.mul(255).round().clamp(0, 255).to(torch.uint8)
    else:
        out = values.to(getattr(torch, slot.dtype))
    layout = slot.layout.removeprefix("n")
    if layout == "hw":
        return out[0]
    if layout == "hwc":
        return out.permute(1, 2, 0)
    return out


def _unchanged(source: SourceImage, image: torch.Tensor) -> bool:
    return torch.equal(source.tensor.mul(255).round().div(255), image)


def _restore(slot: ImageSlot, images: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor | None]) -> Any:
    frames = [
        _restore_frame(slot, images[slot.position + k].detach().cpu().float(), alphas[slot.position + k])
        for k in range(slot.frames)
    ]
    tensor = torch.stack(frames) if slot.layout.startswith("n") else frames[0]
    tensor = tensor.contiguous()
    if slot.kind == "tensor":
        return tensor
    array = tensor.numpy()
    if slot.kind == "numpy":
        return array
    image = Image.fromarray(array)
    if slot.kind == "pil":
        if slot.mode in _PIL_BACK and image.mode != slot.mode:
            image = image.convert(slot.mode)
        return image
    buffer = io.BytesIO()
    fmt = slot.mode or "PNG"
    options = {"quality": 95} if fmt.upper() in ("JPEG", "JPG", "MPO", "WEBP") else {}
    if fmt.upper() == "MPO":
        fmt = "JPEG"
    image.save(buffer, format=fmt, **options)
    data = buffer.getvalue()
    return {"bytes": data, "path": None} if slot.kind == "bytes_dict" else data


def iter_slots(skeleton: Any) -> list[ImageSlot]:
    """Every :class:`ImageSlot` of a skeleton, at any depth, in walk order."""
    if isinstance(skeleton, ImageSlot):
        return [skeleton]
    if _is_dataclass_instance(skeleton):
        return [s for f in dataclasses.fields(skeleton) for s in iter_slots(getattr(skeleton, f.name))]
    if _is_object_array(skeleton):
        return [s for v in skeleton.flat for s in iter_slots(v)]
    if isinstance(skeleton, dict):
        return [s for v in skeleton.values() for s in iter_slots(v)]
    if isinstance(skeleton, (tuple, list)):
        return [s for v in skeleton for s in iter_slots(v)]
    return []


def join_sample(
    skeleton: Any,
    images: Sequence[torch.Tensor],
    alphas: Sequence[torch.Tensor | None] | None = None,
    sources: Sequence[SourceImage] | None = None,
) -> Any:
    """The sample with each :class:`ImageSlot` of ``skeleton`` replaced by its image.

    Args:
        skeleton: from :func:`split_sample`.
        images: ``3,H,W float in [0,1]`` per image (frames of a stack each), in order.
        alphas: per image the ``1,H,W`` alpha from :class:`SourceImage`, or None.
        sources: the :class:`SourceImage` list of :func:`split_sample`; where every image of a
            slot came back unchanged (at 8-bit precision) the sample's own object is returned.
    """
    alphas = alphas if alphas is not None else [None] * len(images)

    def fill(value: Any) -> Any:
        if isinstance(value, ImageSlot):
            original = None if sources is None else sources[value.position].original
            if original is not None:
                frames = range(value.position, value.position + value.frames)
                if all(_unchanged(sources[k], images[k].detach().cpu().float()) for k in frames):  # type: ignore[index]
                    return original
            restored = _restore(value, images, alphas)
            if isinstance(original, torch.Tensor) and type(original) is not torch.Tensor:
                restored = restored.as_subclass(type(original))  # tv_tensors.Image stays an Image
            return restored
        if _is_dataclass_instance(value):
            return _replace_fields(value, {f.name: fill(getattr(value, f.name)) for f in dataclasses.fields(value)})
        if _is_object_array(value):
            out = value.copy()
            for at in np.ndindex(value.shape):
                out[at] = fill(value[at])
            return out
        if isinstance(value, dict):
            out = copy.copy(value)
            out.update({k: fill(v) for k, v in value.items()})
            return out
        if isinstance(value, (tuple, list)):
            items = [fill(v) for v in value]
            if hasattr(value, "_fields"):
                return type(value)(*items)
            try:
                return type(value)(items)
            except TypeError:
                return list(items) if isinstance(value, list) else tuple(items)
        return value

    return fill(skeleton)
