"""FAMS's CLIP input equals what the authors' pipeline gets from CLIPImageProcessor's PIL path
(float crops in [0, 1], do_rescale=False): uint8 conversion, PIL bicubic resize, crop, normalize."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from anonloader.methods.fams import ClipInput  # noqa: E402


def _processor(**kwargs):
    transformers = pytest.importorskip("transformers")
    # transformers 5 names the PIL path CLIPImageProcessorPil; in 4.x it is CLIPImageProcessor itself
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kwargs)


def test_pixels_equal_the_uint8_pil_path_of_clip_image_processor():
    generator = torch.Generator().manual_seed(0)
    crops = torch.rand(3, 3, 40, 40, generator=generator)
    crops[1] = crops[1] * 0.01 + 0.5  # values near a uint8 boundary: truncation, not rounding
    crops[2] = (crops[2] > 0.5).float()  # all-integer image: transformers casts it without * 255
    processor = _processor(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20})
    expected = processor(images=list(crops), do_rescale=False, return_tensors="pt").pixel_values
    ours = ClipInput(size=24, crop_size=20)(crops)
    assert ours.dtype == torch.float32 and ours.shape == (3, 3, 20, 20)
    assert torch.equal(ours, expected)


def test_released_sizes_and_non_square_input():
    generator = torch.Generator().manual_seed(1)
    crops = torch.rand(1, 3, 300, 260, generator=generator)  # shortest side 260 -> 224, long side int(224 * 300 / 260)
    expected = _processor().__call__(images=list(crops), do_rescale=False, return_tensors="pt").pixel_values
    assert torch.equal(ClipInput()(crops), expected)

