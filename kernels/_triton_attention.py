"""Triton forward and backward kernels of
:func:`anonloader.kernels.attention.multi_source_attention` (imported lazily: this module imports
triton).

One launch per key/value segment. Each launch runs the flash-attention online softmax over its
segment for a ``BLOCK_M`` tile of queries; between segments the running row maximum ``m``, row
sum ``l`` and un-normalised accumulator (float32) are carried in small buffers, so the segments
are never concatenated. A blended segment loads ``a`` and ``b`` tiles and blends them in
registers, ``(1 - w) * a + w * b`` in float32, so the blend is never allocated. A single segment
needs no buffers at all. Under Triton's CPU interpreter, bfloat16 dot products run on operands
rounded to bfloat16 but stored as float32 (the interpreter's bfloat16 ``tl.dot`` is wrong);
the native bfloat16 ``tl.dot`` is only exercised on a GPU. Head dims that are not powers of two are padded to the next power of
two with masked loads; sequence lengths need not be multiples of the block sizes. The forward
also writes the float32 per-row log-sum-exp (natural log) from its final running max and sum.

Backward (flash-attention-2 style, deterministic, no atomics): ``delta = rowsum(dO * O)`` in
torch, then per segment one ``_attention_dkdv_kernel`` launch over key blocks (recomputing
``P = exp(q k^T * scale - lse)`` per query block; ``dV = P^T dO``, ``dS = P * (dO v^T - delta)``,
``dK = dS^T q * scale``) and one ``_attention_dq_kernel`` launch over query blocks that adds the
segment's ``dS k * scale`` to a float32 dQ. A blended segment is blended while loading exactly as
in the forward; the gradients of ``a``, ``b`` and the weight follow in torch from the blend's
float32 dK/dV. float16 runs P and dS through float16 dots; bfloat16 keeps them in float32 (tf32 on
a GPU), see ``_mm_p``. Under the interpreter, bfloat16 roundings that Triton's interpreter
truncates (float32 -> bfloat16 casts) are rounded to nearest-even by hand (``_round_to``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_backward", "attention_forward"]

_LOG2E = 1.4426950408889634


@triton.jit
def _round_to(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """float32 ``x`` rounded to ``dtype``. With ``RNE`` (bfloat16 under the interpreter, whose
    float32 -> bfloat16 cast truncates) it rounds to nearest-even by hand, as a GPU does."""
    if RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _attention_segment_kernel(
    Q, KA, VA, KB, VB, Wt, O, LSE, Mbuf, Lbuf, Acc,
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
            k = _round_to((1.0 - w) * k.to(tl.float32) + w * k_b.to(tl.float32), dtype, DOT_UPCAST)
            v = _round_to((1.0 - w) * v.to(tl.float32) + w * v_b.to(tl.float32), dtype, DOT_UPCAST)
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
            acc = acc * alpha[:, None] + tl.dot(_round_to(p, dtype, True).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
        m_i = m_new

    if LAST:
        out = acc / l_i[:, None]
        # natural-log sum of exp(q k^T * scale) per row, from the running max/sum (log2 domain)
        tl.store(LSE + state, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=mask_m)
        o_ptrs = O + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_m + offs_d[None, :] * so_d
        tl.store(o_ptrs, _round_to(out, O.dtype.element_ty, DOT_UPCAST), mask=mask_m[:, None] & mask_d[None, :])
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


def attention_forward(q: torch.Tensor, segments: list, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward over ``segments`` (validated ``KV`` / ``BlendedKV`` with ``B`` weights).

    Args:
        q: ``B,H,Lq,D`` float32/float16/bfloat16.
        segments: non-empty list of segments, tensors ``B,H,Lk_i,D`` of ``q``'s dtype.
        scale: softmax scale.

    Returns:
        ``(out, lse)``: ``out`` ``B,H,Lq,D`` in ``q``'s dtype; ``lse`` ``B,H,Lq`` float32, the
        natural log of ``sum_k exp(q k^T * scale)`` over all segments (for the backward).
    """
    from .attention import KV

    batch, heads, lq, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
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
            q, ka, va, kb, vb, weight, out, lse, m_buf, l_buf, acc_buf,
            scale * _LOG2E, heads, lq, ka.shape[2], head_dim,
            *q.stride(), *ka.stride(), *va.stride(), *kb.stride(), *vb.stride(), *out.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            BLENDED=blended, FIRST=i == 0, LAST=i == len(segments) - 1, IEEE=q.dtype == torch.float32,
            DOT_UPCAST=upcast,
            num_warps=num_warps, num_stages=2,
        )
    return out, lse


@triton.jit
def _mm(a, b, like, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32, with both operands rounded to ``like``'s dtype first
    (float32: exact IEEE products; bfloat16 under the interpreter: rounded, then multiplied as
    float32, see the module docstring)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_UPCAST:
        return tl.dot(a.to(like.dtype).to(tl.float32), b.to(like.dtype).to(tl.float32))
    else:
        return tl.dot(a.to(like.dtype), b.to(like.dtype))


@triton.jit
def _mm_p(p, x, like, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, P_FP32: tl.constexpr):
    """``p @ x`` for a float32 tile ``p`` (P or dS). With ``P_FP32`` (bfloat16 inputs) ``p`` is
    not rounded to bfloat16's 8-bit mantissa but multiplied as float32 (tf32 on a GPU): rounding
    P and dS to bfloat16, as a float16 run rounds them to float16, puts the bfloat16 key
    gradients at ~2.1x torch's own error; float32 P/dS brings them to <= 1.75x."""
    if P_FP32:
        return tl.dot(p, x.to(tl.float32))
    else:
        return _mm(p, x, like, IEEE, DOT_UPCAST)


@triton.jit
def _load_kv(KA, VA, KB, VB, Wt, b, h, cols, offs_d, mask_n, mask_d, like,
             ska_b, ska_h, ska_n, ska_d, sva_b, sva_h, sva_n, sva_d,
             skb_b, skb_h, skb_n, skb_d, svb_b, svb_h, svb_n, svb_d,
             BLENDED: tl.constexpr, RNE: tl.constexpr):
    """A ``BLOCK_N,BLOCK_D`` tile of keys and values, blended in float32 while loading when
    ``BLENDED`` and rounded back to ``like``'s dtype, exactly as in the forward."""
    kv_mask = mask_n[:, None] & mask_d[None, :]
    rows = cols[:, None].to(tl.int64)
    k = tl.load(KA + b * ska_b + h * ska_h + rows * ska_n + offs_d[None, :] * ska_d, mask=kv_mask, other=0.0)
    v = tl.load(VA + b * sva_b + h * sva_h + rows * sva_n + offs_d[None, :] * sva_d, mask=kv_mask, other=0.0)
    if BLENDED:
        w = tl.load(Wt + b).to(tl.float32)
        k_b = tl.load(KB + b * skb_b + h * skb_h + rows * skb_n + offs_d[None, :] * skb_d, mask=kv_mask, other=0.0)
        v_b = tl.load(VB + b * svb_b + h * svb_h + rows * svb_n + offs_d[None, :] * svb_d, mask=kv_mask, other=0.0)
        k = _round_to((1.0 - w) * k.to(tl.float32) + w * k_b.to(tl.float32), like.dtype, RNE)
        v = _round_to((1.0 - w) * v.to(tl.float32) + w * v_b.to(tl.float32), like.dtype, RNE)
    return k, v


@triton.jit
def _attention_dkdv_kernel(
    Q, DO, LSE, Delta, KA, VA, KB, VB, Wt, DK, DV,
    qk_scale, scale, H, LQ, LK, D,
    sq_b, sq_h, sq_m, sq_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    ska_b, ska_h, ska_n, ska_d,
    sva_b, sva_h, sva_n, sva_d,
    skb_b, skb_h, skb_n, skb_d,
    svb_b, svb_h, svb_n, svb_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLENDED: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, P_FP32: tl.constexpr,
):
    """dK and dV (float32, contiguous ``B,H,LK,D``) of one segment's ``BLOCK_N`` keys, looping
    over every query block: ``P = exp(q k^T * scale - lse)``, ``dV = P^T dO``,
    ``dS = P * (dO v^T - delta)``, ``dK = dS^T q * scale``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < LK
    mask_d = offs_d < D
    like = tl.load(Q + b * sq_b + h * sq_h)  # carries the storage dtype
    k, v = _load_kv(KA, VA, KB, VB, Wt, b, h, offs_n, offs_d, mask_n, mask_d, like,
                    ska_b, ska_h, ska_n, ska_d, sva_b, sva_h, sva_n, sva_d,
                    skb_b, skb_h, skb_n, skb_d, svb_b, svb_h, svb_n, svb_d, BLENDED, DOT_UPCAST)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    row_base = pid_bh.to(tl.int64) * LQ
    for start_m in range(0, LQ, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < LQ
        tile_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None].to(tl.int64) * sq_m + offs_d[None, :] * sq_d, mask=tile_mask, other=0.0)
        do = tl.load(do_base + rows[:, None].to(tl.int64) * sdo_m + offs_d[None, :] * sdo_d, mask=tile_mask, other=0.0)
        lse2 = tl.load(LSE + row_base + rows, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row_base + rows, mask=mask_m, other=0.0)
        qk = _mm(q, tl.trans(k), like, IEEE, DOT_UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += _mm_p(tl.trans(p), do, like, IEEE, DOT_UPCAST, P_FP32)
        dp = _mm(do, tl.trans(v), like, IEEE, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _mm_p(tl.trans(ds), q, like, IEEE, DOT_UPCAST, P_FP32)
    out_offs = (pid_bh.to(tl.int64) * LK + offs_n[:, None].to(tl.int64)) * D + offs_d[None, :]
    out_mask = mask_n[:, None] & mask_d[None, :]
    tl.store(DK + out_offs, dk * scale, mask=out_mask)
    tl.store(DV + out_offs, dv, mask=out_mask)


@triton.jit
def _attention_dq_kernel(
    Q, DO, LSE, Delta, KA, VA, KB, VB, Wt, DQ,
    qk_scale, scale, H, LQ, LK, D,
    sq_b, sq_h, sq_m, sq_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    ska_b, ska_h, ska_n, ska_d,
    sva_b, sva_h, sva_n, sva_d,
    skb_b, skb_h, skb_n, skb_d,
    svb_b, svb_h, svb_n, svb_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLENDED: tl.constexpr, FIRST: tl.constexpr, IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    P_FP32: tl.constexpr,
):
    """Adds one segment's share of dQ (float32, contiguous ``B,H,LQ,D``) for ``BLOCK_M``
    queries, looping over the segment's key blocks: ``dQ += dS k * scale``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < D
    tile_mask = mask_m[:, None] & mask_d[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * sq_b + h * sq_h + rows * sq_m + offs_d[None, :] * sq_d, mask=tile_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows * sdo_m + offs_d[None, :] * sdo_d, mask=tile_mask, other=0.0)
    row_state = pid_bh.to(tl.int64) * LQ + offs_m
    lse2 = tl.load(LSE + row_state, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_state, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < LK
        k, v = _load_kv(KA, VA, KB, VB, Wt, b, h, cols, offs_d, mask_n, mask_d, q,
                        ska_b, ska_h, ska_n, ska_d, sva_b, sva_h, sva_n, sva_d,
                        skb_b, skb_h, skb_n, skb_d, svb_b, svb_h, svb_n, svb_d, BLENDED, DOT_UPCAST)
        qk = _mm(q, tl.trans(k), q, IEEE, DOT_UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = _mm(do, tl.trans(v), q, IEEE, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm_p(ds, k, q, IEEE, DOT_UPCAST, P_FP32)
    dq_offs = row_state[:, None] * D + offs_d[None, :]
    dq = dq * scale
    if not FIRST:
        dq += tl.load(DQ + dq_offs, mask=tile_mask, other=0.0)
    tl.store(DQ + dq_offs, dq, mask=tile_mask)


def _backward_blocks(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """``BLOCK_M, BLOCK_N, BLOCK_D, num_warps`` of the backward kernels (dK/dV: ``BLOCK_N`` keys
    held, ``BLOCK_M`` queries streamed; dQ: the roles swap, so it uses ``BLOCK_N, BLOCK_M``)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return 16, 16, block_d, 4
    if block_d <= 64:
        return 32, 64, block_d, 4
    if block_d <= 128:
        return (16, 32, block_d, 4) if dtype == torch.float32 else (32, 64, block_d, 8)
    return 16, 32, block_d, 8


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segments: list,
    scale: float,
    needs_q: bool,
    needs_segments: list[bool],
) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor | None, ...] | None]]:
    """Fused flash-attention-2 backward over ``segments`` (as given to :func:`attention_forward`).

    Per segment (one launch each, never concatenated): a dK/dV kernel over key blocks and a dQ
    kernel over query blocks that adds the segment's share, both deterministic (no atomics).
    A blended segment gets the gradients of its blend, then ``d a = (1 - w) d blend``,
    ``d b = w d blend`` and ``d w = sum(dK (k_b - k_a)) + sum(dV (v_b - v_a))`` per batch item.

    Args:
        grad_out: ``B,H,Lq,D`` gradient of the output.
        q, out, lse: the forward's query, output (``B,H,Lq,D``) and float32 ``B,H,Lq`` log-sum-exp.
        segments: the forward's ``KV`` / ``BlendedKV`` (tensors ``B,H,Lk_i,D``, ``B`` weights).
        scale: softmax scale.
        needs_q: whether to compute dQ.
        needs_segments: per segment, whether any of its tensors needs a gradient.

    Returns:
        ``(dq, grads)``: ``dq`` ``B,H,Lq,D`` in ``q``'s dtype (None unless ``needs_q``); per
        segment ``(dk, dv)`` or ``(dk_a, dv_a, dk_b, dv_b, dweight)`` in the inputs' dtypes, or None.
    """
    from .attention import KV

    batch, heads, lq, head_dim = q.shape
    if lq == 0:  # no queries: every gradient is zero
        grads = []
        for seg, need in zip(segments, needs_segments):
            tensors = [seg.k, seg.v] if isinstance(seg, KV) else [seg.k_a, seg.v_a, seg.k_b, seg.v_b, seg.weight]
            grads.append(tuple(torch.zeros_like(t) for t in tensors) if need else None)
        return (torch.zeros_like(q) if needs_q else None), grads
    block_m, block_n, block_d, num_warps = _backward_blocks(head_dim, q.dtype, q.device)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    ieee = q.dtype == torch.float32
    upcast = q.device.type != "cuda" and q.dtype == torch.bfloat16
    p_fp32 = q.dtype == torch.bfloat16
    dq = torch.empty(batch, heads, lq, head_dim, device=q.device, dtype=torch.float32) if needs_q else None
    grads: list[tuple[torch.Tensor | None, ...] | None] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, KV):
            ka, va, kb, vb, weight, blended = seg.k, seg.v, seg.k, seg.v, lse, False
        else:
            ka, va, kb, vb, blended = seg.k_a, seg.v_a, seg.k_b, seg.v_b, True
            weight = seg.weight.detach().to(torch.float32).contiguous()
        lk = ka.shape[2]
        common = (
            *q.stride(), *grad_out.stride(), *ka.stride(), *va.stride(), *kb.stride(), *vb.stride(),
        )
        if needs_q:
            _attention_dq_kernel[(triton.cdiv(lq, block_n), batch * heads)](
                q, grad_out, lse, delta, ka, va, kb, vb, weight, dq,
                scale * _LOG2E, scale, heads, lq, lk, head_dim, *common,
                BLOCK_M=block_n, BLOCK_N=block_m, BLOCK_D=block_d,
                BLENDED=blended, FIRST=i == 0, IEEE=ieee, DOT_UPCAST=upcast, P_FP32=p_fp32,
                num_warps=num_warps, num_stages=2,
            )
        if not needs_segments[i]:
            grads.append(None)
            continue
        dk = torch.empty(batch, heads, lk, head_dim, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        _attention_dkdv_kernel[(triton.cdiv(lk, block_n), batch * heads)](
            q, grad_out, lse, delta, ka, va, kb, vb, weight, dk, dv,
            scale * _LOG2E, scale, heads, lq, lk, head_dim, *common,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            BLENDED=blended, IEEE=ieee, DOT_UPCAST=upcast, P_FP32=p_fp32,
            num_warps=num_warps, num_stages=2,
        )
        if not blended:
            grads.append((dk.to(q.dtype), dv.to(q.dtype)))
            continue
        w = weight.view(-1, 1, 1, 1)
        dweight = (dk * (kb.float() - ka.float())).sum((1, 2, 3)) + (dv * (vb.float() - va.float())).sum((1, 2, 3))
        grads.append((
            ((1 - w) * dk).to(q.dtype), ((1 - w) * dv).to(q.dtype),
            (w * dk).to(q.dtype), (w * dv).to(q.dtype),
            dweight.to(seg.weight.dtype),
        ))
    return (dq.to(q.dtype) if needs_q else None), grads
