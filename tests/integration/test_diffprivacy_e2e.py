"""Diff-Privacy end to end on real photos (tiny random networks): through ``anonloader.anonymize``,
and anonymize -> encrypted keys -> recover on t1.jpg, where every pixel outside the paste mask
keeps the original bytes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("cryptography")

import anonloader
from anonloader.errors import SecretError
from anonloader.methods.diffprivacy import DiffPrivacy
from anonloader.methods.diffprivacy.crypto import KdfParams
from anonloader.methods.diffprivacy.recovery import recover_image
from anonloader.methods.diffprivacy.store import RecoveryKeyStore
from anonloader.types import FaceConditions

OPTIONS = {"tiny": True, "num_inference_steps": 10, "group_size": 2, "inversion_iters": 2}


def test_diffprivacy_anonymizes_a_real_photo_through_anonymize(astronaut_image):
    options = dict(method="diffprivacy", **OPTIONS)
    out = anonloader.anonymize([astronaut_image], **options)[0]
    assert isinstance(out, torch.Tensor) and out.shape == astronaut_image.shape
    changed = (out - astronaut_image).abs().amax(dim=0) > 2 / 255
    assert changed.any(), "the face was not replaced"
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert 60 < rows.float().mean() < 260 and 120 < cols.float().mean() < 320
    assert changed.float().mean() < 0.25
    assert torch.equal(anonloader.anonymize([astronaut_image], **options)[0], out)


def test_anonymize_then_recover_with_the_password_only(t1_image, tmp_path):
    from anonloader.kernels.paste_back import crop_mask, paste_back

    from anonloader.align import align_faces
    from anonloader.detect import load_detector

    method = DiffPrivacy(**OPTIONS)
    faces = load_detector("default")([t1_image])[0]
    assert len(faces) >= 4
    aligned = align_faces([t1_image], [faces], crop_size=method.crop_size, template=method.template)
    ones = torch.ones(len(faces), 5, 1)
    landmarks = torch.cat([faces.landmarks, ones], dim=2) @ aligned.affines.transpose(1, 2)
    seeds = list(range(100, 100 + len(faces)))
    conditions = FaceConditions(seeds=seeds, identity_keys=[None] * len(faces), synthetic_ids=[None] * len(faces), landmarks=landmarks)
    with torch.no_grad():
        generated, keys = method.anonymize_with_keys(aligned.crops, conditions)
    feather = 0.1
    anonymized = paste_back([t1_image], generated, aligned.affines, aligned.image_index, feather=feather, color_match=True)[0]
    anonymized = (anonymized * 255).round() / 255  # as stored: 8-bit

    store = RecoveryKeyStore.create(tmp_path, "pw for t1", fingerprint="fp-t1", kdf=KdfParams.new(memory_cost=1024, iterations=1, lanes=1))
    store.put_entry("t1", keys, aligned.affines, feather)
    store.close()

    with pytest.raises(SecretError):
        RecoveryKeyStore.open(tmp_path, "not the password")
    opened = RecoveryKeyStore.open(tmp_path, "pw for t1", fingerprint="fp-t1")
    # the payload is a function of the face and its seed only, whatever the password
    other = RecoveryKeyStore.create(tmp_path / "other", "another password", fingerprint="fp-t1", kdf=KdfParams.new(memory_cost=1024, iterations=1, lanes=1))
    other.put_entry("t1", keys, aligned.affines, feather)
    assert other.get_bytes("t1", 2) == opened.get_bytes("t1", 2) == keys[2].with_placement(aligned.affines[2], feather).to_bytes()
    recovered = recover_image(method, opened, "t1", anonymized)

    # the support of the anonymization mask, warped into the image
    support = paste_back(
        [torch.zeros_like(t1_image)], crop_mask(method.crop_size, 0.0, "ellipse").expand(len(faces), 3, -1, -1).contiguous(),
        aligned.affines, aligned.image_index, feather=0.0, color_match=False,
    )[0].amax(dim=0) > 0
    outside = ~support
    assert torch.equal(recovered[:, outside], anonymized[:, outside])  # the original's bytes there
    assert torch.equal(anonymized[:, outside], ((t1_image * 255).round() / 255)[:, outside])
    # the best any recovery can do is the backbone's own reconstruction D(E(x)) of each crop
    backbone, _, _ = method.load()
    with torch.no_grad():
        reconstruction = backbone.decode(backbone.encode(aligned.crops)).clamp(0, 1)
    ideal = paste_back([anonymized], reconstruction, aligned.affines, aligned.image_index, feather=0.0, color_match=False)[0]
    to_ideal = ((recovered - ideal)[:, support] ** 2).mean()
    anonymized_to_ideal = ((anonymized - ideal)[:, support] ** 2).mean()
    print(f"t1 face regions, MSE to D(E(x)): recovered {to_ideal:.4f}, anonymized {anonymized_to_ideal:.4f} (tiny random models, N=10, k=2)")
    assert to_ideal < anonymized_to_ideal / 2
