"""DiffDeID end to end on t1.jpg (tiny random UNet, 32 px ffhq crops, offline stand-in condition
models, small LDS samplers fitted on random vectors): the mechanics of detect -> align ->
68 points, ρ, mask, z_id -> LDS -> DDIM -> paste back, not the beauty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import anonloader
from anonloader.identity.sampler import LatentIDSampler
from anonloader.methods.diffdeid.conditions import LandmarkFaceModel, landmarks_68


def _parts(astronaut_image: torch.Tensor) -> dict:
    """A face model fitted on the astronaut's dlib points (the photo, and the photo shrunk and
    re-enlarged as a second 'identity': no package ships several photos per person) and two
    LDS samplers fitted on random vectors (a stand-in identity distribution)."""
    from facenet_pytorch import MTCNN

    from anonloader.align import align_faces, template_points
    from anonloader.types import Detections

    array = (astronaut_image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    boxes, scores, points = MTCNN(keep_all=True, device="cpu").detect(array, landmarks=True)
    best = int(np.argmax(scores))
    det = Detections(torch.tensor(np.asarray(boxes[best], dtype=np.float32))[None], torch.tensor(np.asarray(points[best], dtype=np.float32))[None], torch.ones(1))
    crop = align_faces([astronaut_image], [det], crop_size=128, template="ffhq").crops
    small = torch.nn.functional.interpolate(torch.nn.functional.interpolate(crop, scale_factor=0.5, mode="bilinear", antialias=True), size=(128, 128), mode="bilinear")
    lm = template_points(128, "ffhq")[None]
    face_points = torch.cat([landmarks_68(crop, lm), landmarks_68(small, lm)])
    jitter = torch.randn(4, 68, 2, generator=torch.Generator().manual_seed(0))
    face_model = LandmarkFaceModel().fit(torch.cat([face_points, face_points + jitter[:2]]), [0, 1, 0, 1], 128)
    g = torch.Generator().manual_seed(1)
    ids = LatentIDSampler(128, timesteps=50, hidden=32, depth=1, space="dlib")
    ids.fit(torch.randn(64, 128, generator=g), steps=20, batch_size=32)
    shapes = LatentIDSampler(80, timesteps=50, hidden=32, depth=1, unit_norm=False, space="landmark-standin")
    shapes.fit(torch.randn(64, 80, generator=g) * 0.5, steps=20, batch_size=32)
    return dict(face_model=face_model, id_sampler=ids, shape_sampler=shapes)


def test_diffdeid_anonymizes_t1_through_anonymize(t1_image, astronaut_image):
    from anonloader import Anonymizer

    options = dict(config="tiny", num_inference_steps=2, **_parts(astronaut_image))
    torch.manual_seed(0)
    anonymizer = Anonymizer("diffdeid", on_error="raise", revalidate=False, **options)
    result = anonymizer([t1_image])
    records = result.records[0]
    assert len(records) == 6 and all(r.status == "anonymized" for r in records)
    out = result.images[0]
    assert out.shape == t1_image.shape
    changed = (out - t1_image).abs().amax(dim=0) > 2 / 255
    for record in records:  # every face region changed
        x1, y1, x2, y2 = (int(v) for v in record.box)
        assert changed[y1:y2, x1:x2].float().mean() > 0.2
    assert changed.float().mean() < 0.3  # background kept
    config = anonymizer.config()["method"]
    assert config["name"] == "diffdeid" and config["face_model"]["kind"] == "landmark-standin"
    assert config["renderer"]["kind"] == "contour-standin" and config["masker"]["kind"] == "hull-standin"
    torch.manual_seed(0)  # the same random network again, through the one-line entry point
    again = anonloader.anonymize([t1_image], method="diffdeid", on_error="raise", revalidate=False, **options)[0]
    assert torch.equal(again, out)  # same bytes


def test_diffdeid_with_a_keyed_mapper_over_an_lds_bank(t1_image, astronaut_image):
    """A bank drawn from the two samplers (embeddings + α' coefficients); the keyed assigner
    maps each real person to one bank identity, whose embedding and coefficients DiffDeID uses."""
    from anonloader import Anonymizer
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.identity.bank import IdentityBank

    parts = _parts(astronaut_image)
    bank = IdentityBank.from_sampler(parts["id_sampler"], 16, threshold=0.9, steps=10, seed=2, shape_sampler=parts["shape_sampler"])
    assert bank.coefficients.shape == (16, 80) and bank.meta["recognizer"]["name"] == "dlib"
    assigner = KeyedIdentityAssigner("online", secret="correct horse battery staple", bank=bank)
    torch.manual_seed(0)
    anonymizer = Anonymizer("diffdeid", identity=assigner, on_error="raise", revalidate=False, config="tiny",
                            num_inference_steps=1, bank=bank, **parts)
    seen = []
    inner = anonymizer.method.generate

    def spy(crops, masks, rendered, rho, identity, seeds):
        seen.append((rho.clone(), identity.clone()))
        return inner(crops, masks, rendered, rho, identity, seeds)

    anonymizer.method.generate = spy
    result = anonymizer([t1_image])
    records = result.records[0]
    assert len(records) == 6 and all(r.status == "anonymized" for r in records)
    ids = [r.synthetic_id for r in records]
    assert None not in ids and len(set(ids)) == 6
    rho = torch.cat([s[0] for s in seen])
    identity = torch.cat([s[1] for s in seen])
    assert len(identity) == 6
    for sid in ids:  # every face's z'_id and α' is one of the bank rows of the assigned identities
        matches = [i for i in range(6) if torch.equal(identity[i], bank.embeddings[sid])]
        assert len(matches) == 1 and torch.equal(rho[matches[0], :80], bank.coefficients[sid])
