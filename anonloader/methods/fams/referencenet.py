"""The ReferenceNet: a UNet of the denoiser's structure whose self-attention inputs are kept.

FAMS (paper fig. 2) runs two ReferenceNets, one on the source image and one on the driving
image, once per image at timestep 0. At each self-attention layer of a ReferenceNet the hidden
states entering the layer (after the block's first norm) are recorded; the denoising UNet's
self-attention layer of the same name later attends to them as extra keys and values.

The released checkpoints store each ReferenceNet as a diffusers ``UNet2DConditionModel`` with
the same module names (their config says ``ReferenceNetModel``); :class:`ReferenceNet` wraps
such a model and records the states with an attention processor, so nothing is monkeypatched.

Which recorded state each UNet self-attention layer receives is the *routing*
(:func:`reference_layer_map`):

- ``"released"`` (default; what the released weights were trained with): the authors' code hands
  every attention module of a UNet block the whole tuple of the ReferenceNet block's states
  (all its attention modules' transformer blocks, in forward order), and each transformer block
  takes the element with its own transformer-block number. With Stable Diffusion 2.1's one
  transformer block per attention module, every self-attention layer of a block receives the
  state of the block's *first* attention module (``attentions.0``): of an SD 2.1 UNet's 16
  self-attention layers, 9 attend to another layer's state than the one with their name. The
  paper's prose ("input states for corresponding attention modules") reads like name routing;
  the released code is the contract here. Blocks pair up by their order among the blocks with
  attention (the released code counts down blocks among all down blocks, which is the same for
  every UNet whose attention blocks come first, as SD 2.1's do).
- ``"by_name"``: each layer receives the state of the ReferenceNet layer with its own name. Only
  for checkpoints trained with it (anonloader records the routing in ``fams_config.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

__all__ = ["ROUTINGS", "ReferenceNet", "ReferenceStateRecorder", "reference_layer_map", "self_attention_names"]

#: The reference-state routings (see the module docstring).
ROUTINGS = ("released", "by_name")


def self_attention_names(model: torch.nn.Module) -> list[str]:
    """Module names of the self-attention layers (``attn1`` of every transformer block) of a
    diffusers UNet, in forward order; the keys under which reference states are exchanged."""
    from diffusers.models.attention import BasicTransformerBlock

    names = []
    for name, module in model.named_modules():
        if isinstance(module, BasicTransformerBlock):
            names.append(f"{name}.attn1")
    return names


def _attention_blocks(model: torch.nn.Module) -> dict[str, list[list[str]]]:
    """Per part (``down``, ``mid``, ``up``), the blocks with attention in forward order, each as
    its self-attention layer names per attention module (``[[attentions.0 ...], [attentions.1 ...]]``)."""
    from diffusers.models.attention import BasicTransformerBlock

    parts: dict[str, list[list[str]]] = {"down": [], "mid": [], "up": []}
    blocks: list[tuple[str, str, Any]] = [("down", f"down_blocks.{i}", b) for i, b in enumerate(getattr(model, "down_blocks", []))]
    if getattr(model, "mid_block", None) is not None:
        blocks.append(("mid", "mid_block", model.mid_block))
    blocks += [("up", f"up_blocks.{i}", b) for i, b in enumerate(getattr(model, "up_blocks", []))]
    for part, prefix, block in blocks:
        attentions = getattr(block, "attentions", None)
        if not attentions:
            continue
        per_attention = []
        for a, attention in enumerate(attentions):
            names = [
                f"{prefix}.attentions.{a}.{name}.attn1"
                for name, module in attention.named_modules()
                if isinstance(module, BasicTransformerBlock)
            ]
            per_attention.append(names)
        parts[part].append(per_attention)
    return parts


def reference_layer_map(model: torch.nn.Module, routing: str = "released") -> dict[str, str]:
    """Which ReferenceNet layer's state each self-attention layer of a UNet receives.

    Args:
        model: the denoising UNet (the ReferenceNets have its structure).
        routing: ``"released"`` (the authors' code) or ``"by_name"`` (see the module docstring).

    Returns:
        UNet self-attention layer name -> ReferenceNet self-attention layer name, for every name of
        :func:`self_attention_names`, in forward order.

    Raises:
        ValueError: an unknown routing, or a UNet whose self-attention layers sit outside its
            down/mid/up attention blocks.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"FAMS reference routing must be one of {ROUTINGS}, got {routing!r}")
    names = self_attention_names(model)
    if routing == "by_name":
        return {name: name for name in names}
    mapping: dict[str, str] = {}
    for blocks in _attention_blocks(model).values():
        for block in blocks:
            flat = [name for attention in block for name in attention]  # the block's tuple of states
            for attention in block:
                for number, name in enumerate(attention):  # ``number``: the transformer block's
                    mapping[name] = flat[number]
    if set(mapping) != set(names):
        missing = sorted(set(names) - set(mapping))[:3]
        raise ValueError(f"FAMS reference routing: self-attention layers outside the UNet's attention blocks: {missing}")
    return {name: mapping[name] for name in names}


class ReferenceStateRecorder:
    """A diffusers attention processor that stores the hidden states entering the layer in
    ``states[name]`` and then computes plain scaled-dot-product attention."""

    def __init__(self, name: str, states: dict[str, torch.Tensor]) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.name = name
        self.states = states
        self.attention = AttnProcessor2_0()

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
        self.states[self.name] = hidden_states
        return self.attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceNet(torch.nn.Module):
    """Wraps a ``UNet2DConditionModel`` and returns its self-attention input states.

    Args:
        model: the ReferenceNet weights (same structure as the denoising UNet).
    """

    def __init__(self, model: UNet2DConditionModel) -> None:
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.model = model
        self._recorded: dict[str, torch.Tensor] = {}
        self.layer_names = self_attention_names(model)
        wanted = set(self.layer_names)
        processors: dict[str, Any] = {}
        for key in model.attn_processors:
            layer = key[: -len(".processor")]
            processors[key] = ReferenceStateRecorder(layer, self._recorded) if layer in wanted else AttnProcessor2_0()
        model.set_attn_processor(processors)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, latents: torch.Tensor, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference states of a batch.

        Args:
            latents: ``B,4,h,w`` VAE latents (already multiplied by the VAE scaling factor).
            image_embeds: ``B,T,C`` cross-attention tokens (FAMS: ``T = 1``, the pooled CLIP
                image embedding of the same image, scaled by ``1 - d`` for the source).

        Returns:
            layer name -> ``B,L,C`` hidden states entering that self-attention layer, for every
            name in :attr:`layer_names`. Computed at timestep 0, as the authors do.
        """
        self._recorded.clear()
        timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=torch.long)
        try:
            self.model(latents, timestep, encoder_hidden_states=image_embeds, return_dict=False)
            states = {name: self._recorded[name] for name in self.layer_names}
        finally:
            self._recorded.clear()
        return states

    def attention_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the transformer blocks (self-attention, cross-attention, their norms and
        feed-forward): what FAMS trains in a ReferenceNet."""
        from diffusers.models.attention import BasicTransformerBlock

        params: list[torch.nn.Parameter] = []
        for module in self.model.modules():
            if isinstance(module, BasicTransformerBlock):
                params.extend(module.parameters())
        return params
