"""Multi-source attention: one query attends to several key/value segments as if they were
concatenated along the sequence, without materializing the concatenation.

A segment is either a plain key/value pair (:class:`KV`) or a blend of two pairs
(:class:`BlendedKV`, ``(1 - weight) * a + weight * b``) that the Triton kernel blends while
loading, so neither the concatenation nor the blend is ever allocated.

Dispatch rule (:func:`multi_source_attention`): the Triton kernel for CUDA tensors (or, when the
environment has ``TRITON_INTERPRET=1`` and the caller asks for ``backend="triton"``, for CPU
tensors through Triton's interpreter); :func:`multi_source_attention_reference` (plain torch)
everywhere else. Triton is imported lazily, only when the kernel runs.

Autograd: the reference path is differentiated by torch. The Triton path is a
:class:`torch.autograd.Function` whose forward is the fused kernel (which also keeps the
float32 per-row log-sum-exp) and whose backward is, by default (``backward="triton"``), a fused
flash-attention-2 style Triton backward: per segment (never concatenated) one dK/dV kernel over
key blocks and one dQ kernel over query blocks that recompute ``P = exp(q k^T * scale - lse)``
tile by tile, deterministic (no atomics); blended segments get the gradient of the blend and
then of ``a``, ``b`` and the weight from it. ``backward="reference"`` instead recomputes the
attention through the reference (materializing the ``Lq x sum(Lk)`` scores for that step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

__all__ = [
    "KV",
    "BlendedKV",
    "BlendedStates",
    "MultiSourceAttnProcessor",
    "multi_source_attention",
    "multi_source_attention_reference",
]


@dataclass(frozen=True)
class KV:
    """A key/value segment.

    Attributes:
        k: ``B,H,L,D`` keys (``B`` may be 1 to broadcast over the query batch).
        v: ``B,H,L,D`` values, same shape as ``k``.
    """

    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class BlendedKV:
    """The segment ``(1 - weight) * a + weight * b`` for keys and values, blended while loading.

    Attributes:
        k_a, v_a, k_b, v_b: ``B,H,L,D``, all the same shape.
        weight: a float (may lie outside [0,1]) or a ``B`` tensor, one weight per batch item.
    """

    k_a: torch.Tensor
    v_a: torch.Tensor
    k_b: torch.Tensor
    v_b: torch.Tensor
    weight: float | torch.Tensor


@dataclass(frozen=True)
class BlendedStates:
    """Hidden states ``(1 - weight) * a + weight * b`` for :class:`MultiSourceAttnProcessor`.

    Because the key/value projections are affine and the blend weights sum to one, the blend
    commutes with the projection: the processor projects ``a`` and ``b`` and hands the kernel a
    :class:`BlendedKV`.

    Attributes:
        a, b: ``B,L,C`` (or ``B,C,H,W``) hidden states of the same shape.
        weight: a float or a ``B`` tensor.
    """

    a: torch.Tensor
    b: torch.Tensor
    weight: float | torch.Tensor


Source = Union[KV, BlendedKV, tuple]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _weight_tensor(weight: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """The blend weight as a ``batch`` tensor on ``like``'s device (float32 unless it is a
    floating tensor already, to keep its gradient)."""
    if isinstance(weight, torch.Tensor):
        w = weight.to(device=like.device)
        if not w.is_floating_point():
            w = w.float()
        w = w.reshape(-1)
        _check(w.numel() in (1, batch), f"BlendedKV weight must be a float or a {batch} tensor, got {tuple(weight.shape)}")
        return w.expand(batch)
    return torch.full((batch,), float(weight), device=like.device, dtype=torch.float32)


def _normalize_sources(q: torch.Tensor, sources: Sequence[Source]) -> list[KV | BlendedKV]:
    """Validates ``sources`` against ``q`` (``B,H,Lq,D``); returns KV/BlendedKV segments whose
    tensors are expanded (as views) to the query batch, with blend weights as ``B`` tensors.
    Empty segments are dropped."""
    _check(q.ndim == 4, f"q must be B,H,Lq,D, got {tuple(q.shape)}")
    b, h, _, d = q.shape
    segments: list[KV | BlendedKV] = []
    for i, src in enumerate(sources):
        if isinstance(src, tuple) and not isinstance(src, (KV, BlendedKV)):
            _check(len(src) == 2, f"source {i}: a plain tuple must be (k, v), got {len(src)} items")
            src = KV(*src)
        if isinstance(src, KV):
            tensors = [src.k, src.v]
        elif isinstance(src, BlendedKV):
            tensors = [src.k_a, src.v_a, src.k_b, src.v_b]
        else:
            raise TypeError(f"source {i}: expected KV, BlendedKV or (k, v), got {type(src).__name__}")
        shape = tensors[0].shape
        for t in tensors:
            _check(t.ndim == 4 and t.shape == shape, f"source {i}: keys/values must share one B,H,L,D shape, got {[tuple(x.shape) for x in tensors]}")
            _check(t.dtype == q.dtype and t.device == q.device, f"source {i}: dtype/device {t.dtype}/{t.device} differ from q's {q.dtype}/{q.device}")
        _check(shape[0] in (1, b) and shape[1] == h and shape[3] == d, f"source {i}: shape {tuple(shape)} does not fit q {tuple(q.shape)} (B or 1, H, L, D)")
        if shape[2] == 0:
            continue
        tensors = [t.expand(b, -1, -1, -1) for t in tensors]
        if isinstance(src, KV):
            segments.append(KV(*tensors))
        else:
            segments.append(BlendedKV(*tensors, weight=_weight_tensor(src.weight, b, q)))
    _check(len(segments) > 0, "multi_source_attention needs at least one non-empty key/value segment")
    return segments


def _segment_kv(seg: KV | BlendedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The (materialized) keys and values of one segment, for the reference."""
    if isinstance(seg, KV):
        return seg.k, seg.v
    w = seg.weight.to(seg.k_a.dtype).view(-1, 1, 1, 1)
    return (1 - w) * seg.k_a + w * seg.k_b, (1 - w) * seg.v_a + w * seg.v_b


def multi_source_attention_reference(
    q: torch.Tensor, sources: Sequence[Source], *, scale: float | None = None
) -> torch.Tensor:
    """Plain-torch multi-source attention: blends, concatenates, then
    ``F.scaled_dot_product_attention`` (``softmax(q k^T * scale) v``, fused by torch where it can).

    Args:
        q: ``B,H,Lq,D`` queries (float32/float16/bfloat16/float64).
        sources: ``KV`` / ``BlendedKV`` / ``(k, v)`` segments, each ``B,H,Lk_i,D`` (``B`` may be 1).
        scale: the softmax scale, ``1/sqrt(D)`` by default.

    Returns:
        ``B,H,Lq,D`` in ``q``'s dtype, as torch's own attention computes it at that precision.
    """
    segments = _normalize_sources(q, sources)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    keys, values = zip(*(_segment_kv(s) for s in segments))
    k = torch.cat(keys, dim=-2)
    v = torch.cat(values, dim=-2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _triton_allowed(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(q: torch.Tensor, backend: str | None) -> bool:
    if backend is None or backend == "auto":
        return q.is_cuda
    if backend == "reference":
        return False
    if backend == "triton":
        if not _triton_allowed(q):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment to run "
                "Triton's CPU interpreter; pass backend=None to use the torch reference"
            )
        return True
    raise ValueError(f"backend must be None, 'auto', 'triton' or 'reference', got {backend!r}")


class _MultiSourceAttentionFunction(torch.autograd.Function):
    """Forward: the fused Triton kernel (also keeps the per-row log-sum-exp). Backward: the fused
    Triton backward (``backward="triton"``) or a recompute through the reference
    (``backward="reference"``)."""

    @staticmethod
    def forward(
        ctx: Any, scale: float, kinds: tuple[str, ...], backward: str, q: torch.Tensor, *flat: torch.Tensor
    ) -> torch.Tensor:
        from ._triton_attention import attention_forward

        segments = _unflatten(kinds, flat)
        out, lse = attention_forward(q, segments, scale)
        ctx.scale = scale
        ctx.kinds = kinds
        ctx.backward_kind = backward
        if backward == "triton":
            ctx.save_for_backward(q, out, lse, *flat)
        else:
            ctx.save_for_backward(q, *flat)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad[3:]
        if ctx.backward_kind == "triton":
            return (None, None, None, *_triton_backward(ctx, grad_out, needs))
        q, *flat = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip([q, *flat], needs)]
            out = multi_source_attention_reference(inputs[0], _unflatten(ctx.kinds, inputs[1:]), scale=ctx.scale)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
        result = [next(grads) if t.requires_grad else None for t in inputs]
        return (None, None, None, *result)


def _triton_backward(ctx: Any, grad_out: torch.Tensor, needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """Gradients of ``q`` and every flattened segment tensor through the fused Triton backward."""
    from ._triton_attention import attention_backward

    q, out, lse, *flat = ctx.saved_tensors
    segments = _unflatten(ctx.kinds, flat)
    needs_segments, per_segment, i = [], [], 1
    for kind in ctx.kinds:
        n = 2 if kind == "kv" else 5
        per_segment.append(needs[i : i + n])
        needs_segments.append(any(needs[i : i + n]))
        i += n
    dq, seg_grads = attention_backward(grad_out, q, out, lse, segments, ctx.scale, needs[0], needs_segments)
    result: list[torch.Tensor | None] = [dq]
    for grads, wanted in zip(seg_grads, per_segment):
        if grads is None:
            result.extend([None] * len(wanted))
        else:
            result.extend(g if w else None for g, w in zip(grads, wanted))
    return result


def _flatten(segments: list[KV | BlendedKV]) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    kinds, flat = [], []
    for seg in segments:
        if isinstance(seg, KV):
            kinds.append("kv")
            flat += [seg.k, seg.v]
        else:
            kinds.append("blend")
            flat += [seg.k_a, seg.v_a, seg.k_b, seg.v_b, seg.weight]
    return tuple(kinds), flat


def _unflatten(kinds: tuple[str, ...], flat: Sequence[torch.Tensor]) -> list[KV | BlendedKV]:
    segments: list[KV | BlendedKV] = []
    i = 0
    for kind in kinds:
        if kind == "kv":
            segments.append(KV(flat[i], flat[i + 1]))
            i += 2
        else:
            segments.append(BlendedKV(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], weight=flat[i + 4]))
            i += 5
    return segments


def multi_source_attention(
    q: torch.Tensor,
    sources: Sequence[Source],
    *,
    scale: float | None = None,
    backend: str | None = None,
    backward: str = "triton",
) -> torch.Tensor:
    """Attention of ``q`` over several key/value segments, as if concatenated along the sequence.

    Args:
        q: ``B,H,Lq,D`` queries, float32/float16/bfloat16 (float64 only on the reference path).
        sources: a sequence of ``KV`` / ``BlendedKV`` / ``(k, v)`` segments, each ``B,H,Lk_i,D``
            with ``q``'s dtype and device (a segment batch of 1 broadcasts).
        scale: the softmax scale, ``1/sqrt(D)`` by default.
        backend: ``None``/``"auto"`` (Triton for CUDA tensors, the reference otherwise),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"reference"``.
        backward: when the forward runs on Triton, how gradients are computed: ``"triton"``
            (default, the fused flash-attention-2 backward) or ``"reference"`` (recompute through
            :func:`multi_source_attention_reference`, materializing the scores). Ignored on the
            reference path, which torch differentiates.

    Returns:
        ``B,H,Lq,D`` in ``q``'s dtype; differentiable with respect to ``q``, every key/value and
        tensor blend weights.
    """
    _check(backward in ("triton", "reference"), f"backward must be 'triton' or 'reference', got {backward!r}")
    if not _use_triton(q, backend):
        return multi_source_attention_reference(q, sources, scale=scale)
    _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"the Triton kernel takes float32/float16/bfloat16, got {q.dtype}")
    segments = _normalize_sources(q, sources)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kinds, flat = _flatten(segments)
    return _MultiSourceAttentionFunction.apply(scale, kinds, backward, q, *flat)


class MultiSourceAttnProcessor:
    """A diffusers attention processor (``unet.set_attn_processor``) that attends to the layer's own
    keys/values plus extra segments through :func:`multi_source_attention`.

    Set before the forward pass:

    - ``extra_states``: a list of hidden states ``B,L,C`` (or ``B,C,H,W``) or
      :class:`BlendedStates`, projected with the layer's own ``to_k`` / ``to_v`` (and ``norm_k``).
    - ``extra_kv``: a list of already projected :class:`KV` / :class:`BlendedKV` (``B,heads,L,D``).

    Extra segments with batch 1 broadcast over the batch. With both lists empty this computes
    what diffusers' ``AttnProcessor2_0`` computes (attention masks are supported only then).

    Args:
        backend: passed to :func:`multi_source_attention` (``None`` = by device).
        backward: passed to :func:`multi_source_attention` (``"triton"``: the fused backward;
            ``"reference"``: recompute through the reference).
    """

    def __init__(self, backend: str | None = None, backward: str = "triton") -> None:
        self.backend = backend
        self.backward = backward
        self.extra_states: list[torch.Tensor | BlendedStates] = []
        self.extra_kv: list[KV | BlendedKV] = []

    def clear(self) -> None:
        """Empties ``extra_states`` and ``extra_kv``."""
        self.extra_states = []
        self.extra_kv = []

    @staticmethod
    def _project(attn: Any, states: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if states.ndim == 4:
            n, c, hh, ww = states.shape
            states = states.view(n, c, hh * ww).transpose(1, 2)
        _check(states.ndim == 3, f"extra_states entries must be B,L,C or B,C,H,W, got {tuple(states.shape)}")
        key = attn.to_k(states)
        value = attn.to_v(states)
        head_dim = key.shape[-1] // attn.heads
        n = states.shape[0]
        key = key.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, value

    def _extra_segments(self, attn: Any, batch: int) -> list[KV | BlendedKV]:
        segments: list[KV | BlendedKV] = []
        for states in self.extra_states:
            if isinstance(states, BlendedStates):
                k_a, v_a = self._project(attn, states.a, batch)
                k_b, v_b = self._project(attn, states.b, batch)
                segments.append(BlendedKV(k_a, v_a, k_b, v_b, states.weight))
            else:
                segments.append(KV(*self._project(attn, states, batch)))
        segments.extend(self.extra_kv)
        return segments

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        extra = self._extra_segments(attn, batch)
        if attention_mask is not None:
            _check(not extra, "MultiSourceAttnProcessor does not support attention masks together with extra sources")
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        else:
            extra = [self._match_dtype(s, query.dtype) for s in extra]
            hidden_states = multi_source_attention(
                query, [KV(key, value), *extra], scale=attn.scale, backend=self.backend, backward=self.backward
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _match_dtype(seg: KV | BlendedKV, dtype: torch.dtype) -> KV | BlendedKV:
        if isinstance(seg, KV):
            return KV(seg.k.to(dtype), seg.v.to(dtype))
        return BlendedKV(seg.k_a.to(dtype), seg.v_a.to(dtype), seg.k_b.to(dtype), seg.v_b.to(dtype), seg.weight)
