"""The Lightning batch stage leaves no side door: every batch of images is anonymized in its own
layout, and an image-like field it cannot anonymize is an error, not a raw face for the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

from anonloader.assets import sample_photo  # noqa: E402
from anonloader.errors import UnsupportedImageError  # noqa: E402
from anonloader.integrations.lightning import anonymize_batch  # noqa: E402
from anonloader.pipeline import Anonymizer  # noqa: E402

FACE = (slice(30, 70), slice(44, 90))  # rows, columns of the astronaut's face at 128 px


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """``128,128,3 uint8``."""
    return torch.from_numpy(np.asarray(sample_photo("astronaut").resize((128, 128)), dtype=np.uint8).copy())


@pytest.fixture(scope="module")
def blur() -> Anonymizer:
    return Anonymizer("blur")


def _changed(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean absolute change of the face region, both ``H,W,C``."""
    return float((before[FACE].float() - after[FACE].float()).abs().mean())


def test_channels_last_batch_is_anonymized_in_its_layout(photo, blur):
    batch = {"image": photo.unsqueeze(0).repeat(2, 1, 1, 1), "label": torch.tensor([3, 4])}  # B,H,W,C
    out = anonymize_batch(blur, batch)
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == torch.uint8
    assert torch.equal(out["label"], batch["label"])
    for i in range(2):
        assert _changed(photo, out["image"][i]) > 5


def test_channels_first_float_batch(photo, blur):
    batch = (photo.permute(2, 0, 1).unsqueeze(0).float() / 255, torch.tensor([1]))
    out = anonymize_batch(blur, batch)
    assert out[0].dtype == torch.float32 and out[0].shape == batch[0].shape
    assert _changed(photo, (out[0][0].permute(1, 2, 0) * 255).round()) > 5


def test_an_image_field_the_stage_cannot_take_is_an_error(photo, blur):
    batch = {"image": photo.unsqueeze(0), "views": [photo.numpy()]}  # a list of raw arrays beside the batch
    with pytest.raises(UnsupportedImageError, match="views"):
        anonymize_batch(blur, batch)
    kept = anonymize_batch(blur, batch, passthrough_keys=("views",))  # declared: the user's call
    assert kept["views"][0] is batch["views"][0]


def test_a_fourth_channel_needs_declaring(photo, blur):
    alpha = torch.full((128, 128, 1), 200, dtype=torch.uint8)
    batch = torch.cat([photo, alpha], dim=2).permute(2, 0, 1).unsqueeze(0)  # 1,4,H,W
    with pytest.raises(UnsupportedImageError, match="alpha_channel"):
        anonymize_batch(blur, batch)
    out = anonymize_batch(blur, batch, alpha_channel=True)
    assert torch.equal(out[0, 3], batch[0, 3])
    assert _changed(photo, out[0, :3].permute(1, 2, 0)) > 5
