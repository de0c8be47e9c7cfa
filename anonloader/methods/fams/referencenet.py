"""The ReferenceNet: a UNet of the denoiser's structure whose self-attention inputs are kept.

FAMS (paper fig. 2) runs two ReferenceNets, one on the source image and one on the driving
image, once per image at timestep 0. At each self-attention layer of a ReferenceNet the hidden
states entering the layer (after the block's first norm) are recorded; the denoising UNet's
self-attention layer of the same name later attends to them as extra keys and values.

The released checkpoints store each ReferenceNet as a diffusers ``UNet2DConditionModel`` with
the same module names (their config says ``ReferenceNetModel``); :class:`ReferenceNet` wraps
such a model and records the states with an attention processor, so nothing is monkeypatched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

__all__ = ["ReferenceNet", "ReferenceStateRecorder", "self_attention_names"]


def self_attention_names(model: torch.nn.Module) -> list[str]:
    """Module names of the self-attention layers (``attn1`` of every transformer block) of a
    diffusers UNet, in forward order; the keys under which reference states are exchanged."""
    from diffusers.models.attention import BasicTransformerBlock

    names = []
    for name, module in model.named_modules():
        if isinstance(module, BasicTransformerBlock):
            names.append(f"{name}.attn1")
    return names


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
