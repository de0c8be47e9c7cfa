"""``IDDiffuse``: the anonymization method (``method="iddiffuse"``) around a trained network.

Per face: the synthetic identity image x̂ (from ``conditions.extra["synthetic_images"]``, else
``bank.images[conditions.synthetic_ids[i]]``, else — called without an assigner, e.g. directly
or with ``Anonymizer(..., identity=False)`` — ``bank.images[seed % len(bank)]``), its E_I
feature, the E_t tokens of the real crop, and a DDIM (default) or DDPM sampler started from
noise drawn from ``torch.Generator(seed)`` of that face alone, so a face's output depends only
on its crop, identity and seed.

The same synthetic person for the same real person, by default: an
:class:`~anonloader.pipeline.Anonymizer` given this method with a bank and no ``identity=``
uses :meth:`IDDiffuse.default_identity` — a keyed ``"online"``
:class:`~anonloader.identity.assigner.KeyedIdentityAssigner`: the recognizer (dlib, offline)
links every face to the first face of the same person seen by the process, and the keyed
mapper picks that person's synthetic identity among the :data:`DEFAULT_CANDIDATE_POOL` bank
identities nearest in E_I space (paper sec. 3.2; :meth:`identity_features` as ``feature_fn``,
the bank's E_I features computed once at construction unless saved with the bank), never one
the recognizer takes for the real person. Two photos of one person therefore get one synthetic
identity and one seed. The mapping is keyed by a secret the user supplies — ``$ANONLOADER_SECRET``
(or ``$ANONLOADER_SECRET_FILE``, a file holding it), or ``default_identity(secret=...)`` passed
as ``identity=`` — and :class:`~anonloader.errors.ConfigError` says so when none is set. No
per-run random secret is made up: the promise is the same person *in every run*, and a fresh
secret per run would break it (and change the pipeline fingerprint, so no cache would ever be
reused). ``identity=False`` opts out (``seed % n`` above: each photo its own identity).

Scope of the default: the online registry lives in the process. Faces seen by different
DataLoader workers, Ray actors or machines are linked only through identical crops; for a
dataset read in parallel, fit the ``"cluster"`` strategy over it first
(:meth:`KeyedIdentityAssigner.fit`, or ``anonloader identity embed`` + ``EmbeddingStore.fit``)
and pass that assigner, or give ``default_identity(registry_path=..., store=...)`` a persisted
registry and table (with ``store_embeddings=True`` for returning people across runs).

With ``synthetic_sets=<root>`` (a DCFace-style folder, one sub-folder of images per synthetic
identity, the bank built from one image per sub-folder so that ``bank.names[i]`` is
``"<identity>/<file>"``), the keyed mapping still picks the synthetic *identity*, and among that
identity's images the one nearest to the real crop in E_I space is used (paper sec. 3.2: the
nearest synthetic image, so pose, expression and other non-identity attributes fit); the same
real person keeps the same synthetic person.

``gamma`` (paper sec. 4, Fig. 5a): ``gamma=0`` (default) is the full synthetic identity,
``gamma=1`` keeps the original. Reading chosen (the paper writes the interpolation of the two
identity features, ``(1-γ) E_I(x̂) + γ E_I(x)``, without saying where it enters the network):
the blend is applied to what the feature becomes inside the UNet — the timestep term
``(1-γ) W E_I(x̂) + γ W E_I(x)`` (equal to blending the features, the map is linear) and every
attention layer's identity keys/values ``(1-γ) K(x̂) + γ K(x)`` (not equal to blending the
features: the identity tokens pass a LayerNorm first). At ``gamma=1`` x̂ has no influence at all.
``guidance_scale`` > 1 applies classifier-free guidance against the null conditions.

Remaining deviations from the paper, and how to get closer:

- E_I's recognizers: the paper concatenates ArcFace, FaRL and FaceNet (3 x 512-d). The ``"paper"``
  preset uses a single ArcFace IResNet-50; FaRL has no offline torch package. For the closest
  ensemble, add FaceNet to the network config before training, e.g.
  ``{"preset": "paper", "identity": {"recognizers": [<the IResNet-50 spec>, {"kind": "facenet",
  "pretrained": "vggface2"}], "hidden_dims": [2048, 1024], "output_dim": 512}}`` (E_I's input
  size follows the recognizers; :mod:`~anonloader.methods.iddiffuse.recognizers`).
- The keyed mapping's recognizer (which real faces are one person, which bank identities look
  like them) is dlib's ResNet, not E_I: E_I only ranks the bank by nearness.
- The gamma reading above.

Choosing the synthetic identity near the real face (paper sec. 3.2) with an assigner of your
own (what :meth:`IDDiffuse.default_identity` builds, spelled out): the bank gets E_I
features (:meth:`IDDiffuse.with_bank_features`) and the keyed assigner ranks the bank by the
real face's E_I feature (:meth:`IDDiffuse.identity_features` as ``feature_fn``)::

    model.bank = model.with_bank_features(IdentityBank.load("bank"))  # E_I features of its images
    assigner = KeyedIdentityAssigner("cluster", secret=..., bank=model.bank,
                                     feature_fn=model.identity_features, candidate_pool=16)

The synthetic identity is then among the 16 bank identities nearest in E_I space, picked in
the keyed order, never within the recognizer threshold of the real face, and kept for every
later image of that person (the mapper's table; see :mod:`anonloader.identity.mapper`).

Checkpoint layout (``save_pretrained(path)``): ``path/iddiffuse.json`` (format, network config,
sampling settings) and ``path/model.safetensors`` (every weight: recognizers, mapper, texture
head, UNet — EMA weights when exported from training). The identity bank is separate
(``IdentityBank.save`` / ``load``) and passed as ``bank=``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError, MethodError
from anonloader.fingerprint import state_hash
from anonloader.methods.iddiffuse.network import IDDiffuseNetwork
from anonloader.types import FaceConditions

__all__ = ["DEFAULT_CANDIDATE_POOL", "IDDiffuse"]

#: how many bank identities nearest in E_I space the default assigner chooses among
DEFAULT_CANDIDATE_POOL = 16
_FORMAT = "anonloader-iddiffuse"
_FORMAT_VERSION = 1
_CONFIG_FILE = "iddiffuse.json"
_WEIGHTS_FILE = "model.safetensors"


class IDDiffuse:
    """Dual-conditional diffusion anonymizer (Shaheryar et al., IDDiffuse).

    Args:
        pretrained: a folder written by :meth:`save_pretrained` (or by ``train.py``).
        config: a preset name (``"paper"``, ``"tiny"``) or network config dict to build a network
            with **random weights** (tests, smoke runs); ignored with ``pretrained``.
        network: an already built :class:`IDDiffuseNetwork` (e.g. from training).
        bank: an ``IdentityBank`` with ``images`` — the synthetic identities.
        sampler: ``"ddim"`` or ``"ddpm"``.
        num_inference_steps: sampler steps (DDPM ignores it and uses all T steps).
        gamma: identity interpolation in [0,1] (0 = synthetic, 1 = original).
        guidance_scale: classifier-free guidance weight (1 = off).
        eta: DDIM stochasticity (0 = deterministic given the initial noise).
        synthetic_sets: optional root of per-identity image folders (see the module docstring).
        device: where the network runs; None (default) follows the crops' device (the
            pipeline's ``device``). Crops are returned on their own device. Initial and DDPM
            noise is drawn on the CPU from per-face generators, so a seed gives the same noise on
            every device.
    """

    name = "iddiffuse"
    template = "arcface"

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        config: str | dict[str, Any] | None = None,
        network: IDDiffuseNetwork | None = None,
        bank: Any = None,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        gamma: float = 0.0,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        synthetic_sets: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if sampler not in ("ddim", "ddpm"):
            raise ConfigError(f"IDDiffuse sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self._weights_hash: str | None = None
        if network is None:
            if pretrained is not None:
                network, self._weights_hash = self._load_network(Path(pretrained))
            elif config is not None:
                network = IDDiffuseNetwork(config)
            else:
                raise ConfigError(
                    "IDDiffuse needs trained weights: pass pretrained=<folder from save_pretrained / "
                    "python -m anonloader.methods.iddiffuse.train>, or config='tiny' for random weights"
                )
        self.device = None if device is None else torch.device(device)
        self.network = network.to(self.device or "cpu").eval()
        self.crop_size = self.network.crop_size
        self.bank = bank
        self.sampler, self.num_inference_steps = sampler, int(num_inference_steps)
        self.gamma, self.guidance_scale, self.eta = float(gamma), float(guidance_scale), float(eta)
        self.synthetic_sets = None if synthetic_sets is None else Path(synthetic_sets)
        self._set_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._featured: tuple[str, Any] | None = None  # (bank fingerprint, bank with E_I features)

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _load_network(path: Path) -> tuple[IDDiffuseNetwork, str]:
        from anonloader.methods.checkpoint import load_network_checkpoint

        network, digest, _ = load_network_checkpoint(
            path, what="an IDDiffuse", config_file=_CONFIG_FILE, weights_file=_WEIGHTS_FILE,
            format_name=_FORMAT, version=_FORMAT_VERSION, build=IDDiffuseNetwork,
        )
        return network, digest  # type: ignore[return-value]

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> IDDiffuse:
        """Load a folder written by :meth:`save_pretrained`; ``kwargs`` as in the constructor."""
        meta_path = Path(path) / _CONFIG_FILE
        sampling = json.loads(meta_path.read_text()).get("sampling", {}) if meta_path.is_file() else {}
        return cls(pretrained=path, **{**sampling, **kwargs})

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``iddiffuse.json`` and ``model.safetensors`` under ``path``; returns ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(path / _WEIGHTS_FILE))
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "network": self.network.config(),
                "sampling": self._sampling()}
        (path / _CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path

    def _sampling(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "num_inference_steps": self.num_inference_steps, "gamma": self.gamma,
                "guidance_scale": self.guidance_scale, "eta": self.eta}

    def config(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = state_hash(self.network)
        bank = None if self.bank is None else self.bank.fingerprint()
        return {"name": self.name, "crop_size": self.crop_size, "template": self.template, **self._sampling(),
                "network": self.network.config(), "weights_sha256": self._weights_hash, "bank": bank,
                "synthetic_sets": None if self.synthetic_sets is None else str(self.synthetic_sets)}

    # ------------------------------------------------------------------ inference
    def _identity_set(self, bank_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images ``K,3,S,S``, E_I features ``K,D``) of the synthetic identity ``bank_index``."""
        if bank_index not in self._set_cache:
            from anonloader.methods.iddiffuse.data import load_face

            folder = self.synthetic_sets / Path(self.bank.names[bank_index]).parent
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}) if folder.is_dir() else []
            if not files:
                raise MethodError(f"no images for synthetic identity {self.bank.names[bank_index]!r} under {folder}")
            images = torch.stack([load_face(p, self.crop_size) for p in files])
            device = next(self.network.parameters()).device
            features = torch.cat([self.network.identity_encoder(images[i:i + 64].to(device)).cpu() for i in range(0, len(images), 64)])
            self._set_cache[bank_index] = (images, features)
        return self._set_cache[bank_index]

    def _nearest_set_images(self, index: list[int], real: torch.Tensor | None) -> torch.Tensor:
        if real is None:
            raise MethodError("synthetic_sets needs the real crops to choose the nearest synthetic image")
        device = next(self.network.parameters()).device
        real_features = self.network.identity_encoder(real.to(device)).cpu()
        chosen = []
        for i, bank_index in enumerate(index):
            images, features = self._identity_set(bank_index)
            chosen.append(images[int((features @ real_features[i]).argmax())])
        return torch.stack(chosen)

    def synthetic_images(self, conditions: FaceConditions, real: torch.Tensor | None = None) -> torch.Tensor:
        """``F,3,S,S float in [0,1]`` synthetic identity images for the faces of ``conditions``
        (``real``: the ``F,3,S,S`` crops, needed with ``synthetic_sets``)."""
        extra = conditions.extra.get("synthetic_images")
        if extra is not None:
            images = torch.as_tensor(extra).float()
            if images.ndim != 4 or images.shape[0] != len(conditions):
                raise MethodError(f"conditions.extra['synthetic_images'] must be F,3,S,S with F={len(conditions)}, got {tuple(images.shape)}")
        else:
            if self.bank is None or (getattr(self.bank, "images", None) is None and self.synthetic_sets is None):
                raise MethodError(
                    "IDDiffuse needs a synthetic identity image per face: pass bank=<IdentityBank with images> "
                    "(e.g. IdentityBank.from_folder on a DCFace-style set) or conditions.extra['synthetic_images']"
                )
            n = len(self.bank)
            index = [sid if sid is not None else seed % n for sid, seed in zip(conditions.synthetic_ids, conditions.seeds, strict=True)]
            bad = [i for i in index if not 0 <= i < n]
            if bad:
                raise MethodError(f"synthetic ids {bad} are outside the bank of {n} identities; was the mapping made with another bank?")
            if self.synthetic_sets is not None:
                images = self._nearest_set_images(index, real)
            else:
                images = self.bank.images[torch.tensor(index, dtype=torch.long)]
        if images.shape[-1] != self.crop_size or images.shape[-2] != self.crop_size:
            images = nn.functional.interpolate(images, size=(self.crop_size, self.crop_size), mode="bilinear", align_corners=False)
        return images.clamp(0, 1)

    # ------------------------------------------------------------------ E_I features for the mapping
    @torch.no_grad()
    def identity_features(self, crops: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """E_I features of faces: ``F,3,S,S float in [0,1]`` crops aligned with the arcface
        template (any ``S``; resized to ``crop_size``) -> ``F,D float32`` unit vectors on the CPU.

        Usable as ``KeyedIdentityAssigner(feature_fn=model.identity_features)``; the assigner's
        crops come with its embedder's alignment (dlib and ArcFace: the arcface template).
        """
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise MethodError(f"identity_features expects F,3,S,S crops, got {tuple(crops.shape)}")
        device = next(self.network.parameters()).device
        out = []
        for start in range(0, len(crops), batch_size):
            part = crops[start:start + batch_size].float().to(device)
            if part.shape[-1] != self.crop_size or part.shape[-2] != self.crop_size:
                part = nn.functional.interpolate(part, size=(self.crop_size, self.crop_size), mode="bilinear", align_corners=False, antialias=True)
            out.append(self.network.identity_encoder(part.clamp(0, 1)).float().cpu())
        if not out:
            return torch.zeros(0, int(self.network.identity_encoder.dim))
        return torch.cat(out)

    def bank_features(self, bank: Any = None, batch_size: int = 64) -> torch.Tensor:
        """``N,D float32`` E_I features of a bank's images (default: this method's bank)."""
        bank = self.bank if bank is None else bank
        if bank is None or getattr(bank, "images", None) is None:
            raise MethodError("bank_features needs an IdentityBank with images (e.g. IdentityBank.from_folder)")
        return self.identity_features(bank.images, batch_size=batch_size)

    def feature_config(self) -> dict[str, Any]:
        """What the E_I features depend on (stored in ``bank.meta["features"]``)."""
        if self._weights_hash is None:
            self._weights_hash = state_hash(self.network)
        return {"space": "iddiffuse/E_I", "crop_size": self.crop_size, "weights_sha256": self._weights_hash}

    def with_bank_features(self, bank: Any = None, batch_size: int = 64) -> Any:
        """A copy of ``bank`` (default: this method's) holding its E_I features, so the keyed
        mapper can choose synthetic identities near the real face (``candidate_pool``)."""
        bank = self.bank if bank is None else bank
        return bank.with_features(self.bank_features(bank, batch_size), self.feature_config())

    def _bank_with_features(self) -> Any:
        """This method's bank with E_I features of these weights: the bank itself when it holds
        them already (``meta["features"]`` equal to :meth:`feature_config`), else a copy, computed
        once per bank."""
        bank = self.bank
        if getattr(bank, "features", None) is not None and (bank.meta or {}).get("features") == self.feature_config():
            return bank
        if self._featured is None or self._featured[0] != bank.fingerprint():
            self._featured = (bank.fingerprint(), self.with_bank_features(bank))
        return self._featured[1]

    def default_identity(
        self,
        *,
        secret: Any = None,
        secret_file: str | Path | None = None,
        embedder: Any = "dlib",
        candidate_pool: int = DEFAULT_CANDIDATE_POOL,
        registry_path: str | Path | None = None,
        store: str | Path | None = None,
        store_embeddings: bool = False,
    ) -> Any:
        """The keyed identity assigner the pipeline uses when given none (module docstring).

        Args:
            secret, secret_file: the mapping secret; default ``$ANONLOADER_SECRET`` or the file
                named by ``$ANONLOADER_SECRET_FILE``.
            embedder: the recognizer that links faces of one person and keeps look-alikes out
                (name or object); the bank's ``embeddings`` must be in its space.
            candidate_pool: choose among this many bank identities nearest in E_I space (at most
                the bank's size); needs the bank's images (E_I features of them).
            registry_path, store, store_embeddings: persist the online registry and the mapping
                table (see :class:`~anonloader.identity.assigner.KeyedIdentityAssigner`).

        Returns:
            a :class:`~anonloader.identity.assigner.KeyedIdentityAssigner` (``"online"``), or None
            without a bank (then every face needs ``conditions.extra["synthetic_images"]``).

        Raises:
            ConfigError: no secret anywhere, or a bank whose embeddings are not in the
                recognizer's space.
        """
        if self.bank is None:
            return None
        from anonloader.identity.assigner import default_assigner

        options: dict[str, Any] = {}
        bank = self.bank
        if getattr(bank, "images", None) is not None:  # nearness in E_I space needs the bank's faces
            bank = self._bank_with_features()
            options = {"feature_fn": self.identity_features, "candidate_pool": max(1, min(int(candidate_pool), len(bank)))}
        return default_assigner(
            "IDDiffuse", bank, secret=secret, secret_file=secret_file, embedder=embedder, registry_path=registry_path,
            store=store, store_embeddings=store_embeddings, **options,
        )

    def _make_scheduler(self) -> Any:
        from diffusers import DDIMScheduler, DDPMScheduler

        kwargs = dict(self.network.network_config["schedule"], clip_sample=True, prediction_type="epsilon")
        if self.sampler == "ddim":
            scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=True)
            scheduler.set_timesteps(min(self.num_inference_steps, self.network.num_train_timesteps))
        else:
            scheduler = DDPMScheduler(**kwargs)
            scheduler.set_timesteps(self.network.num_train_timesteps)
        return scheduler

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """Anonymize ``F,3,S,S float32 in [0,1]`` aligned crops; returns the same shape/device."""
        if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[-1] != self.crop_size or crops.shape[-2] != self.crop_size:
            raise MethodError(f"IDDiffuse expects F,3,{self.crop_size},{self.crop_size} crops, got {tuple(crops.shape)}")
        if len(conditions) != crops.shape[0]:
            raise MethodError(f"{crops.shape[0]} crops but {len(conditions)} conditions")
        if crops.shape[0] == 0:
            return crops.clone()
        out_device, dev = crops.device, self.device or crops.device
        if next(self.network.parameters()).device != dev:
            self.network.to(dev)
        real = crops.float().to(dev)
        synthetic = self.synthetic_images(conditions, real).to(dev)
        net = self.network
        f_synthetic = net.identity_encoder(synthetic)
        f_real = net.identity_encoder(real) if self.gamma != 0.0 else None
        texture = net.texture_encoder(real)
        generators = [torch.Generator(device="cpu").manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in conditions.seeds]
        sample = torch.stack([torch.randn(real.shape[1:], generator=g) for g in generators]).to(dev)
        scheduler = self._make_scheduler()
        f = real.shape[0]
        for t in scheduler.timesteps:
            timesteps = torch.full((f,), int(t), device=dev, dtype=torch.long)
            eps = net.unet(sample, timesteps, f_synthetic, texture, identity_b=f_real,
                           gamma=self.gamma if f_real is not None else None)
            if self.guidance_scale != 1.0:
                drop = torch.ones(f, dtype=torch.bool, device=dev)
                eps_null = net.unet(sample, timesteps, f_synthetic, texture, drop_identity=drop, drop_texture=drop)
                eps = eps_null + self.guidance_scale * (eps - eps_null)
            if self.sampler == "ddim":
                noise = None
                if self.eta > 0:
                    noise = torch.stack([torch.randn(real.shape[1:], generator=g) for g in generators]).to(dev)
                sample = scheduler.step(eps, t, sample, eta=self.eta, variance_noise=noise).prev_sample
            else:
                noise = torch.stack([torch.randn(real.shape[1:], generator=g) for g in generators]).to(dev)
                sample = self._ddpm_step(scheduler, eps, int(t), sample, noise)
        return ((sample + 1.0) / 2.0).clamp(0, 1).to(out_device, crops.dtype)

    @staticmethod
    def _ddpm_step(scheduler: Any, eps: torch.Tensor, t: int, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One ancestral DDPM step (Ho et al. eqs. 6-7, x0 clipped to [-1,1]) with caller-drawn
        ``noise`` ``F,3,S,S`` (per-face generators keep each face independent of the batch)."""
        ac = scheduler.alphas_cumprod.to(sample.device, sample.dtype)
        ab_t = ac[t]
        ab_prev = ac[t - 1] if t > 0 else torch.ones_like(ab_t)
        beta_t = 1 - ab_t / ab_prev
        x0 = ((sample - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1.0, 1.0)
        mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + ((1 - beta_t).sqrt() * (1 - ab_prev) / (1 - ab_t)) * sample
        if t == 0:
            return mean
        variance = (beta_t * (1 - ab_prev) / (1 - ab_t)).clamp(min=1e-20)
        return mean + variance.sqrt() * noise
