"""IDDiffuse's conditions, exactly: identity and texture K/V reach every attention layer of the
UNet; ``gamma`` blends the identity condition as the docstring's reading says (an intermediate
gamma equals the blend built by hand, ``gamma = 1`` leaves no trace of x̂).

The UNet here has the ``"paper"`` preset's block structure (two attention down blocks, two
attention up blocks, layers_per_block=1, the mid block) with tiny channels."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.kernels.attention import KV, BlendedKV, MultiSourceAttnProcessor  # noqa: E402
from anonloader.methods.iddiffuse import IDDiffuse  # noqa: E402
from anonloader.methods.iddiffuse.network import PRESETS  # noqa: E402
from anonloader.methods.iddiffuse.unet import DualConditionUNet  # noqa: E402
from anonloader.types import FaceConditions  # noqa: E402

ID_DIM, TOKEN_DIM, TEXTURE_TOKENS = 8, 8, 5


@pytest.fixture(scope="module")
def unet() -> DualConditionUNet:
    paper = PRESETS["paper"]["unet"]
    torch.manual_seed(0)
    return DualConditionUNet(
        sample_size=32, block_out_channels=(8, 8, 16, 16), layers_per_block=paper["layers_per_block"],
        down_block_types=paper["down_block_types"], up_block_types=paper["up_block_types"], attention_head_dim=4,
        norm_num_groups=4, identity_dim=ID_DIM, token_dim=TOKEN_DIM, num_identity_tokens=paper["num_identity_tokens"],
    ).eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 3, 32, 32, generator=g),
        "timesteps": torch.tensor([3, 17]),
        "identity": torch.randn(2, ID_DIM, generator=g),
        "texture": torch.randn(2, TEXTURE_TOKENS, TOKEN_DIM, generator=g),
        "identity_b": torch.randn(2, ID_DIM, generator=g),
    }


def test_identity_and_texture_kv_reach_every_attention_layer(unet, inputs, monkeypatch):
    from diffusers.models.attention_processor import Attention

    received: dict[int, list] = {}
    original = MultiSourceAttnProcessor.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        received[id(attn)] = list(self.extra_kv)  # what each processor holds when its layer runs
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    monkeypatch.setattr(MultiSourceAttnProcessor, "__call__", spy)
    layers = [m for m in unet.unet.modules() if isinstance(m, Attention)]
    # 2 attention down blocks x 1 layer + 2 attention up blocks x (1 + 1) layers + the mid block's 1
    assert len(layers) == 7
    heads = {id(m): m.heads for m in layers}
    for gamma, identity_kind in ((None, KV), (0.5, BlendedKV)):
        received.clear()
        with torch.no_grad():
            unet(inputs["sample"], inputs["timesteps"], inputs["identity"], inputs["texture"],
                 identity_b=inputs["identity_b"] if gamma is not None else None, gamma=gamma)
        assert set(received) == set(heads)  # every attention layer ran with the conditions
        for layer, (identity, texture) in received.items():
            assert isinstance(identity, identity_kind) and isinstance(texture, KV)
            k_identity = identity.k if isinstance(identity, KV) else identity.k_a
            assert k_identity.shape[:3] == (2, heads[layer], unet.num_identity_tokens)  # B, heads, identity tokens
            assert texture.k.shape[:3] == (2, heads[layer], TEXTURE_TOKENS)
    assert all(not p.extra_kv for _, p in unet._processors.values())  # cleared after the pass


def test_intermediate_gamma_equals_the_blend_built_by_hand(unet, inputs):
    g = 0.3
    x, t, a, texture, b = (inputs[k] for k in ("sample", "timesteps", "identity", "texture", "identity_b"))
    with torch.no_grad():
        out = unet(x, t, a, texture, identity_b=b, gamma=g)
        # the reading: the timestep term of the blended features (it is linear in them) ...
        time_condition = unet.identity_to_time((1 - g) * a + g * b)
        # ... and in every attention layer, the blend of the two identities' projected keys/values
        tokens_a, tokens_b = unet.identity_tokens(a), unet.identity_tokens(b)
        for key, (attn, processor) in unet._processors.items():
            k_a, v_a = unet._project(key, attn, tokens_a)
            k_b, v_b = unet._project(key, attn, tokens_b)
            processor.extra_kv = [KV((1 - g) * k_a + g * k_b, (1 - g) * v_a + g * v_b), KV(*unet._project(key, attn, texture))]
        try:
            expected = unet.unet(x, t, class_labels=time_condition).sample
        finally:
            for _, processor in unet._processors.values():
                processor.clear()
        ends = unet(x, t, a, texture), unet(x, t, b, texture)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert min(float((out - e).abs().max()) for e in ends) > 1e-4  # neither end: a real blend


def _conditions(seeds, synthetic):
    n = len(seeds)
    return FaceConditions(seeds, [None] * n, [None] * n, torch.zeros(n, 5, 2), {"synthetic_images": synthetic})


def test_gamma_one_ignores_the_synthetic_identity_to_the_byte():
    torch.manual_seed(0)
    method = IDDiffuse(config="tiny", num_inference_steps=3, gamma=1.0)
    g = torch.Generator().manual_seed(3)
    crops, synthetic, other = (torch.rand(2, 3, 32, 32, generator=g) for _ in range(3))
    out = method(crops, _conditions([4, 5], synthetic))
    assert out.numpy().tobytes() == method(crops, _conditions([4, 5], other)).numpy().tobytes()
    method.gamma = 0.5  # any other gamma does depend on x̂
    assert not torch.equal(method(crops, _conditions([4, 5], synthetic)), method(crops, _conditions([4, 5], other)))
