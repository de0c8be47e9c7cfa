"""Triton forward kernel of :func:`anonloader.kernels.attention.multi_source_attention`
(imported lazily: this module imports triton).

One launch per key/value segment. Each launch runs the flash-attention online softmax over its
segment for a ``BLOCK_M`` tile of queries; between segments the running row maximum ``m``, row
sum ``l`` and un-normalised accumulator (float32) are carried in small buffers, so the segments
are never concatenated. A blended segment loads ``a`` and ``b`` tiles and blends them in
registers, ``(1 - w) * a + w * b`` in float32, so the blend is never allocated. A single segment
needs no buffers at all. Under Triton's CPU interpreter, bfloat16 dot products run on operands
rounded to bfloat16 but stored as float32 (the interpreter's bfloat16 ``tl.dot`` is wrong);
the native bfloat16 ``tl.dot`` is only exercised on a GPU. Head dims that are not powers of two are padded to the next power of
two with masked loads; sequence lengths need not be multiples of the block sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_forward"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attention_segment_kernel(
    Q, KA, VA, KB, VB, Wt, O, Mbuf, Lbuf, Acc,
    qk_scale, H, LQ, LK, D,
    sq_b, sq_h, sq_m, sq_d,
    ska_b, ska_h, ska_n, ska_d,
    sva_b, sva_h, sva_n, sva_d,
    skb_b, skb_h, skb_n, skb_d,
    svb_b, svb_h, svb_n, svb_d,
    so_b, so_h, so_m, so_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLENDED: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, IEEE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < D

    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    dtype = q.dtype

    state = (pid_bh.to(tl.int64) * LQ + offs_m).to(tl.int64)
    if FIRST:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    else:
        m_i = tl.load(Mbuf + state, mask=mask_m, other=0.0)
        l_i = tl.load(Lbuf + state, mask=mask_m, other=1.0)
        acc = tl.load(Acc + state[:, None] * BLOCK_D + offs_d[None, :], mask=mask_m[:, None], other=0.0)

    if BLENDED:
        w = tl.load(Wt + b).to(tl.float32)
    ka_base = KA + b * ska_b + h * ska_h
    va_base = VA + b * sva_b + h * sva_h
    kb_base = KB + b * skb_b + h * skb_h
    vb_base = VB + b * svb_b + h * svb_h
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < LK
        kv_mask = mask_n[:, None] & mask_d[None, :]
        rows = cols[:, None].to(tl.int64)
        k = tl.load(ka_base + rows * ska_n + offs_d[None, :] * ska_d, mask=kv_mask, other=0.0)
        v = tl.load(va_base + rows * sva_n + offs_d[None, :] * sva_d, mask=kv_mask, other=0.0)
        if BLENDED:
            k_b = tl.load(kb_base + rows * skb_n + offs_d[None, :] * skb_d, mask=kv_mask, other=0.0)
            v_b = tl.load(vb_base + rows * svb_n + offs_d[None, :] * svb_d, mask=kv_mask, other=0.0)
            k = ((1.0 - w) * k.to(tl.float32) + w * k_b.to(tl.float32)).to(dtype)
            v = ((1.0 - w) * v.to(tl.float32) + w * v_b.to(tl.float32)).to(dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        elif DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32))
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        elif DOT_UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
        m_i = m_new

    if LAST:
        out = acc / l_i[:, None]
        o_ptrs = O + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_m + offs_d[None, :] * so_d
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    else:
        tl.store(Mbuf + state, m_i, mask=mask_m)
        tl.store(Lbuf + state, l_i, mask=mask_m)
        tl.store(Acc + state[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask_m[:, None])


def _blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """``BLOCK_M, BLOCK_N, BLOCK_D, num_warps`` for a head dim."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return 16, 16, block_d, 4  # the interpreter: small tiles keep tests fast
    wide = dtype == torch.float32
    if block_d <= 64:
        return (64 if wide else 128), 64, block_d, 4
    if block_d <= 128:
        return 64, (32 if wide else 64), block_d, (4 if wide else 8)
    return 64, (16 if wide else 32), block_d, 8


def attention_forward(q: torch.Tensor, segments: list, scale: float) -> torch.Tensor:
    """Fused forward over ``segments`` (validated ``KV`` / ``BlendedKV`` with ``B`` weights).

    Args:
        q: ``B,H,Lq,D`` float32/float16/bfloat16.
        segments: non-empty list of segments, tensors ``B,H,Lk_i,D`` of ``q``'s dtype.
        scale: softmax scale.

    Returns:
        ``B,H,Lq,D`` in ``q``'s dtype.
    """
    from .attention import KV

    batch, heads, lq, head_dim = q.shape
    out = torch.empty_like(q)
    block_m, block_n, block_d, num_warps = _blocks(head_dim, q.dtype, q.device)
    if len(segments) > 1:
        m_buf = torch.empty(batch * heads * lq, device=q.device, dtype=torch.float32)
        l_buf = torch.empty_like(m_buf)
        acc_buf = torch.empty(batch * heads * lq, block_d, device=q.device, dtype=torch.float32)
    else:
        m_buf = l_buf = acc_buf = out  # unused by a single launch
    grid = (triton.cdiv(lq, block_m), batch * heads)
    # Triton's interpreter (3.x) multiplies bfloat16 dot operands as their raw uint16 storage;
    # there, operands are rounded to bfloat16 and multiplied in float32 (what the GPU does).
    upcast = q.device.type != "cuda" and q.dtype == torch.bfloat16
    for i, seg in enumerate(segments):
        if isinstance(seg, KV):
            ka, va, kb, vb, weight, blended = seg.k, seg.v, seg.k, seg.v, out, False
        else:
            ka, va, kb, vb, blended = seg.k_a, seg.v_a, seg.k_b, seg.v_b, True
            weight = seg.weight.detach().to(torch.float32).contiguous()
        _attention_segment_kernel[grid](
            q, ka, va, kb, vb, weight, out, m_buf, l_buf, acc_buf,
            scale * _LOG2E, heads, lq, ka.shape[2], head_dim,
            *q.stride(), *ka.stride(), *va.stride(), *kb.stride(), *vb.stride(), *out.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            BLENDED=blended, FIRST=i == 0, LAST=i == len(segments) - 1, IEEE=q.dtype == torch.float32,
            DOT_UPCAST=upcast,
            num_warps=num_warps, num_stages=2,
        )
    return out
