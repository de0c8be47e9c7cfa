"""Energy-guided DDIM (paper Alg. 1, eqs. 1, 8-16), DDIM inversion for key-I and recovery.

All latents are ``B,4,h,w`` (``h = S/8`` for SD v1.x); conditions ``C`` are ``F,10,L,D`` per face
(C^0..C^9), UC ``1,L,D``. The schedule's timesteps come from
:class:`~anonloader.methods.diffprivacy.schedule.NoiseSchedule`; the DDIM step is the corrected
form documented there.

Guidance (eq. 12): after each DDIM step, ``z'_{t-1} = z_{t-1} - λ_t·∇E`` with E evaluated on
``x̂0 = D(ẑ0)`` warped to the recognizer's template. ``guidance_grad="z0"`` (default, eq. 12 as
printed) differentiates E with respect to ẑ0 only (through the decoder and the recognizer, no
UNet backward); ``"zt"`` (FreeDoM, eq. 9) differentiates with respect to z_t through the UNet.
λ_t is not given by the paper: ours is ``λ·‖z_{t-1} - z_t‖ / ‖∇E‖`` per sample (λ = 0.1 by
default, to be calibrated on real weights), so the correction is a fixed fraction of the step
the sampler itself takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from anonloader.errors import ConfigError

from .energy import (
    cosine,
    diversity,
    identity_dissimilarity,
    identity_similarity,
    recognizer_view,
)
from .msi import stage_index
from .schedule import ddim_invert_step, ddim_step

if TYPE_CHECKING:
    from .backbone import Backbone

__all__ = ["MODE_DEFAULTS", "Guide", "SamplingSettings", "condition_at", "guidance_step", "guided_sample", "invert", "reconstruct", "solve_step"]

MODES = ("anonymize", "hide")
#: the paper's settings per task (A.2.3): DDIM steps, S_ns, τ, group size G
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "anonymize": {"num_inference_steps": 50, "strength": 0.6, "tau": 0.4, "group_size": 4},
    "hide": {"num_inference_steps": 100, "strength": 0.8, "tau": 0.6, "group_size": 1},
}
GRAD_MODES = ("z0", "zt")
SELECTS = ("least_similar", "first")


@dataclass(frozen=True)
class SamplingSettings:
    """Every setting of the guided sampler and the key inversion.

    Attributes:
        mode: ``"anonymize"`` (E = L_Idis + L_div) or ``"hide"`` (E = L_is).
        num_inference_steps: DDIM steps over the whole schedule (anonymize 50, hide 100).
        strength: S_ns; denoising starts at the largest scheduled t ≤ S_ns·T (0.6 / 0.8).
        tau: τ of eq. 16; C^{t//100} while t > τ·T, then UC (0.4 / 0.6).
        group_size: G noises per face (4 / 1); the output is one of them (``select``).
        guidance_scale: λ of λ_t = λ·‖z_{t-1} - z_t‖ / ‖∇E‖; 0 turns guidance off.
        guidance_grad: ``"z0"`` or ``"zt"`` (see the module docstring).
        select: ``"least_similar"`` (the member least similar to the original for F_θ) or ``"first"``.
        inversion_iters: k; each inversion step makes at most k + 1 UNet calls (0 = eq. 4; see ``invert``).
        inversion_tol: the relative fixed-point residual that ends a step's solve before k calls.
        refine_steps, refine_lr: per-face tuning of the 10 pseudo-words at anonymization time.
    """

    mode: str = "anonymize"
    num_inference_steps: int = 50
    strength: float = 0.6
    tau: float = 0.4
    group_size: int = 4
    guidance_scale: float = 0.1
    guidance_grad: str = "z0"
    select: str = "least_similar"
    inversion_iters: int = 5
    inversion_tol: float = 1e-7
    refine_steps: int = 0
    refine_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"Diff-Privacy mode must be one of {MODES}, got {self.mode!r}")
        if self.guidance_grad not in GRAD_MODES:
            raise ConfigError(f"Diff-Privacy guidance_grad must be one of {GRAD_MODES}, got {self.guidance_grad!r}")
        if self.select not in SELECTS:
            raise ConfigError(f"Diff-Privacy select must be one of {SELECTS}, got {self.select!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"Diff-Privacy tau must be in [0, 1], got {self.tau}")
        if self.group_size < 1 or self.inversion_iters < 0 or self.refine_steps < 0 or self.guidance_scale < 0 or self.inversion_tol < 0:
            raise ConfigError(
                "Diff-Privacy group_size must be >= 1 and inversion_iters, inversion_tol, refine_steps, guidance_scale >= 0; "
                f"got {self.group_size}, {self.inversion_iters}, {self.inversion_tol}, {self.refine_steps}, {self.guidance_scale}"
            )

    @classmethod
    def for_mode(cls, mode: str = "anonymize", **overrides: Any) -> SamplingSettings:
        """The paper's settings for ``mode`` with the non-``None`` ``overrides`` applied."""
        if mode not in MODES:
            raise ConfigError(f"Diff-Privacy mode must be one of {MODES}, got {mode!r}")
        values = {**MODE_DEFAULTS[mode], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(mode=mode, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def condition_at(t: int, conds: torch.Tensor, uc: torch.Tensor, tau: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Eq. 16: ``F,10,L,D`` conditions -> ``F,L,D`` C_t: C^{t//100} if ``t > τ·T``, else UC."""
    if t > tau * num_train_timesteps:
        return conds[:, stage_index(t, conds.shape[1], num_train_timesteps)]
    return uc.expand(conds.shape[0], -1, -1)


@dataclass(eq=False)
class Guide:
    """The energy E of one batch of faces.

    Attributes:
        recognizer: F_θ, frozen; ``B,3,s,s [0,1]`` arcface-aligned -> ``B,D`` (or a tuple whose
            first item is that).
        originals: ``F,D`` F_θ(x) of the original faces.
        landmarks: ``F,5,2`` landmarks in pixels of the backbone's resolution.
        mode: ``"anonymize"`` or ``"hide"``; group_size: G.
        input_size: the recognizer's crop side (112 for ArcFace).
    """

    recognizer: nn.Module
    originals: torch.Tensor
    landmarks: torch.Tensor
    mode: str
    group_size: int
    input_size: int = 112
    history: list[float] = field(default_factory=list)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """``B,3,R,R`` images (about [0,1]) and ``B,5,2`` landmarks -> ``B,D`` embeddings."""
        dtype = next(self.recognizer.parameters()).dtype
        out = self.recognizer(recognizer_view(images.to(dtype), landmarks, self.input_size))
        return out[0] if isinstance(out, tuple) else out

    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """E summed over faces for ``F·G,3,R,R`` decoded x̂0 (face-major groups)."""
        g = self.group_size
        emb = self.embed(images, self.landmarks.repeat_interleave(g, dim=0))
        total = emb.new_zeros(())
        for f in range(self.originals.shape[0]):
            members = emb[f * g : (f + 1) * g]
            if self.mode == "anonymize":
                total = total + identity_dissimilarity(self.originals[f], members) + diversity(members)
            else:
                total = total + identity_similarity(self.originals[f], members)
        return total


def group_noise(seeds: list[int], group_size: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``F·G,*shape`` standard normal noise, face f's G members from a CPU generator seeded with
    ``seeds[f]`` (bit-identical on every machine)."""
    out = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        out.append(torch.randn(group_size, *shape, generator=generator))
    return torch.cat(out).to(device=device, dtype=dtype)


def guidance_step(
    backbone: Backbone, guide: Guide | None, z: torch.Tensor, t: int, t_prev: int, cond: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One step of Alg. 1 (l. 5-7): ``(z'_{t-1}, ∇E or None, the variable differentiated)``.

    ``z``: ``B,4,h,w`` at ``t``; ``cond``: ``B,L,D``. With ``guidance_grad="zt"`` the gradient is
    with respect to z_t (through the UNet), else with respect to ẑ0.
    """
    schedule = backbone.schedule
    a_t, a_prev = schedule.alpha(t), schedule.alpha(t_prev)
    guided = guide is not None and settings.guidance_scale > 0
    if guided and settings.guidance_grad == "zt":
        with torch.enable_grad():
            variable = z.detach().requires_grad_(True)
            eps = backbone.eps(variable, t, cond)
            z_prev, z0 = ddim_step(variable, eps, a_t, a_prev)
            energy = guide.energy(backbone.decode(z0))  # type: ignore[union-attr]
            (grad,) = torch.autograd.grad(energy, variable)
        z_prev = z_prev.detach()
    else:
        with torch.no_grad():
            eps = backbone.eps(z, t, cond)
            z_prev, z0 = ddim_step(z, eps, a_t, a_prev)
        if not guided:
            return z_prev, None, None
        with torch.enable_grad():
            variable = z0.detach().requires_grad_(True)
            energy = guide.energy(backbone.decode(variable))  # type: ignore[union-attr]
            (grad,) = torch.autograd.grad(energy, variable)
    guide.history.append(float(energy.detach()))  # type: ignore[union-attr]
    dims = tuple(range(1, z.ndim))
    step = torch.linalg.vector_norm((z_prev - z).detach(), dim=dims, keepdim=True)
    norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    scale = torch.where(norm > 0, settings.guidance_scale * step / norm.clamp_min(1e-30), torch.zeros_like(norm))
    return z_prev - scale * grad, grad, variable.detach()


def guided_sample(
    backbone: Backbone,
    z0: torch.Tensor,
    conds: torch.Tensor,
    uc: torch.Tensor,
    seeds: list[int],
    settings: SamplingSettings,
    guide: Guide | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Alg. 1 l. 1-8: ``F,4,h,w`` z0 and ``F,10,L,D`` C -> ``F·G,4,h,w`` z'_0 (face-major).

    Starts at the largest scheduled t ≤ S_ns·T with eq. 1 and G noises per face from ``seeds``.
    ``on_step(t, C_t)`` (tests) sees the condition of every UNet call.
    """
    schedule = backbone.schedule
    n = settings.num_inference_steps
    timesteps = schedule.start_timesteps(n, settings.strength)
    g = settings.group_size
    noise = group_noise(seeds, g, tuple(z0.shape[1:]), z0.device, z0.dtype)
    a = schedule.alpha(timesteps[0])
    z = math.sqrt(a) * z0.repeat_interleave(g, dim=0) + math.sqrt(1.0 - a) * noise
    for t in timesteps:
        cond = condition_at(t, conds, uc, settings.tau, schedule.num_train_timesteps).repeat_interleave(g, dim=0)
        if on_step is not None:
            on_step(t, cond)
        z, _, _ = guidance_step(backbone, guide, z, t, schedule.previous(t, n), cond, settings)
        z = z.detach()
    return z


def _stage_cond(conds: torch.Tensor, t: int, num_train_timesteps: int) -> torch.Tensor:
    return conds[:, stage_index(max(t, 0), conds.shape[1], num_train_timesteps)]


def solve_step(
    step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, calls: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Solves ``x = step(x)`` for each sample of a batch by fixed-point iteration, calling
    ``step`` at most ``calls`` times.

    Each call gives ``g = step(x)`` and the relative residual ``‖g - x‖ / ‖x‖``; the next
    iterate is ``g``. A sample whose residual falls to ``tol`` keeps that ``g`` and stops moving;
    the solve ends early when every sample has. Should a residual grow (a step that does not
    contract), the sample ends at ``step`` of its best iterate.

    Args:
        step: ``B,*S float64 -> (g, aux)``: the map's value ``B,*S float64`` and an auxiliary
            tensor kept from the last call (``invert``: the ε̂ it used).
        x: ``B,*S float64`` the start; calls: the most calls; tol: the relative residual that
            ends a sample (0: always ``calls`` calls).

    Returns:
        ``(x, residuals, last, made)``: ``B,*S`` the solution, ``B`` each sample's last measured
        relative residual, the ``step`` output's auxiliary value at the last call (``invert``:
        ε̂, ``B,4,h,w``) and the number of calls made.
    """
    batch = x.shape[0]
    shape = (-1,) + (1,) * (x.ndim - 1)
    residuals = torch.full((batch,), float("inf"), dtype=torch.float64, device=x.device)
    best = residuals.clone()
    best_g = x.clone()
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    last = None
    made = 0
    for _ in range(calls):
        g, last = step(x)
        made += 1
        rel = torch.linalg.vector_norm((g - x).reshape(batch, -1), dim=1) / torch.linalg.vector_norm(x.reshape(batch, -1), dim=1).clamp_min(1e-300)
        residuals = torch.where(active, rel, residuals)
        improved = active & (rel < best)
        best = torch.where(improved, rel, best)
        best_g = torch.where(improved.view(shape), g, best_g)
        x = torch.where(active.view(shape), g, x)
        active = active & (rel > tol)
        if not active.any():
            break
    worse = active & (residuals > best)
    return torch.where(worse.view(shape), best_g, x), residuals, last, made


def invert(
    backbone: Backbone,
    z0: torch.Tensor,
    conds: torch.Tensor,
    num_steps: int,
    iters: int,
    tol: float = 1e-7,
    on_step: Callable[[int, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """Key-I (Alg. 1 l. 9-11): DDIM inversion of ``F,4,h,w`` z0 over the whole ``num_steps``
    schedule with C_t = C^{t//100} -> ``F,4,h,w`` z_T (float64).

    Each step from level s to the next timestep t solves the sampler's own step for z_t: the
    fixed point ``z_t = inv(z_s, ε_θ(z_t, t, C_t))``, so that DDIM sampling from z_T, which takes
    exactly that ε̂ at exactly that (z_t, t, C_t), retraces the path. Latents and step arithmetic
    are float64 (the UNet sees them in its own dtype, as the sampler does).

    UNet calls: at most ``iters + 1`` per step (``k = iters``), as the issue's algorithm spends
    (eq. 4's call, then k iterations); k = 0 is eq. 4 exactly (ε̂ at the source, ``ε_θ(z_s, s,
    C_s)``). For k ≥ 1 the first step starts from eq. 4 and iterates k times; every later step
    starts, with no UNet call, from ε̂ extrapolated linearly in t from the last ε̂ of the two steps
    before it (one step back: that ε̂ itself, eq. 4's ε̂ at the solved z_s up to its residual), and spends
    all ``k + 1`` calls on fixed-point iterations. A step stops early once its relative residual
    is ``tol`` (about the float32 UNet's own noise).

    Why (measured on the tiny test backbone, N = 50, k = 5): the iteration contracts, by a
    factor of about 0.2 per call at t ≈ 980 and 0.03 at t ≈ 1, but eq. 4's guess is far off at
    large t (relative residual 2e-2: a random UNet's ε̂ changes fast with t), and what a step
    leaves is amplified about 30x on the way back down. Eq. 4 + 5 iterations reconstructed z0
    to 4.2e-4; the same 300 UNet calls spent as above reach 2e-5. Anderson acceleration did
    not beat plain iteration here (4.2e-4 -> 3.8e-4), so the solve is plain iteration.

    ``on_step(t, residuals, calls)`` (tests, benchmarks) sees each step's ``F`` last relative
    residuals and its number of UNet calls.
    """
    schedule = backbone.schedule
    T = schedule.num_train_timesteps
    z = z0.double()

    def eps(latents: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        return backbone.eps(latents.to(backbone.dtype), t, cond).double()

    history: list[tuple[int, torch.Tensor]] = []  # (t, the last ε̂ of that step's solve)
    with torch.no_grad():
        for t in schedule.timesteps(num_steps)[::-1]:
            s = schedule.previous(t, num_steps)
            a_s, a_t = schedule.alpha(s), schedule.alpha(t)
            calls = iters + 1
            if iters == 0 or not history:
                guess = eps(z, max(s, 0), _stage_cond(conds, s, T))  # eq. 4
                calls -= 1
            elif len(history) == 1:
                guess = history[-1][1]
            else:
                (t1, e1), (t2, e2) = history[-2:]
                guess = e2 + (t - t2) / (t2 - t1) * (e2 - e1)
            cond_t = _stage_cond(conds, t, T)

            def step(candidate: torch.Tensor, z_s: torch.Tensor = z, a_s: float = a_s, a_t: float = a_t, t: int = t, cond_t: torch.Tensor = cond_t) -> tuple[torch.Tensor, torch.Tensor]:
                e = eps(candidate, t, cond_t)
                return ddim_invert_step(z_s, e, a_s, a_t), e

            z, residuals, last, made = solve_step(step, ddim_invert_step(z, guess, a_s, a_t), calls, tol)
            if last is not None:
                history = [*history[-1:], (t, last)]
            if on_step is not None:
                on_step(t, residuals, made + int(calls == iters))
    return z


def reconstruct(backbone: Backbone, z_T: torch.Tensor, conds: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Recovery (sec. 2.4): plain DDIM sampling of ``F,4,h,w`` z_T with C^{t//100} -> ``F,4,h,w``
    z_r (float64 state, as in :func:`invert`)."""
    schedule = backbone.schedule
    z = z_T.double()
    with torch.no_grad():
        for t in schedule.timesteps(num_steps):
            eps = backbone.eps(z.to(backbone.dtype), t, _stage_cond(conds, t, schedule.num_train_timesteps)).double()
            z, _ = ddim_step(z, eps, schedule.alpha(t), schedule.alpha(schedule.previous(t, num_steps)))
    return z


def select_members(guide: Guide | None, images: torch.Tensor, group_size: int, select: str) -> torch.Tensor:
    """``F·G,3,R,R`` decoded members -> ``F`` indices into them: the member least similar to the
    original for F_θ (``"least_similar"``; ``"first"`` or no recognizer: member 0)."""
    faces = images.shape[0] // group_size
    base = torch.arange(faces, device=images.device) * group_size
    if select == "first" or group_size == 1 or guide is None:
        return base
    with torch.no_grad():
        emb = guide.embed(images, guide.landmarks.repeat_interleave(group_size, dim=0))
        sims = cosine(guide.originals.repeat_interleave(group_size, dim=0), emb).view(faces, group_size)
    return base + sims.argmin(dim=1)
