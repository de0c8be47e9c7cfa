"""FAMS weights: save then load bit for bit; a directory in the released layout loads offline;
hub ids never download unless allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.errors import ModelLoadError  # noqa: E402
from anonloader.methods.fams import FAMS, build_tiny_components  # noqa: E402
from anonloader.methods.fams.weights import CPU_ALIGNMENT, own_aligned_memory  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402

# The keys of stabilityai/stable-diffusion-2-1's unet/config.json (the released FAMS networks
# are initialized from it and keep its structure; only the sizes below are tiny).
SD21_UNET_KEYS = [
    "act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "cross_attention_dim",
    "down_block_types", "downsample_padding", "dual_cross_attention", "flip_sin_to_cos", "freq_shift",
    "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps", "norm_num_groups",
    "num_class_embeds", "only_cross_attention", "out_channels", "sample_size", "up_block_types",
    "use_linear_projection", "upcast_attention",
]  # fmt: skip
SD21_VAE_KEYS = [
    "act_fn", "block_out_channels", "down_block_types", "in_channels", "latent_channels",
    "layers_per_block", "norm_num_groups", "out_channels", "sample_size", "up_block_types",
]  # fmt: skip
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}  # fmt: skip
CLIP_PREPROCESSOR = {
    "crop_size": 16, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 16,
}  # fmt: skip



def _conditions(n):
    return FaceConditions(list(range(7, 7 + n)), [None] * n, [None] * n, torch.zeros(n, 5, 2))


@pytest.fixture(scope="module")
def crops():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _rewrite_config(folder: Path, class_name: str, keys: list[str]) -> None:
    config = json.loads((folder / "config.json").read_text())
    kept = {k: config[k] for k in keys if k in config}
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.25.0.dev0", **kept}))


def _write_release(root: Path, components) -> tuple[Path, Path, Path]:
    """Writes the three sources the way users have them: the FAMS release, SD 2.1, CLIP."""
    from transformers import CLIPConfig, CLIPModel

    release, sd21, clip = root / "face-anon-simple", root / "stable-diffusion-2-1", root / "clip-vit-large-patch14"
    components.unet.save_pretrained(release / "unet")
    _rewrite_config(release / "unet", "UNet2DConditionModel", SD21_UNET_KEYS)
    for name in ("referencenet", "conditioning_referencenet"):
        getattr(components, name).model.save_pretrained(release / name)
        _rewrite_config(release / name, "ReferenceNetModel", SD21_UNET_KEYS)
    components.vae.save_pretrained(sd21 / "vae")
    _rewrite_config(sd21 / "vae", "AutoencoderKL", SD21_VAE_KEYS)
    (sd21 / "scheduler").mkdir()
    (sd21 / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER))
    # clip-vit-large-patch14 is a whole CLIPModel (text and vision); we read its vision tower
    vision = components.image_encoder.config.to_dict()
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    full.vision_model.load_state_dict(components.image_encoder.state_dict())
    full.save_pretrained(clip)
    (clip / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR))
    return release, sd21, clip


def test_released_layout_loads_offline_and_matches_the_networks(tmp_path, crops):
    components = build_tiny_components(0)
    release, sd21, clip = _write_release(tmp_path, components)
    loaded = FAMS.from_pretrained(str(release), base_model=str(sd21), clip_model=str(clip), crop_size=16, resolution=16, num_inference_steps=2)
    assert loaded.components.scheduler_config["prediction_type"] == "v_prediction"
    assert loaded.components.clip_input.size == 16
    for name, network in components.networks().items():
        theirs = loaded.components.networks()[name].state_dict()
        for key, value in network.state_dict().items():
            assert torch.equal(theirs[key], value), f"{name}.{key}"
    # diffusers/transformers hand out tensors inside the memory-mapped files (8-byte aligned);
    # MKL sums misaligned data in another order, so the loader moves them to aligned memory
    for name, network in loaded.components.networks().items():
        for tensor in [*network.parameters(), *network.buffers()]:
            assert tensor.data_ptr() % CPU_ALIGNMENT == 0, name
    reference = FAMS.from_components(components, crop_size=16, resolution=16, num_inference_steps=2)
    assert torch.equal(loaded(crops, _conditions(2)), reference(crops, _conditions(2)))
    config = loaded.config()
    assert config["weights"]["origin"] == "files" and len(config["weights"]["unet"]) == 64


def test_save_then_load_is_bit_for_bit(tmp_path, crops):
    fams = FAMS.from_config(tiny=True, crop_size=16, anonymization_degree=1.4, num_inference_steps=2)
    before = fams(crops, _conditions(2))
    fams.save_pretrained(tmp_path / "ours")
    assert {p.name for p in (tmp_path / "ours").iterdir()} >= {"unet", "referencenet", "conditioning_referencenet", "vae", "scheduler", "image_encoder", "feature_extractor", "fams_config.json"}
    # self-contained: the SD 2.1 / CLIP sources are never consulted (these ids are not cached)
    loaded = FAMS.from_pretrained(tmp_path / "ours", base_model="nobody/none", clip_model="nobody/none", crop_size=16)
    assert loaded.settings.anonymization_degree == 1.4 and loaded.settings.resolution == 16  # saved settings
    assert torch.equal(loaded(crops, _conditions(2)), before)
    assert loaded.config()["weights"] == FAMS(tmp_path / "ours", crop_size=16).config()["weights"]


def test_missing_hub_weights_never_download_unless_allowed(tmp_path):
    with pytest.raises(ModelLoadError, match="allow_download"):
        FAMS.from_pretrained("hkung/face-anon-simple", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="neither a directory nor a hub id"):
        FAMS.from_pretrained(str(tmp_path / "does" / "not" / "exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="released layout"):
        FAMS.from_pretrained(tmp_path / "empty")
    lazy = FAMS("hkung/face-anon-simple", cache_dir=tmp_path)  # construction touches nothing
    with pytest.raises(ModelLoadError):
        lazy.config()


def test_own_aligned_memory_moves_only_misaligned_tensors_and_keeps_values():
    linear = torch.nn.Linear(32, 32)
    linear.register_buffer("scale", torch.arange(8.0))
    storage = torch.empty(32 * 32 + 1)  # one float in: 4 bytes off PyTorch's 64-byte alignment
    misaligned = storage[1:].view(32, 32)
    misaligned.copy_(linear.weight.detach())
    expected_weight = linear.weight.detach().clone()
    linear.weight.data = misaligned
    bias_pointer = linear.bias.data_ptr()
    assert linear.weight.data_ptr() % CPU_ALIGNMENT != 0
    own_aligned_memory(linear)
    assert linear.weight.data_ptr() % CPU_ALIGNMENT == 0 and torch.equal(linear.weight, expected_weight)
    assert linear.bias.data_ptr() == bias_pointer  # already aligned: untouched, not copied
    assert torch.equal(linear.scale, torch.arange(8.0)) and isinstance(linear.weight, torch.nn.Parameter)


def test_routing_is_recorded_with_our_checkpoints_and_released_layout_routes_as_released(tmp_path, crops):
    by_name = FAMS.from_components(build_tiny_components(0, reference_routing="by_name"), crop_size=16, resolution=16, num_inference_steps=2)
    by_name.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "fams_config.json").read_text())
    assert saved["reference_routing"] == "by_name" and saved["format"] == 2
    loaded = FAMS.from_pretrained(tmp_path / "ours", crop_size=16)
    assert loaded.components.reference_routing == "by_name" and loaded.config()["reference_routing"] == "by_name"
    assert torch.equal(loaded(crops, _conditions(2)), by_name(crops, _conditions(2)))
    # the same networks routed as released compute something else; the fingerprint says so
    released = FAMS.from_pretrained(tmp_path / "ours", crop_size=16, reference_routing="released")
    assert released.config() != loaded.config()
    assert not torch.equal(released(crops, _conditions(2)), by_name(crops, _conditions(2)))
    # the authors' layout has no fams_config.json: released routing
    release, sd21, clip = _write_release(tmp_path / "release", build_tiny_components(0))
    assert FAMS(str(release), base_model=str(sd21), clip_model=str(clip)).config()["reference_routing"] == "released"
