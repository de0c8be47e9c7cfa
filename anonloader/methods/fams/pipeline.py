"""FAMS sampling: anonymization (paper 3.3, eqs. 1-2) and face swap, with classifier-free guidance.

Anonymization uses the face as both source and driving image and moves the source toward "no
identity" with the degree ``d``:

- eq. 1: the source's pooled CLIP embedding becomes ``(1 - d) Z``; it conditions the source
  ReferenceNet and takes the source slot of the UNet's cross-attention;
- eq. 2: the source ReferenceNet's states become ``(1 - d) S_cond + d S_uncond``, where
  ``S_uncond`` are the states of zero latents with a zero embedding (as in the authors' code;
  ``d > 1`` extrapolates away from the identity). The blend happens inside the attention kernel.

Classifier-free guidance pairs each face with an unconditional branch whose source is "none"
(``S_uncond`` and a zero embedding) and whose driving image is the face:
``eps = eps_u + g (eps_c - eps_u)``. Face swap takes a separate source image (e.g. from a
synthetic identity bank) with ``d = 0`` by default.

Both ReferenceNets run once per face, at timestep 0; their states are routed to the UNet's
self-attention layers as the released code does (``FAMSComponents.reference_routing``), projected
to keys and values once and reused at every denoising step. Randomness comes only from per-face
``torch.Generator`` objects seeded from ``FaceConditions.seeds`` (on the CPU, so the starting
noise is the same on every device), so a face's random draws do not depend on the rest of its
batch. Its output bytes can, in the last bits (about 1e-5 on the CPU): matrix kernels sum in an
order that depends on the batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from anonloader.errors import ConfigError, MethodError
from anonloader.kernels.attention import BlendedStates

from .attention import clear_reference_states, project_reference_states, route_reference_kv
from .components import FAMSComponents

__all__ = ["LATENT_SEED_SALT", "SamplingSettings", "decode_latents", "embed_images", "encode_images", "initial_noise", "make_scheduler", "sample_faces"]

Sampler = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class SamplingSettings:
    """Every sampling parameter that changes output pixels.

    Attributes:
        anonymization_degree: ``d`` of eqs. 1-2 when anonymizing (paper: 1.2 and 1.4; the
            authors' README: 1.25). 0 keeps the identity; values above 1 are allowed.
        swap_degree: ``d`` applied to the source image in face-swap mode (0 = plain swap).
        guidance_scale: classifier-free guidance ``g`` (paper: 4.0); ``<= 1`` turns CFG off.
        num_inference_steps: denoising steps (paper: 200 with DDPM).
        sampler: ``"ddpm"`` (the paper's) or ``"ddim"`` (deterministic, fewer steps suffice).
        resolution: side in pixels the networks run at (released model: 512).
        latent_sampling: ``"mean"`` encodes source and driving images to their VAE posterior
            means; ``"sample"`` draws ``mean + std * eps`` as the authors' code does, with ``eps``
            from a per-face generator seeded ``seed ^ LATENT_SEED_SALT`` (source first, then
            driving; deterministic per face, unlike the authors' global generator).
    """

    anonymization_degree: float = 1.25
    swap_degree: float = 0.0
    guidance_scale: float = 4.0
    num_inference_steps: int = 200
    sampler: Sampler = "ddpm"
    resolution: int = 512
    latent_sampling: Literal["mean", "sample"] = "mean"

    def __post_init__(self) -> None:
        if self.latent_sampling not in ("mean", "sample"):
            raise ConfigError(f"FAMS latent_sampling must be 'mean' or 'sample', got {self.latent_sampling!r}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"FAMS sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if self.num_inference_steps < 1:
            raise ConfigError(f"FAMS num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"FAMS resolution must be a multiple of 8, got {self.resolution}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_scheduler(scheduler_config: dict[str, Any], sampler: Sampler) -> Any:
    """A fresh scheduler (per call: schedulers keep state) from the noise-schedule config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    return cls.from_config(config)


def encode_images(
    components: FAMSComponents, images: torch.Tensor, *, sample: bool = False, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """``B,3,R,R float in [0,1]`` -> ``B,4,R/f,R/f`` latents times the VAE's scaling factor.

    Without ``sample`` the posterior mean; with it ``mean + std * eps`` (what the authors' code
    does, from torch's global generator), ``eps`` drawn per row from ``generators`` (one CPU
    generator per image, float32) or, without them, from torch's global generator.
    """
    vae = components.vae
    posterior = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist
    latents = posterior.mean
    if sample:
        if generators is not None:
            eps = torch.stack([torch.randn(latents.shape[1:], generator=g, dtype=torch.float32) for g in generators])
        else:
            eps = torch.randn(latents.shape, dtype=torch.float32, device=latents.device)
        latents = latents + posterior.std * eps.to(device=latents.device, dtype=latents.dtype)
    return latents * vae.config.scaling_factor


#: Mixed into a face's seed for the generator of its VAE posterior samples, so that
#: ``latent_sampling="sample"`` leaves the starting and per-step noise as they are.
LATENT_SEED_SALT = 0x6C6174656E74


def decode_latents(components: FAMSComponents, latents: torch.Tensor) -> torch.Tensor:
    """``B,4,h,w`` latents -> ``B,3,h*f,w*f float32 in [0,1]``."""
    vae = components.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return ((images.float() + 1) / 2).clamp(0, 1)


def embed_images(components: FAMSComponents, images: torch.Tensor) -> torch.Tensor:
    """``B,3,H,W float in [0,1]`` -> ``B,1,C`` pooled CLIP image embeddings (FAMS's cross-attention
    tokens, ``C`` = the UNet's ``cross_attention_dim``)."""
    encoder = components.image_encoder
    pixels = components.clip_input(images.float()).to(encoder.dtype)
    return encoder(pixel_values=pixels).pooler_output.unsqueeze(1).to(components.dtype)


def initial_noise(seeds: list[int], shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-face starting noise ``F,*shape`` and the per-face CPU generators that drive the rest
    of the sampling (DDPM's per-step noise), each seeded from the face's seed."""
    generators = [torch.Generator("cpu").manual_seed(int(seed) & ((1 << 63) - 1)) for seed in seeds]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype), generators


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _expand(states: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    return {name: s.expand(batch, *s.shape[1:]) for name, s in states.items()}


@torch.no_grad()
def sample_faces(
    components: FAMSComponents,
    driving: torch.Tensor,
    seeds: list[int],
    settings: SamplingSettings,
    *,
    source: torch.Tensor | None = None,
    anonymize: bool = True,
) -> torch.Tensor:
    """Generates one face per driving crop.

    Args:
        components: the networks (on the device and dtype to run in).
        driving: ``F,3,S,S float in [0,1]`` aligned crops (resized to ``settings.resolution``).
        seeds: ``F`` integer seeds, one per face.
        settings: sampling parameters.
        source: ``F,3,S',S' float in [0,1]`` source faces for face swap, or ``None``.
        anonymize: without a source, ``True`` applies eqs. 1-2 with ``anonymization_degree``;
            ``False`` is the plain reconstruction path (source = driving = the crop, no blend).

    Returns:
        ``F,3,R,R float32 in [0,1]`` at ``settings.resolution``.
    """
    faces = driving.shape[0]
    if len(seeds) != faces:
        raise MethodError(f"FAMS got {faces} crops but {len(seeds)} seeds")
    if source is not None and source.shape[0] != faces:
        raise MethodError(f"FAMS face swap got {faces} crops but {source.shape[0]} source images")
    device, dtype = components.device, components.dtype
    size = settings.resolution
    driving = _resize(driving.to(device=device, dtype=torch.float32), size)

    if source is not None:
        degree = float(settings.swap_degree)
        source_images = _resize(source.to(device=device, dtype=torch.float32), size)
    else:
        degree = float(settings.anonymization_degree) if anonymize else 0.0
        source_images = driving
    blend = (source is None and anonymize) or degree != 0.0
    guided = settings.guidance_scale > 1.0

    # Reference states: once per face, at timestep 0.
    if settings.latent_sampling == "sample":
        latent_generators = [torch.Generator("cpu").manual_seed((int(seed) ^ LATENT_SEED_SALT) & ((1 << 63) - 1)) for seed in seeds]
        source_latents = encode_images(components, source_images, sample=True, generators=latent_generators)
        driving_latents = encode_images(components, driving, sample=True, generators=latent_generators)
    else:
        driving_latents = encode_images(components, driving)
        source_latents = driving_latents if source is None else encode_images(components, source_images)
    driving_embeds = embed_images(components, driving)
    source_embeds = (driving_embeds if source is None else embed_images(components, source_images)) * (1.0 - degree)  # eq. 1
    source_states = components.source_states(source_latents.to(dtype), source_embeds)  # routed to the UNet's layers
    driving_states = components.driving_states(driving_latents.to(dtype), driving_embeds)
    latent_size = tuple(driving_latents.shape[-2:])

    if guided or blend:
        null = components.null_states(latent_size)  # S_uncond, batch 1
    if guided:
        batch = 2 * faces
        # rows [0, F): unconditional (source = none); rows [F, 2F): conditional.
        null_rows = _expand(null, batch)
        if blend:
            weight = torch.cat([torch.zeros(faces), torch.full((faces,), degree)]).to(device)
            source_route = {
                name: BlendedStates(torch.cat([null_rows[name][:faces], s]), null_rows[name], weight)
                for name, s in source_states.items()
            }
        else:
            source_route = {name: torch.cat([null_rows[name][:faces], s]) for name, s in source_states.items()}
        driving_route = {name: torch.cat([s, s]) for name, s in driving_states.items()}
        embeds = torch.cat(
            [torch.cat([torch.zeros_like(source_embeds), driving_embeds], dim=1), torch.cat([source_embeds, driving_embeds], dim=1)]
        )
    else:
        if blend:
            null_rows = _expand(null, faces)
            source_route = {name: BlendedStates(s, null_rows[name], degree) for name, s in source_states.items()}  # eq. 2
        else:
            source_route = dict(source_states)
        driving_route = dict(driving_states)
        embeds = torch.cat([source_embeds, driving_embeds], dim=1)

    unet = components.unet
    scheduler = make_scheduler(components.scheduler_config, settings.sampler)
    scheduler.set_timesteps(settings.num_inference_steps, device=device)
    latents, generators = initial_noise(seeds, (unet.config.in_channels, *latent_size), device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma

    projected = project_reference_states(unet, [source_route, driving_route])
    route_reference_kv(components.processors, projected)
    try:
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + settings.guidance_scale * (conditional - unconditional)
            step_kwargs: dict[str, Any] = {"generator": generators} if settings.sampler == "ddpm" else {"eta": 0.0}
            latents = scheduler.step(prediction, t, latents, return_dict=False, **step_kwargs)[0]
    finally:
        clear_reference_states(components.processors)
    return decode_latents(components, latents)
