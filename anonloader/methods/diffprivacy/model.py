"""``DiffPrivacy``: the method of "Diff-Privacy: Diffusion-based Face Privacy Protection".

    >>> from anonloader.methods.diffprivacy import DiffPrivacy
    >>> dp = DiffPrivacy("/models/diffprivacy-msi", base_model="/models/sd-v1-5",  # doctest: +SKIP
    ...                  clip_model="/models/clip-vit-large-patch14",
    ...                  recognizer={"kind": "iresnet", "weights": "/models/arcface_r50.pth"})
    >>> tiny = DiffPrivacy(tiny=True)  # random tiny networks of the real structure (tests)  # doctest: +SKIP

Per face (Alg. 1): z0 = E(x); the MSI gives 10 pseudo-words -> C^0..C^9; G noises from the
face's seed start the guided DDIM at S_ns·T; C_t follows eq. 16; after each step the latents move
down the gradient of the identity energy (anonymize: L_Idis + L_div, hide: L_is); the output is
the member least similar to the original. With recovery keys (:meth:`anonymize_with_keys`), z_T
from the DDIM inversion of the original z0 and the pseudo-words form the face's key
(:class:`~anonloader.methods.diffprivacy.keys.RecoveryKey`), which
:mod:`~anonloader.methods.diffprivacy.store` encrypts under the user's password.

Licences: the authors publish their code without a licence (nothing of it is used here); SD v1.x
weights are CreativeML OpenRAIL-M; arcface_torch's released recognizers are non-commercial.
Hide mode keeps the face's machine identity by design: it hides from people, not recognizers.
The synthetic person is not stable per real person (it depends on the face's seed and content).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anonloader.errors import AnonloaderError, ConfigError, MethodError, ModelLoadError
from anonloader.types import FaceConditions

from .backbone import (
    CLIP_MODEL_ID,
    SD_MODEL_ID,
    Backbone,
    build_tiny_backbone,
    load_backbone,
    locate_backbone,
    module_digest,
    save_backbone,
)
from .keys import RecoveryKey
from .msi import (
    MSI,
    anchor_embedding,
    clip_class_tokens,
    default_layers,
    encode_stage_words,
    prompt_slot,
    stage_timesteps,
    unconditional_embedding,
)
from .sampler import (
    Guide,
    SamplingSettings,
    guided_sample,
    invert,
    reconstruct,
    select_members,
)
from .training import refine_words

__all__ = ["DiffPrivacy"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TINY_RESOLUTION = 32
_KEY_E = ("words", "embeddings")


def _tiny_recognizer(seed: int) -> nn.Module:
    from anonloader.methods.iddiffuse.backbone import IResNet

    torch.manual_seed(seed)
    return IResNet(widths=(4, 4, 8, 8), depths=(1, 1, 1, 1), embedding_dim=8, input_size=16).eval().requires_grad_(False)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def _scale_points(points: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """Pixel coordinates (centres at integers) of a ``source`` px crop -> a ``target`` px crop."""
    return (points + 0.5) * (target / source) - 0.5


class DiffPrivacy:
    """Diff-Privacy as an anonloader :class:`~anonloader.methods.base.Method`.

    Args:
        weights: a directory holding ``msi/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``,
            from ``python -m anonloader.methods.diffprivacy.train msi``); ``None`` with ``tiny``.
        base_model: SD v1.x in diffusers layout (directory or hub id); clip_model: CLIP ViT-L/14.
        allow_download: let hub ids missing from the local cache be downloaded; cache_dir: the hub cache.
        tiny, tiny_seed: random tiny networks of the real structure (tests, CPU users).
        backbone, msi: ready networks (override ``weights`` / ``tiny``).
        recognizer: F_θ: a spec for ``iddiffuse.recognizers.build_recognizer`` (e.g.
            ``{"kind": "iresnet", "weights": "backbone.pth"}``) or a module; required with real
            weights unless ``guidance_scale=0`` and ``select="first"``. ``recognizer_size``: its
            crop side (112).
        mode: ``"anonymize"`` or ``"hide"``; the other sampling options default to the paper's
            per mode (see :class:`~anonloader.methods.diffprivacy.sampler.SamplingSettings`).
        recoverable: whether :meth:`anonymize_with_keys` may be used (inversion costs N UNet calls
            per face, times at most ``inversion_iters + 1``); in :meth:`config`.
        inversion_iters, inversion_tol: k (each inversion step makes at most k + 1 UNet calls
            solving the sampler's step as a fixed point; 0 = eq. 4) and the relative residual
            that ends a step sooner (see :func:`~anonloader.methods.diffprivacy.sampler.invert`).
        key_e: ``"words"`` (30 KiB) or ``"embeddings"`` (2.3 MiB) in each key.
        crop_size: side of the crops asked of the aligner (512; tiny 32); resolution: the
            backbone's working side (512; tiny 32).
        device: where the networks run (``None``: follow the crops); dtype: float32 by default.
    """

    name = "diffprivacy"
    template = "ffhq"
    paste_color_match = True

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        *,
        base_model: str | os.PathLike[str] = SD_MODEL_ID,
        clip_model: str | os.PathLike[str] = CLIP_MODEL_ID,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        tiny: bool = False,
        tiny_seed: int = 0,
        backbone: Backbone | None = None,
        msi: MSI | None = None,
        recognizer: dict[str, Any] | nn.Module | None = None,
        recognizer_size: int | None = None,
        mode: str = "anonymize",
        num_inference_steps: int | None = None,
        strength: float | None = None,
        tau: float | None = None,
        group_size: int | None = None,
        guidance_scale: float = 0.1,
        guidance_grad: str = "z0",
        select: str = "least_similar",
        recoverable: bool = True,
        inversion_iters: int = 5,
        inversion_tol: float = 1e-7,
        key_e: str = "words",
        refine_steps: int = 0,
        refine_lr: float = 1e-3,
        crop_size: int | None = None,
        resolution: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
    ) -> None:
        self.tiny = bool(tiny) and backbone is None
        if weights is None and not self.tiny and (backbone is None or msi is None):
            raise ConfigError("Diff-Privacy needs weights (a directory with msi/), tiny=True, or backbone and msi")
        if key_e not in _KEY_E:
            raise ConfigError(f"Diff-Privacy key_e must be one of {_KEY_E}, got {key_e!r}")
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigError(f"Diff-Privacy dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.weights = None if weights is None else str(weights)
        self.base_model, self.clip_model = str(base_model), str(clip_model)
        self.allow_download = bool(allow_download)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.tiny_seed = int(tiny_seed)
        self.settings = SamplingSettings.for_mode(
            mode,
            num_inference_steps=num_inference_steps,
            strength=strength,
            tau=tau,
            group_size=group_size,
            guidance_scale=guidance_scale,
            guidance_grad=guidance_grad,
            select=select,
            inversion_iters=inversion_iters,
            inversion_tol=inversion_tol,
            refine_steps=refine_steps,
            refine_lr=refine_lr,
        )
        self.recoverable = bool(recoverable)
        self.key_e = key_e
        default_size = _TINY_RESOLUTION if self.tiny else 512
        self.crop_size = int(crop_size or default_size)
        self.resolution = int(resolution or default_size)
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype or "float32"
        self._recognizer_spec = recognizer if isinstance(recognizer, dict) else None
        self._recognizer: nn.Module | None = recognizer if isinstance(recognizer, nn.Module) else None
        self.recognizer_size = int(recognizer_size or (16 if self.tiny and recognizer is None else 112))
        self._given = backbone is not None
        self._backbone = backbone
        self._msi = msi
        self._digests: dict[str, str] | None = None
        needs_recognizer = self.settings.guidance_scale > 0 or (self.settings.select == "least_similar" and self.settings.group_size > 1)
        if needs_recognizer and recognizer is None and not self.tiny:
            raise ConfigError(
                "Diff-Privacy guides with a face recognizer: pass recognizer={'kind': 'iresnet', 'weights': '<arcface_torch backbone.pth>'} "
                "(or a module), or guidance_scale=0 and select='first'"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike[str], **kwargs: Any) -> DiffPrivacy:
        """Loads everything now (raises :class:`~anonloader.errors.ModelLoadError` when a part is
        missing or would need a download ``allow_download`` forbids)."""
        method = cls(weights, **kwargs)
        method.load()
        return method

    def load(self) -> tuple[Backbone, MSI, nn.Module | None]:
        """Loads (once) and returns the backbone, the MSI and the recognizer."""
        if self._backbone is None:
            if self.tiny:
                self._backbone = build_tiny_backbone(self.tiny_seed, resolution=self.resolution)
                if self.dtype != "float32":
                    self._backbone.to(dtype=_DTYPES[self.dtype])
            else:
                dirs, digests = locate_backbone(self.base_model, self.clip_model, allow_download=self.allow_download, cache_dir=self.cache_dir)
                logger.info("loading the Diff-Privacy backbone from %s (SD v1.x: CreativeML OpenRAIL-M)", dirs["unet"].parent)
                self._backbone = load_backbone(dirs, digests, dtype=_DTYPES[self.dtype])
        if self._msi is None:
            if self.tiny and self.weights is None:
                vision = self._backbone.image_encoder.config
                torch.manual_seed(self.tiny_seed + 10)
                self._msi = MSI(
                    vision_width=vision.hidden_size,
                    text_width=self._backbone.text_width,
                    layers=default_layers(vision.num_hidden_layers),
                    num_heads=2,
                )
            else:
                self._msi = self._load_msi()
            self._msi.eval().requires_grad_(False)
        if self._recognizer is None:
            if self._recognizer_spec is not None:
                from anonloader.methods.iddiffuse.recognizers import build_recognizer

                self._recognizer = build_recognizer(self._recognizer_spec, allow_download=self.allow_download)
            elif self.tiny:
                self._recognizer = _tiny_recognizer(self.tiny_seed + 20)
        if self._recognizer is not None:
            self._recognizer.eval().requires_grad_(False)
        return self._backbone, self._msi, self._recognizer

    def _load_msi(self) -> MSI:
        assert self.weights is not None
        folder = Path(self.weights).expanduser() / "msi"
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"Diff-Privacy weights: {folder} has no config.json; train an MSI with "
                "`python -m anonloader.methods.diffprivacy.train msi` and pass its --out directory"
            )
        try:
            return MSI.from_pretrained(folder)
        except Exception as error:
            raise ModelLoadError(f"Diff-Privacy: could not load the MSI from {folder}: {error}") from error

    def save_pretrained(self, directory: str | os.PathLike[str], *, with_backbone: bool = False) -> Path:
        """Writes ``msi/`` (and, with ``with_backbone``, the backbone's diffusers layout) to ``directory``."""
        backbone, msi, _ = self.load()
        root = Path(directory)
        msi.save_pretrained(root / "msi", safe_serialization=True)
        (root / "diffprivacy_config.json").write_text(json.dumps({"format": 1, "backbone_digests": backbone.digests}, indent=2, sort_keys=True))
        if with_backbone:
            save_backbone(backbone, root)
        return root

    # ------------------------------------------------------------------ the Method protocol
    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """Anonymizes (or hides) aligned crops.

        Args:
            crops: ``F,3,S,S float32 in [0,1]`` aligned with the ``ffhq`` template.
            conditions: ``seeds`` (one per crop) drive every random draw; ``landmarks``
                ``F,5,2`` in crop pixels place the recognizer's view; ``extra["stage_words"]``
                (optional) ``F,10,D`` pseudo-words replace the MSI's (per-image training).

        Returns:
            ``F,3,S,S float32 in [0,1]`` on the crops' device.
        """
        out, _ = self._run(crops, conditions, with_keys=False)
        return out

    def anonymize_with_keys(self, crops: torch.Tensor, conditions: FaceConditions) -> tuple[torch.Tensor, list[RecoveryKey]]:
        """Like ``__call__``, plus one :class:`RecoveryKey` per face (plaintext: encrypt it with
        :class:`~anonloader.methods.diffprivacy.store.RecoveryKeyStore` before it leaves memory).
        Raises :class:`ConfigError` when built with ``recoverable=False``."""
        if not self.recoverable:
            raise ConfigError("this Diff-Privacy was built with recoverable=False; build it with recoverable=True to get recovery keys")
        out, keys = self._run(crops, conditions, with_keys=True)
        assert keys is not None
        return out, keys

    def _run(self, crops: torch.Tensor, conditions: FaceConditions, *, with_keys: bool) -> tuple[torch.Tensor, list[RecoveryKey] | None]:
        if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
            raise MethodError(f"Diff-Privacy expects crops F,3,S,S, got {tuple(crops.shape)}")
        if len(conditions) != crops.shape[0]:
            raise MethodError(f"Diff-Privacy got {crops.shape[0]} crops but {len(conditions)} conditions")
        if crops.shape[0] == 0:
            return crops.clone(), ([] if with_keys else None)
        try:
            return self._generate(crops, conditions, with_keys)
        except AnonloaderError:
            raise
        except Exception as error:
            raise MethodError(f"Diff-Privacy failed on a batch of {crops.shape[0]} crops: {type(error).__name__}: {error}") from error

    def _generate(self, crops: torch.Tensor, conditions: FaceConditions, with_keys: bool) -> tuple[torch.Tensor, list[RecoveryKey] | None]:
        backbone, msi, recognizer = self.load()
        device = self.device or crops.device
        if backbone.device != device:
            backbone.to(device=device)
            msi.to(device=device)
            if recognizer is not None:
                recognizer.to(device=device)
        size = crops.shape[-1]
        R = self.resolution
        x = _resize(crops.to(device=device, dtype=torch.float32), R).clamp(0, 1)
        landmarks = _scale_points(conditions.landmarks.to(device=device, dtype=torch.float32), size, R)
        seeds = [int(s) for s in conditions.seeds]
        slot = prompt_slot(backbone)
        with torch.no_grad():
            z0 = backbone.encode(x)
            words = self.stage_words(x, conditions)
        if self.settings.refine_steps:
            words = torch.stack(
                [refine_words(backbone, slot, z0[f : f + 1], words[f], self.settings.refine_steps, self.settings.refine_lr, seeds[f]) for f in range(len(seeds))]
            )
        with torch.no_grad():
            conds = encode_stage_words(backbone, slot, words)
            uc = unconditional_embedding(backbone)
            guide = None
            if recognizer is not None:
                guide = Guide(recognizer, torch.zeros(0), landmarks, self.settings.mode, self.settings.group_size, self.recognizer_size)
                guide.originals = guide.embed(x, landmarks)
        z = guided_sample(backbone, z0, conds, uc, seeds, self.settings, guide)
        with torch.no_grad():
            images = backbone.decode(z).float()
            chosen = images[select_members(guide, images, self.settings.group_size, self.settings.select)]
        out = _resize(chosen, size).clamp(0, 1).to(device=crops.device, dtype=torch.float32)
        if not with_keys:
            return out, None
        z_T = invert(backbone, z0, conds, self.settings.num_inference_steps, self.settings.inversion_iters, self.settings.inversion_tol)
        meta = self._key_meta(size)
        keys = [
            RecoveryKey(z_T[f].float().cpu(), (words[f] if self.key_e == "words" else conds[f]).float().cpu(), self.key_e, meta)
            for f in range(len(seeds))
        ]
        return out, keys

    def stage_words(self, images: torch.Tensor, conditions: FaceConditions | None = None) -> torch.Tensor:
        """``F,3,R,R [0,1]`` crops at the backbone's resolution -> ``F,10,D`` pseudo-words (the
        MSI's, or ``conditions.extra["stage_words"]`` when given). No gradient."""
        backbone, msi, _ = self.load()
        given = None if conditions is None else conditions.extra.get("stage_words")
        if given is not None:
            words = torch.stack([torch.as_tensor(w) for w in given]).to(images.device, backbone.dtype)
            if words.shape[1:] != (msi.config.num_stages, backbone.text_width):
                raise ConfigError(f"stage_words must be F,{msi.config.num_stages},{backbone.text_width}, got {tuple(words.shape)}")
            return words
        slot = prompt_slot(backbone)
        with torch.no_grad():
            features = clip_class_tokens(backbone, images, msi.config.layers).to(msi.dtype)
            ts = torch.tensor(stage_timesteps(msi.config.num_stages, backbone.schedule.num_train_timesteps), device=images.device)
            return msi(features, ts, anchor_embedding(backbone, slot)).to(backbone.dtype)

    def _key_meta(self, crop_size: int) -> dict[str, Any]:
        backbone, _, _ = self.load()
        return {
            "backbone": dict(backbone.digests),
            "schedule": backbone.schedule.to_dict(),
            "num_inference_steps": self.settings.num_inference_steps,
            "inversion_iters": self.settings.inversion_iters,
            "inversion_solver": "fixed_point_extrapolated",
            "inversion_tol": self.settings.inversion_tol,
            "resolution": self.resolution,
            "crop_size": crop_size,
            "prompt": "a photo of *",
        }

    # ------------------------------------------------------------------ recovery
    def recover(self, keys: list[RecoveryKey]) -> torch.Tensor:
        """The original crops from decrypted keys: DDIM sampling of z_T with C^{t//100}, decoded.

        Returns:
            ``F,3,S,S float32 in [0,1]`` (``S`` = the crop size recorded in the keys), CPU.

        Raises:
            ConfigError: a key was made with another backbone or schedule than this method's.
        """
        backbone, _, _ = self.load()
        if not keys:
            return torch.zeros(0, 3, self.crop_size, self.crop_size)
        expected = {"backbone": backbone.digests, "schedule": backbone.schedule.to_dict()}
        for i, key in enumerate(keys):
            for name, value in expected.items():
                if key.meta.get(name) != value:
                    raise ConfigError(f"recovery key {i} was made with another {name} than this Diff-Privacy's; load the models it records")
        device = self.device or backbone.device
        slot = prompt_slot(backbone)
        outs = []
        for key in keys:
            with torch.no_grad():
                key_e = key.key_e.to(device, backbone.dtype)
                conds = (encode_stage_words(backbone, slot, key_e) if key.kind == "words" else key_e)[None]
                z = reconstruct(backbone, key.z_T[None].to(device, backbone.dtype), conds, int(key.meta["num_inference_steps"]))
                image = backbone.decode(z.to(backbone.dtype)).float()
            outs.append(_resize(image, int(key.meta["crop_size"])).clamp(0, 1).cpu())
        return torch.cat(outs)

    # ------------------------------------------------------------------ fingerprint, pickling
    def config(self) -> dict[str, Any]:
        """Every parameter that changes output pixels (and keys), with the models' digests."""
        backbone, msi, recognizer = self.load()
        if self._digests is None:
            self._digests = {**backbone.digests, "msi": module_digest(msi)}
            if recognizer is not None:
                self._digests["recognizer"] = module_digest(recognizer)
        return {
            "format": 1,
            "weights": {"origin": "tiny" if self.tiny else ("memory" if self._given else "files"), **self._digests},
            "crop_size": self.crop_size,
            "resolution": self.resolution,
            "template": self.template,
            "dtype": self.dtype,
            "sampling": self.settings.to_dict(),
            "scheduler": dict(backbone.scheduler_config),
            "recognizer_size": self.recognizer_size,
            "recoverable": self.recoverable,
            "key_e": self.key_e,
            "vae_latents": "posterior_mean",
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not self._given:
            state["_backbone"] = state["_msi"] = None
            if self._recognizer_spec is not None or self.tiny:
                state["_recognizer"] = None
        return state

    def __repr__(self) -> str:
        source = "tiny" if self.tiny else (self.weights or "components")
        return f"DiffPrivacy({source!r}, mode={self.settings.mode!r}, crop_size={self.crop_size}, recoverable={self.recoverable})"
