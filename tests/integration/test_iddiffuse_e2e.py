"""IDDiffuse end to end on real photos (tiny random network, 32 px arcface-template crops): the
mechanics of detect -> align -> identity mapping -> IDDiffuse -> paste back, not the beauty."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import anonloader  # noqa: E402
from anonloader.identity.bank import IdentityBank  # noqa: E402


def _bank(size: int, dim: int) -> IdentityBank:
    g = torch.Generator().manual_seed(5)
    images = torch.nn.functional.avg_pool2d(torch.rand(size, 3, 32, 32, generator=g), 3, 1, 1)
    return IdentityBank(torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1), images=images)


def test_iddiffuse_anonymizes_a_real_photo_through_anonymize(astronaut_image, monkeypatch):
    monkeypatch.setenv("ANONLOADER_SECRET", "correct horse battery staple")  # keys the default identity mapping
    torch.manual_seed(0)
    options = dict(method="iddiffuse", config="tiny", num_inference_steps=2, bank=_bank(8, 128))  # dlib space
    out = anonloader.anonymize([astronaut_image], **options)[0]
    assert isinstance(out, torch.Tensor) and out.shape == astronaut_image.shape
    changed = (out - astronaut_image).abs().amax(dim=0) > 2 / 255
    assert changed.any(), "the face was not replaced"
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert 60 < rows.float().mean() < 260 and 120 < cols.float().mean() < 320  # the astronaut's face
    assert changed.float().mean() < 0.25
    torch.manual_seed(0)  # same random network again
    assert torch.equal(anonloader.anonymize([astronaut_image], **options)[0], out)  # same bytes


def test_iddiffuse_with_the_keyed_identity_mapper(t1_image):
    from anonloader import Anonymizer
    from anonloader.identity.assigner import KeyedIdentityAssigner

    bank = _bank(32, 128)  # dlib space (128-d) for the mapper's threshold check
    assigner = KeyedIdentityAssigner("online", secret="correct horse battery staple", bank=bank)
    torch.manual_seed(0)
    anonymizer = Anonymizer("iddiffuse", identity=assigner, config="tiny", num_inference_steps=2, bank=bank)
    result = anonymizer([t1_image])
    records = result.records[0]
    assert len(records) == 6 and all(r.status == "anonymized" for r in records)
    assert len({r.synthetic_id for r in records}) == 6
    assert result.images[0].shape == t1_image.shape
    assert not torch.equal(result.images[0], t1_image)
    assert anonymizer.config()["method"]["name"] == "iddiffuse"
