"""Routing the ReferenceNets' states into the denoising UNet's self-attention.

In every self-attention layer of the UNet the keys and values are the UNet's own ``N`` tokens
followed by the source and driving ReferenceNets' ``N`` tokens each (paper fig. 2). The
authors' code concatenates the three into ``3N`` tokens, uses all of them as queries and keeps
the first third of the output. Here the UNet's own ``N`` queries attend to the ``3N`` keys and
values through :class:`anonloader.kernels.attention.MultiSourceAttnProcessor` (Triton on CUDA):
the same rows, a third of the query work, and the concatenation is never allocated.

The anonymization blend of the source states (paper eq. 2, ``S' = (1 - d) S_cond + d S_uncond``)
is handed to the kernel as :class:`~anonloader.kernels.attention.BlendedKV` (or
:class:`~anonloader.kernels.attention.BlendedStates` while training), so ``S'`` is never
materialized either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch

from anonloader.errors import MethodError
from anonloader.kernels.attention import KV, BlendedKV, BlendedStates, MultiSourceAttnProcessor

from .referencenet import self_attention_names

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

__all__ = [
    "ReferenceSource",
    "clear_reference_states",
    "install_reference_attention",
    "project_reference_states",
    "route_reference_kv",
    "route_reference_states",
]

#: One layer's extra segment: plain hidden states ``B,L,C``, or a blend of two.
ReferenceSource = Union[torch.Tensor, BlendedStates]


def install_reference_attention(unet: UNet2DConditionModel, *, backend: str | None = None) -> dict[str, MultiSourceAttnProcessor]:
    """Puts a :class:`MultiSourceAttnProcessor` on every self-attention layer of ``unet`` (and
    diffusers' plain processor elsewhere).

    Returns:
        layer name (``...transformer_blocks.k.attn1``) -> its processor, in forward order.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    names = self_attention_names(unet)
    wanted = set(names)
    installed: dict[str, MultiSourceAttnProcessor] = {}
    processors: dict[str, Any] = {}
    for key in unet.attn_processors:
        layer = key[: -len(".processor")]
        if layer in wanted:
            installed[layer] = MultiSourceAttnProcessor(backend=backend)
            processors[key] = installed[layer]
        else:
            processors[key] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return {name: installed[name] for name in names}


def _check_layers(processors: Mapping[str, Any], sources: Sequence[Mapping[str, Any]]) -> None:
    for i, source in enumerate(sources):
        if set(source) != set(processors):
            missing = sorted(set(processors) - set(source))[:3]
            extra = sorted(set(source) - set(processors))[:3]
            raise MethodError(
                f"reference source {i} does not match the UNet's self-attention layers (missing {missing}, "
                f"unexpected {extra}); the ReferenceNets must have the denoising UNet's structure"
            )


def route_reference_states(
    processors: Mapping[str, MultiSourceAttnProcessor], sources: Sequence[Mapping[str, ReferenceSource]]
) -> None:
    """Sets, on every self-attention layer, the extra hidden states it attends to besides its own.

    Args:
        processors: from :func:`install_reference_attention`.
        sources: per source (FAMS: source ReferenceNet, then driving ReferenceNet) a mapping
            layer name -> ``B,L,C`` states or :class:`BlendedStates` (batch ``B`` equal to the
            UNet's batch, or 1 to broadcast). The layer projects them with its own ``to_k`` /
            ``to_v`` at every call (what training needs: the states carry gradients).
    """
    _check_layers(processors, sources)
    for name, processor in processors.items():
        processor.extra_kv = []
        processor.extra_states = [source[name] for source in sources]


def _project(attn: Any, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B,L,C`` states -> keys and values ``B,heads,L,D`` with the layer's own projections. States
    broadcast over the batch (stride 0, e.g. the null states) are projected once and expanded."""
    if states.shape[0] > 1 and states.stride(0) == 0:
        key, value = _project(attn, states[:1])
        return key.expand(states.shape[0], -1, -1, -1), value.expand(states.shape[0], -1, -1, -1)
    key = attn.to_k(states)
    value = attn.to_v(states)
    batch, length, inner = key.shape
    head_dim = inner // attn.heads
    key = key.view(batch, length, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, length, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def project_reference_states(
    unet: UNet2DConditionModel, sources: Sequence[Mapping[str, ReferenceSource]]
) -> list[dict[str, KV | BlendedKV]]:
    """Projects reference states to keys/values once, with each UNet layer's ``to_k`` / ``to_v``.

    During sampling the reference states do not change from step to step, so projecting them
    once (instead of at each of the ~200 steps) saves ``2 * 2 * 3N * C^2`` multiply-adds per layer
    and step. A :class:`BlendedStates` becomes a :class:`BlendedKV` (the blend commutes with the
    affine projection because its weights sum to one), still blended only inside the kernel.

    Returns:
        per source, layer name -> :class:`KV` or :class:`BlendedKV` (``B,heads,L,D``).
    """
    modules = dict(unet.named_modules())
    projected: list[dict[str, KV | BlendedKV]] = []
    for source in sources:
        layers: dict[str, KV | BlendedKV] = {}
        for name, states in source.items():
            attn = modules[name]
            if isinstance(states, BlendedStates):
                k_a, v_a = _project(attn, states.a)
                k_b, v_b = _project(attn, states.b)
                layers[name] = BlendedKV(k_a, v_a, k_b, v_b, states.weight)
            else:
                layers[name] = KV(*_project(attn, states))
        projected.append(layers)
    return projected


def route_reference_kv(
    processors: Mapping[str, MultiSourceAttnProcessor], sources: Sequence[Mapping[str, KV | BlendedKV]]
) -> None:
    """Like :func:`route_reference_states` with keys/values from :func:`project_reference_states`."""
    _check_layers(processors, sources)
    for name, processor in processors.items():
        processor.extra_states = []
        processor.extra_kv = [source[name] for source in sources]


def clear_reference_states(processors: Mapping[str, MultiSourceAttnProcessor]) -> None:
    """Back to plain self-attention on every layer (and drops the references to the states)."""
    for processor in processors.values():
        processor.clear()
