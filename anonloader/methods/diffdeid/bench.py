"""Timings for DiffDeID's closing-note questions (``python -m anonloader.methods.diffdeid.bench``).

Prints one JSON object:

- ``texture_attention``: one texture-attention layer at the 64 px level (4,096 queries x 4,096
  keys, ``channels`` wide, heads of 64) through :func:`anonloader.kernels.attention.multi_source_attention`
  with the Triton kernel (CUDA only) and with the reference (``F.scaled_dot_product_attention``);
- ``moments``: per-channel instance moments of a ``B,channels/2,2 side,2 side`` map by ``patch_stats(x, 1)``
  (Triton on CUDA), by ``torch.mean`` in moment form, and ``F.instance_norm`` for scale;
- ``unet_step``: one UNet step at the preset's crop size with cached K_b/V_b (inference), and
  ``train_step``: one forward + backward at ``--batch`` faces (float32, and bf16 autocast on CUDA).

Each figure is the median of ``--repeat`` runs after one warm-up, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["main", "run"]


def _time(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def run(preset: str = "paper", device: str = "cpu", batch: int = 8, repeat: int = 5, side: int = 64, channels: int = 256) -> dict[str, Any]:
    """All timings as a dict (see the module docstring)."""
    from anonloader.kernels.attention import multi_source_attention
    from anonloader.kernels.patch_stats import patch_stats
    from anonloader.methods.diffdeid.network import DiffDeIDUNet, TextureAttention, instance_moments

    dev = torch.device(device)
    out: dict[str, Any] = {"device": str(dev), "preset": preset, "batch": batch}
    torch.manual_seed(0)
    layer = TextureAttention(channels, 64).to(dev)
    fn = torch.randn(1, channels, side, side, device=dev)
    kv = layer.project_kv(torch.randn(1, channels, side, side, device=dev))
    q = layer._heads(layer.to_q(fn)).detach()
    attention = {"queries": side * side, "keys": side * side, "channels": channels}
    with torch.no_grad():
        attention["reference_ms"] = _time(lambda: multi_source_attention(q, [kv], backend="reference"), dev, repeat)
        if dev.type == "cuda":
            attention["triton_ms"] = _time(lambda: multi_source_attention(q, [kv], backend="triton"), dev, repeat)
    out["texture_attention"] = attention
    x = torch.randn(batch, max(1, channels // 2), 2 * side, 2 * side, device=dev)  # the level above (128 ch, 128 px in paper)
    moments = {"shape": list(x.shape)}
    moments["patch_stats_ms"] = _time(lambda: (patch_stats(x, 1), patch_stats(x * x, 1)), dev, repeat)
    moments["torch_mean_ms"] = _time(lambda: instance_moments(x, use_patch_stats=False), dev, repeat)
    moments["instance_norm_ms"] = _time(lambda: torch.nn.functional.instance_norm(x, eps=1e-6), dev, repeat)
    out["moments"] = moments
    net = DiffDeIDUNet(preset).to(dev)
    s = net.crop_size
    inputs = (torch.randn(batch, 3, s, s, device=dev), torch.full((batch,), 500 % net.num_train_timesteps, device=dev),
              torch.randn(batch, 3, s, s, device=dev), torch.randn(batch, net.rho_dim, device=dev), torch.randn(batch, net.id_dim, device=dev))
    masked = torch.randn(batch, 3, s, s, device=dev)
    with torch.no_grad():
        net.eval()
        cached = net.texture_kv(masked)
        out["texture_encoder_ms"] = _time(lambda: net.texture_kv(masked), dev, repeat)
        out["unet_step_ms"] = _time(lambda: net(*inputs, cached), dev, repeat)
    net.train()

    def train_step(dtype: torch.dtype | None) -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = net(*inputs, masked).float().square().mean()
        loss.backward()

    out["train_step_ms"] = {"float32": _time(lambda: train_step(None), dev, repeat)}
    if dev.type == "cuda":
        out["train_step_ms"]["bf16_autocast"] = _time(lambda: train_step(torch.bfloat16), dev, repeat)
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m anonloader.methods.diffdeid.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--channels", type=int, default=256)
    args = parser.parse_args(argv)
    result = run(args.preset, args.device, args.batch, args.repeat, args.side, args.channels)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
