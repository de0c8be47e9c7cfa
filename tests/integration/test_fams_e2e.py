"""FAMS end to end through ``anonloader.anonymize`` on a real photo (tiny random networks: the
mechanics of detect -> align (ffhq template, 512-style crops) -> FAMS -> paste back)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import anonloader  # noqa: E402



def test_fams_anonymizes_a_real_photo_through_anonymize(astronaut_image):
    options = dict(method="fams", tiny=True, crop_size=64, num_inference_steps=2, anonymization_degree=1.4)
    dataset = anonloader.anonymize([astronaut_image], **options)
    out = dataset[0]
    assert isinstance(out, torch.Tensor) and out.shape == astronaut_image.shape
    changed = (out - astronaut_image).abs().amax(dim=0) > 2 / 255
    assert changed.any(), "the face was not replaced"
    rows, cols = torch.nonzero(changed, as_tuple=True)
    # the astronaut's face is in the upper-middle of the 512x512 photo; the rest is untouched
    assert 60 < rows.float().mean() < 260 and 120 < cols.float().mean() < 320
    assert changed.float().mean() < 0.25
    assert torch.equal(anonloader.anonymize([astronaut_image], **options)[0], out)  # same bytes again
