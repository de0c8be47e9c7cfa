"""Sample adapters: every supported sample kind round-trips with its type, dtype and labels."""

from __future__ import annotations

import io
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from anonloader.data.adapters import (
    ImageSlot,
    image_layout,
    iter_slots,
    join_sample,
    looks_like_image,
    split_sample,
)
from anonloader.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InputError,
    UnsupportedImageError,
)


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


def test_16_bit_input_is_refused_with_how_to_convert():
    array = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    for sample in (Image.fromarray(array), array, torch.from_numpy(array.astype(np.int32)).expand(3, -1, -1)):
        with pytest.raises(UnsupportedImageError, match=r"sample 4 / field \['x'\]: .*16 or more bits.*convert it first"):
            split_sample({"x": sample, "y": 1}, index=4)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with pytest.raises(UnsupportedImageError, match="16 bits per channel"):
        split_sample((buffer.getvalue(), 0), index=0)


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
    other = torch.zeros(3, 20, 30)
    images, back = _identity_roundtrip({"image": pil, "label": "smile", "other": other}, image_keys=["image"], passthrough_keys=["other"])
    assert len(images) == 1 and back["label"] == "smile" and back["other"] is other
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
    with pytest.raises(UnsupportedImageError, match=r"sample 2 / field \['img'\]: .*not an image"):
        split_sample({"img": 42}, ["img"], index=2)
    with pytest.raises(UnsupportedImageError, match=r"\[0,1\]"):
        split_sample(torch.full((3, 20, 30), 2.0), index=4)
    with pytest.raises(InputError, match="no field"):
        split_sample({"x": 1}, ["img"], index=5)
    with pytest.raises(InputError, match="found no image"):
        split_sample((1, 2), index=6)


# -- the strict walker: every image-like field is found, wherever it sits ----------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_image_like_field_is_found_at_any_depth_with_its_path():
    rgb = _rgb_array(20, 30)
    sample = (
        Image.fromarray(rgb),
        rgb[:, :, 0].copy(),  # 2-D grayscale
        torch.from_numpy(rgb),  # channels-last tensor
        [np.ascontiguousarray(rgb.transpose(2, 0, 1)), {"deep": _png(rgb)}],  # C,H,W numpy; bytes in a dict in a list
        {"bytes": _png(rgb), "path": "a.png"},  # Hugging Face Image(decode=False)
        torch.from_numpy(np.stack([rgb, rgb[::-1].copy()])).permute(0, 3, 1, 2),  # N,C,H,W stack
        "a caption",
        b"not an image, just bytes",
    )
    images, skeleton = split_sample(sample, index=0)
    slots = iter_slots(skeleton)
    assert [s.field for s in slots] == ["[0]", "[1]", "[2]", "[3][0]", "[3][1]['deep']", "[4]", "[5]"]
    assert [s.layout for s in slots] == ["hwc", "hw", "hwc", "chw", "hwc", "hwc", "nchw"]
    assert len(images) == 8 and slots[-1].frames == 2 and slots[-1].position == 6
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for source in images[:1] + images[2:7]:
        assert torch.equal(source.tensor, expected)
    assert torch.equal(images[7].tensor, expected.flip(1))
    assert torch.allclose(images[1].tensor, expected[:1].expand(3, -1, -1))

    back = join_sample(skeleton, [s.tensor for s in images], [s.alpha for s in images])
    assert isinstance(back, tuple) and back[6:] == sample[6:]
    assert np.array_equal(np.asarray(back[0]), rgb) and np.array_equal(back[1], rgb[:, :, 0])
    assert back[2].shape == (20, 30, 3) and torch.equal(back[2], sample[2])
    assert isinstance(back[3], list) and np.array_equal(back[3][0], sample[3][0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(back[3][1]["deep"]))), rgb)
    assert back[4]["path"] is None and np.array_equal(np.asarray(Image.open(io.BytesIO(back[4]["bytes"]))), rgb)
    assert back[5].shape == (2, 3, 20, 30) and torch.equal(back[5], sample[5])


def test_changed_pixels_come_back_in_each_fields_own_type_layout_and_dtype():
    rgb = _rgb_array(20, 30)
    sample = {
        "hwc": torch.from_numpy(rgb),
        "gray": rgb[:, :, 1].astype(np.float32) / 255,
        "half": torch.from_numpy(rgb).permute(2, 0, 1).to(torch.bfloat16) / 255,
    }
    images, skeleton = split_sample(sample)
    darker = [s.tensor * 0.5 for s in images]
    back = join_sample(skeleton, darker, [s.alpha for s in images], images)
    assert back["hwc"].shape == (20, 30, 3) and back["hwc"].dtype == torch.uint8
    assert torch.equal(back["hwc"], (torch.from_numpy(rgb).float() * 0.5).round().to(torch.uint8))
    assert back["gray"].shape == (20, 30) and back["gray"].dtype == np.float32
    assert np.abs(back["gray"] - sample["gray"] * 0.5).max() < 1e-6
    assert back["half"].dtype == torch.bfloat16 and back["half"].shape == (3, 20, 30)
    assert (back["half"].float() - sample["half"].float() * 0.5).abs().max() < 1e-2


def test_unchanged_images_come_back_as_the_same_object():
    gray = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)  # not on the 1/255 grid
    images, skeleton = split_sample((gray, 1))
    quantized = [s.tensor.mul(255).round().div(255) for s in images]  # what the pipeline returns
    assert join_sample(skeleton, quantized, None, images)[0] is gray
    assert join_sample(skeleton, quantized)[0] is not gray


@pytest.mark.parametrize(
    "value",
    [
        np.zeros((5, 2), np.float32),  # landmarks
        np.zeros((68, 2), np.float32),
        np.zeros((3, 5, 2), np.float32),  # N,5,2 landmarks
        np.zeros((40, 4), np.float32),  # boxes
        torch.zeros(1000),  # logits / one-hot
        torch.zeros(32, 10),  # a batch of one-hot rows
        torch.zeros(64, 64, dtype=torch.int64),  # a class-id map
        np.zeros((64, 64), bool),  # a mask
        torch.zeros(1, 64, 64, dtype=torch.int64),  # a class-id map with a channel axis
        np.zeros((15, 15), np.uint8),  # below MIN_IMAGE_SIDE
        torch.zeros(64, 14, 14),  # a feature map
        "path/to/face.jpg",
        b'{"json": true}',
        None,
    ],
)
def test_labels_and_annotations_are_not_taken_for_images(value):
    assert not looks_like_image(value)
    images, skeleton = split_sample((Image.fromarray(_rgb_array()), value))
    assert len(images) == 1 and skeleton[1] is value


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.zeros((16, 16), np.uint8), "hw"),
        (np.zeros((16, 16), np.float64), "hw"),
        (np.zeros((1, 16, 16), np.float32), "chw"),
        (np.zeros((16, 16, 3), np.uint8), "hwc"),
        (torch.zeros(3, 16, 16, dtype=torch.int64), "chw"),  # refused later, but seen
        (torch.zeros(5, 4, 16, 16), "nchw"),
        (np.zeros((5, 16, 16, 1), np.uint8), "nhwc"),
    ],
)
def test_image_layout_rule(value, expected):
    assert image_layout(value) == expected and looks_like_image(value)


def test_four_channels_need_a_declaration_pil_rgba_does_not():
    rgba = np.dstack([_rgb_array(), np.full((20, 30), 77, np.uint8)])
    with pytest.raises(UnsupportedImageError, match=r"sample 3 / field \['nir'\]: .*4 channels.*alpha_channel=True"):
        split_sample({"rgb": Image.fromarray(_rgb_array()), "nir": rgba}, index=3)
    images, skeleton = split_sample({"nir": rgba}, alpha_channel=True)
    assert torch.equal(images[0].alpha, torch.full((1, 20, 30), 77 / 255))
    back = join_sample(skeleton, [torch.zeros_like(images[0].tensor)], [images[0].alpha])
    assert np.array_equal(back["nir"][:, :, 3], rgba[:, :, 3]) and back["nir"][:, :, :3].max() == 0
    images, _ = split_sample({"nir": rgba}, passthrough_keys=["nir"], require_image=False)
    assert images == []
    pil = Image.fromarray(rgba)
    images, skeleton = split_sample(pil)
    assert pil.mode == "RGBA" and images[0].alpha is not None


def test_image_key_makes_other_image_like_fields_an_error_until_declared():
    pil = Image.fromarray(_rgb_array())
    sample = {"img": pil, "views": [pil, _png(_rgb_array())], "mask": np.zeros((20, 30), np.uint8)}
    with pytest.raises(UnsupportedImageError, match=r"sample 9 / field \['views'\]\[0\]: .*image_key= names only"):
        split_sample(sample, ["img"], index=9)
    images, skeleton = split_sample(sample, ["img", "views"], passthrough_keys=["mask"])
    assert [s.field for s in iter_slots(skeleton)] == ["['img']", "['views'][0]", "['views'][1]"]
    assert skeleton["mask"] is sample["mask"] and len(images) == 3
    images, _ = split_sample(sample, [("views", 1)], passthrough_keys=["img", ("views", 0), "mask"])
    assert len(images) == 1 and images[0].slot.field == "['views'][1]"
    with pytest.raises(UnsupportedImageError, match="holds no image"):
        split_sample({"img": pil, "meta": {"a": 1}}, ["img", "meta"])


def test_bytes_with_an_image_signature_that_do_not_decode_are_an_error():
    data = _png(_rgb_array())
    with pytest.raises(ImageDecodeError, match=r"sample 5 / field \[1\]"):
        split_sample((Image.fromarray(_rgb_array()), data[:8] + b"\0" * 40), index=5)


def test_oversized_encoded_images_are_refused_before_decoding(monkeypatch):
    data = _png(_rgb_array(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 - 1)
    with pytest.raises(ImageTooLargeError, match=r"sample 2 / field \['png'\]: .*MAX_IMAGE_PIXELS"):
        split_sample({"png": data}, index=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 3)  # past PIL's own 2x error limit
    with pytest.raises(ImageTooLargeError):
        split_sample({"png": data}, index=2)


@pytest.mark.parametrize(
    "value, message",
    [
        (torch.full((3, 20, 30), 2.0), r"\[0,1\]"),
        (torch.full((3, 20, 30), float("nan")), r"finite"),
        (torch.zeros(3, 20, 30, dtype=torch.int64), "dtype int64"),
        (np.zeros((20, 30, 2), np.uint8), "2 channels"),
    ],
)
def test_refused_arrays_name_sample_field_and_remedy(value, message):
    with pytest.raises(UnsupportedImageError, match=r"sample 1 / field \[0\]\['x'\]: .*" + message):
        split_sample([{"x": value}], index=1)


def test_mirrored_views_and_read_only_arrays_are_read():
    rgb = _rgb_array()
    frozen = rgb.copy()
    frozen.flags.writeable = False
    images, _ = split_sample((rgb[:, ::-1], frozen))
    expected = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(images[0].tensor, expected.flip(2)) and torch.equal(images[1].tensor, expected)


def test_dataclasses_object_arrays_and_tv_tensors_are_walked_and_cycles_refused():
    from dataclasses import dataclass

    from torchvision import tv_tensors

    @dataclass(frozen=True)
    class Pair:
        image: torch.Tensor
        label: int

        def __post_init__(self):
            assert self.image.ndim == 3  # a check a skeleton slot must not trip

    rgb = _rgb_array()
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    cells = np.empty(2, dtype=object)
    cells[0], cells[1] = Image.fromarray(rgb), "caption"
    mask = tv_tensors.Mask(torch.ones(20, 30, dtype=torch.uint8))
    sample = {"pair": Pair(tv_tensors.Image(tensor), 3), "cells": cells, "mask": mask}
    images, skeleton = split_sample(sample, index=0)
    assert [s.field for s in iter_slots(skeleton)] == ["['pair'].image", "['cells'][(0,)]"]
    back = join_sample(skeleton, [s.tensor for s in images], [s.alpha for s in images])
    assert isinstance(back["pair"], Pair) and back["pair"].label == 3
    assert type(back["pair"].image) is torch.Tensor and torch.equal(back["pair"].image, tensor)
    back = join_sample(skeleton, [s.tensor * 0.5 for s in images], None, images)
    assert type(back["pair"].image) is tv_tensors.Image  # a changed image keeps its tensor subclass
    assert isinstance(back["cells"][0], Image.Image) and back["cells"][1] == "caption" and back["mask"] is mask
    loop: list = [Image.fromarray(rgb)]
    loop.append(loop)
    with pytest.raises(InputError, match=r"sample 1 / field \[1\]: .*contains itself"):
        split_sample(loop, index=1)
