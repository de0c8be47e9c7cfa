"""The Triton kernels against their references, on CPU through Triton's interpreter.

Triton decides between interpreter and compiler when it (and each ``@triton.jit`` function,
including its own standard library) is imported, so ``TRITON_INTERPRET=1`` must be in the
environment before ``import triton``. This module therefore runs itself in a fresh subprocess
with that variable set (``test_kernels_under_triton_interpreter``); in the parent process the
kernel cases are skipped, in the child they run. Shapes are tiny and odd (sequence lengths not multiples of the block, head dims 40/80) since
the interpreter is slow.

Tolerances: attention (forward, and the gradients of the fused Triton backward for q, every
key/value, blended a/b and the blend weight) is accepted when its max error against a float64
reference is at most 2x torch's own error at the same precision (the reference run in that
dtype) plus 1e-6; float32 gradients also within 1e-5 abs / 1e-4 rel of torch's float32 ones;
patch statistics and paste-back within float32 rounding of the reference (1e-5 / 1e-4 abs),
half-precision patch statistics within two ulps of the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
kernel_case = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_under_triton_interpreter")

from anonloader.kernels.attention import KV, BlendedKV, multi_source_attention, multi_source_attention_reference  # noqa: E402
from anonloader.kernels.paste_back import paste_back, paste_back_reference  # noqa: E402
from anonloader.kernels.patch_stats import patch_stats, patch_stats_reference  # noqa: E402



@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter subprocess itself")
def test_kernels_under_triton_interpreter() -> None:
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(root)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _to(sources: list, dtype: torch.dtype) -> list:
    out = []
    for s in sources:
        if isinstance(s, KV):
            out.append(KV(s.k.to(dtype), s.v.to(dtype)))
        else:
            out.append(BlendedKV(s.k_a.to(dtype), s.v_a.to(dtype), s.k_b.to(dtype), s.v_b.to(dtype), s.weight))
    return out


def _sources(b: int, h: int, d: int, dtype: torch.dtype, seed: int) -> list:
    own = KV(_randn(b, h, 19, d, seed=seed, dtype=dtype), _randn(b, h, 19, d, seed=seed + 1, dtype=dtype))
    # a batch-1 segment (broadcast) given as B,L,H,D transposed: non-contiguous strides
    ref = KV(_randn(1, 23, h, d, seed=seed + 2, dtype=dtype).transpose(1, 2), _randn(1, 23, h, d, seed=seed + 3, dtype=dtype).transpose(1, 2))
    blended = BlendedKV(*(_randn(b, h, 17, d, seed=seed + 4 + i, dtype=dtype) for i in range(4)), weight=torch.tensor([0.3, 1.4])[:b])
    return [own, ref, blended]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 80])
@kernel_case
def test_attention_kernel_error_within_2x_torch(dtype: torch.dtype, head_dim: int) -> None:
    q = _randn(2, 2, 21, head_dim, seed=1, dtype=dtype)
    sources = _sources(2, 2, head_dim, dtype, seed=10)
    exact = multi_source_attention_reference(q.double(), _to(sources, torch.float64))
    out = multi_source_attention(q, sources, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    torch_error = (multi_source_attention_reference(q, sources).double() - exact).abs().max().item()
    kernel_error = (out.double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error + 1e-6, (kernel_error, torch_error)


@kernel_case
def test_attention_kernel_single_segment_and_scale() -> None:
    q = _randn(1, 3, 33, 64, seed=2)
    k, v = _randn(1, 3, 45, 64, seed=3), _randn(1, 3, 45, 64, seed=4)
    out = multi_source_attention(q, [(k, v)], scale=0.05, backend="triton")
    torch.testing.assert_close(out, multi_source_attention_reference(q, [(k, v)], scale=0.05), atol=2e-6, rtol=1e-5)


def _gradient_case(
    dtype: torch.dtype, head_dim: int, backend: str, backward: str = "triton", rounded_to: torch.dtype | None = None
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``q``, the own k/v, the broadcast (batch-1, strided) k/v, the blended
    k_a/v_a/k_b/v_b and the ``B`` blend weight; inputs and output gradient are rounded to
    ``rounded_to`` (default ``dtype``) and then converted to ``dtype``."""
    b, h = 2, 2
    rounded_to = dtype if rounded_to is None else rounded_to
    q = _randn(b, h, 13, head_dim, seed=5, dtype=rounded_to)
    sources = _sources(b, h, head_dim, rounded_to, seed=20)
    own, ref, blended = _to(sources, dtype)
    leaves = [q.to(dtype), own.k, own.v, ref.k, ref.v, blended.k_a, blended.v_a, blended.k_b, blended.v_b]
    leaves = [t.detach().requires_grad_() for t in leaves] + [torch.tensor([0.3, 1.4], requires_grad=True)]
    q_, k0, v0, k1, v1, ka, va, kb, vb, weight = leaves
    segments = [KV(k0, v0), KV(k1, v1), BlendedKV(ka, va, kb, vb, weight)]
    out = multi_source_attention(q_, segments, backend=backend, backward=backward)
    grad_out = _randn(b, h, 13, head_dim, seed=6, dtype=rounded_to).to(dtype)
    return torch.autograd.grad(out, leaves, grad_out)


GRAD_NAMES = ("q", "k", "v", "k_broadcast", "v_broadcast", "k_a", "v_a", "k_b", "v_b", "weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 80])
@kernel_case
def test_attention_triton_backward_gradients(dtype: torch.dtype, head_dim: int) -> None:
    """The fused Triton backward against a float64 reference: float32 within 1e-5 abs / 1e-4
    rel of torch's own float32 gradients; float16/bfloat16 within 2x torch's own error at that
    precision (+1e-6), for every gradient including the blend weight and the broadcast segment."""
    exact = _gradient_case(torch.float64, head_dim, backend="reference", rounded_to=dtype)
    kernel = _gradient_case(dtype, head_dim, backend="triton")
    torch_grads = _gradient_case(dtype, head_dim, backend="reference")
    for name, g_kernel, g_torch, g_exact in zip(GRAD_NAMES, kernel, torch_grads, exact):
        assert g_kernel.shape == g_exact.shape and g_kernel.dtype == g_torch.dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(g_kernel, g_torch, atol=1e-5, rtol=1e-4, msg=name)
        torch_error = (g_torch.double() - g_exact).abs().max().item()
        kernel_error = (g_kernel.double() - g_exact).abs().max().item()
        assert kernel_error <= 2 * torch_error + 1e-6, (name, kernel_error, torch_error)


@kernel_case
def test_attention_backward_default_is_triton_and_reference_stays_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import anonloader.kernels._triton_attention as kernels

    calls = []
    fused = kernels.attention_backward
    monkeypatch.setattr(kernels, "attention_backward", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    default = _gradient_case(torch.float32, 40, backend="triton")
    assert len(calls) == 1
    recomputed = _gradient_case(torch.float32, 40, backend="triton", backward="reference")
    assert len(calls) == 1
    for name, g_fused, g_ref in zip(GRAD_NAMES, default, recomputed):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4, msg=name)


@kernel_case
def test_attention_triton_backward_partial_grads_and_float_weight() -> None:
    """Only some inputs need gradients (q frozen, one segment frozen); a float blend weight."""
    q = _randn(1, 2, 9, 24, seed=30)
    k0, v0 = _randn(1, 2, 7, 24, seed=31), _randn(1, 2, 7, 24, seed=32)
    ka, va, kb, vb = (_randn(1, 2, 11, 24, seed=33 + i).requires_grad_() for i in range(4))
    grad_out = _randn(1, 2, 9, 24, seed=40)
    grads = []
    for backend in ("triton", "reference"):
        out = multi_source_attention(q, [KV(k0, v0), BlendedKV(ka, va, kb, vb, 0.7)], scale=0.3, backend=backend)
        grads.append(torch.autograd.grad(out, [ka, va, kb, vb], grad_out))
    for g_kernel, g_ref in zip(*grads):
        torch.testing.assert_close(g_kernel, g_ref, atol=1e-5, rtol=1e-4)
    # no queries at all: zero gradients of the right shapes
    out = multi_source_attention(q[:, :, :0].requires_grad_(), [BlendedKV(ka, va, kb, vb, 0.7)], backend="triton")
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(torch.autograd.grad(out.sum(), [ka, vb]), [ka, vb]))


@pytest.mark.parametrize(
    "dtype, grid", [(torch.float32, 1), (torch.float32, 3), (torch.float32, 5), (torch.float16, 3), (torch.bfloat16, 5)]
)
@kernel_case
def test_patch_stats_kernel_matches_reference(dtype: torch.dtype, grid: int) -> None:
    x = (_randn(2, 3, 23, 17, seed=7) * 2 + 3).to(dtype)
    mean, std = patch_stats(x, grid, backend="triton")
    mean_ref, std_ref = patch_stats_reference(x, grid)
    assert mean.shape == (2, 3, grid, grid) and mean.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * 8  # two ulps at |x| ~ 8
    torch.testing.assert_close(mean.float(), mean_ref.float(), atol=atol, rtol=0)
    torch.testing.assert_close(std.float(), std_ref.float(), atol=atol, rtol=0)


@kernel_case
def test_patch_stats_kernel_gradient_matches_reference() -> None:
    x = _randn(1, 2, 11, 9, seed=8).requires_grad_()
    g_mean, g_std = _randn(1, 2, 3, 3, seed=9), _randn(1, 2, 3, 3, seed=10)
    grads = []
    for backend in ("triton", "reference"):
        mean, std = patch_stats(x, 3, backend=backend)
        grads.append(torch.autograd.grad((mean * g_mean).sum() + (std * g_std).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _paste_scene():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_paste_back import _similarity

    images = [torch.rand(3, 37, 45, generator=torch.Generator().manual_seed(0)), torch.rand(3, 26, 21, generator=torch.Generator().manual_seed(1)), torch.rand(3, 9, 11)]
    size = 13
    affines = torch.stack([_similarity(0.8, 10, (15, 12), size), _similarity(1.3, -20, (35, 25), size), _similarity(1.0, 35, (10, 15), size), _similarity(0.9, 0, (19, 3), size)])
    crops = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2))
    return images, crops, affines, torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("mask, color_match", [("ellipse", True), ("ellipse", False), ("border", True)])
@kernel_case
def test_paste_back_kernel_matches_reference(mask: str, color_match: bool) -> None:
    images, crops, affines, index = _paste_scene()
    before = [im.clone() for im in images]
    out = paste_back(images, crops, affines, index, feather=0.15, color_match=color_match, mask=mask, backend="triton")
    ref = paste_back_reference(images, crops, affines, index, feather=0.15, color_match=color_match, mask=mask)
    for im, old, o, r in zip(images, before, out, ref):
        assert torch.equal(im, old)
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, atol=1e-4, rtol=0)
    assert (out[0] - images[0]).abs().max() > 0.1  # faces were pasted
    assert torch.equal(out[2], images[2])  # no faces: a copy
