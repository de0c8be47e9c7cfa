"""multi_source_attention: reference semantics, dispatch, autograd and the diffusers processor.

The Triton kernels (forward and backward) are tested under the interpreter in test_kernels_triton.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anonloader.kernels.attention import (
    KV,
    BlendedKV,
    BlendedStates,
    MultiSourceAttnProcessor,
    multi_source_attention,
    multi_source_attention_reference,
)


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def test_reference_equals_sdpa_on_concatenation() -> None:
    q = _rand(2, 3, 7, 40, seed=1)
    k1, v1 = _rand(2, 3, 5, 40, seed=2), _rand(2, 3, 5, 40, seed=3)
    k2, v2 = _rand(2, 3, 11, 40, seed=4), _rand(2, 3, 11, 40, seed=5)
    out = multi_source_attention_reference(q, [KV(k1, v1), (k2, v2)])
    expected = F.scaled_dot_product_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_blend_equals_materialized_blend_and_scale() -> None:
    q = _rand(2, 2, 6, 16, seed=1)
    ka, va, kb, vb = (_rand(2, 2, 9, 16, seed=s) for s in (2, 3, 4, 5))
    own = KV(_rand(2, 2, 6, 16, seed=6), _rand(2, 2, 6, 16, seed=7))
    weight = torch.tensor([0.25, 1.5])
    out = multi_source_attention_reference(q, [own, BlendedKV(ka, va, kb, vb, weight)], scale=0.3)
    w = weight.view(2, 1, 1, 1)
    k = torch.cat([own.k, (1 - w) * ka + w * kb], 2)
    v = torch.cat([own.v, (1 - w) * va + w * vb], 2)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a float weight means the same for every batch item
    out_f = multi_source_attention_reference(q, [own, BlendedKV(ka, va, kb, vb, 0.25)], scale=0.3)
    torch.testing.assert_close(out_f[0], out[0])


def test_batch_one_segment_broadcasts_and_empty_segment_is_skipped() -> None:
    q = _rand(3, 2, 5, 8, seed=1)
    k, v = _rand(1, 2, 4, 8, seed=2), _rand(1, 2, 4, 8, seed=3)
    empty = KV(torch.zeros(3, 2, 0, 8), torch.zeros(3, 2, 0, 8))
    out = multi_source_attention(q, [empty, KV(k, v)])
    expected = F.scaled_dot_product_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "sources, message",
    [
        ([], "at least one"),
        ([KV(torch.zeros(1, 2, 4, 9), torch.zeros(1, 2, 4, 9))], "does not fit"),
        ([KV(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8))], "share one"),
    ],
)
def test_invalid_sources_raise(sources: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        multi_source_attention(torch.zeros(1, 2, 3, 8), sources)


def test_backward_option_is_validated_and_ignored_on_the_reference_path() -> None:
    q = _rand(1, 2, 3, 8, seed=1).requires_grad_()
    k, v = _rand(1, 2, 4, 8, seed=2), _rand(1, 2, 4, 8, seed=3)
    with pytest.raises(ValueError, match="backward must be"):
        multi_source_attention(q, [(k, v)], backward="fused")
    grads = [torch.autograd.grad(multi_source_attention(q, [(k, v)], backward=b).sum(), q)[0] for b in ("triton", "reference")]
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_dispatch_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import anonloader.kernels.attention as attention

    calls = []
    original = attention.multi_source_attention_reference
    monkeypatch.setattr(attention, "multi_source_attention_reference", lambda *a, **k: calls.append(1) or original(*a, **k))
    q = _rand(1, 1, 3, 8)
    attention.multi_source_attention(q, [KV(q, q)])
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attention.multi_source_attention(q, [KV(q, q)], backend="triton")


def test_import_does_not_load_triton_or_query_cuda() -> None:
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError('CUDA queried'))\n"
        "torch.cuda.device_count = lambda: (_ for _ in ()).throw(RuntimeError('CUDA queried'))\n"
        "import anonloader, anonloader.kernels\n"
        "from anonloader.kernels import multi_source_attention, KV, BlendedKV, paste_back, patch_stats\n"
        "assert callable(paste_back) and callable(patch_stats)\n"
        "import anonloader.kernels.attention\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
        "q = torch.randn(1, 1, 2, 8)\n"
        "multi_source_attention(q, [KV(q, q)])\n"
        "assert 'triton' not in sys.modules, 'triton imported by the CPU path'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_reference_gradcheck_float64() -> None:
    q = _rand(1, 2, 3, 5, dtype=torch.float64, seed=1).requires_grad_()
    k, v = _rand(1, 2, 2, 5, dtype=torch.float64, seed=2).requires_grad_(), _rand(1, 2, 2, 5, dtype=torch.float64, seed=3).requires_grad_()
    ka, va, kb, vb = (_rand(1, 2, 3, 5, dtype=torch.float64, seed=s).requires_grad_() for s in (4, 5, 6, 7))
    w = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, ka, va, kb, vb, w):
        return multi_source_attention(q, [KV(k, v), BlendedKV(ka, va, kb, vb, w)])

    assert torch.autograd.gradcheck(fn, (q, k, v, ka, va, kb, vb, w))


# --- diffusers processor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    return unet.eval()


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 12, generator=g)


def test_processor_without_extras_matches_attnprocessor2_0(tiny_unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    sample, t, text = _unet_inputs()
    with torch.no_grad():
        tiny_unet.set_attn_processor(AttnProcessor2_0())
        expected = tiny_unet(sample, t, encoder_hidden_states=text).sample
        tiny_unet.set_attn_processor(MultiSourceAttnProcessor())
        out = tiny_unet(sample, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _self_attention_processors(unet) -> dict[str, MultiSourceAttnProcessor]:
    processors = {name: MultiSourceAttnProcessor() if name.endswith("attn1.processor") else proc for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(dict(processors))  # diffusers pops entries from the dict it is given
    return {name: proc for name, proc in processors.items() if isinstance(proc, MultiSourceAttnProcessor)}


def test_processor_extra_states_change_output_and_match_explicit_concat(tiny_unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    sample, t, text = _unet_inputs()
    with torch.no_grad():
        tiny_unet.set_attn_processor(AttnProcessor2_0())
        plain = tiny_unet(sample, t, encoder_hidden_states=text).sample
        processors = _self_attention_processors(tiny_unet)
        assert processors, "the tiny UNet has self-attention layers"
        attn_modules = {name.rsplit(".processor", 1)[0]: m for name, m in tiny_unet.named_modules() if hasattr(m, "to_k")}
        for name, proc in processors.items():
            channels = attn_modules[name.rsplit(".processor", 1)[0]].to_k.in_features
            g = torch.Generator().manual_seed(len(name))
            a, b = torch.randn(1, 6, channels, generator=g), torch.randn(2, 6, channels, generator=g)
            proc.extra_states = [a, BlendedStates(b, torch.zeros_like(b), 0.0)]
        with_extra = tiny_unet(sample, t, encoder_hidden_states=text).sample
        assert not torch.allclose(with_extra, plain, atol=1e-4)
        # a blend with weight 0 equals its first state; weight 1 its second
        for proc in processors.values():
            a, blended = proc.extra_states
            proc.extra_states = [a, BlendedStates(torch.zeros_like(blended.a), blended.a, 1.0)]
        again = tiny_unet(sample, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(again, with_extra, atol=1e-5, rtol=1e-5)
        # projected extra_kv give the same result as extra_states
        for name, proc in processors.items():
            attn = attn_modules[name.rsplit(".processor", 1)[0]]
            a, blended = proc.extra_states
            kv = [KV(*proc._project(attn, s, 2)) for s in (a, blended.b)]
            proc.extra_states, proc.extra_kv = [], kv
        via_kv = tiny_unet(sample, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(via_kv, with_extra, atol=1e-5, rtol=1e-5)
        for proc in processors.values():
            proc.clear()
        cleared = tiny_unet(sample, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(cleared, plain, atol=1e-5, rtol=1e-5)


def test_benchmark_skips_cleanly_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run, not skip")
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIP: no CUDA GPU")
