"""FAMS end to end through ``anonloader.anonymize`` on a real photo (tiny random networks: the
mechanics of detect -> align (ffhq template, 512-style crops) -> FAMS -> paste back)."""

from __future__ import annotations

import json

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
    sources, embeds = [], []

    def spy(module, args):
        if args[0].abs().sum() > 0:  # not the null states
            sources.append(args[0].clone())
            embeds.append(args[1].clone())

    handle = fams.components.referencenet.register_forward_pre_hook(spy)
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
    assert torch.equal(embeds[1], embeds[0]) and torch.equal(embeds[2], embeds[0])
    assert not torch.equal(sources[3], sources[0]) and not torch.equal(embeds[3], embeds[0])
    assert not torch.equal(outputs[0], astronaut_image)
    # the bank is part of the pipeline's fingerprint through the method's config
    from anonloader.pipeline import Anonymizer

    other = IdentityBank(torch.randn(6, 8, generator=generator), torch.rand(6, 3, 32, 32, generator=generator))
    fingerprints = {
        Anonymizer(FAMS(tiny=True, crop_size=64, num_inference_steps=2, bank=b), identity=assigner).fingerprint() for b in (bank, other)
    }
    assert len(fingerprints) == 2


def _save(image, path):
    from PIL import Image

    Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


def _people_photos(t1_image, astronaut_image, folder):
    """t1's six people, each cut out of the photo and of a changed copy (rescaled, brightened,
    rotated: other pixels, same person), plus the astronaut once: 13 photos of 7 people."""
    from _identity_faces import changed_photo, detect_faces

    folder.mkdir()
    truth = {}
    for version, image in (("a", t1_image), ("b", changed_photo(t1_image))):
        for person, box in enumerate(detect_faces(image).boxes.tolist()):  # left to right
            x1, y1, x2, y2 = box
            pad = x2 - x1
            top, left = max(0, int(y1 - pad)), max(0, int(x1 - pad))
            _save(image[:, top : int(y2 + pad), left : int(x2 + pad)], folder / f"{version}_{person}.png")
            truth[str(folder / f"{version}_{person}.png")] = person
    _save(astronaut_image, folder / "astronaut.png")
    truth[str(folder / "astronaut.png")] = "astronaut"
    return truth


@pytest.fixture(scope="module")
def fams_records(t1_image, astronaut_image, tmp_path_factory):
    from anonloader.methods.fams import FAMS
    from anonloader.methods.fams.data import FAMSSwapper, build_records

    root = tmp_path_factory.mktemp("fams_records")
    truth = _people_photos(t1_image, astronaut_image, root / "photos")
    swapper = FAMSSwapper(FAMS(tiny=True, crop_size=16, num_inference_steps=2))
    out = build_records(root / "photos", root / "records", swapper=swapper, detector="mtcnn", resolution=16, seed=3)
    return truth, out


def test_triplet_builder_groups_the_package_photos_and_writes_loadable_records(fams_records):
    from anonloader.methods.fams.data import SwapRecordFolder
    from anonloader.methods.fams.training import TripletDataset

    truth, out = fams_records
    assert len(truth) == 13
    lines = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    # six people with two photos each: every photo is a ground truth once; the astronaut (one photo) only donates
    assert len(lines) == 12
    assert sorted(truth[line["photos"]["ground_truth"]] for line in lines) == sorted(list(range(6)) * 2)
    for line in lines:
        photos = line["photos"]
        assert photos["source"] != photos["ground_truth"]
        assert truth[photos["source"]] == truth[photos["ground_truth"]]  # grouped by the recogniser
        assert truth[photos["donor"]] != truth[photos["ground_truth"]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["people"], manifest["faces"], manifest["swapper"]["name"]) == (7, 13, "fams")
    records = SwapRecordFolder(out)
    assert len(records) == 12
    record = records[5]
    assert all(t.shape == (3, 16, 16) and 0 <= t.min() and t.max() <= 1 for t in (record.source, record.ground_truth, record.swapped, record.donor))
    assert len(TripletDataset(records, "mixed")) == 24


def test_train_cli_fits_on_the_records_and_writes_loadable_weights(fams_records, tmp_path):
    from anonloader.methods.fams import FAMS
    from anonloader.methods.fams.train import main

    _, records = fams_records
    final = main([
        "--records", str(records), "--out", str(tmp_path / "run"), "--tiny", "--epochs", "2", "--switch-epoch", "1",
        "--batch-size", "4", "--accumulate", "1", "--lr", "1e-3", "--accelerator", "cpu", "--devices", "1", "--num-workers", "0",
    ])  # fmt: skip
    trained = FAMS.from_pretrained(final, crop_size=16)
    untrained = FAMS(tiny=True, crop_size=16)
    assert trained.components.reference_routing == "released"
    assert not torch.equal(trained.components.unet.conv_in.weight, untrained.components.unet.conv_in.weight)
    assert torch.equal(trained.components.vae.encoder.conv_in.weight, untrained.components.vae.encoder.conv_in.weight)  # frozen


def test_bank_cli_renders_from_the_packaged_faces_and_writes_a_loadable_bank(tmp_path):
    from anonloader.identity.bank import IdentityBank
    from anonloader.methods.fams.bank import main, packaged_driving_crops

    driving = packaged_driving_crops(16)
    assert driving.shape == (7, 3, 16, 16)  # the astronaut and t1's six people
    folder = main([str(tmp_path / "bank"), "--n", "1", "--tiny", "--resolution", "16", "--steps", "2", "--seed", "4"])
    bank = IdentityBank.load(folder)
    assert len(bank) == 1 and bank.names == ["fams_seed4"] and bank.images.shape == (1, 3, 16, 16)
    assert bank.meta["template"] == "ffhq" and bank.meta["deny"]["count"] == 0
