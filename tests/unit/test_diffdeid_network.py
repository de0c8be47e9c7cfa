"""DiffDeID's UNet pieces checked against the equations computed a second way: AdaIN (eq. 7),
the condition C, texture attention (eqs. 5-6, residual on F_n), and the Triton path."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anonloader.methods.diffdeid.network import (
    AdaIN,
    DiffDeIDUNet,
    TextureAttention,
    timestep_features,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _inputs(net: DiffDeIDUNet, b: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = net.crop_size
    return dict(sample=torch.randn(b, 3, s, s, generator=g), timesteps=torch.tensor([3, 41][:b]),
                rendered=torch.rand(b, 3, s, s, generator=g) * 2 - 1, rho=torch.randn(b, net.rho_dim, generator=g),
                identity=torch.nn.functional.normalize(torch.randn(b, net.id_dim, generator=g), dim=1),
                texture=torch.rand(b, 3, s, s, generator=g) * 2 - 1)


def _randomise(module: torch.nn.Module, seed: int = 3) -> None:
    """Random weights everywhere (the zero-initialised output conv and AdaIN styles included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_adain_output_moments_equal_the_condition_styles():
    torch.manual_seed(0)
    adain = AdaIN(5, condition_dim=7)
    _randomise(adain)
    x = torch.randn(3, 5, 9, 11, dtype=torch.float32) * 4 + 2
    c = torch.randn(3, 7)
    out = adain(x, c)
    sigma, mu = (c @ adain.to_style.weight.T + adain.to_style.bias).chunk(2, dim=1)  # Linear by hand
    assert torch.allclose(out.mean(dim=(2, 3)), mu, atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3), unbiased=False), sigma.abs(), atol=1e-5)
    assert torch.allclose(adain(0.25 * x - 3.0, c), out, atol=1e-5)  # invariant to a x + b, a > 0


def test_instance_moments_torch_path_equals_patch_stats_path():
    from anonloader.methods.diffdeid.network import instance_moments

    x = torch.randn(2, 3, 7, 9) * 3 + 1
    for a, b in zip(instance_moments(x, use_patch_stats=True), instance_moments(x, use_patch_stats=False)):
        assert torch.allclose(a, b, atol=1e-5)
    mean, std = instance_moments(x)
    assert torch.allclose(mean[:, :, 0, 0], x.mean((2, 3)), atol=1e-5)
    assert torch.allclose(std[:, :, 0, 0], (x.var((2, 3), unbiased=False) + 1e-6).sqrt(), atol=1e-5)


def test_adain_starts_as_plain_instance_norm():
    adain = AdaIN(4, condition_dim=6)
    x = torch.randn(2, 4, 8, 8)
    expected = torch.nn.functional.instance_norm(x, eps=1e-6)
    assert torch.allclose(adain(x, torch.randn(2, 6)), expected, atol=1e-5)


def test_condition_from_hand_set_weights_is_exact():
    net = DiffDeIDUNet("tiny")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        net.w_rho.weight.copy_(torch.randn(net.w_rho.weight.shape, generator=g))
        net.w_rho.bias.copy_(torch.randn(net.id_dim, generator=g))
        net.w_t.weight.copy_(torch.randn(net.w_t.weight.shape, generator=g))
        net.w_t.bias.zero_()
    t = torch.tensor([0, 17], dtype=torch.long)
    rho, z = torch.randn(2, net.rho_dim, dtype=torch.float64), torch.randn(2, net.id_dim, dtype=torch.float64)
    net64 = net.double()
    half = net.time_dim // 2
    k = torch.arange(half, dtype=torch.float64)
    angles = t.double()[:, None] * torch.pow(10000.0, -k / half)[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    expected = z + rho @ net64.w_rho.weight.T + net64.w_rho.bias + emb @ net64.w_t.weight.T
    got = net64.condition(t, rho, z)
    assert torch.allclose(got, expected, atol=1e-5)  # emb(t) is computed in float32
    assert torch.allclose(timestep_features(t, net.time_dim).double(), emb, atol=1e-5)


def test_video_network_ignores_the_identity():
    torch.manual_seed(0)
    net = DiffDeIDUNet({"preset": "tiny", "identity_condition": False})
    _randomise(net)
    inputs = _inputs(net)
    with torch.no_grad():
        a = net(**inputs)
        b = net(**{**inputs, "identity": torch.randn_like(inputs["identity"])})
    assert torch.equal(a, b)


def test_tau_zero_is_the_unet_without_texture_attention():
    torch.manual_seed(0)
    net = DiffDeIDUNet("tiny")
    _randomise(net)
    for module in net.attention.values():
        module.tau.data.zero_()
    plain = DiffDeIDUNet({"preset": "tiny", "attention_levels": []})
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.startswith("attention.") for k in unexpected)
    inputs = _inputs(net)
    out = net(**inputs)
    with torch.no_grad():
        assert torch.equal(out, plain(**inputs))  # same bytes
    out.square().sum().backward()
    for level, module in net.attention.items():
        assert module.tau.grad is not None and float(module.tau.grad.abs()) > 0, level


def _explicit_attention(fn: torch.Tensor, fb: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d)) V per head, with Q = F_n, K = V = F_b (identity convs), by loops."""
    b, c, h, w = fn.shape
    d = c // heads
    out = torch.empty_like(fn)
    for i in range(b):
        for head in range(heads):
            q = fn[i, head * d:(head + 1) * d].reshape(d, -1).T  # HW,d
            k = fb[i, head * d:(head + 1) * d].reshape(d, -1).T
            scores = torch.exp(q @ k.T / math.sqrt(d))
            weights = scores / scores.sum(1, keepdim=True)
            out[i, head * d:(head + 1) * d] = (weights @ k).T.reshape(d, h, w)
    return out


@pytest.mark.parametrize("channels, head_dim, heads", [(6, 64, 1), (8, 4, 2)])
def test_texture_attention_equals_explicit_softmax(channels, head_dim, heads):
    module = TextureAttention(channels, head_dim=head_dim).double()
    assert module.heads == heads
    with torch.no_grad():
        for conv in (module.to_q, module.to_k, module.to_v):
            conv.weight.copy_(torch.eye(channels, dtype=torch.float64)[:, :, None, None])
            conv.bias.zero_()
        module.tau.fill_(0.7)
    fn, fb = torch.randn(2, channels, 3, 5, dtype=torch.float64), torch.randn(2, channels, 4, 4, dtype=torch.float64)
    got = module(fn, module.project_kv(fb))
    expected = 0.7 * _explicit_attention(fn, fb, heads) + fn
    assert torch.allclose(got, expected, atol=1e-10)


def test_texture_attention_is_invariant_to_permuting_background_positions():
    torch.manual_seed(0)
    module = TextureAttention(8, head_dim=4).double()
    module.tau.data.fill_(1.3)
    fn, fb = torch.randn(1, 8, 4, 4, dtype=torch.float64), torch.randn(1, 8, 4, 4, dtype=torch.float64)
    perm = torch.randperm(16)
    shuffled = fb.flatten(2)[:, :, perm].reshape_as(fb)
    assert not torch.equal(shuffled, fb)
    assert torch.allclose(module(fn, module.project_kv(fb)), module(fn, module.project_kv(shuffled)), atol=1e-12)


def test_texture_kv_is_reusable_across_steps():
    torch.manual_seed(0)
    net = DiffDeIDUNet("tiny")
    _randomise(net)
    inputs = _inputs(net)
    with torch.no_grad():
        cached = net(**{**inputs, "texture": net.texture_kv(inputs["texture"])})
        direct = net(**inputs)
    assert torch.equal(cached, direct)
    assert set(net.texture_kv(inputs["texture"])) == {2, 3, 4}


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter subprocess itself")
def test_texture_attention_under_triton_interpreter() -> None:
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-x", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(root), "-k", "triton_matches"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess")
def test_texture_attention_triton_matches_reference() -> None:
    torch.manual_seed(0)
    module = TextureAttention(16, head_dim=8)
    module.tau.data.fill_(0.9)
    fn = torch.randn(2, 16, 4, 4, requires_grad=True)
    fb = torch.randn(2, 16, 3, 5, requires_grad=True)
    grads = {}
    outs = {}
    for backend in ("reference", "triton"):
        module.zero_grad()
        fn.grad = fb.grad = None
        out = module(fn, module.project_kv(fb), backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[backend] = out.detach()
        grads[backend] = [fn.grad.clone(), fb.grad.clone(), module.tau.grad.clone(), module.to_q.weight.grad.clone()]
    assert torch.allclose(outs["triton"], outs["reference"], atol=1e-4)
    for a, b in zip(grads["triton"], grads["reference"]):
        assert torch.allclose(a, b, atol=1e-3)


def test_bench_runs_on_the_tiny_preset():
    from anonloader.methods.diffdeid.bench import run

    result = run("tiny", "cpu", batch=1, repeat=1, side=4, channels=8)
    assert result["texture_attention"]["queries"] == 16 and result["moments"]["shape"] == [1, 4, 8, 8]
    assert all(result[k] is not None for k in ("unet_step_ms", "texture_encoder_ms")) and "float32" in result["train_step_ms"]
