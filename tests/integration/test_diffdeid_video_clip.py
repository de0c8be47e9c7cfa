"""DiffDeID's video paradigm on the panned t1.jpg clip of ``test_video.py`` (MTCNN faces, tracks
from the known pan, tiny random networks): one z'_id per track, and every later frame of a track
feeds that track's first output to the video network's E_t."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from _identity_faces import detect_faces  # noqa: E402  (tests/integration helpers)
from test_diffdeid_e2e import _parts  # noqa: E402

from anonloader.align import align_faces  # noqa: E402
from anonloader.assets import sample_photo  # noqa: E402
from anonloader.methods.diffdeid.model import DiffDeID  # noqa: E402
from anonloader.methods.diffdeid.network import DiffDeIDUNet  # noqa: E402
from anonloader.methods.diffdeid.video import DiffDeIDVideo  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402

SHIFT = (10, 4)  # the simulated camera pans 10 px left and 4 px up per frame (as test_video.py)


def _pan_clip(frames: int) -> list[torch.Tensor]:
    base = sample_photo("t1").resize((480, 332), Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.array(base)).permute(2, 0, 1).float() / 255
    dx, dy = SHIFT
    return [array[:, dy * t : dy * t + 300, dx * t : dx * t + 420].contiguous() for t in range(frames)]


def _clip_faces(frames: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """(crops, crop landmarks, track keys, frame indices); tracks by the nearest frame-0 face in
    panorama coordinates (the people do not move there)."""
    crops, landmarks, keys, index, anchors = [], [], [], [], None
    for t, frame in enumerate(frames):
        det = detect_faces(frame, scale=1.0)
        aligned = align_faces([frame], [det], crop_size=size, template="ffhq")
        homogeneous = torch.cat([det.landmarks, torch.ones(len(det), 5, 1)], dim=2)
        landmarks.append(torch.einsum("fij,fkj->fki", aligned.affines, homogeneous))
        centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2 + torch.tensor(SHIFT, dtype=torch.float32) * t
        if anchors is None:
            anchors = centres
        for c in centres:
            keys.append(f"track-{int((anchors - c).norm(dim=1).argmin())}")
            index.append(t)
        crops.append(aligned.crops)
    return torch.cat(crops), torch.cat(landmarks), keys, index


def test_video_paradigm_on_the_panned_t1_clip(astronaut_image):
    torch.manual_seed(0)
    image_method = DiffDeID(config="tiny", num_inference_steps=2, **_parts(astronaut_image))
    net = DiffDeIDUNet({"preset": "tiny", "identity_condition": False})
    video = DiffDeIDVideo(image_method, net)
    crops, landmarks, keys, index = _clip_faces(_pan_clip(3), image_method.crop_size)
    tracks = sorted(set(keys))
    assert len(tracks) >= 5 and len(crops) >= 15
    conditions = FaceConditions([1000 + i for i in range(len(crops))], keys, [None] * len(crops), landmarks)
    identities, texture_inputs = [], []
    inner_generate, inner_texture = image_method.generate, video.network.texture_kv

    def spy_generate(c, m, r, rho, identity, seeds):
        identities.append(identity.clone())
        return inner_generate(c, m, r, rho, identity, seeds)

    def spy_texture(x):
        texture_inputs.append(x.clone())
        return inner_texture(x)

    image_method.generate, video.network.texture_kv = spy_generate, spy_texture
    out = video.clip_faces(crops, conditions, index)
    assert out.shape == crops.shape
    assert len(identities) == 1 and len(identities[0]) == len(tracks)  # one z'_id per track, drawn once
    first = {key: keys.index(key) for key in tracks}
    rows = [i for track in DiffDeIDVideo.tracks(conditions) for i in sorted(track, key=lambda j: index[j])[1:]]
    expected = torch.stack([out[first[keys[i]]] for i in rows]) * 2 - 1
    assert len(texture_inputs) == 1 and torch.equal(texture_inputs[0], expected)


def test_anonymize_clip_hands_the_whole_clip_to_the_video_method(astronaut_image):
    """Through the pipeline: one clip_faces call with every face of every frame in frame order,
    the tracker's keys as tracks, and every face region changed."""
    from anonloader.integrations.video import anonymize_clip, tracking_anonymizer

    torch.manual_seed(0)
    image_method = DiffDeID(config="tiny", num_inference_steps=2, **_parts(astronaut_image))
    video = DiffDeIDVideo(image_method, DiffDeIDUNet({"preset": "tiny", "identity_condition": False}))
    calls = []
    inner = video.clip_faces

    def spy(crops, conditions, frame_index):
        calls.append((len(crops), list(frame_index), list(conditions.identity_keys)))
        return inner(crops, conditions, frame_index)

    video.clip_faces = spy
    frames = _pan_clip(3)
    anonymizer = tracking_anonymizer(video, secret="clip test secret", revalidate=False)
    result = anonymize_clip(frames, anonymizer, batch_size=2)
    assert len(calls) == 1
    faces, frame_index, keys = calls[0]
    assert faces == sum(len(r) for r in result.records) and frame_index == sorted(frame_index)
    assert set(frame_index) == {0, 1, 2}
    assert len(set(keys)) < faces  # tracks span frames: fewer keys than faces
    for frame, out, records in zip(frames, result.frames, result.records, strict=True):
        assert records and all(r.status == "anonymized" for r in records)
        for record in records:
            x1, y1, x2, y2 = (int(v) for v in record.box)
            assert (frame[:, y1:y2, x1:x2] - out[:, y1:y2, x1:x2]).abs().mean() > 0.02
