"""Sample adapters: every supported sample kind round-trips with its type, dtype and labels."""

from __future__ import annotations

import io
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from anonloader.data.adapters import ImageSlot, join_sample, split_sample
from anonloader.errors import ImageDecodeError, InputError, UnsupportedImageError


def _identity_roundtrip(sample, **kw):
    images, skeleton = split_sample(sample, **kw)
    return images, join_sample(skeleton, [s.tensor for s in images], [s.alpha for s in images])


def _rgb_array(h=20, w=30):
    return (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)


def test_pil_rgb_roundtrip_is_exact():
    pil = Image.fromarray(_rgb_array())
    images, back = _identity_roundtrip(pil)
    assert images[0].tensor.shape == (3, 20, 30) and images[0].tensor.dtype == torch.float32
    assert isinstance(back, Image.Image) and back.mode == "RGB"
    assert np.array_equal(np.asarray(back), np.asarray(pil))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA"])
def test_pil_modes_come_back_in_their_mode(mode):
    pil = Image.fromarray(_rgb_array()).convert(mode)
    images, back = _identity_roundtrip(pil)
    assert images[0].tensor.shape[0] == 3
    assert back.mode == mode
    assert np.abs(np.asarray(back).astype(int) - np.asarray(pil).astype(int)).max() <= 1


def test_pil_16bit_keeps_precision():
    array = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    pil = Image.fromarray(array)
    _, back = _identity_roundtrip(pil)
    assert np.abs(np.asarray(back).astype(int) - array.astype(int)).max() <= 1


def test_uint8_and_float_tensors_keep_dtype():
    u8 = torch.from_numpy(_rgb_array()).permute(2, 0, 1).contiguous()
    _, back = _identity_roundtrip(u8)
    assert back.dtype == torch.uint8 and torch.equal(back, u8)
    f = u8.float() / 255
    _, back = _identity_roundtrip(f)
    assert back.dtype == torch.float32 and torch.allclose(back, f)


def test_numpy_hwc_and_grayscale():
    arr = _rgb_array()
    _, back = _identity_roundtrip(arr)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8 and np.array_equal(back, arr)
    gray = arr[:, :, 0]
    _, back = _identity_roundtrip((gray, 3), image_keys=[0])
    assert back[0].shape == gray.shape and back[1] == 3


def test_tuple_dict_namedtuple_labels_untouched():
    pil = Image.fromarray(_rgb_array())
    images, back = _identity_roundtrip((pil, 7))
    assert len(images) == 1 and back[1] == 7 and isinstance(back, tuple)
    images, back = _identity_roundtrip({"image": pil, "label": "smile", "other": torch.zeros(3, 20, 30)}, image_keys=["image"])
    assert len(images) == 1 and back["label"] == "smile" and torch.equal(back["other"], torch.zeros(3, 20, 30))
    images, back = _identity_roundtrip({"a": pil, "b": pil, "y": 1})
    assert len(images) == 2 and isinstance(back["a"], Image.Image) and isinstance(back["b"], Image.Image)
    Sample = namedtuple("Sample", "img target")
    _, back = _identity_roundtrip(Sample(pil, 5))
    assert isinstance(back, Sample) and back.target == 5


def test_skeleton_is_picklable_and_holds_no_pixels():
    import pickle

    _, skeleton = split_sample({"image": Image.fromarray(_rgb_array()), "label": 1})
    assert isinstance(skeleton["image"], ImageSlot)
    assert len(pickle.dumps(skeleton)) < 500


def test_encoded_bytes_keep_format_and_hash_the_file():
    buffer = io.BytesIO()
    Image.fromarray(_rgb_array()).save(buffer, format="PNG")
    data = buffer.getvalue()
    images, back = _identity_roundtrip({"png": data}, image_keys=["png"])
    assert images[0].encoded == data and images[0].content_bytes() == b"enc:" + data
    assert isinstance(back["png"], bytes) and Image.open(io.BytesIO(back["png"])).format == "PNG"


def test_corrupt_and_truncated_bytes_name_the_sample():
    buffer = io.BytesIO()
    Image.fromarray(_rgb_array(64, 64)).save(buffer, format="JPEG")
    truncated = buffer.getvalue()[:200]
    with pytest.raises(ImageDecodeError, match="sample 12"):
        split_sample({"img": truncated}, ["img"], index=12)
    with pytest.raises(ImageDecodeError, match="sample 3"):
        split_sample({"img": b"not an image at all"}, ["img"], index=3)
    with pytest.raises(ImageDecodeError):
        split_sample({"img": b""}, ["img"], index=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(UnsupportedImageError, match="zero size"):
        split_sample({"img": np.zeros((0, 10, 3), np.uint8)}, ["img"], index=1)
    with pytest.raises(UnsupportedImageError, match="not an image"):
        split_sample({"img": 42}, ["img"], index=2)
    with pytest.raises(UnsupportedImageError, match=r"\[0,1\]"):
        split_sample(torch.full((3, 10, 10), 2.0), index=4)
    with pytest.raises(InputError, match="no field"):
        split_sample({"x": 1}, ["img"], index=5)
    with pytest.raises(InputError, match="found no image"):
        split_sample((1, 2), index=6)
