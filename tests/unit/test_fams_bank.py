"""Banks rendered by FAMS: near-duplicates and denied faces are rejected by the recogniser; the
bank records FAMS's template, so identity mode uses its images as they are."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("dlib")

from anonloader.errors import ConfigError, IdentityError  # noqa: E402
from anonloader.identity.embedders import load_embedder  # noqa: E402
from anonloader.methods.fams import FAMS  # noqa: E402
from anonloader.methods.fams.bank import embed_ffhq_crops, render_bank  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    fams = FAMS(tiny=True, crop_size=16, num_inference_steps=2, anonymization_degree=1.4)
    driving = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return fams, driving, load_embedder("dlib")


def test_one_identity_is_the_render_of_its_seed_and_identity_mode_uses_it_as_is(setup):
    fams, driving, embedder = setup
    bank = render_bank(fams, 1, embedder, driving=driving, seed=7)
    # rendered in one batch of four (seeds 7-10, driving crops in turn); the first is kept
    batch = fams(driving[[0, 1, 2, 0]], FaceConditions([7, 8, 9, 10], [None] * 4, [None] * 4, torch.zeros(4, 5, 2)))
    assert torch.equal(bank.images[0], batch[0].clamp(0, 1)) and bank.names == ["fams_seed7"]
    torch.testing.assert_close(bank.embeddings[0], embed_ffhq_crops(batch[:1], embedder)[0])
    assert bank.meta["template"] == "ffhq" and bank.meta["method"]["sampling"]["anonymization_degree"] == 1.4
    swapper = FAMS(tiny=True, crop_size=16, num_inference_steps=2, bank=bank)
    assert swapper.bank_template == "ffhq" and torch.equal(swapper.bank_sources([0]), bank.images[:1])


def test_near_duplicates_and_denied_faces_are_rejected(setup):
    fams, driving, embedder = setup
    first = render_bank(fams, 1, embedder, driving=driving, seed=0)
    renders = fams(driving, FaceConditions([0, 1, 2], [None] * 3, [None] * 3, torch.zeros(3, 5, 2)))
    vectors = embed_ffhq_crops(renders, embedder)
    close = (vectors @ vectors.T)[0]
    # random tiny networks draw blobs, not people: to the recogniser these renders are one person
    assert bool((close[1:] >= embedder.threshold).all())
    with pytest.raises(IdentityError, match="2 near-duplicates"):
        render_bank(fams, 2, embedder, driving=driving, seed=0, max_attempts=3)
    with pytest.raises(IdentityError, match="3 too close to the deny list"):
        render_bank(fams, 1, embedder, driving=driving, seed=0, deny=first.embeddings, max_attempts=3)
    with pytest.raises(ConfigError, match="without bank"):
        render_bank(FAMS(tiny=True, bank=first), 1, embedder, driving=driving)
