"""FAMS checkpoints on disk: the released layout, our own, local directories and hub ids.

The authors' release (hub id ``hkung/face-anon-simple``) holds three diffusers model folders,
``unet``, ``referencenet`` and ``conditioning_referencenet`` (each a ``config.json`` plus
``diffusion_pytorch_model.safetensors``). The VAE (``vae/``) and the noise schedule
(``scheduler/scheduler_config.json``) come from Stable Diffusion 2.1
(``stabilityai/stable-diffusion-2-1``); the CLIP image encoder and its input settings from
``openai/clip-vit-large-patch14`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``). :func:`save_components` writes everything into one directory
(adding ``vae/``, ``scheduler/``, ``image_encoder/``, ``feature_extractor/``), which then loads
without the other two sources.

Each reference is a local directory (used as is, offline) or a hub id, which is read from the
local Hugging Face cache and downloaded only with ``allow_download=True``; otherwise
:class:`~anonloader.errors.ModelLoadError` says what to do.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ModelLoadError
from anonloader.fingerprint import hash_file

from .components import ClipInput, FAMSComponents
from .referencenet import ROUTINGS, ReferenceNet

__all__ = [
    "BASE_MODEL_ID",
    "CLIP_MODEL_ID",
    "FAMS_HUB_ID",
    "CPU_ALIGNMENT",
    "LoadedWeights",
    "load_components",
    "own_aligned_memory",
    "resolve_directory",
    "save_components",
    "weight_files_digest",
]

logger = logging.getLogger(__name__)

FAMS_HUB_ID = "hkung/face-anon-simple"
BASE_MODEL_ID = "stabilityai/stable-diffusion-2-1"
CLIP_MODEL_ID = "openai/clip-vit-large-patch14"

_DIFFUSERS_NETWORKS = ("unet", "referencenet", "conditioning_referencenet")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")
_digest_memo: dict[tuple[str, int, int], str] = {}


def _looks_like_hub_id(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and not reference.startswith((".", "~")) and "\\" not in reference


def resolve_directory(
    reference: str | os.PathLike[str],
    *,
    allow_patterns: list[str],
    allow_download: bool,
    what: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local directory for ``reference``.

    Args:
        reference: a directory, or a hub id ``owner/name``.
        allow_patterns: the files of a hub repository that are needed (nothing else is fetched).
        allow_download: whether a hub id missing from the local cache may be downloaded.
        what: the component's name, for messages.

    Raises:
        ModelLoadError: not a directory nor a cached hub id and downloads are not allowed, or the
            download failed.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    text = str(reference)
    if path.exists() or not _looks_like_hub_id(text):
        raise ModelLoadError(f"FAMS {what}: {text!r} is neither a directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download  # network-ok: fetches only when allow_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = snapshot_download(  # network-ok: local_files_only unless allow_download
            text, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns, local_files_only=not allow_download
        )
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"FAMS {what}: {text!r} is not in the local Hugging Face cache and downloading is not allowed; "
            "pass allow_download=True (needs internet) or the path of a local copy"
        ) from error
    except Exception as error:  # network, auth, missing repository
        raise ModelLoadError(f"FAMS {what}: could not get {text!r} from the hub ({type(error).__name__}: {error})") from error
    return Path(local)


def _weight_file(directory: Path, what: str) -> Path:
    for name in _WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise ModelLoadError(f"FAMS {what}: no weights ({' / '.join(_WEIGHT_NAMES)}) in {directory}")


def weight_files_digest(directory: Path, what: str) -> str:
    """SHA-256 over a model folder's ``config.json`` and weights file (memoized by path, size and
    modification time: the released weights are gigabytes)."""
    import hashlib

    files = [directory / "config.json", _weight_file(directory, what)]
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"FAMS {what}: {file} is missing")
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _digest_memo:
            _digest_memo[key] = hash_file(file)
        digest.update(file.name.encode())
        digest.update(_digest_memo[key].encode())
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"FAMS {what}: cannot read {path} ({error})") from error


@dataclass
class LoadedWeights:
    """Where each part came from, and the digests that go into the fingerprint."""

    directories: dict[str, Path] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    saved_settings: dict[str, Any] = field(default_factory=dict)
    #: the reference-state routing the networks were trained with: ``"released"`` for the
    #: authors' layout (no ``fams_config.json``), else what ``fams_config.json`` records
    reference_routing: str = "released"


def locate_weights(
    weights: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] = BASE_MODEL_ID,
    clip_model: str | os.PathLike[str] = CLIP_MODEL_ID,
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedWeights:
    """Finds every folder and file FAMS needs and hashes them, without loading any network."""
    found = LoadedWeights()
    files = ["*.json", "*.safetensors"]
    root = resolve_directory(
        weights,
        allow_patterns=[f"{n}/{f}" for n in (*_DIFFUSERS_NETWORKS, "vae", "scheduler", "image_encoder", "feature_extractor") for f in files]
        + ["fams_config.json"],
        allow_download=allow_download,
        what="weights",
        revision=revision,
        cache_dir=cache_dir,
    )
    for name in _DIFFUSERS_NETWORKS:
        if not (root / name / "config.json").is_file():
            raise ModelLoadError(
                f"FAMS weights: {root} has no {name}/config.json; expected the released layout "
                f"({', '.join(_DIFFUSERS_NETWORKS)} folders, as in {FAMS_HUB_ID})"
            )
        found.directories[name] = root / name
    if (root / "fams_config.json").is_file():
        saved = _read_json(root / "fams_config.json", "weights")
        found.saved_settings = saved.get("settings", {})
        if "reference_routing" in saved:
            found.reference_routing = saved["reference_routing"]
        else:
            logger.warning(
                "FAMS weights %s: fams_config.json (format %s) does not record the reference routing; "
                "assuming the released one. Checkpoints trained with anonloader before routing was "
                "recorded used reference_routing='by_name': pass it explicitly for those.",
                root,
                saved.get("format"),
            )
        if found.reference_routing not in ROUTINGS:
            raise ModelLoadError(f"FAMS weights: {root}/fams_config.json names an unknown reference routing {found.reference_routing!r}")

    if (root / "vae" / "config.json").is_file() and (root / "scheduler" / "scheduler_config.json").is_file():
        base = root
    else:
        base = resolve_directory(
            base_model,
            allow_patterns=["vae/*.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/*.json"],
            allow_download=allow_download,
            what="VAE and scheduler (Stable Diffusion 2.1)",
            cache_dir=cache_dir,
        )
    found.directories["vae"] = base / "vae"
    found.directories["scheduler"] = base / "scheduler"

    if (root / "image_encoder" / "config.json").is_file() and (root / "feature_extractor" / "preprocessor_config.json").is_file():
        found.directories["image_encoder"] = root / "image_encoder"
        found.directories["feature_extractor"] = root / "feature_extractor"
    else:
        clip = resolve_directory(
            clip_model,
            allow_patterns=["config.json", "preprocessor_config.json", "model.safetensors"],
            allow_download=allow_download,
            what="CLIP image encoder",
            cache_dir=cache_dir,
        )
        found.directories["image_encoder"] = clip
        found.directories["feature_extractor"] = clip

    for name in (*_DIFFUSERS_NETWORKS, "vae", "image_encoder"):
        found.digests[name] = weight_files_digest(found.directories[name], name)
    scheduler_file = found.directories["scheduler"] / "scheduler_config.json"
    extractor_file = found.directories["feature_extractor"] / "preprocessor_config.json"
    for name, file in (("scheduler", scheduler_file), ("feature_extractor", extractor_file)):
        if not file.is_file():
            raise ModelLoadError(f"FAMS {name}: {file} is missing")
    return found


#: Byte alignment of PyTorch's own CPU allocations (``c10::alloc_cpu``).
CPU_ALIGNMENT = 64


def own_aligned_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Moves every CPU parameter and buffer of ``module`` that is not :data:`CPU_ALIGNMENT`-byte
    aligned into freshly allocated (aligned) memory, in place; returns ``module``.

    Why: diffusers and transformers load ``.safetensors`` files by memory-mapping them and use
    the mapped tensors as parameters, so each parameter starts wherever the file put it (the
    header length plus the tensor's offset: 8-byte aligned, not 64). On the CPU, MKL's matrix
    kernels take a different vectorised path for such data, which sums in another order: the same
    weights then give outputs up to a few ulp apart (``Linear(32, 32)``: 1.2e-7), which 200
    denoising steps carry into the pixels. With every tensor owning aligned memory, a network
    loaded from files computes bit for bit what the same network built in memory computes, and
    its output no longer depends on a file's header length. Tensors on other devices are copies
    already and are left alone.
    """
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.device.type == "cpu" and parameter.data_ptr() % CPU_ALIGNMENT:
                parameter.data = parameter.data.clone()
        for submodule in module.modules():
            for name, buffer in list(submodule.named_buffers(recurse=False)):
                if buffer is not None and buffer.device.type == "cpu" and buffer.data_ptr() % CPU_ALIGNMENT:
                    setattr(submodule, name, buffer.clone())
    return module


def load_components(
    found: LoadedWeights,
    *,
    dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
    reference_routing: str | None = None,
) -> FAMSComponents:
    """Builds the networks from the folders :func:`locate_weights` found (on the CPU, in memory
    of their own: see :func:`own_aligned_memory`). ``reference_routing`` overrides the one the
    weights record (``found.reference_routing``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel

    dirs = found.directories
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(dirs["unet"], **kwargs)
        referencenet = ReferenceNet(UNet2DConditionModel.from_pretrained(dirs["referencenet"], **kwargs))
        conditioning = ReferenceNet(UNet2DConditionModel.from_pretrained(dirs["conditioning_referencenet"], **kwargs))
        vae = AutoencoderKL.from_pretrained(dirs["vae"], **kwargs)
        image_encoder = CLIPVisionModel.from_pretrained(dirs["image_encoder"], **({} if dtype is None else {"dtype": dtype}))
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"FAMS: could not load the networks from {sorted({str(p) for p in dirs.values()})}: {error}") from error
    for network in (unet, referencenet, conditioning, vae, image_encoder):
        own_aligned_memory(network)
    scheduler_config = _read_json(dirs["scheduler"] / "scheduler_config.json", "scheduler")
    clip_input = ClipInput.from_preprocessor_config(_read_json(dirs["feature_extractor"] / "preprocessor_config.json", "feature_extractor"))
    components = FAMSComponents(
        unet=unet,
        referencenet=referencenet,
        conditioning_referencenet=conditioning,
        vae=vae,
        image_encoder=image_encoder,
        clip_input=clip_input,
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        attention_backend=attention_backend,
        reference_routing=reference_routing or found.reference_routing,
    )
    return components.eval()


def save_components(components: FAMSComponents, directory: str | os.PathLike[str], settings: dict[str, Any] | None = None) -> Path:
    """Writes a self-contained FAMS directory (the released layout plus ``vae/``, ``scheduler/``,
    ``image_encoder/``, ``feature_extractor/`` and ``fams_config.json``, which records the sampling
    settings and the reference routing) that
    :func:`locate_weights` / :func:`load_components` read back bit for bit."""
    from diffusers import DDPMScheduler

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(root / "unet", safe_serialization=True)
    components.referencenet.model.save_pretrained(root / "referencenet", safe_serialization=True)
    components.conditioning_referencenet.model.save_pretrained(root / "conditioning_referencenet", safe_serialization=True)
    components.vae.save_pretrained(root / "vae", safe_serialization=True)
    components.image_encoder.save_pretrained(root / "image_encoder", safe_serialization=True)
    DDPMScheduler.from_config(components.scheduler_config).save_pretrained(root / "scheduler")
    (root / "feature_extractor").mkdir(exist_ok=True)
    (root / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(components.clip_input.to_preprocessor_config(), indent=2)
    )
    record = {"format": 2, "reference_routing": components.reference_routing, "settings": settings or {}}
    (root / "fams_config.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    logger.info("saved FAMS to %s", root)
    return root
