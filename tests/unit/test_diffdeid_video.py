"""DiffDeID's video paradigm (sec. 3.4): ρ̂ takes each part from its source, the window mean is
exact and clipped at the ends, and a clip's later frames feed their track's first output to E_t."""

from __future__ import annotations

import pytest
import torch
from test_diffdeid_model import (  # tests/unit is on sys.path (pytest's prepend import mode)
    S,
    _face,
    _method,
)

from anonloader.errors import ConfigError
from anonloader.methods.diffdeid.conditions import RhoLayout
from anonloader.methods.diffdeid.network import DiffDeIDUNet
from anonloader.methods.diffdeid.video import DiffDeIDVideo, video_rho, window_mean
from anonloader.types import FaceConditions


def test_window_mean_is_exact_and_clipped_at_the_ends():
    values = torch.arange(7, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 10.0]], dtype=torch.float64)
    frames = torch.tensor([0, 1, 2, 3, 4, 5, 7])  # frame 6 missing
    got = window_mean(values, frames, k=2)
    for i, f in enumerate(frames.tolist()):
        rows = [j for j, g in enumerate(frames.tolist()) if abs(g - f) <= 2]
        assert torch.allclose(got[i], values[rows].mean(0))
    assert torch.allclose(got[0], values[:3].mean(0))  # clipped at the start: frames 0, 1, 2
    assert torch.allclose(got[-1], values[[5, 6]].mean(0))  # clipped at the end: frames 5 and 7 (6 missing)
    assert torch.equal(window_mean(values, frames, k=0), values)


def test_rho_hat_takes_each_part_from_its_source():
    layout = RhoLayout()
    g = torch.Generator().manual_seed(0)
    frames_rho, reference = torch.randn(5, 261, generator=g), torch.randn(261, generator=g)
    frames = torch.arange(5)
    hat = video_rho(layout, frames_rho, reference, frames, k=2)
    smooth = window_mean(frames_rho, frames, 2)
    for name in ("alpha", "delta", "gamma"):
        assert torch.equal(hat[:, layout.slice(name)], reference[layout.slice(name)].expand(5, -1))
    for name in ("beta", "pose", "omega"):
        assert torch.equal(hat[:, layout.slice(name)], smooth[:, layout.slice(name)])


def _video_method() -> DiffDeIDVideo:
    torch.manual_seed(5)
    net = DiffDeIDUNet({"preset": "tiny", "identity_condition": False})
    with torch.no_grad():
        net.out.weight.normal_(0, 0.2)
    return DiffDeIDVideo(_method(), net)


def test_clip_faces_one_identity_per_track_and_first_output_drives_texture():
    video = _video_method()
    crop, lm = _face()
    # a 3-frame clip with two tracks: the astronaut, and her mirror image (another 'person'), with
    # small photometric changes from frame to frame
    frames, keys, index = [], [], []
    for t in range(3):
        frames += [(crop[0] * (1 + 0.05 * t)).clamp(0, 1), (crop[0].flip(-1) * (1 - 0.05 * t)).clamp(0, 1)]
        keys += ["track-a", "track-b"]
        index += [t, t]
    crops = torch.stack(frames)
    mirrored = lm.clone()
    mirrored[..., 0] = S - lm[..., 0]
    mirrored = mirrored[:, [1, 0, 2, 4, 3]]
    landmarks = torch.cat([lm, mirrored] * 3)
    conditions = FaceConditions([10 + i for i in range(6)], keys, [None] * 6, landmarks)
    image_calls, texture_inputs = [], []
    image_method = video.image_method
    inner_call = type(image_method).__call__
    inner_texture = video.network.texture_kv

    def spy_call(self, c, cond):
        image_calls.append((c.clone(), list(cond.identity_keys)))
        return inner_call(self, c, cond)

    def spy_texture(x):
        texture_inputs.append(x.clone())
        return inner_texture(x)

    type(image_method).__call__ = spy_call
    video.network.texture_kv = spy_texture
    try:
        out = video.clip_faces(crops, conditions, index)
    finally:
        type(image_method).__call__ = inner_call
        del video.network.texture_kv
    assert out.shape == crops.shape and out.min() >= 0 and out.max() <= 1
    assert len(image_calls) == 1 and image_calls[0][1] == ["track-a", "track-b"]  # first frames only, once
    assert torch.equal(image_calls[0][0], crops[[0, 1]])
    assert len(texture_inputs) == 1
    # rows: track a frames 1, 2 then track b frames 1, 2; each gets its track's first output
    expected = torch.stack([out[0], out[0], out[1], out[1]]) * 2 - 1
    assert torch.equal(texture_inputs[0], expected)
    again = video.clip_faces(crops, conditions, index)
    assert torch.equal(again, out)  # deterministic


def test_video_network_must_ignore_identity():
    with pytest.raises(ConfigError, match="identity_condition=False"):
        DiffDeIDVideo(_method(), DiffDeIDUNet("tiny"))
