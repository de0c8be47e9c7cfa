"""Clips where each real person is tracked across frames: one synthetic identity per track,
read from a video file (PyAV) and a frame folder; identity consistency measured with dlib."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from anonloader.align import align_faces
from anonloader.assets import sample_photo
from anonloader.types import Detections

av = pytest.importorskip("av", reason="PyAV (pip install av) reads and writes the test video")

from anonloader.integrations.video import AnonymizedClips, read_video, tracking_anonymizer, write_video  # noqa: E402

SHIFT = (10, 4)  # the simulated camera pans 10 px left and 4 px up per frame
SECRET = "video-test-secret-0123456789abcdef"


def _pan_clip(frames: int) -> list[torch.Tensor]:
    base = sample_photo("t1").resize((480, 332), Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.array(base)).permute(2, 0, 1)
    dx, dy = SHIFT
    return [array[:, dy * t : dy * t + 300, dx * t : dx * t + 420].contiguous() for t in range(frames)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = write_video(tmp_path_factory.mktemp("video") / "pan.mp4", _pan_clip(4), fps=10)
    clips = AnonymizedClips([path], tracking_anonymizer("blur", secret=SECRET))
    return clips[0], read_video(path)[0]


def _faces_by_track(sample):
    by_track: dict[int, list[tuple[int, object]]] = {}
    for t, (records, tracks) in enumerate(zip(sample["records"], sample["tracks"])):
        for record, track in zip(records, tracks):
            by_track.setdefault(track, []).append((t, record))
    return by_track


def test_video_round_trip_and_tracks_follow_the_real_people(clip):
    sample, originals = clip
    assert sample["frames"].shape == (4, 3, 300, 420) and sample["frames"].dtype == torch.uint8
    assert sample["fps"] == pytest.approx(10)
    by_track = _faces_by_track(sample)
    assert len(by_track) >= 5
    dx, dy = SHIFT

    def centre(t, record):  # in the panorama's coordinates, where the people do not move
        return np.array([(record.box[0] + record.box[2]) / 2 + dx * t, (record.box[1] + record.box[3]) / 2 + dy * t])

    anchors = {track: centre(*faces[0]) for track, faces in by_track.items()}
    for track, faces in by_track.items():
        for t, record in faces:
            distances = {other: np.linalg.norm(centre(t, record) - anchor) for other, anchor in anchors.items()}
            assert min(distances, key=distances.get) == track, f"track {track} jumps to another person in frame {t}"
            assert distances[track] < 15
    long_tracks = [faces for faces in by_track.values() if len(faces) == 4]
    assert len(long_tracks) >= 4  # people visible in every frame keep one track throughout


def test_one_synthetic_identity_per_track(clip):
    sample, _ = clip
    ids = {track: {r.synthetic_id for _, r in faces} for track, faces in _faces_by_track(sample).items()}
    assert all(len(v) == 1 and None not in v for v in ids.values()), ids
    assert len({next(iter(v)) for v in ids.values()}) == len(ids)  # different people, different identities


def test_identity_consistency_across_frames_with_dlib(clip):
    from anonloader.identity.embedders import DlibEmbedder

    sample, originals = clip
    embedder = DlibEmbedder()
    frames = [f.float() / 255 for f in sample["frames"]]
    faces = _faces_by_track(sample)
    tracks = [t for t, f in faces.items() if len(f) >= 3]
    vectors = {}
    for track in tracks:
        crops = []
        for t, record in faces[track]:
            detections = Detections(torch.tensor([record.box]), torch.tensor([record.landmarks]), torch.tensor([record.score]))
            crops.append(align_faces([frames[t]], [detections], crop_size=112, template="arcface").crops[0])
        vectors[track] = embedder(torch.stack(crops))
    within = [float(v[i] @ v[j]) for v in vectors.values() for i, j in itertools.combinations(range(len(v)), 2)]
    across = [float(vectors[a][0] @ vectors[b][0]) for a, b in itertools.combinations(tracks, 2)]
    print(f"dlib cosine, anonymized faces: same track mean {np.mean(within):.3f} min {np.min(within):.3f}; "
          f"different tracks mean {np.mean(across):.3f} max {np.max(across):.3f}")
    assert np.mean(within) > np.mean(across) + 0.02
    assert np.min(within) > embedder.threshold  # every pair of one track: the same person to dlib


def test_frame_folder_clip(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(_pan_clip(2)):
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"{t:04d}.png")
    sample = AnonymizedClips([folder], method="pixelate", secret=SECRET)[0]
    assert sample["frames"].shape == (2, 3, 300, 420) and sample["clip"] == "frames"
    first, second = (sorted(zip(t, (r.synthetic_id for r in rec))) for t, rec in zip(sample["tracks"], sample["records"]))
    assert [s for _, s in first] == [s for _, s in second[: len(first)]]  # same people, same identities
