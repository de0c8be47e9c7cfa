"""Benchmarks of the fused kernels against plain torch, on a CUDA GPU.

- Multi-source attention at the shapes of a 512x512 Stable Diffusion UNet with two
  ReferenceNets (64x64 latent: Lq = 4096 queries, keys/values of the layer's own 4096 tokens
  plus 2 x 4096 reference tokens, heads of 64): TFLOP/s and ms of ``multi_source_attention``
  versus ``F.scaled_dot_product_attention`` on the concatenated keys/values (concatenation,
  and for the blended case the blend, included in its time) and versus a naive
  ``softmax(q k^T) v``. FLOPs counted as ``4 * B * H * Lq * Lk * D`` for every variant.
  Forward + backward (gradients of q and every key/value, and of the blend weight): the fused
  Triton forward/backward versus ``F.scaled_dot_product_attention``'s on the concatenation
  (cat and blend, and their backward, included) and versus the reference-recompute backward
  (``backward="reference"``). FLOPs counted as ``(4 + 10) * B * H * Lq * Lk * D`` (the
  flash-attention-2 backward recomputes ``q k^T``: 5 matmuls).
- Paste-back of 4 faces (256x256 crops) into a 1080p image: GB/s (image read + output written +
  crops read) of the Triton kernel versus the kornia reference.

Usage: ``python benchmarks/kernels.py [--dtype float16|bfloat16|float32] [--batch 2] [--heads 5]``.
Without a CUDA GPU it prints a skip message and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _bench(fn, warmup: int = 5, rep: int = 20) -> float:
    """Median milliseconds of ``fn`` (Triton's ``do_bench``: flushes L2, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(dim=-1), v)


def bench_attention(batch: int, heads: int, lq: int, lk_each: int, head_dim: int, dtype: torch.dtype) -> None:
    from anonloader.kernels.attention import KV, BlendedKV, multi_source_attention

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)

    def rand(length: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, generator=g)

    q = rand(lq)
    own = KV(rand(lq), rand(lq))
    refs = [KV(rand(lk_each), rand(lk_each)) for _ in range(2)]
    other = KV(rand(lk_each), rand(lk_each))
    weight = 0.3
    lk = lq + 2 * lk_each
    flops = 4 * batch * heads * lq * lk * head_dim
    print(f"attention: q {tuple(q.shape)} {dtype}, segments Lk = {lq} + {lk_each} + {lk_each} = {lk}, head_dim {head_dim}")

    def sdpa_concat():
        k = torch.cat([own.k, refs[0].k, refs[1].k], dim=2)
        v = torch.cat([own.v, refs[0].v, refs[1].v], dim=2)
        return F.scaled_dot_product_attention(q, k, v)

    def sdpa_blend_concat():
        k_blend = (1 - weight) * refs[1].k + weight * other.k
        v_blend = (1 - weight) * refs[1].v + weight * other.v
        k = torch.cat([own.k, refs[0].k, k_blend], dim=2)
        v = torch.cat([own.v, refs[0].v, v_blend], dim=2)
        return F.scaled_dot_product_attention(q, k, v)

    def naive():
        k = torch.cat([own.k, refs[0].k, refs[1].k], dim=2)
        v = torch.cat([own.v, refs[0].v, refs[1].v], dim=2)
        return _naive_attention(q, k, v)

    def fused():
        return multi_source_attention(q, [own, refs[0], refs[1]])

    def fused_blend():
        return multi_source_attention(q, [own, refs[0], BlendedKV(refs[1].k, refs[1].v, other.k, other.v, weight)])

    reference = sdpa_concat().float()
    error = (fused().float() - reference).abs().max().item()
    blend_error = (fused_blend().float() - sdpa_blend_concat().float()).abs().max().item()
    print(f"  max |fused - sdpa| = {error:.2e}, blended: {blend_error:.2e}")
    rows = [
        ("multi_source_attention (3 segments)", fused),
        ("sdpa on torch.cat (cat included)", sdpa_concat),
        ("naive softmax(qk^T)v on torch.cat", naive),
        ("multi_source_attention (blended 3rd segment)", fused_blend),
        ("sdpa on blend + torch.cat (included)", sdpa_blend_concat),
    ]
    print(f"  {'variant':48s} {'ms':>9s} {'TFLOP/s':>9s}")
    for name, fn in rows:
        try:
            ms = _bench(fn)
        except torch.OutOfMemoryError:
            print(f"  {name:48s} {'OOM':>9s}")
            torch.cuda.empty_cache()
            continue
        print(f"  {name:48s} {ms:9.3f} {flops / ms / 1e9:9.1f}")
    bench_attention_backward(q, own, refs, other, weight)


def bench_attention_backward(q: torch.Tensor, own, refs: list, other, weight: float) -> None:
    """Forward + backward timings; gradients of q, every key/value and a tensor blend weight."""
    from anonloader.kernels.attention import KV, BlendedKV, multi_source_attention

    batch, heads, lq, head_dim = q.shape
    q = q.detach().requires_grad_()
    leaves = [t.detach().requires_grad_() for seg in (own, *refs, other) for t in (seg.k, seg.v)]
    k0, v0, k1, v1, k2, v2, k3, v3 = leaves
    w = torch.full((batch,), weight, device=q.device, dtype=torch.float32, requires_grad=True)
    lk = k0.shape[2] + k1.shape[2] + k2.shape[2]
    flops = 14 * batch * heads * lq * lk * head_dim
    grad_out = torch.randn_like(q)
    inputs = [q, *leaves, w]

    def run(forward):
        def step():
            for t in inputs:
                t.grad = None
            forward().backward(grad_out)
        return step

    def fused(backward: str = "triton"):
        return multi_source_attention(q, [KV(k0, v0), KV(k1, v1), BlendedKV(k2, v2, k3, v3, w)], backward=backward)

    def sdpa():
        wv = w.to(q.dtype).view(-1, 1, 1, 1)
        k = torch.cat([k0, k1, (1 - wv) * k2 + wv * k3], dim=2)
        v = torch.cat([v0, v1, (1 - wv) * v2 + wv * v3], dim=2)
        return F.scaled_dot_product_attention(q, k, v)

    grads = {}
    for name, fn in (("fused", fused), ("sdpa", sdpa)):
        run(fn)()
        grads[name] = [t.grad.float().clone() for t in inputs]
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(grads["fused"], grads["sdpa"]))
    print(f"forward+backward (blended 3rd segment, grads of q, 8 k/v tensors, weight): max relative |grad fused - sdpa| = {worst:.2e}")
    rows = [
        ("multi_source_attention fwd+bwd (Triton bwd)", run(fused)),
        ("multi_source_attention fwd+bwd (reference bwd)", run(lambda: fused("reference"))),
        ("sdpa on blend + torch.cat fwd+bwd", run(sdpa)),
    ]
    print(f"  {'variant':48s} {'ms':>9s} {'TFLOP/s':>9s}")
    for name, fn in rows:
        try:
            ms = _bench(fn)
        except torch.OutOfMemoryError:
            print(f"  {name:48s} {'OOM':>9s}")
            torch.cuda.empty_cache()
            continue
        print(f"  {name:48s} {ms:9.3f} {flops / ms / 1e9:9.1f}")


def bench_paste_back(faces: int, crop: int, height: int, width: int) -> None:
    from anonloader.kernels.paste_back import paste_back, paste_back_reference

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    image = torch.rand(3, height, width, device=device, generator=g)
    crops = torch.rand(faces, 3, crop, crop, device=device, generator=g)
    affines = []
    for f in range(faces):
        scale, angle = crop / (200 + 60 * f), math.radians(10 * f - 15)
        cx, cy = width * (f + 1) / (faces + 1), height / 2
        rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64) * scale
        t = torch.tensor([(crop - 1) / 2] * 2, dtype=torch.float64) - rot @ torch.tensor([cx, cy], dtype=torch.float64)
        affines.append(torch.cat([rot, t[:, None]], 1))
    affines = torch.stack(affines).float().to(device)
    index = torch.zeros(faces, dtype=torch.int64, device=device)
    moved = 2 * image.numel() * 4 + crops.numel() * 4
    print(f"paste_back: image 3x{height}x{width} float32, {faces} faces, crops {faces}x3x{crop}x{crop}; bytes = image read + written + crops read")
    for color_match in (False, True):
        out = paste_back([image], crops, affines, index, color_match=color_match)[0]
        ref = paste_back_reference([image], crops, affines, index, color_match=color_match)[0]
        print(f"  color_match={color_match}: max |kernel - kornia| = {(out - ref).abs().max().item():.2e}")
        for name, fn in (
            ("triton", lambda: paste_back([image], crops, affines, index, color_match=color_match)),
            ("kornia reference", lambda: paste_back_reference([image], crops, affines, index, color_match=color_match)),
        ):
            ms = _bench(fn)
            print(f"    {name:18s} {ms:8.3f} ms {moved / ms / 1e6:8.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--lq", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP: no CUDA GPU available; benchmarks/kernels.py measures the Triton kernels on a GPU only.")
        return 0
    try:
        import triton
    except ImportError:
        print("SKIP: triton is not installed (pip install 'anonloader[kernels]').")
        return 0
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    bench_attention(args.batch, args.heads, args.lq, args.lq, args.head_dim, DTYPES[args.dtype])
    bench_paste_back(faces=4, crop=256, height=1080, width=1920)
    return 0


if __name__ == "__main__":
    sys.exit(main())
