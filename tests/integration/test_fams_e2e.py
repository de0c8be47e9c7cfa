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


def test_identity_mode_gives_one_real_person_one_source_through_anonymize(astronaut_image):
    """With an assigner and an image bank, every photo of one person is swapped from the same
    bank face (spied on the source ReferenceNet's input); another person gets another."""
    from anonloader.identity import KeyedIdentityAssigner
    from anonloader.identity.bank import IdentityBank
    from anonloader.methods.fams import FAMS

    generator = torch.Generator().manual_seed(0)
    bank = IdentityBank(torch.randn(6, 8, generator=generator), torch.rand(6, 3, 32, 32, generator=generator))
    fams = FAMS(tiny=True, crop_size=64, num_inference_steps=2, bank=bank)
    sources = []
    handle = fams.components.referencenet.register_forward_pre_hook(
        lambda module, args: sources.append(args[0].clone()) if args[0].abs().sum() > 0 else None  # not the null states
    )
    samples = [
        {"image": astronaut_image, "person": "A"},
        {"image": astronaut_image * 0.9, "person": "A"},
        {"image": astronaut_image.flip(-1), "person": "A"},
        {"image": astronaut_image, "person": "B"},
    ]
    assigner = KeyedIdentityAssigner("label", secret="test-secret", bank=bank, embedder=None)
    dataset = anonloader.anonymize(samples, method=fams, identity=assigner, identity_label=lambda s: s["person"])
    try:
        outputs = [dataset[i]["image"] for i in range(len(samples))]
    finally:
        handle.remove()
    assert len(sources) == 4 and all(s.shape[0] == 1 for s in sources)  # one face per photo
    assert torch.equal(sources[1], sources[0]) and torch.equal(sources[2], sources[0])
    assert not torch.equal(sources[3], sources[0])
    assert not torch.equal(outputs[0], astronaut_image)
