"""Per-patch mean and standard deviation of a feature map on a ``grid x grid`` layout.

Patch ``(i, j)`` covers rows ``floor(i*H/grid) <= r < floor((i+1)*H/grid)`` and likewise
columns, so ``H`` and ``W`` need not divide by ``grid`` and the patches tile the map exactly.
The standard deviation is the population one (divides by the patch's pixel count).

Dispatch: :func:`patch_stats` runs the Triton kernel (one program per patch and channel, one
read of the map, shifted sums for stability) for CUDA tensors, or with ``backend="triton"``
under ``TRITON_INTERPRET=1``; :func:`patch_stats_reference` (plain torch) otherwise. The Triton
path is differentiable: its backward is the closed form ``d mean/dx = 1/n``,
``d std/dx = (x - mean) / (n * std)`` evaluated in torch.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["patch_bounds", "patch_stats", "patch_stats_reference"]


def patch_bounds(size: int, grid: int) -> list[int]:
    """The ``grid + 1`` patch boundaries ``floor(i * size / grid)`` along one axis."""
    return [(i * size) // grid for i in range(grid + 1)]


def _check(x: torch.Tensor, grid: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"patch_stats expects x B,C,H,W, got {tuple(x.shape)}")
    if not 1 <= grid <= min(x.shape[-2:]):
        raise ValueError(f"grid must lie in [1, min(H, W)] = [1, {min(x.shape[-2:])}], got {grid}")
    if not x.is_floating_point():
        raise ValueError(f"patch_stats expects a floating tensor, got {x.dtype}")


def _patch_ids(size: int, grid: int, device: torch.device) -> torch.Tensor:
    """``size int64``: the patch each row (column) belongs to."""
    bounds = torch.tensor(patch_bounds(size, grid), device=device)
    return torch.bucketize(torch.arange(size, device=device), bounds[1:], right=True)


def _expand(stat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``B,C,grid,grid`` -> ``B,C,H,W`` by patch membership."""
    return stat[:, :, rows][:, :, :, cols]


def patch_stats_reference(x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and population standard deviation in plain torch.

    Args:
        x: ``B,C,H,W`` floating feature map (any range).
        grid: patches per side, ``1 <= grid <= min(H, W)``.

    Returns:
        ``(mean, std)``, each ``B,C,grid,grid`` in ``x``'s dtype (accumulated in float32, or
        float64 for float64 input).
    """
    _check(x, grid)
    h, w = x.shape[-2:]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rows, cols = _patch_ids(h, grid, x.device), _patch_ids(w, grid, x.device)
    row_onehot = torch.nn.functional.one_hot(rows, grid).to(acc)  # H,grid
    col_onehot = torch.nn.functional.one_hot(cols, grid).to(acc)  # W,grid
    counts = row_onehot.sum(0)[:, None] * col_onehot.sum(0)[None, :]
    mean = torch.einsum("bchw,hi,wj->bcij", xf, row_onehot, col_onehot) / counts
    centred = xf - _expand(mean, rows, cols)
    var = torch.einsum("bchw,hi,wj->bcij", centred * centred, row_onehot, col_onehot) / counts
    return mean.to(x.dtype), var.sqrt().to(x.dtype)


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    if backend is None or backend == "auto":
        return x.is_cuda
    if backend == "reference":
        return False
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment to run "
                "Triton's CPU interpreter; pass backend=None to use the torch reference"
            )
        return True
    raise ValueError(f"backend must be None, 'auto', 'triton' or 'reference', got {backend!r}")


class _PatchStatsFunction(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the closed-form gradient in torch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ._triton_patch_stats import patch_stats_triton

        mean, std = patch_stats_triton(x, grid)
        ctx.grid = grid
        ctx.save_for_backward(x, mean, std)
        return mean, std

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor, grad_std: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        x, mean, std = ctx.saved_tensors
        h, w = x.shape[-2:]
        rows, cols = _patch_ids(h, ctx.grid, x.device), _patch_ids(w, ctx.grid, x.device)
        row_len = torch.bincount(rows, minlength=ctx.grid).to(torch.float32)
        col_len = torch.bincount(cols, minlength=ctx.grid).to(torch.float32)
        counts = row_len[:, None] * col_len[None, :]
        g_mean = grad_mean.float() / counts
        g_std = grad_std.float() / (counts * std.float().clamp_min(1e-12))
        centred = x.float() - _expand(mean.float(), rows, cols)
        grad = _expand(g_mean, rows, cols) + centred * _expand(g_std, rows, cols)
        return grad.to(x.dtype), None


def patch_stats(x: torch.Tensor, grid: int, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and population standard deviation of ``x`` on a ``grid x grid`` layout.

    Args:
        x: ``B,C,H,W`` float32/float16/bfloat16 feature map (any range).
        grid: patches per side, ``1 <= grid <= min(H, W)``.
        backend: ``None``/``"auto"`` (Triton for CUDA tensors, the reference otherwise),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"reference"``.

    Returns:
        ``(mean, std)``, each ``B,C,grid,grid`` in ``x``'s dtype; differentiable.
    """
    if not _use_triton(x, backend):
        return patch_stats_reference(x, grid)
    _check(x, grid)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernel takes float32/float16/bfloat16, got {x.dtype}")
    return _PatchStatsFunction.apply(x, grid)
