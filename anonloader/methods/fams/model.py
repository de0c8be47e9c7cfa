"""``FAMS``: the anonymization method of "Face Anonymization Made Simple" (Kung et al., WACV 2025).

    >>> from anonloader.methods.fams import FAMS
    >>> fams = FAMS.from_pretrained("hkung/face-anon-simple", allow_download=True)  # doctest: +SKIP
    >>> fams = FAMS.from_pretrained("/data/models/face-anon-simple")  # a local copy, offline  # doctest: +SKIP
    >>> tiny = FAMS.from_config(tiny=True)  # random tiny networks for tests  # doctest: +SKIP

Given aligned ``ffhq``-template crops, each face is regenerated from noise with the same pose,
expression, gaze and background and a different identity controlled by the degree ``d``.

Identity mode (stable synthetic identities): given ``bank=`` (an
:class:`~anonloader.identity.bank.IdentityBank` holding face images, the same bank the pipeline's
identity assigner maps into), FAMS runs its face-swap path with, as source, the bank image of
each face's ``conditions.synthetic_ids`` entry, aligned to FAMS's ``ffhq`` template, and
``swap_degree`` applied to it by eqs. 1-2 (0: the released plain swap). Every photo of one real
person then gets the same source image and (from the assigner) the same seed. The released code
defines ``d`` on the source branch only, so in identity mode the driving branch runs as released
(its states carry pose, expression and background) and ``anonymization_degree`` is not used.
``conditions.extra["source_images"]`` swaps in explicit source faces instead. Given no assigner,
the pipeline uses :meth:`FAMS.default_identity` (keyed ``"online"`` strategy over the bank, secret
from ``secret=`` or ``$ANONLOADER_SECRET``). A bank rendered by
FAMS itself: :mod:`anonloader.methods.fams.bank` (``python -m anonloader.methods.fams.bank``).

The authors' code is AGPL-3.0 (none of it is copied here); check the licence of the released
weights before use.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from anonloader.errors import AnonloaderError, ConfigError, MethodError
from anonloader.types import Detections, FaceConditions

from .components import FAMSComponents, build_tiny_components, state_digest
from .referencenet import ROUTINGS
from .pipeline import SamplingSettings, sample_faces
from .weights import BASE_MODEL_ID, CLIP_MODEL_ID, FAMS_HUB_ID, LoadedWeights, load_components, locate_weights, save_components

__all__ = ["FAMS"]


def _bank_template(bank: Any) -> str:
    """The alignment template a bank's images are in: recorded in its metadata, or the generating
    method's, else ``"arcface"`` (recognizer-aligned face folders)."""
    meta = getattr(bank, "meta", {}) or {}
    if isinstance(meta.get("template"), str):
        return meta["template"]
    method = meta.get("method")
    if isinstance(method, dict) and isinstance(method.get("template"), str):
        return method["template"]
    return "arcface"

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SETTING_NAMES = ("anonymization_degree", "swap_degree", "guidance_scale", "num_inference_steps", "sampler", "resolution", "latent_sampling")
_TINY_RESOLUTION = 16


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return name
        raise ConfigError(f"FAMS dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    if dtype not in _DTYPES:
        raise ConfigError(f"FAMS dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return dtype


class FAMS:
    """FAMS as an anonloader :class:`~anonloader.methods.base.Method`.

    Networks load lazily (on the first call, :meth:`load`, or :meth:`from_pretrained`), so an
    unloaded instance pickles cheaply into DataLoader workers.

    Args:
        weights: a local directory in the released layout (or one written by
            :meth:`save_pretrained`), or a hub id (default ``hkung/face-anon-simple``).
        base_model: where the VAE and scheduler come from (a Stable Diffusion 2.1 directory or id).
        clip_model: where the CLIP image encoder comes from (a clip-vit-large-patch14 directory or id).
        allow_download: let hub ids missing from the local cache be downloaded.
        revision, cache_dir: passed to the hub client.
        tiny: build tiny random networks of the real structure instead (tests, CPU users);
            ``tiny_seed`` fixes their weights.
        components: ready networks (then ``weights`` is ignored).
        crop_size: side of the crops asked of the aligner (the output has the input's size).
        anonymization_degree, swap_degree, guidance_scale, num_inference_steps, sampler,
            resolution, latent_sampling: see :class:`~anonloader.methods.fams.pipeline.SamplingSettings`;
            ``None`` takes the value saved with the weights, else the paper's defaults
            (``resolution``: 512, tiny models 16).
        device: where the networks run; ``None`` follows the crops.
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
        attention_backend: for the multi-source attention kernel (``None``: Triton on CUDA).
        bank: identity mode (see the module docstring): an ``IdentityBank`` with images, or the
            folder of a saved one; :class:`~anonloader.errors.ConfigError` if it holds no images.
        bank_template: the alignment template of the bank's images (``"arcface"``, ``"ffhq"``);
            ``None`` reads it from the bank's metadata (``meta["template"]``, or the generating
            method's template for banks made by a method), else ``"arcface"`` (face folders such
            as DCFace's).
        reference_routing: which ReferenceNet state each UNet self-attention layer receives
            (:mod:`~anonloader.methods.fams.referencenet`): ``None`` takes what the weights record
            (the released layout: ``"released"``, the authors' code); ``"by_name"`` only for
            checkpoints trained that way.
    """

    name = "fams"
    template = "ffhq"
    paste_color_match = True

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = FAMS_HUB_ID,
        *,
        base_model: str | os.PathLike[str] = BASE_MODEL_ID,
        clip_model: str | os.PathLike[str] = CLIP_MODEL_ID,
        allow_download: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        tiny: bool = False,
        tiny_seed: int = 0,
        components: FAMSComponents | None = None,
        crop_size: int = 512,
        anonymization_degree: float | None = None,
        swap_degree: float | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        resolution: int | None = None,
        latent_sampling: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attention_backend: str | None = None,
        reference_routing: str | None = None,
        bank: Any = None,
        bank_template: str | None = None,
    ) -> None:
        if crop_size < 8:
            raise ConfigError(f"FAMS crop_size must be at least 8, got {crop_size}")
        self.weights = None if (tiny or components is not None or weights is None) else str(weights)
        if self.weights is None and not tiny and components is None:
            raise ConfigError("FAMS needs weights (a directory or hub id), tiny=True, or components")
        self.base_model = str(base_model)
        self.clip_model = str(clip_model)
        self.allow_download = bool(allow_download)
        self.revision = revision
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.tiny = bool(tiny) and components is None
        self.tiny_seed = int(tiny_seed)
        self.crop_size = int(crop_size)
        self.device = None if device is None else torch.device(device)
        self.dtype = _dtype_name(dtype)
        self.attention_backend = attention_backend
        if reference_routing is not None and reference_routing not in ROUTINGS:
            raise ConfigError(f"FAMS reference_routing must be one of {ROUTINGS}, got {reference_routing!r}")
        if components is not None and reference_routing not in (None, components.reference_routing):
            raise ConfigError(
                f"FAMS reference_routing={reference_routing!r} but the components route {components.reference_routing!r}; "
                "build the components with the routing they were trained with"
            )
        self.reference_routing = reference_routing
        self.bank_path: str | None = None
        self._bank: Any = None
        self.bank_template: str | None = None
        if bank is not None:
            self._bank = self._load_bank(bank)
            self.bank_template = bank_template or _bank_template(self._bank)
            from anonloader.align import TEMPLATES

            if self.bank_template not in TEMPLATES:
                raise ConfigError(f"FAMS bank_template must be one of {sorted(TEMPLATES)}, got {self.bank_template!r}")
        elif bank_template is not None:
            raise ConfigError("FAMS bank_template is for identity mode; pass bank= too")
        self._overrides = {
            "anonymization_degree": anonymization_degree,
            "swap_degree": swap_degree,
            "guidance_scale": guidance_scale,
            "num_inference_steps": num_inference_steps,
            "sampler": sampler,
            "resolution": resolution,
            "latent_sampling": latent_sampling,
        }
        SamplingSettings(**{k: v for k, v in self._overrides.items() if v is not None})  # validates now
        self._given_components = components is not None
        self._components: FAMSComponents | None = components
        self._located: LoadedWeights | None = None
        self._settings: SamplingSettings | None = None
        if components is not None:
            components.to(dtype=_DTYPES[self.dtype])

    def _load_bank(self, bank: Any) -> Any:
        from anonloader.identity.bank import IdentityBank

        if isinstance(bank, (str, os.PathLike)):
            self.bank_path = str(bank)
            bank = IdentityBank.load(bank)
        if getattr(bank, "images", None) is None:
            raise ConfigError(
                "FAMS identity mode swaps in the bank image of each face's synthetic identity, but this bank holds "
                "embeddings only; build one with images (IdentityBank.from_folder(..., keep_images=True) or "
                "IdentityBank.from_method(...)), or drop bank= to anonymize with the degree d"
            )
        return bank

    @property
    def bank(self) -> Any:
        """The identity bank of identity mode, or None."""
        if self._bank is None and self.bank_path is not None:
            self._bank = self._load_bank(self.bank_path)
        return self._bank

    def default_identity(
        self,
        *,
        secret: Any = None,
        secret_file: str | os.PathLike[str] | None = None,
        embedder: Any = None,
        registry_path: str | os.PathLike[str] | None = None,
        store: str | os.PathLike[str] | None = None,
        store_embeddings: bool = False,
    ) -> Any:
        """The keyed identity assigner the pipeline uses in identity mode when given none, so a
        bank alone keeps one synthetic person per real person: the ``"online"`` strategy linking
        faces with ``embedder`` (default: the bank's recorded recognizer, else dlib), keyed by
        ``secret`` (default ``$ANONLOADER_SECRET`` / ``$ANONLOADER_SECRET_FILE``; a
        :class:`~anonloader.errors.ConfigError` says what to set when there is none). None
        without a bank (FAMS then anonymizes with the degree ``d``). See
        :func:`~anonloader.identity.assigner.default_assigner`."""
        if self.bank is None:
            return None
        from anonloader.identity.assigner import default_assigner

        return default_assigner(
            "FAMS", self.bank, secret=secret, secret_file=secret_file, embedder=embedder, registry_path=registry_path,
            store=store, store_embeddings=store_embeddings,
        )

    def bank_sources(self, synthetic_ids: list[int | None]) -> torch.Tensor:
        """The source faces of identity mode: the bank image of each synthetic id, aligned to
        FAMS's ``ffhq`` template.

        Args:
            synthetic_ids: ``F`` bank indices (from the pipeline's identity assigner).

        Returns:
            ``F,3,R,R float32 in [0,1]`` on the CPU (``R``: ``settings.resolution``; a bank
            already in the ``ffhq`` template keeps its own size, resized when sampling).

        Raises:
            MethodError: a face without a synthetic id, or an id outside the bank.
        """
        bank = self.bank
        if bank is None:
            raise MethodError("FAMS has no identity bank (pass bank=)")
        missing = [i for i, s in enumerate(synthetic_ids) if s is None]
        if missing:
            raise MethodError(
                f"FAMS identity mode needs a synthetic id per face; faces {missing[:5]} have none. Run it with an "
                "identity assigner over the same bank, e.g. identity=KeyedIdentityAssigner(..., bank=bank)"
            )
        ids = [int(s) for s in synthetic_ids]  # type: ignore[arg-type]
        outside = sorted({s for s in ids if not 0 <= s < len(bank)})
        if outside:
            raise MethodError(f"FAMS identity mode: synthetic ids {outside[:5]} are outside the bank of {len(bank)}; the assigner must map into the same bank")
        images = bank.images[ids]
        if self.bank_template == "ffhq":
            return images.clone()
        from anonloader.align import align_faces, template_points

        size = images.shape[-1]
        landmarks = template_points(size, str(self.bank_template)).unsqueeze(0)
        detections = [Detections(torch.zeros(1, 4), landmarks, torch.ones(1)) for _ in ids]
        aligned = align_faces(list(images), detections, crop_size=self.settings.resolution, template=self.template, padding_mode="reflection")
        return aligned.crops.clamp(0, 1)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike[str] = FAMS_HUB_ID, *, allow_download: bool = False, **kwargs: Any) -> FAMS:
        """Loads the released weights (or ours) now; raises
        :class:`~anonloader.errors.ModelLoadError` when they are missing or would need a download
        that ``allow_download`` does not permit."""
        method = cls(path_or_hub_id, allow_download=allow_download, **kwargs)
        method.load()
        return method

    @classmethod
    def from_config(cls, *, tiny: bool = True, seed: int = 0, **kwargs: Any) -> FAMS:
        """A FAMS with tiny random networks of the real structure (only ``tiny=True`` exists: the
        full-size networks are only useful with trained weights, see :meth:`from_pretrained`)."""
        if not tiny:
            raise ConfigError("FAMS.from_config builds tiny models only; use FAMS.from_pretrained for the real ones")
        method = cls(tiny=True, tiny_seed=seed, **kwargs)
        method.load()
        return method

    @classmethod
    def from_components(cls, components: FAMSComponents, **kwargs: Any) -> FAMS:
        """Wraps ready networks (e.g. fresh from :mod:`anonloader.methods.fams.training`)."""
        return cls(components=components, **kwargs)

    def load(self) -> FAMSComponents:
        """Loads (once) and returns the networks."""
        if self._components is None:
            if self.tiny:
                self._components = build_tiny_components(
                    self.tiny_seed, resolution=self.settings.resolution, reference_routing=self.reference_routing or "released"
                )
                self._components.attention_backend = self.attention_backend
            else:
                located = self._locate()
                logger.info(
                    "loading FAMS from %s (the authors' code is AGPL-3.0; check the licence of these weights)",
                    located.directories["unet"].parent,
                )
                self._components = load_components(
                    located, dtype=_DTYPES[self.dtype], attention_backend=self.attention_backend, reference_routing=self.reference_routing
                )
            self._components.to(device=self.device, dtype=_DTYPES[self.dtype])
        return self._components

    def _locate(self) -> LoadedWeights:
        if self._located is None:
            assert self.weights is not None
            self._located = locate_weights(
                self.weights,
                base_model=self.base_model,
                clip_model=self.clip_model,
                allow_download=self.allow_download,
                revision=self.revision,
                cache_dir=self.cache_dir,
            )
        return self._located

    @property
    def components(self) -> FAMSComponents:
        return self.load()

    @property
    def settings(self) -> SamplingSettings:
        """The sampling settings: explicit arguments, else those saved with the weights, else defaults."""
        if self._settings is None:
            saved: dict[str, Any] = {}
            if self.weights is not None:
                saved = self._locate().saved_settings
            values: dict[str, Any] = {}
            for name in _SETTING_NAMES:
                if self._overrides[name] is not None:
                    values[name] = self._overrides[name]
                elif name in saved:
                    values[name] = saved[name]
            if "resolution" not in values and self.tiny:
                values["resolution"] = _TINY_RESOLUTION
            self._settings = SamplingSettings(**values)
        return self._settings

    # ---------------------------------------------------------------- the Method protocol
    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """Anonymizes aligned crops; in identity mode (``bank=``) or with
        ``conditions.extra["source_images"]``, face-swaps them.

        Args:
            crops: ``F,3,S,S float32 in [0,1]`` aligned with the ``ffhq`` template.
            conditions: ``seeds`` (one per crop) drive all randomness; ``synthetic_ids`` pick the
                bank images in identity mode; ``extra["source_images"]`` (optional)
                ``F,3,S',S' float in [0,1]`` explicit source faces for face swap.

        Returns:
            ``F,3,S,S float32 in [0,1]`` on the crops' device.
        """
        if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
            raise MethodError(f"FAMS expects crops F,3,S,S, got {tuple(crops.shape)}")
        if crops.shape[0] == 0:
            return crops.clone()
        source = conditions.extra.get("source_images") if conditions.extra else None
        if source is not None and not isinstance(source, torch.Tensor):
            source = torch.stack(list(source))
        if self.bank is not None:
            if source is not None:
                raise MethodError("FAMS got source_images in identity mode (bank=); use one or the other")
            source = self.bank_sources(list(conditions.synthetic_ids))
        try:
            out = self.generate(crops, list(conditions.seeds), source=source)
        except AnonloaderError:
            raise
        except Exception as error:
            raise MethodError(f"FAMS failed on a batch of {crops.shape[0]} crops: {type(error).__name__}: {error}") from error
        return out

    def generate(
        self, crops: torch.Tensor, seeds: list[int], *, source: torch.Tensor | None = None, anonymize: bool = True
    ) -> torch.Tensor:
        """Like ``__call__`` with explicit seeds; ``anonymize=False`` (without a source) is the
        plain reconstruction path (source = driving = crop, ``d`` unused).

        Args:
            crops: ``F,3,S,S float in [0,1]``.
            seeds: ``F`` integers.
            source: ``F,3,S',S' float in [0,1]`` or ``None``.

        Returns:
            ``F,3,S,S float32 in [0,1]`` on the crops' device.
        """
        components = self.load()
        device = self.device or crops.device
        if components.device != device:
            components.to(device=device)
        out = sample_faces(components, crops, seeds, self.settings, source=source, anonymize=anonymize)
        size = crops.shape[-1]
        if out.shape[-1] != size:
            out = F.interpolate(out, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return out.to(device=crops.device, dtype=torch.float32)

    def config(self) -> dict[str, Any]:
        """Every parameter that changes output pixels, with the digests of the weights."""
        if self.weights is not None:
            digests = dict(self._locate().digests)
            origin = "files"
        else:
            components = self.load()
            digests = {name: state_digest(net) for name, net in components.networks().items()}
            origin = "tiny" if self.tiny else "memory"
        if self._components is not None:
            scheduler = dict(self._components.scheduler_config)
            clip_input = self._components.clip_input
            routing = self._components.reference_routing
        else:
            located = self._locate()
            import json

            from .components import ClipInput

            scheduler = {k: v for k, v in json.loads((located.directories["scheduler"] / "scheduler_config.json").read_text()).items() if not k.startswith("_")}
            clip_input = ClipInput.from_preprocessor_config(json.loads((located.directories["feature_extractor"] / "preprocessor_config.json").read_text()))
            routing = self.reference_routing or located.reference_routing
        return {
            "format": 2,
            "weights": {"origin": origin, **digests},
            "crop_size": self.crop_size,
            "template": self.template,
            "dtype": self.dtype,
            "sampling": self.settings.to_dict(),
            "scheduler": scheduler,
            "clip_input": {
                "size": clip_input.size,
                "crop_size": clip_input.crop_size,
                "mean": list(clip_input.mean),
                "std": list(clip_input.std),
                "resize": "pil_uint8_bicubic",
            },
            "reference_routing": routing,
            "identity": None
            if self.bank is None
            else {"bank": self.bank.fingerprint(), "bank_template": self.bank_template, "source": "bank image of synthetic_id"},
        }

    # ---------------------------------------------------------------- saving, pickling
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Writes a self-contained directory that :meth:`from_pretrained` loads offline, bit for bit."""
        save_components(self.load(), directory, settings=self.settings.to_dict())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not self._given_components:
            state["_components"] = None  # reloaded from files / rebuilt from the seed where unpickled
        if self.bank_path is not None:
            state["_bank"] = None  # reloaded (and its fingerprint checked) from its folder
        return state

    def __repr__(self) -> str:
        source = "tiny" if self.tiny else (self.weights or "components")
        return f"FAMS({source!r}, crop_size={self.crop_size}, {self.settings})"
