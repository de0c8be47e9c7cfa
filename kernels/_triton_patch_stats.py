"""Triton kernel of :func:`anonloader.kernels.patch_stats.patch_stats` (imported lazily: this
module imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["patch_stats_triton"]


@triton.jit
def _patch_stats_kernel(
    X, Mean, Std,
    C, H, W, GRID,
    stride_b, stride_c, stride_h, stride_w,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (batch*channel, patch row, patch column): one read of the patch,
    sums of ``x - shift`` and its square (``shift`` = the patch's first pixel) in float32."""
    pid_bc = tl.program_id(0)
    pi = tl.program_id(1)
    pj = tl.program_id(2)
    b = pid_bc // C
    c = pid_bc % C
    r0 = (pi * H) // GRID
    r1 = ((pi + 1) * H) // GRID
    c0 = (pj * W) // GRID
    c1 = ((pj + 1) * W) // GRID
    base = X + b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c
    shift = tl.load(base + r0 * stride_h + c0 * stride_w).to(tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    for r in range(r0, r1, BLOCK_H):
        rows = r + offs_h
        for col in range(c0, c1, BLOCK_W):
            cols = col + offs_w
            inside = (rows[:, None] < r1) & (cols[None, :] < c1)
            ptrs = base + rows[:, None].to(tl.int64) * stride_h + cols[None, :].to(tl.int64) * stride_w
            v = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
            v = tl.where(inside, v - shift, 0.0)
            acc += v
            acc_sq += v * v
    n = ((r1 - r0) * (c1 - c0)).to(tl.float32)
    mean_shifted = tl.sum(tl.sum(acc, axis=1), axis=0) / n
    var = tl.sum(tl.sum(acc_sq, axis=1), axis=0) / n - mean_shifted * mean_shifted
    var = tl.maximum(var, 0.0)
    out = pid_bc * GRID * GRID + pi * GRID + pj
    tl.store(Mean + out, mean_shifted + shift)
    tl.store(Std + out, tl.sqrt(var))


def patch_stats_triton(x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``B,C,H,W`` -> ``(mean, std)`` each ``B,C,grid,grid`` in ``x``'s dtype."""
    b, c, h, w = x.shape
    mean = torch.empty(b, c, grid, grid, device=x.device, dtype=torch.float32)
    std = torch.empty_like(mean)
    patch_h, patch_w = -(-h // grid), -(-w // grid)
    block_w = min(64, triton.next_power_of_2(patch_w))
    block_h = max(1, min(triton.next_power_of_2(patch_h), 1024 // block_w))
    _patch_stats_kernel[(b * c, grid, grid)](
        x, mean, std, c, h, w, grid, *x.stride(), BLOCK_H=block_h, BLOCK_W=block_w
    )
    return mean.to(x.dtype), std.to(x.dtype)
