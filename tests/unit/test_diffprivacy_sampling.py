"""Diff-Privacy's energies (eqs. 14, 15, 17), embedding schedule (eq. 16) and guided DDIM (eq. 12)
on a tiny SD v1.5-shaped backbone."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from anonloader.align import template_points
from anonloader.methods.diffprivacy.backbone import build_tiny_backbone
from anonloader.methods.diffprivacy.energy import (
    diversity,
    identity_dissimilarity,
    identity_similarity,
)
from anonloader.methods.diffprivacy.model import _tiny_recognizer
from anonloader.methods.diffprivacy.sampler import (
    Guide,
    SamplingSettings,
    group_noise,
    guidance_step,
    guided_sample,
)
from anonloader.methods.diffprivacy.schedule import ddim_step


@pytest.fixture(scope="module")
def backbone():
    return build_tiny_backbone(0)


def _marked_conditions(faces: int = 1, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """C^i filled with i + 1 and UC filled with -1, so a UNet call's condition names its stage."""
    conds = torch.arange(1, 11, dtype=torch.float32).view(1, 10, 1, 1).expand(faces, 10, 77, width).contiguous()
    return conds, torch.full((1, 77, width), -1.0)


def _spy_stages(backbone, run) -> list[str]:
    seen: list[str] = []

    def hook(_module, _args, kwargs):
        value = float(kwargs["encoder_hidden_states"][0, 0, 0])
        seen.append("UC" if value < 0 else f"C{int(value) - 1}")

    handle = backbone.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def _runs(labels: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for label in labels:
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1] + 1)
        else:
            out.append((label, 1))
    return out


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("anonymize", [("C5", 5), ("C4", 5), ("UC", 20)]), ("hide", [("C7", 10), ("C6", 10), ("UC", 60)])],
)
def test_embedding_schedule_follows_eq16(backbone, mode, expected):
    settings = SamplingSettings.for_mode(mode, group_size=1, guidance_scale=0.0)
    conds, uc = _marked_conditions()
    z0 = torch.zeros(1, 4, 16, 16)
    seen = _spy_stages(backbone, lambda: guided_sample(backbone, z0, conds, uc, [7], settings))
    assert _runs(seen) == expected


def test_energies_exact_on_unit_vectors():
    e = torch.eye(3)
    original = e[0]
    a, b = torch.tensor([0.6, 0.8, 0.0]), torch.tensor([-1.0, 0.0, 0.0])
    generated = torch.stack([e[0], a, b])
    # L_Idis: cos = 1, 0.6, -1 (clamped to 0)
    assert identity_dissimilarity(original, generated).item() == pytest.approx(1.6, abs=1e-6)
    # L_div over ordered pairs i != j: cos(e0,a)=0.6 twice, cos(e0,b)=-1 -> 0, cos(a,b)=-0.6 -> 0
    assert diversity(generated).item() == pytest.approx(1.2, abs=1e-6)
    # L_is = 1 - cos per member
    assert identity_similarity(original, generated).item() == pytest.approx(0.0 + 0.4 + 2.0, abs=1e-6)


def test_negative_cosine_clamps_to_zero_with_zero_gradient():
    original = torch.tensor([1.0, 0.0])
    generated = torch.tensor([[-0.8, 0.6]], requires_grad=True)
    loss = identity_dissimilarity(original, generated) + diversity(torch.cat([generated, -generated + 0.0]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(generated.grad, torch.zeros_like(generated))


def _guide(backbone, group_size: int, mode: str) -> tuple[Guide, torch.Tensor]:
    recognizer = _tiny_recognizer(3)
    landmarks = template_points(32, "ffhq")[None]
    torch.manual_seed(11)
    x = torch.rand(1, 3, 32, 32)
    guide = Guide(recognizer, torch.zeros(0), landmarks, mode, group_size, 16)
    with torch.no_grad():
        guide.originals = guide.embed(x, landmarks)
        z0 = backbone.encode(x)
    return guide, z0


@pytest.mark.parametrize(("grad_mode", "mode", "group"), [("z0", "anonymize", 3), ("zt", "anonymize", 3), ("z0", "hide", 1)])
def test_guidance_moves_down_the_energy(backbone, grad_mode, mode, group):
    guide, z0 = _guide(backbone, group, mode)
    settings = SamplingSettings.for_mode(mode, group_size=group, guidance_grad=grad_mode, guidance_scale=0.1)
    conds, _ = _marked_conditions(1)
    t, t_prev = 481, 461
    a = backbone.schedule.alpha(t)
    z = math.sqrt(a) * z0.repeat(group, 1, 1, 1) + math.sqrt(1 - a) * group_noise([5], group, (4, 16, 16), z0.device, z0.dtype)
    cond = conds[:, 4].repeat(group, 1, 1)
    _, grad, variable = guidance_step(backbone, guide, z, t, t_prev, cond, settings)
    assert grad is not None and grad.abs().sum() > 0

    def energy(v: torch.Tensor) -> float:
        with torch.no_grad():
            if grad_mode == "z0":
                return float(guide.energy(backbone.decode(v)))
            _, z0_hat = ddim_step(v, backbone.eps(v, t, cond), a, backbone.schedule.alpha(t_prev))
            return float(guide.energy(backbone.decode(z0_hat)))

    step = 1e-3 * variable.norm() / grad.norm()
    assert energy(variable - step * grad) < energy(variable) < energy(variable + step * grad)


def test_zero_guidance_is_plain_ddim_bit_for_bit(backbone):
    guide, z0 = _guide(backbone, 2, "anonymize")
    conds, uc = _marked_conditions(1)
    conds = conds * 0.01
    settings = SamplingSettings.for_mode("anonymize", group_size=2, num_inference_steps=20, guidance_scale=0.0)
    guided = guided_sample(backbone, z0, conds, uc, [9], settings, guide)
    schedule = backbone.schedule
    timesteps = schedule.start_timesteps(20, 0.6)
    a = schedule.alpha(timesteps[0])
    z = math.sqrt(a) * z0.repeat_interleave(2, 0) + math.sqrt(1 - a) * group_noise([9], 2, (4, 16, 16), z0.device, z0.dtype)
    with torch.no_grad():
        for t in timesteps:
            cond = (conds[:, t // 100] if t > 400 else uc).expand(2, -1, -1)
            z, _ = ddim_step(z, backbone.eps(z, t, cond), schedule.alpha(t), schedule.alpha(t - 50))
    assert torch.equal(guided, z)
    with_guidance = guided_sample(backbone, z0, conds, uc, [9], SamplingSettings.for_mode("anonymize", group_size=2, num_inference_steps=20), guide)
    assert not torch.equal(with_guidance, z)


def test_group_noise_is_seeded_per_face():
    a = group_noise([1, 2], 3, (4, 2, 2), torch.device("cpu"), torch.float32)
    b = group_noise([1], 3, (4, 2, 2), torch.device("cpu"), torch.float32)
    assert a.shape == (6, 4, 2, 2) and torch.equal(a[:3], b)
    assert torch.equal(a[:3], torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a[:3], a[3:])
