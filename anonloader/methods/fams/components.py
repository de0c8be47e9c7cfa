"""The parts of a FAMS model and how tiny ones are built for tests and CPU users.

``FAMSComponents`` holds the denoising UNet, the source ReferenceNet (``referencenet``), the
driving ReferenceNet (``conditioning_referencenet``), the VAE, the CLIP image encoder with its
input settings, and the scheduler's configuration. Loading released weights and saving our own
lives in :mod:`anonloader.methods.fams.weights`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .attention import install_reference_attention
from .referencenet import ROUTINGS, ReferenceNet, reference_layer_map

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel

__all__ = ["ClipInput", "FAMSComponents", "SD21_SCHEDULER_CONFIG", "build_tiny_components", "state_digest"]

#: The noise schedule of Stable Diffusion 2.1 (``stabilityai/stable-diffusion-2-1/scheduler``),
#: which FAMS was trained with; used for tiny models (released weights read their own file).
SD21_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}


@dataclass(frozen=True)
class ClipInput:
    """How crops are prepared for the CLIP image encoder: exactly what the authors' pipeline gets
    from ``CLIPImageProcessor`` (transformers 4.46, the PIL path, ``do_rescale=False``) when it is
    handed float images in ``[0, 1]``.

    Per image: ``uint8 = trunc(float32(float64(x) * 255))`` (transformers' ``to_pil_image``;
    an image whose values are all integers, i.e. only 0 and 1, is cast without the ``* 255``, as
    there), a PIL bicubic resize of the shortest side to ``size``, back to float with
    ``float32(float64(v) / 255)`` (not for the all-integer image), centre crop to ``crop_size``,
    then ``(x - mean) / std`` in float32. Values outside ``[0, 1]`` are clamped first (the
    processor would refuse them). Runs on the CPU (a few milliseconds per face).
    """

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_preprocessor_config(cls, config: Mapping[str, Any]) -> ClipInput:
        """From a ``preprocessor_config.json`` dict (``size`` / ``crop_size`` as ints or dicts)."""
        size = config.get("size", 224)
        if isinstance(size, Mapping):
            size = size.get("shortest_edge", size.get("height", 224))
        crop = config.get("crop_size", size)
        if isinstance(crop, Mapping):
            crop = crop.get("height", size)
        return cls(
            size=int(size),
            crop_size=int(crop),
            mean=tuple(float(x) for x in config.get("image_mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in config.get("image_std", cls.std)),  # type: ignore[arg-type]
        )

    def to_preprocessor_config(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` dict ``CLIPImageProcessor`` reads."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the shortest-side resize (transformers' rounding: ``int``)."""
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def _one(self, image: np.ndarray) -> np.ndarray:
        """``H,W,3 float32 in [0,1]`` -> ``3,crop,crop float32`` (before normalization)."""
        from PIL import Image

        integral = bool(np.allclose(image, image.astype(int)))
        if integral:
            pixels = image.astype(np.uint8)
        else:
            pixels = (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
        height, width = self.resized_size(*image.shape[:2])
        resized = np.asarray(Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.BICUBIC))
        out = resized.transpose(2, 0, 1)
        out = out.astype(np.float32) if integral else (out.astype(np.float64) * (1 / 255)).astype(np.float32)
        top = (height - self.crop_size) // 2
        left = (width - self.crop_size) // 2
        return out[:, top : top + self.crop_size, left : left + self.crop_size]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``B,3,H,W float in [0,1]`` -> ``B,3,crop_size,crop_size float32`` normalized pixel
        values, on ``images``' device."""
        if min(self.resized_size(*images.shape[-2:])) < self.crop_size:
            raise ValueError(f"CLIP input: crop {self.crop_size} is larger than the resized image {self.resized_size(*images.shape[-2:])}")
        array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        pixels = torch.from_numpy(np.stack([self._one(image) for image in array]))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(images.device)


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes), for models that
    live only in memory; models loaded from files are fingerprinted by their files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@dataclass(eq=False)
class FAMSComponents:
    """Every network FAMS runs, plus the settings that go with them.

    Attributes:
        unet: the denoising ``UNet2DConditionModel``; its self-attention layers get
            :class:`~anonloader.kernels.attention.MultiSourceAttnProcessor` (``processors``).
        referencenet: source ReferenceNet (identity).
        conditioning_referencenet: driving ReferenceNet (pose, expression, background).
        vae: ``AutoencoderKL``.
        image_encoder: ``CLIPVisionModel``; its pooled output conditions the cross-attention.
        clip_input: the image encoder's input preparation.
        scheduler_config: the DDPM noise schedule (``DDPMScheduler`` / ``DDIMScheduler`` config).
        attention_backend: for the multi-source attention kernel (``None``: Triton on CUDA).
        reference_routing: which ReferenceNet state each UNet self-attention layer receives:
            ``"released"`` (the authors' code, what their weights were trained with) or
            ``"by_name"`` (see :mod:`anonloader.methods.fams.referencenet`); ``layer_map`` holds
            the resulting UNet layer -> ReferenceNet layer names.
    """

    unet: UNet2DConditionModel
    referencenet: ReferenceNet
    conditioning_referencenet: ReferenceNet
    vae: AutoencoderKL
    image_encoder: CLIPVisionModel
    clip_input: ClipInput = field(default_factory=ClipInput)
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SD21_SCHEDULER_CONFIG))
    attention_backend: str | None = None
    reference_routing: str = "released"

    def __post_init__(self) -> None:
        if self.reference_routing not in ROUTINGS:
            raise ValueError(f"FAMS reference_routing must be one of {ROUTINGS}, got {self.reference_routing!r}")
        self.processors = install_reference_attention(self.unet, backend=self.attention_backend)
        self.layer_map = reference_layer_map(self.unet, self.reference_routing)
        for net in (self.referencenet, self.conditioning_referencenet):
            if not set(self.layer_map.values()) <= set(net.layer_names):
                raise ValueError("FAMS: the ReferenceNets must have the denoising UNet's structure (self-attention layers differ)")
        self._null_states: dict[tuple, dict[str, torch.Tensor]] = {}

    def route(self, states: Mapping[str, Any]) -> dict[str, Any]:
        """ReferenceNet states (ReferenceNet layer name -> ``B,L,C``) -> the states each UNet
        self-attention layer receives (UNet layer name -> ``B,L,C``; with ``"released"`` routing
        several layers share one tensor)."""
        return {layer: states[reference] for layer, reference in self.layer_map.items()}

    def source_states(self, latents: torch.Tensor, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The source ReferenceNet's states, routed to the UNet's layers (see :meth:`route`).

        Args:
            latents: ``B,4,h,w`` scaled VAE latents; image_embeds: ``B,1,C`` CLIP embeddings.
        """
        return self.route(self.referencenet(latents, image_embeds))

    def driving_states(self, latents: torch.Tensor, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The driving ReferenceNet's states, routed to the UNet's layers (see :meth:`route`)."""
        return self.route(self.conditioning_referencenet(latents, image_embeds))

    def networks(self) -> dict[str, torch.nn.Module]:
        """Name (the checkpoint's subfolder) -> network."""
        return {
            "unet": self.unet,
            "referencenet": self.referencenet,
            "conditioning_referencenet": self.conditioning_referencenet,
            "vae": self.vae,
            "image_encoder": self.image_encoder,
        }

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FAMSComponents:
        """Moves every network (in place) and forgets cached null states; returns ``self``."""
        for network in self.networks().values():
            current = next(network.parameters())
            if device is not None and current.device != torch.device(device):
                network.to(device=device)
            if dtype is not None and current.dtype != dtype:
                network.to(dtype=dtype)
        self._null_states.clear()
        return self

    def eval(self) -> FAMSComponents:
        for network in self.networks().values():
            network.eval()
        return self

    def clear_cache(self) -> None:
        """Forgets the cached null states; call after changing the source ReferenceNet (training
        steps, other weights or processors)."""
        self._null_states.clear()

    def null_states(self, latent_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The source ReferenceNet's states for "no source" (zero latents, zero image embedding):
        ``S_uncond`` of paper eq. 2 and the source half of the unconditional CFG branch, routed to
        the UNet's layers (UNet layer name -> ``1,L,C``). They do not depend on the image, so they
        are computed once per latent size and reused (batch 1)."""
        key = (tuple(latent_size), self.device, self.dtype)
        if key not in self._null_states:
            channels = self.referencenet.config.in_channels
            tokens_dim = self.unet.config.cross_attention_dim
            latents = torch.zeros(1, channels, *latent_size, device=self.device, dtype=self.dtype)
            embeds = torch.zeros(1, 1, tokens_dim, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                self._null_states[key] = self.source_states(latents, embeds)
        return self._null_states[key]


def _tiny_unet(seed: int, cross_attention_dim: int, sample_size: int) -> UNet2DConditionModel:
    """Stable Diffusion 2.1's block structure (``layers_per_block=2``: two attention modules per
    down block, three per up block, one transformer block each; linear projections), tiny sizes."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        use_linear_projection=True,
    )


def tiny_unet_config(sample_size: int = 8, cross_attention_dim: int = 16) -> dict[str, Any]:
    """The tiny UNet's ``config.json`` fields (for tests that write checkpoint directories)."""
    return dict(_tiny_unet(0, cross_attention_dim, sample_size).config)


def build_tiny_components(seed: int = 0, *, resolution: int = 16, reference_routing: str = "released") -> FAMSComponents:
    """A FAMS of the real structure with tiny random networks (CPU, milliseconds per step):
    UNet and ReferenceNets with SD 2.1's block structure at 8/16 channels, a 2-level VAE (latents
    at 1/2 resolution) and a one-layer CLIP vision tower with 16-d pooled output. ``seed`` fixes
    every weight."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip_dim = 16
    latent = resolution // 2
    unet = _tiny_unet(seed, clip_dim, latent)
    referencenet = ReferenceNet(_tiny_unet(seed + 1, clip_dim, latent))
    conditioning_referencenet = ReferenceNet(_tiny_unet(seed + 2, clip_dim, latent))
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=resolution,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 4)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=clip_dim,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=resolution,
            patch_size=4,
            projection_dim=clip_dim,
        )
    )
    components = FAMSComponents(
        unet=unet,
        referencenet=referencenet,
        conditioning_referencenet=conditioning_referencenet,
        vae=vae,
        image_encoder=image_encoder,
        clip_input=ClipInput(size=resolution, crop_size=resolution),
        reference_routing=reference_routing,
    )
    return components.eval()
