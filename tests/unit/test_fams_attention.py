"""FAMS attention routing: the UNet's self-attention really attends to the ReferenceNets' states,
and our N-query form equals the authors' 3N-query-then-slice form."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.kernels.attention import BlendedStates  # noqa: E402
from anonloader.methods.fams import FAMS, build_tiny_components  # noqa: E402
from anonloader.methods.fams.referencenet import ReferenceStateRecorder, reference_layer_map  # noqa: E402
from anonloader.methods.fams.attention import (  # noqa: E402
    clear_reference_states,
    project_reference_states,
    route_reference_kv,
    route_reference_states,
)



@pytest.fixture(scope="module")
def components():
    return build_tiny_components(0)


def _inputs(components, batch=2):
    torch.manual_seed(1)
    latents = torch.randn(batch, 4, 8, 8)
    embeds = torch.randn(batch, 1, 16)
    source = components.source_states(latents, embeds)
    driving = components.driving_states(latents.flip(0), embeds.flip(0))
    noisy = torch.randn(batch, 4, 8, 8)
    tokens = torch.cat([embeds, embeds.flip(0)], dim=1)
    return source, driving, noisy, tokens


@torch.no_grad()
def test_reference_states_cover_every_self_attention_layer(components):
    source, _, _, _ = _inputs(components)
    assert list(source) == list(components.processors)
    # down block at 8x8 -> 64 tokens of 8 channels; the UNet's layers have the same names
    first = next(iter(source.values()))
    assert first.shape == (2, 64, 8)


@torch.no_grad()
def test_zeroing_reference_states_changes_the_output(components):
    source, driving, noisy, tokens = _inputs(components)
    t = torch.tensor([500, 500])
    route_reference_states(components.processors, [source, driving])
    with_states = components.unet(noisy, t, encoder_hidden_states=tokens).sample
    zeroed = [{k: torch.zeros_like(v) for k, v in s.items()} for s in (source, driving)]
    route_reference_states(components.processors, zeroed)
    with_zeros = components.unet(noisy, t, encoder_hidden_states=tokens).sample
    clear_reference_states(components.processors)
    plain = components.unet(noisy, t, encoder_hidden_states=tokens).sample
    assert (with_states - with_zeros).abs().max() > 1e-4
    assert (with_states - plain).abs().max() > 1e-4
    # and the states are used per sample: swapping the driving states between the two samples
    # changes each sample's prediction
    route_reference_states(components.processors, [source, {k: v.flip(0) for k, v in driving.items()}])
    swapped = components.unet(noisy, t, encoder_hidden_states=tokens).sample
    clear_reference_states(components.processors)
    assert (with_states - swapped).abs().amax(dim=(1, 2, 3)).min() > 1e-5


@torch.no_grad()
def test_n_queries_equal_the_authors_3n_queries_sliced(components):
    """The authors' UNet attends with the concatenated 3N tokens as queries and keeps the first N
    output rows; we use the N own queries only. The rows must agree."""
    source, driving, _, _ = _inputs(components)
    name = next(iter(components.processors))
    attn = dict(components.unet.named_modules())[name]
    torch.manual_seed(2)
    own = torch.randn_like(source[name])
    processor = components.processors[name]
    processor.extra_states = [source[name], driving[name]]
    ours = attn(own)
    processor.clear()
    concatenated = torch.cat([own, source[name], driving[name]], dim=1)
    theirs = attn(concatenated)[:, : own.shape[1]]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_projected_blend_equals_materialized_blend(components):
    """Eq. 2 handed to the kernel (BlendedKV of projected states) equals projecting the
    materialized S' = (1 - d) S_cond + d S_uncond, for d > 1 too."""
    source, driving, noisy, tokens = _inputs(components)
    null = components.null_states((8, 8))
    degree = 1.4
    t = torch.tensor([300, 300])
    blended = {k: BlendedStates(v, null[k].expand_as(v), degree) for k, v in source.items()}
    route_reference_kv(components.processors, project_reference_states(components.unet, [blended, driving]))
    fused = components.unet(noisy, t, encoder_hidden_states=tokens).sample
    materialized = {k: (1 - degree) * v + degree * null[k] for k, v in source.items()}
    route_reference_states(components.processors, [materialized, driving])
    explicit = components.unet(noisy, t, encoder_hidden_states=tokens).sample
    clear_reference_states(components.processors)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- routing as the released code does it

class _NoisyRecorder(ReferenceStateRecorder):
    """Hands the UNet the layer's states plus noise; the ReferenceNet itself computes with the
    original states (so nothing downstream in the ReferenceNet changes)."""

    def __init__(self, name, states, noise):
        super().__init__(name, states)
        self.noise = noise

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = super().__call__(attn, hidden_states, *args, **kwargs)
        self.states[self.name] = hidden_states + self.noise.to(hidden_states)
        return out


def _generate_with_noise(components, crops, network, layers):
    """FAMS output (CFG and eq. 2 on) with noise written into ``network``'s recorded states of
    ``layers``."""
    net = getattr(components, network)
    modules = dict(net.model.named_modules())
    originals = {layer: modules[layer].processor for layer in layers}
    generator = torch.Generator().manual_seed(17)
    try:
        for layer in layers:
            recorder = originals[layer]
            channels = modules[layer].to_q.in_features
            noise = torch.randn(1, 1, channels, generator=generator) * 3.0
            modules[layer].set_processor(_NoisyRecorder(layer, recorder.states, noise))
        components.clear_cache()
        fams = FAMS.from_components(components, crop_size=16, resolution=16, num_inference_steps=2, anonymization_degree=1.25)
        return fams.generate(crops, [3, 4])
    finally:
        for layer, processor in originals.items():
            modules[layer].set_processor(processor)
        components.clear_cache()


@pytest.fixture(scope="module")
def face_crops():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("network", ["referencenet", "conditioning_referencenet"])
def test_released_routing_gives_every_attention_of_a_block_attention_0s_state(components, face_crops, network):
    """The released code indexes a block's tuple of states by transformer-block number: with one
    transformer block per attention module (SD 2.1, layers_per_block=2 here), noise in the
    states of attention 1 (and 2) reaches no output byte; noise in attention 0's does."""
    assert components.reference_routing == "released"
    names = getattr(components, network).layer_names
    later = [n for n in names if ".attentions.0." not in n]
    first = [n for n in names if ".attentions.0." in n and not n.startswith("mid_block")]
    assert {n.split(".attentions.")[0] for n in later} == {"down_blocks.0", "up_blocks.1"}  # 2 and 3 attentions
    clean = _generate_with_noise(components, face_crops, network, [])
    assert torch.equal(_generate_with_noise(components, face_crops, network, later), clean)
    for layer in first:  # down_blocks.0.attentions.0, up_blocks.1.attentions.0: each feeds its block
        assert not torch.equal(_generate_with_noise(components, face_crops, network, [layer]), clean), layer


def test_name_routing_reads_each_layers_own_state(face_crops):
    by_name = build_tiny_components(0, reference_routing="by_name")
    layer = "down_blocks.0.attentions.1.transformer_blocks.0.attn1"
    clean = _generate_with_noise(by_name, face_crops, "referencenet", [])
    assert not torch.equal(_generate_with_noise(by_name, face_crops, "referencenet", [layer]), clean)


def test_sd21_structure_routes_9_of_16_layers_to_attention_0():
    """Stable Diffusion 2.1's block structure (channels shrunk): 16 self-attention layers, of
    which 9 (the non-first attentions of each block) read the block's first state."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=8,
        norm_num_groups=4,
        use_linear_projection=True,
    )
    released = reference_layer_map(unet, "released")
    assert len(released) == 16 and reference_layer_map(unet, "by_name") == {n: n for n in released}
    moved = {k: v for k, v in released.items() if k != v}
    assert len(moved) == 9 and len(set(released.values())) == 7
    assert released["up_blocks.3.attentions.2.transformer_blocks.0.attn1"] == "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    assert released["mid_block.attentions.0.transformer_blocks.0.attn1"] == "mid_block.attentions.0.transformer_blocks.0.attn1"
    with pytest.raises(ValueError, match="routing"):
        reference_layer_map(unet, "nearest")
