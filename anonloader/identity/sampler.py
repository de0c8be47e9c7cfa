"""DiffDeID's latent ID sampler (LDS): a small DDIM over identity embeddings.

Trained on a set of real or synthetic recognizer embeddings (standardised to zero mean, unit
variance per dimension, as in DiffDeID section 3.2) with the L1 noise-prediction loss
``|eps_theta(z_t, t) - eps|`` (their eq. 2); sampled with deterministic DDIM (eta = 0) from seeded
Gaussian noise, un-standardised and L2-normalised. Samples are filtered by cosine similarity:
never within ``threshold`` of the real faces given, and not within ``threshold`` of each other
(so every sample is a distinct synthetic person to the recognizer).

Eq. 3 (the 3DMM identity α) uses a second sampler with ``unit_norm=False``: no L2 on fit or
sample, the standardised vector itself is the latent (no autoencoder). ``space`` records which
recognizer (or face model) the vectors come from. Per-face draws (:meth:`LatentIDSampler.sample`
with ``seeds=``) run one generator and one denoising pass per seed, so a seed's sample does not
depend on the other seeds of its batch; :meth:`LatentIDSampler.sample_filtered` walks each seed's
derived seeds (:func:`derive_seed`) past candidates within ``threshold`` of the real face, and
:meth:`LatentIDSampler.sample_ranked` returns a seed's filtered candidates ordered by cosine
distance (DiffDeID's de-identification levels).

Small enough to train in a minute or two on a CPU for a few hundred embeddings.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError, IdentityError

__all__ = ["EmbeddingDenoiser", "LatentIDSampler", "derive_seed"]


def derive_seed(seed: int, index: int) -> int:
    """The ``index``-th seed derived from ``seed`` (63-bit; ``index=0`` gives ``seed`` itself),
    SHA-256 based so that nearby seeds give unrelated sequences."""
    if index == 0:
        return int(seed) & 0x7FFF_FFFF_FFFF_FFFF
    digest = hashlib.sha256(f"anonloader/lds/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of integer timesteps ``B`` -> ``B,dim``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class EmbeddingDenoiser(nn.Module):
    """``eps_theta(z_t, t)``: a residual MLP over ``D``-dim latents, conditioned on the timestep."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        self.dim, self.hidden, self.depth, self.time_dim = dim, hidden, depth, time_dim
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z`` ``B,D`` noisy latents, ``t`` ``B`` int timesteps -> predicted noise ``B,D``."""
        h = self.inp(z) + self.time(_timestep_features(t, self.time_dim))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float()[None], b.float()[None], dim=1))


class LatentIDSampler:
    """DDIM sampler over recognizer embeddings (DiffDeID's LDS).

    Args:
        dim: embedding dimension (128 for dlib, 512 for ArcFace, 80 for 3DMM α).
        timesteps: training diffusion steps ``T`` (linear beta schedule 1e-4 .. 0.02).
        hidden, depth: denoiser width and residual depth.
        unit_norm: L2-normalise the data before fitting and the samples (recognizer embeddings);
            False for coefficient vectors such as 3DMM α (eq. 3).
        space: what the vectors are (e.g. the recognizer's name, ``"dlib"``), recorded and saved.
    """

    def __init__(
        self, dim: int, *, timesteps: int = 200, hidden: int = 256, depth: int = 3, unit_norm: bool = True, space: str | None = None
    ) -> None:
        if dim < 2:
            raise ConfigError(f"embedding dimension must be >= 2, got {dim}")
        self.dim, self.timesteps = int(dim), int(timesteps)
        self.unit_norm, self.space = bool(unit_norm), space
        self.model = EmbeddingDenoiser(self.dim, hidden=hidden, depth=depth)
        betas = torch.linspace(1e-4, 0.02, self.timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.mean = torch.zeros(self.dim)
        self.std = torch.ones(self.dim)
        self.trained_steps = 0

    def fit(
        self, embeddings: torch.Tensor, *, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0
    ) -> list[float]:
        """Train on ``embeddings`` (``N,D float``) with DiffDeID's L1 noise loss; returns the losses."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or len(embeddings) < 2:
            raise ConfigError(f"fit expects N,{self.dim} embeddings with N >= 2, got {tuple(embeddings.shape)}")
        data = embeddings.detach().float()
        if self.unit_norm:
            data = torch.nn.functional.normalize(data, dim=1)
        self.mean = data.mean(0)
        self.std = data.std(0).clamp_min(1e-4)
        latents = (data - self.mean) / self.std
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # parameter init
        self.model = EmbeddingDenoiser(self.dim, hidden=self.model.hidden, depth=self.model.depth)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        losses = []
        self.model.train()
        for _ in range(steps):
            index = torch.randint(0, len(latents), (batch_size,), generator=generator)
            z0 = latents[index]
            t = torch.randint(0, self.timesteps, (batch_size,), generator=generator)
            noise = torch.randn(z0.shape, generator=generator)
            a = self.alphas_cumprod[t][:, None]
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            loss = (self.model(zt, t) - noise).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        self.trained_steps += steps
        return losses

    @torch.no_grad()
    def sample(self, n: int | None = None, *, steps: int = 50, seed: int = 0, seeds: list[int] | None = None) -> torch.Tensor:
        """Samples by deterministic DDIM from seeded noise: ``n,D float32`` (L2-normalised when
        ``unit_norm``), either ``n`` from one generator seeded with ``seed`` or, with ``seeds``,
        one per seed, each from its own generator and its own denoising pass (independent of
        the batch)."""
        if self.trained_steps == 0:
            raise IdentityError("the latent ID sampler is untrained; call fit(embeddings) or load a trained one")
        if seeds is not None:
            if not len(seeds):
                return torch.zeros(0, self.dim)
            return torch.cat([self._denoise(torch.randn(1, self.dim, generator=torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)), steps) for s in seeds])
        if n is None:
            raise ConfigError("sample needs n or seeds")
        generator = torch.Generator().manual_seed(seed)
        return self._denoise(torch.randn(n, self.dim, generator=generator), steps)

    def _denoise(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM (eta 0) from noise ``z`` (``n,D``) to un-standardised samples."""
        n = len(z)
        times = torch.linspace(self.timesteps - 1, 0, steps).round().long().unique_consecutive()
        for i, t in enumerate(times):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0)
            eps = self.model(z, t.expand(n))
            z0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            z = a_prev.sqrt() * z0 + (1 - a_prev).sqrt() * eps
        out = z * self.std + self.mean
        return torch.nn.functional.normalize(out, dim=1) if self.unit_norm else out

    def sample_filtered(
        self,
        seeds: list[int],
        *,
        avoid: torch.Tensor | None,
        threshold: float,
        steps: int = 50,
        start: list[int] | None = None,
        max_candidates: int = 64,
    ) -> tuple[torch.Tensor, list[int]]:
        """One sample per seed, never within ``threshold`` cosine of that face's real vector.

        For face ``i`` the candidates are drawn from ``derive_seed(seeds[i], k)`` for
        ``k = start[i], start[i] + 1, ...``; a candidate with cosine ``>= threshold`` to
        ``avoid[i]`` is skipped.

        Args:
            seeds: ``F`` per-face seeds.
            avoid: ``F,D`` real vectors (one per face), or None (no filtering).
            threshold: the same-person cosine similarity.
            start: ``F`` first candidate index per face (default 0), for posterior re-draws.

        Returns:
            (``F,D`` samples, ``F`` candidate index each sample came from).

        Raises:
            IdentityError: when ``max_candidates`` candidates of a face were all too close.
        """
        start = [0] * len(seeds) if start is None else list(start)
        rows, used = [], []
        for i, seed in enumerate(seeds):
            for k in range(start[i], start[i] + max_candidates):
                candidate = self.sample(seeds=[derive_seed(seed, k)], steps=steps)
                if avoid is None or _cosine(candidate[0], avoid[i]) < threshold:
                    rows.append(candidate)
                    used.append(k)
                    break
            else:
                raise IdentityError(
                    f"face {i}: {max_candidates} sampled identities were all within cosine {threshold} of the real face; "
                    "retrain the sampler on more identities or raise the threshold"
                )
        return (torch.cat(rows) if rows else torch.zeros(0, self.dim)), used

    def sample_ranked(
        self, seed: int, *, reference: torch.Tensor, threshold: float, count: int, steps: int = 50, start: int = 0
    ) -> torch.Tensor:
        """``count`` filtered candidates of ``seed`` (derived seeds ``start, start + 1, ...``)
        ordered by increasing cosine distance to ``reference`` (``D``) -> ``count,D``."""
        found: list[torch.Tensor] = []
        k = start
        while len(found) < count:
            if k - start >= 8 * count + 64:
                raise IdentityError(f"only {len(found)} of {count} candidates were below cosine {threshold} to the real face")
            candidate = self.sample(seeds=[derive_seed(seed, k)], steps=steps)[0]
            if _cosine(candidate, reference) < threshold:
                found.append(candidate)
            k += 1
        stack = torch.stack(found)
        distance = 1 - torch.nn.functional.cosine_similarity(stack, reference.float()[None], dim=1)
        return stack[torch.sort(distance, stable=True).indices]

    def sample_distinct(
        self,
        n: int,
        *,
        threshold: float,
        avoid: torch.Tensor | None = None,
        steps: int = 50,
        seed: int = 0,
        max_rounds: int = 20,
    ) -> torch.Tensor:
        """``n`` samples pairwise below ``threshold`` cosine and below it to every row of ``avoid``.

        Args:
            threshold: the recognizer's same-person cosine similarity.
            avoid: ``M,D`` embeddings of real faces the samples must not match, or None.
        """
        kept: list[torch.Tensor] = []
        avoid = None if avoid is None else torch.nn.functional.normalize(avoid.float(), dim=1)
        for round_index in range(max_rounds):
            for vector in self.sample(max(2 * n, 16), steps=steps, seed=seed + round_index):
                if avoid is not None and len(avoid) and float((avoid @ vector).max()) >= threshold:
                    continue
                if kept and float((torch.stack(kept) @ vector).max()) >= threshold:
                    continue
                kept.append(vector)
                if len(kept) == n:
                    return torch.stack(kept)
        raise IdentityError(
            f"only {len(kept)} of {n} sampled identities were distinct at cosine {threshold}; "
            "train the sampler on more identities or ask for fewer"
        )

    def digest(self) -> str:
        """SHA-256 over the config, the statistics and the denoiser's weights."""
        h = hashlib.sha256()
        h.update(repr(sorted(self.state_dict()["config"].items())).encode() + repr(self.space).encode())
        for name, tensor in [("mean", self.mean), ("std", self.std), *sorted(self.model.state_dict().items())]:
            h.update(name.encode())
            h.update(tensor.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": {"dim": self.dim, "timesteps": self.timesteps, "hidden": self.model.hidden, "depth": self.model.depth,
                       "unit_norm": self.unit_norm},
            "space": self.space or "",
            "model": self.model.state_dict(),
            "mean": self.mean,
            "std": self.std,
            "trained_steps": self.trained_steps,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatentIDSampler:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        sampler = cls(**state["config"], space=state.get("space") or None)
        sampler.model.load_state_dict(state["model"])
        sampler.model.eval()
        sampler.mean, sampler.std = state["mean"], state["std"]
        sampler.trained_steps = int(state["trained_steps"])
        return sampler
