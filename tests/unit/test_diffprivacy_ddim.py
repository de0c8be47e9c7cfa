"""Diff-Privacy's schedule, DDIM step and inversion against closed forms and diffusers' DDIM,
and the backbone loaded from a real diffusers directory."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import ModelLoadError
from anonloader.methods.diffprivacy.backbone import (
    SD15_SCHEDULER_CONFIG,
    build_tiny_backbone,
    load_backbone,
    locate_backbone,
    save_backbone,
)
from anonloader.methods.diffprivacy.schedule import (
    NoiseSchedule,
    ddim_invert_step,
    ddim_step,
    predict_z0,
    v_to_eps,
)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)


def test_schedule_matches_diffusers_ddim(schedule):
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod)
    reference.set_timesteps(50)
    assert schedule.timesteps(50) == reference.timesteps.tolist()
    assert schedule.final_alpha_cumprod == float(reference.final_alpha_cumprod)


def test_start_timesteps_anonymize_and_hide(schedule):
    ts = schedule.start_timesteps(50, 0.6)
    assert ts[0] == 581 and ts[-1] == 1 and len(ts) == 30
    hide = schedule.start_timesteps(100, 0.8)
    assert hide[0] == 791 and hide[-1] == 1 and len(hide) == 80


def test_ddim_step_is_the_corrected_closed_form_and_diffusers_step(schedule):
    from diffusers import DDIMScheduler

    torch.manual_seed(1)
    z_t, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, s = 581, 561
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    z_s, z0 = ddim_step(z_t, eps, a_t, a_s)
    # eq. 13 as printed, with the missing sqrt(a_s) factor on the eps term restored
    closed = math.sqrt(a_s / a_t) * z_t + math.sqrt(a_s) * (math.sqrt(1 / a_s - 1) - math.sqrt(1 / a_t - 1)) * eps
    assert torch.allclose(z_s, closed, atol=1e-6, rtol=0)
    printed = math.sqrt(a_s / a_t) * z_t + (math.sqrt(1 / a_s - 1) - math.sqrt(1 / a_t - 1)) * eps
    assert (z_s - printed).abs().max() > 1e-3  # the printed form is a different (wrong) update
    # eq. 10 exactly: z_t built from z0 and eps gives z0 back
    assert torch.allclose(predict_z0(math.sqrt(a_t) * z0 + math.sqrt(1 - a_t) * eps, eps, a_t), z0, atol=1e-12)
    reference = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    reference.set_timesteps(50)
    expected = reference.step(eps.float(), t, z_t.float(), eta=0.0).prev_sample
    assert torch.allclose(z_s.float(), expected, atol=1e-5, rtol=0)


def test_inversion_then_sampling_is_the_identity_with_constant_eps(schedule):
    torch.manual_seed(2)
    z0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, dtype=torch.float64)  # a constant-eps model
    ts = schedule.timesteps(50)[::-1]
    z = z0
    for t in ts:
        z = ddim_invert_step(z, eps, schedule.alpha(schedule.previous(t, 50)), schedule.alpha(t))
    for t in ts[::-1]:
        z, _ = ddim_step(z, eps, schedule.alpha(t), schedule.alpha(schedule.previous(t, 50)))
    assert torch.allclose(z, z0, atol=1e-5, rtol=0)


def test_v_prediction_converts_to_eps(schedule):
    torch.manual_seed(3)
    z0, eps = torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(1, 4, 4, 4, dtype=torch.float64)
    a = schedule.alpha(401)
    z_t = math.sqrt(a) * z0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * z0  # the v-prediction target
    assert torch.allclose(v_to_eps(v, z_t, a), eps, atol=1e-12)


def test_backbone_round_trips_through_a_diffusers_directory(tmp_path):
    backbone = build_tiny_backbone(0)
    save_backbone(backbone, tmp_path / "sd")
    for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder", "feature_extractor"):
        assert (tmp_path / "sd" / folder).is_dir()
    dirs, digests = locate_backbone(tmp_path / "sd")
    loaded = load_backbone(dirs, digests)
    torch.manual_seed(4)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        cond = backbone.text_encoder(backbone.token_ids("a photo of *")[None]).last_hidden_state
        assert cond.shape == (1, 77, backbone.text_width)
        assert torch.equal(backbone.eps(z, 501, cond), loaded.eps(z, 501, cond))
    assert torch.equal(loaded.token_ids("a photo of *"), backbone.token_ids("a photo of *"))
    assert set(digests) == {"unet", "vae", "text_encoder", "image_encoder", "tokenizer"}


def test_backbone_is_offline_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="allow_download"):
        locate_backbone("nobody-here/no-such-model", cache_dir=tmp_path)
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="vae"):
        locate_backbone(tmp_path / "partial")


def test_clip_image_encoder_from_its_own_directory(tmp_path):
    import shutil

    backbone = build_tiny_backbone(1)
    save_backbone(backbone, tmp_path / "sd")
    clip = tmp_path / "clip"  # the layout of openai/clip-vit-large-patch14: one folder
    shutil.move(str(tmp_path / "sd" / "image_encoder"), str(clip))
    shutil.move(str(tmp_path / "sd" / "feature_extractor" / "preprocessor_config.json"), str(clip / "preprocessor_config.json"))
    shutil.rmtree(tmp_path / "sd" / "feature_extractor")
    dirs, digests = locate_backbone(tmp_path / "sd", clip)
    assert dirs["image_encoder"] == clip == dirs["feature_extractor"]
    loaded = load_backbone(dirs, digests)
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            loaded.image_encoder(pixel_values=loaded.clip_pixels(pixels)).last_hidden_state,
            backbone.image_encoder(pixel_values=backbone.clip_pixels(pixels)).last_hidden_state,
        )
