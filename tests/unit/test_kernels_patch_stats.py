"""patch_stats: reference semantics and dispatch (the kernel: test_kernels_triton.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from anonloader.kernels.patch_stats import patch_bounds, patch_stats, patch_stats_reference


def test_reference_matches_a_loop_over_patches() -> None:
    x = torch.randn(2, 3, 13, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = 4
    mean, std = patch_stats_reference(x, grid)
    rows, cols = patch_bounds(13, grid), patch_bounds(10, grid)
    assert rows == [0, 3, 6, 9, 13] and cols == [0, 2, 5, 7, 10]
    for i in range(grid):
        for j in range(grid):
            patch = x[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            torch.testing.assert_close(mean[:, :, i, j], patch.mean(dim=(-2, -1)))
            torch.testing.assert_close(std[:, :, i, j], patch.std(dim=(-2, -1), unbiased=False))


def test_reference_gradcheck_float64() -> None:
    x = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: patch_stats(t, 2), (x,))


def test_grid_one_and_half_precision() -> None:
    x = torch.rand(1, 1, 8, 8)
    mean, std = patch_stats(x, 1)
    torch.testing.assert_close(mean.flatten(), x.mean().view(1))
    mean16, _ = patch_stats(x.half(), 2)
    assert mean16.dtype == torch.float16


@pytest.mark.parametrize("shape, grid", [((1, 1, 4, 4), 5), ((1, 1, 4, 4), 0), ((4, 4), 1)])
def test_invalid_input_raises(shape: tuple, grid: int) -> None:
    with pytest.raises(ValueError):
        patch_stats(torch.zeros(shape), grid)


def test_dispatch_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("anonloader.kernels.patch_stats")  # the package attribute is the function

    calls = []
    monkeypatch.setattr(module, "patch_stats_reference", lambda *a: calls.append(1) or patch_stats_reference(*a))
    module.patch_stats(torch.rand(1, 1, 4, 4), 2)
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        module.patch_stats(torch.rand(1, 1, 4, 4), 2, backend="triton")
