"""FAMS attention routing: the UNet's self-attention really attends to the ReferenceNets' states,
and our N-query form equals the authors' 3N-query-then-slice form."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.kernels.attention import BlendedStates  # noqa: E402
from anonloader.methods.fams import build_tiny_components  # noqa: E402
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
    source = components.referencenet(latents, embeds)
    driving = components.conditioning_referencenet(latents.flip(0), embeds.flip(0))
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
