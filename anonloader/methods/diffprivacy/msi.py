"""The multi-scale image inversion module (MSI, paper sec. 2.2, eqs. 5-7).

For a face crop ``x``, the frozen CLIP image encoder τ_θ gives hidden states; MSI reads the class
token of 5 evenly spaced layers (``layers``, 1-based indices into ``hidden_states``; ViT-L/14's
24 layers: 5, 10, 14, 19, 24), maps each with its own ``Linear`` to the text width, modulates the
5 vectors with the stage's time embedding (sinusoidal(t_i) -> MLP -> 5 vectors, elementwise
product), pools them with one attention layer (a learned query over the 5 tokens) and returns one
pseudo-word per stage i = 0..9 at ``t_i = 100·i + 50``. The pseudo-word replaces the token ``*``
in ``"a photo of *"``; the frozen CLIP text encoder turns that into C^i (``77×768`` for SD v1.x).
``C_t = C^{t//100}``; UC is the encoding of ``""``.

Choices the paper leaves open (documented, ours): each class token passes through τ_θ's own
frozen ``post_layernorm`` first (intermediate layers' scales differ by orders of magnitude); the
modulation is ``h ⊙ (1 + MLP(emb(t)))`` with the MLP's last layer zero-initialised, so training
starts from plain projections; the pooled vector goes through a LayerNorm and a Linear and is added
to the embedding of ``*`` itself, so an untrained MSI yields the prompt "a photo of *".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from anonloader.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .backbone import Backbone

__all__ = [
    "MSI",
    "PROMPT",
    "PromptSlot",
    "clip_class_tokens",
    "default_layers",
    "encode_stage_words",
    "prompt_slot",
    "stage_index",
    "stage_timesteps",
    "unconditional_embedding",
]

PROMPT = "a photo of *"
PLACEHOLDER = "*"


def default_layers(num_hidden_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` evenly spaced 1-based layer indices ending at the last layer:
    ``round(L·(i+1)/count)`` (ViT-L/14's 24 -> 5, 10, 14, 19, 24; 5 -> 1..5)."""
    if num_hidden_layers < count:
        raise ConfigError(f"MSI needs at least {count} CLIP image layers, the encoder has {num_hidden_layers}")
    return tuple(round(num_hidden_layers * (i + 1) / count) for i in range(count))


def stage_timesteps(num_stages: int = 10, num_train_timesteps: int = 1000) -> list[int]:
    """The timestep each stage's embedding is made for: ``t_i = (T/n)·i + T/(2n)`` (100i + 50)."""
    width = num_train_timesteps // num_stages
    return [width * i + width // 2 for i in range(num_stages)]


def stage_index(t: int, num_stages: int = 10, num_train_timesteps: int = 1000) -> int:
    """``t // 100`` for T = 1000 and 10 stages (the stage whose C serves timestep ``t``)."""
    return min(max(int(t), 0) * num_stages // num_train_timesteps, num_stages - 1)


def sinusoidal(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """``N`` timesteps -> ``N,dim`` sinusoidal embeddings (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / max(half, 1))
    angles = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class MSI(ModelMixin, ConfigMixin):
    """The trainable part of Diff-Privacy.

    Args:
        vision_width: τ_θ's hidden size (ViT-L/14: 1024).
        text_width: the text encoder's hidden size (SD v1.x: 768).
        layers: 1-based indices of τ_θ's hidden states whose class token is read (5 of them).
        num_heads: heads of the pooling attention (must divide ``text_width``).
        num_stages, num_train_timesteps: 10 stages over T = 1000.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vision_width: int = 1024,
        text_width: int = 768,
        layers: Sequence[int] = (5, 10, 14, 19, 24),
        num_heads: int = 8,
        num_stages: int = 10,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if text_width % num_heads:
            raise ConfigError(f"MSI num_heads={num_heads} must divide text_width={text_width}")
        count = len(layers)
        self.projections = nn.ModuleList(nn.Linear(vision_width, text_width) for _ in range(count))
        self.time_mlp = nn.Sequential(nn.Linear(text_width, text_width), nn.SiLU(), nn.Linear(text_width, count * text_width))
        nn.init.zeros_(self.time_mlp[2].weight)
        nn.init.zeros_(self.time_mlp[2].bias)
        self.query = nn.Parameter(torch.randn(1, 1, text_width) * text_width**-0.5)
        self.attention = nn.MultiheadAttention(text_width, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(text_width)
        self.out = nn.Linear(text_width, text_width)
        nn.init.normal_(self.out.weight, std=0.02 * text_width**-0.5)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor, timesteps: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Pseudo-words for each face and stage.

        Args:
            features: ``B,K,Dv`` class tokens of the K (=5) chosen layers (:func:`clip_class_tokens`).
            timesteps: ``S`` or ``B,S`` stage timesteps (e.g. 50, 150, ..., 950).
            anchor: ``Dt`` the token embedding of ``*`` (added to every word).

        Returns:
            ``B,S,Dt`` pseudo-words in the text encoder's token-embedding space.
        """
        batch, count, _ = features.shape
        if timesteps.ndim == 1:
            timesteps = timesteps[None].expand(batch, -1)
        stages = timesteps.shape[1]
        width = self.config.text_width
        h = torch.stack([proj(features[:, k]) for k, proj in enumerate(self.projections)], dim=1)  # B,K,Dt
        emb = sinusoidal(timesteps.reshape(-1), width).to(h.dtype)  # B*S,Dt
        modulation = 1.0 + self.time_mlp(emb).view(batch, stages, count, width)
        tokens = (h[:, None] * modulation).reshape(batch * stages, count, width)
        query = self.query.to(h.dtype).expand(batch * stages, -1, -1)
        pooled, _ = self.attention(query, tokens, tokens, need_weights=False)
        words = self.out(self.norm(pooled[:, 0]))
        return words.view(batch, stages, width) + anchor.to(words.dtype)


def clip_class_tokens(backbone: Backbone, images: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """``B,3,S,S float in [0,1]`` crops -> ``B,K,Dv`` class tokens of τ_θ's hidden states
    ``layers`` (1-based), each through τ_θ's frozen ``post_layernorm``. No gradient."""
    vision = backbone.image_encoder
    with torch.no_grad():
        pixels = backbone.clip_pixels(images)
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        if max(layers) >= len(hidden):
            raise ConfigError(f"MSI layers {tuple(layers)} exceed the CLIP image encoder's {len(hidden) - 1} layers")
        norm = getattr(vision, "vision_model", vision).post_layernorm
        return torch.stack([norm(hidden[i][:, 0]) for i in layers], dim=1)


class PromptSlot:
    """The tokenized prompt and where its placeholder sits: ``ids`` ``L int64``, ``position``."""

    def __init__(self, ids: torch.Tensor, position: int, anchor_id: int) -> None:
        self.ids, self.position, self.anchor_id = ids, position, anchor_id


def prompt_slot(backbone: Backbone, prompt: str = PROMPT) -> PromptSlot:
    """Tokenizes ``prompt`` and finds the single token of ``*`` in it."""
    ids = backbone.token_ids(prompt)
    star = backbone.tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids
    if len(star) != 1:
        raise ConfigError(f"the tokenizer splits {PLACEHOLDER!r} into {len(star)} tokens; MSI needs one")
    where = (ids == star[0]).nonzero().flatten()
    if len(where) != 1:
        raise ConfigError(f"the prompt {prompt!r} must hold {PLACEHOLDER!r} exactly once")
    return PromptSlot(ids, int(where[0]), int(star[0]))


@contextmanager
def _replace_token(backbone: Backbone, position: int, words: torch.Tensor) -> Iterator[None]:
    """While active, the text encoder's token embedding at ``position`` is ``words`` (``N,Dt``)."""
    embedding = backbone.text_encoder.get_input_embeddings()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        word = words.to(output.dtype)[:, None]
        return torch.cat([output[:, :position], word, output[:, position + 1 :]], dim=1)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def anchor_embedding(backbone: Backbone, slot: PromptSlot) -> torch.Tensor:
    """``Dt`` the token embedding of ``*`` (frozen)."""
    return backbone.text_encoder.get_input_embeddings().weight[slot.anchor_id].detach()


def encode_stage_words(backbone: Backbone, slot: PromptSlot, words: torch.Tensor) -> torch.Tensor:
    """C from pseudo-words: ``...,Dt`` words -> ``...,L,Dt`` (``L`` = 77 for SD v1.x), the text
    encoder's last hidden state (after its final layer norm) for the prompt with ``*`` replaced.
    Differentiable in ``words``."""
    lead = words.shape[:-1]
    flat = words.reshape(-1, words.shape[-1])
    ids = slot.ids.to(flat.device)[None].expand(flat.shape[0], -1)
    with _replace_token(backbone, slot.position, flat):
        states = backbone.text_encoder(input_ids=ids).last_hidden_state
    return states.reshape(*lead, *states.shape[1:])


def unconditional_embedding(backbone: Backbone) -> torch.Tensor:
    """UC: ``1,L,Dt`` encoding of the empty prompt."""
    ids = backbone.token_ids("").to(backbone.device)[None]
    with torch.no_grad():
        return backbone.text_encoder(input_ids=ids).last_hidden_state
