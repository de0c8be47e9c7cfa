"""The frozen Stable Diffusion v1.x backbone of Diff-Privacy, and tiny ones for tests.

A backbone directory has the diffusers layout of ``stable-diffusion-v1-5/stable-diffusion-v1-5``:
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/scheduler_config.json``.
The CLIP image encoder τ_θ (ViT-L/14, ``openai/clip-vit-large-patch14``) is read from
``image_encoder/`` + ``feature_extractor/`` inside that directory when present, else from its
own reference. References are local directories (offline) or hub ids read from the local
Hugging Face cache, downloaded only with ``allow_download=True``
(:func:`anonloader.methods.fams.weights.resolve_directory`).

Licences: Stable Diffusion v1.x weights are CreativeML OpenRAIL-M; CLIP's are MIT. The
Diff-Privacy authors publish their code without a licence; none of it is used here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anonloader.errors import ModelLoadError
from anonloader.fingerprint import hash_file
from anonloader.fingerprint import state_hash as module_digest  # re-exported: digests of in-memory networks
from anonloader.methods.fams.components import ClipInput
from anonloader.methods.fams.weights import (
    own_aligned_memory,
    resolve_directory,
    weight_files_digest,
)

from .schedule import NoiseSchedule, v_to_eps

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

__all__ = [
    "CLIP_MODEL_ID",
    "SD15_SCHEDULER_CONFIG",
    "SD_MODEL_ID",
    "Backbone",
    "build_tiny_backbone",
    "load_backbone",
    "module_digest",
    "save_backbone",
]

logger = logging.getLogger(__name__)

SD_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_MODEL_ID = "openai/clip-vit-large-patch14"

#: ``stable-diffusion-v1-5/scheduler/scheduler_config.json`` (PNDM there; the schedule is what
#: matters); tiny backbones use it, real ones read their own file.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

_SD_FOLDERS = ("unet", "vae", "text_encoder")


@dataclass(eq=False)
class Backbone:
    """Every frozen network Diff-Privacy runs.

    Attributes:
        unet: ε_θ, a ``UNet2DConditionModel`` (cross-attention width = the text encoder's).
        vae: ``AutoencoderKL``; E_nc / D_ec.
        text_encoder: ``CLIPTextModel``; C = last hidden state after the final layer norm.
        tokenizer: ``CLIPTokenizer``.
        image_encoder: ``CLIPVisionModel`` τ_θ (MSI reads its hidden states).
        clip_input: τ_θ's input preparation (shared with FAMS).
        scheduler_config: the ``scheduler_config.json`` dict; ``schedule`` its ᾱ table.
        digests: part name -> SHA-256 (weight files, or the in-memory state for tiny models).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    image_encoder: CLIPVisionModel
    clip_input: ClipInput = field(default_factory=ClipInput)
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))
    digests: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        for network in self.networks().values():
            network.eval().requires_grad_(False)
        if not self.digests:
            self.digests = {name: module_digest(net) for name, net in self.networks().items()}
            self.digests["tokenizer"] = hashlib.sha256(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "image_encoder": self.image_encoder}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backbone:
        for network in self.networks().values():
            if device is not None:
                network.to(device=device)
            if dtype is not None:
                network.to(dtype=dtype)
        return self

    def token_ids(self, prompt: str) -> torch.Tensor:
        """``max_length int64`` ids of ``prompt``, padded as SD pads (to 77 for the real encoder)."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt").input_ids
        return ids[0]

    def eps(self, z_t: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """ε̂ = ε_θ(z_t, t, C): ``B,4,h,w`` latents, ``B,L,D`` conditions -> ``B,4,h,w``
        (v-prediction converted to ε)."""
        out = self.unet(z_t, t, encoder_hidden_states=cond).sample
        if self.schedule.prediction_type == "v_prediction":
            out = v_to_eps(out, z_t, self.schedule.alpha(t))
        return out

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z0 = E_nc(x): ``B,3,S,S float in [0,1]`` -> ``B,4,S/f,S/f`` scaled latents (the
        posterior mean, so encoding is deterministic)."""
        posterior = self.vae.encode(images.to(self.dtype) * 2.0 - 1.0).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D_ec(z): ``B,4,h,w`` scaled latents -> ``B,3,h·f,w·f`` in about [0,1] (not
        clamped, so gradients flow; clamp for output)."""
        return (self.vae.decode(latents / self.vae.config.scaling_factor).sample + 1.0) / 2.0

    def clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``B,3,S,S float in [0,1]`` -> τ_θ's normalized input ``B,3,224,224`` (tiny: smaller)."""
        return self.clip_input(images).to(self.dtype)


# ---------------------------------------------------------------------------------- loading
def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Diff-Privacy {what}: cannot read {path} ({error})") from error


def _folder_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(hash_file(file).encode())
    return digest.hexdigest()


def locate_backbone(
    base_model: str | os.PathLike[str] = SD_MODEL_ID,
    clip_model: str | os.PathLike[str] = CLIP_MODEL_ID,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """The folders of every part and their digests, without loading a network.

    Raises:
        ModelLoadError: a part is missing, or would need a download ``allow_download`` forbids.
    """
    patterns = [f"{n}/*.json" for n in (*_SD_FOLDERS, "scheduler", "image_encoder", "feature_extractor")]
    patterns += [f"{n}/*.safetensors" for n in (*_SD_FOLDERS, "image_encoder")] + ["tokenizer/*"]
    root = resolve_directory(base_model, allow_patterns=patterns, allow_download=allow_download, what="Stable Diffusion v1.x backbone", cache_dir=cache_dir)
    dirs: dict[str, Path] = {}
    for name in (*_SD_FOLDERS, "tokenizer", "scheduler"):
        if not (root / name).is_dir():
            raise ModelLoadError(
                f"Diff-Privacy backbone: {root} has no {name}/ folder; expected the diffusers layout of "
                f"{SD_MODEL_ID} (unet, vae, text_encoder, tokenizer, scheduler)"
            )
        dirs[name] = root / name
    if (root / "image_encoder" / "config.json").is_file() and (root / "feature_extractor" / "preprocessor_config.json").is_file():
        dirs["image_encoder"], dirs["feature_extractor"] = root / "image_encoder", root / "feature_extractor"
    else:
        clip = resolve_directory(
            clip_model,
            allow_patterns=["config.json", "preprocessor_config.json", "model.safetensors"],
            allow_download=allow_download,
            what="CLIP image encoder",
            cache_dir=cache_dir,
        )
        dirs["image_encoder"] = dirs["feature_extractor"] = clip
    for name, file in (("scheduler", "scheduler_config.json"), ("feature_extractor", "preprocessor_config.json")):
        if not (dirs[name] / file).is_file():
            raise ModelLoadError(f"Diff-Privacy {name}: {dirs[name] / file} is missing")
    digests = {name: weight_files_digest(dirs[name], name) for name in (*_SD_FOLDERS, "image_encoder")}
    digests["tokenizer"] = _folder_digest(dirs["tokenizer"])
    return dirs, digests


def load_backbone(dirs: dict[str, Path], digests: dict[str, str], *, dtype: torch.dtype | None = None) -> Backbone:
    """Builds the frozen networks from :func:`locate_backbone`'s folders (CPU, aligned memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    hf_kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(dirs["unet"], **kwargs)
        vae = AutoencoderKL.from_pretrained(dirs["vae"], **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(dirs["text_encoder"], **hf_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(dirs["tokenizer"])
        image_encoder = CLIPVisionModel.from_pretrained(dirs["image_encoder"], **hf_kwargs)
    except Exception as error:
        raise ModelLoadError(f"Diff-Privacy: could not load the backbone from {sorted({str(p) for p in dirs.values()})}: {error}") from error
    for network in (unet, vae, text_encoder, image_encoder):
        own_aligned_memory(network)
    scheduler = {k: v for k, v in _read_json(dirs["scheduler"] / "scheduler_config.json", "scheduler").items() if not k.startswith("_")}
    clip_input = ClipInput.from_preprocessor_config(_read_json(dirs["feature_extractor"] / "preprocessor_config.json", "feature_extractor"))
    return Backbone(unet, vae, text_encoder, tokenizer, image_encoder, clip_input, scheduler, dict(digests))


def save_backbone(backbone: Backbone, directory: str | os.PathLike[str]) -> Path:
    """Writes the diffusers layout (plus ``image_encoder/`` and ``feature_extractor/``) that
    :func:`locate_backbone` reads back."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    backbone.unet.save_pretrained(root / "unet", safe_serialization=True)
    backbone.vae.save_pretrained(root / "vae", safe_serialization=True)
    backbone.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    backbone.tokenizer.save_pretrained(root / "tokenizer")
    backbone.image_encoder.save_pretrained(root / "image_encoder", safe_serialization=True)
    (root / "scheduler").mkdir(exist_ok=True)
    config = {"_class_name": "DDIMScheduler", **backbone.scheduler_config}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    (root / "feature_extractor").mkdir(exist_ok=True)
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(backbone.clip_input.to_preprocessor_config(), indent=2))
    return root


# ---------------------------------------------------------------------------------- tiny
def _byte_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: 256 printable characters, one per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer built offline: the byte-level alphabet, each character also with
    the end-of-word mark ``</w>``, no merges (every word is spelled out), and CLIP's two
    special tokens (ids 512, 513). ``"*"`` is one token (``*</w>``), as in the real vocabulary."""
    from transformers import CLIPTokenizer

    alphabet = _byte_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_backbone(seed: int = 0, *, resolution: int = 32) -> Backbone:
    """SD v1.5's structure at tiny sizes (CPU, milliseconds per UNet call).

    UNet: SD v1.5's blocks (three ``CrossAttnDownBlock2D`` + ``DownBlock2D``, mirrored up,
    ``layers_per_block=2``, conv projections in the transformers) at 8/8/16/16 channels; VAE with
    2 levels (latents at 1/2 resolution: the real one has 4, 1/8); CLIP text encoder 2 layers,
    width 16, 77 positions; CLIP vision 5 layers, width 24, ``resolution`` px input. The VAE's
    ``scaling_factor`` is set so its latents have unit variance, as SD's 0.18215 does.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    tokenizer = build_tiny_tokenizer()
    text_width = 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=text_width,
        norm_num_groups=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=resolution,
    )
    # SD's scaling factor makes the latents unit-variance (0.18215 for its VAE); do the same for
    # the random tiny VAE, measured on seeded noise images
    with torch.no_grad():
        probe = torch.rand(4, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))
        vae.register_to_config(scaling_factor=float(1.0 / vae.encode(probe * 2 - 1).latent_dist.mean.std()))
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=text_width,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2, image_size=resolution, patch_size=8)
    )
    clip_input = ClipInput(size=resolution, crop_size=resolution)
    return Backbone(unet, vae, text_encoder, tokenizer, image_encoder, clip_input, dict(SD15_SCHEDULER_CONFIG))
