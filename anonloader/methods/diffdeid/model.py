"""``DiffDeID``: the anonymization method (``method="diffdeid"``) around a trained UNet.

Per face (crops ``F,3,S,S`` aligned with the ``ffhq`` template, ``S`` = the network's crop size):

1. dlib's 68 points (:func:`~.conditions.landmarks_68`, inside the square implied by the
   conditions' 5 landmarks), then ρ = M_3D(I) (eq. 1), the mask M and I_m = I·(1−M);
2. z_id = the embedder's vector of the crop warped to the embedder's own template with
   ``FaceConditions.landmarks`` (dlib by default);
3. the synthetic identity: with a bank and ``synthetic_ids[i]`` from the keyed assigner,
   ``z'_id = bank.embeddings[id]`` and α' = ``bank.coefficients[id]`` (a bank without
   coefficients: an α-LDS draw seeded by the synthetic id, so one synthetic person keeps one
   shape); else an LDS draw from ``seeds[i]`` filtered against z_id (never within the
   embedder's same-person threshold), α' from the α-LDS. With ``deid_level`` k in 1..10, z'_id is
   the ``(k-1) m + m//2``-th of ``10 m`` filtered draws sorted by cosine distance to z_id
   (``m = level_draws``): our definition of the paper's Fig. 3/4 levels;
4. ρ' = ρ with α replaced by α' (eq. 4), I_3d = the renderer of ρ';
5. DDIM (``num_inference_steps``, default 50; eta 0) from noise drawn from
   ``torch.Generator(seeds[i])`` alone, E_t and K_b/V_b computed once per face;
6. posterior check (LDS faces): the output is embedded again; while its cosine to z_id is at or
   above the threshold, z'_id is re-drawn from the next derived seed and the face regenerated,
   at most ``max_redraws`` (4) times, then :class:`~anonloader.errors.MethodError` (fail closed).
   Bank faces are not re-drawn: the keyed assigner already kept them away from the real face.

Checkpoint layout (``save_pretrained(path)``, as IDDiffuse's): ``path/diffdeid.json`` (format,
network config, sampling settings, condition kinds) and ``path/model.safetensors`` (the UNet,
E_t included); beside them, when set, ``face_model.safetensors`` (the landmark stand-in's
bases), ``lds_id.pt`` and ``lds_shape.pt`` (the two samplers). Real condition models (D3DFR,
ONNX parser) are the user's files: pass them again to ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError, MethodError
from anonloader.fingerprint import state_hash
from anonloader.identity.sampler import LatentIDSampler, derive_seed
from anonloader.methods.diffdeid.conditions import (
    ContourRenderer,
    HullMasker,
    LandmarkFaceModel,
    RhoLayout,
    landmarks_68,
)
from anonloader.methods.diffdeid.network import DiffDeIDUNet
from anonloader.types import FaceConditions

__all__ = ["DiffDeID", "ddim_generate", "embed_faces", "load_network", "make_scheduler", "save_network", "state_hash"]

_FORMAT = "anonloader-diffdeid"
_FORMAT_VERSION = 1
_CONFIG_FILE = "diffdeid.json"
_WEIGHTS_FILE = "model.safetensors"
_FACE_MODEL_FILE = "face_model.safetensors"
_LDS_ID_FILE = "lds_id.pt"
_LDS_SHAPE_FILE = "lds_shape.pt"




def embed_faces(embedder: Any, crops: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """z_id: ``F,3,S,S`` crops in [0,1] and their ``F,5,2`` landmarks (crop pixels) -> ``F,D``
    vectors of ``embedder`` on the crops warped to the embedder's own template and size."""
    from anonloader.align import align_faces
    from anonloader.types import Detections

    crops = crops.detach().float().cpu()
    if len(crops) == 0:
        return torch.zeros(0, int(embedder.dim))
    template = getattr(embedder, "template", "arcface")
    size = int(getattr(embedder, "crop_size", 112))
    warped = []
    for crop, points in zip(crops, landmarks.detach().float().cpu()):
        det = Detections(torch.tensor([[0.0, 0.0, crop.shape[-1], crop.shape[-2]]]), points[None], torch.ones(1))
        warped.append(align_faces([crop], [det], crop_size=size, template=template).crops)
    return embedder(torch.cat(warped)).float()


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_scheduler(network: DiffDeIDUNet, kind: str = "ddim", steps: int = 50) -> Any:
    """The diffusers scheduler of ``network``'s linear schedule (DDIM with ``steps`` or DDPM)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(network.network_config["schedule"], beta_schedule="linear", clip_sample=True, prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(**kwargs)
    scheduler = DDIMScheduler(**kwargs, set_alpha_to_one=True)
    scheduler.set_timesteps(min(steps, network.num_train_timesteps))
    return scheduler


@torch.no_grad()
def ddim_generate(
    network: DiffDeIDUNet,
    texture_input: torch.Tensor,
    rendered: torch.Tensor,
    rho: torch.Tensor,
    identity: torch.Tensor | None,
    seeds: list[int],
    steps: int,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with ``network``.

    Args:
        texture_input: E_t's input ``F,3,S,S`` in [0,1] (I_m for the image network, the track's
            first de-identified crop I_d for the video network); E_t and K_b/V_b run once.
        rendered: I_3d ``F,3,S,S`` in [0,1]; rho: ``F,n_ρ``; identity: z'_id ``F,D`` or None.
        seeds: ``F`` seeds; face i's initial noise comes from ``torch.Generator(seeds[i])`` alone.

    Returns:
        ``F,3,S,S float32 in [0,1]`` on the network's device.
    """
    dev = next(network.parameters()).device
    texture = network.texture_kv(texture_input.to(dev) * 2 - 1)
    rendered, rho = rendered.to(dev) * 2 - 1, rho.to(dev)
    identity = None if identity is None else identity.to(dev)
    shape = texture_input.shape[1:]
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)) for s in seeds]
    sample = torch.stack(noise).to(dev)
    scheduler = make_scheduler(network, "ddim", steps)
    for t in scheduler.timesteps:
        timesteps = torch.full((len(seeds),), int(t), device=dev, dtype=torch.long)
        eps = network(sample, timesteps, rendered, rho, identity, texture)
        sample = scheduler.step(eps, t, sample, eta=0.0).prev_sample
    return ((sample + 1) / 2).clamp(0, 1)


def save_network(network: DiffDeIDUNet, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``diffdeid.json`` (format, network config, ``extra``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(path / _WEIGHTS_FILE))
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "network": network.config(), **(extra or {})}
    (path / _CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_network(path: str | Path) -> tuple[DiffDeIDUNet, str, dict[str, Any]]:
    """(network, SHA-256 of ``model.safetensors``, the ``diffdeid.json`` dict) of a folder
    written by :func:`save_network` / :meth:`DiffDeID.save_pretrained`."""
    from anonloader.methods.checkpoint import load_network_checkpoint

    network, digest, meta = load_network_checkpoint(
        path, what="a DiffDeID", config_file=_CONFIG_FILE, weights_file=_WEIGHTS_FILE,
        format_name=_FORMAT, version=_FORMAT_VERSION, build=DiffDeIDUNet,
    )
    return network, digest, meta  # type: ignore[return-value]


class DiffDeID:
    """Multi-conditional diffusion de-identification (DiffDeID).

    Args:
        pretrained: a folder written by :meth:`save_pretrained` (or by ``train.py``).
        config: a preset (``"paper"``, ``"tiny"``) or network config dict for a network with
            **random weights** (tests, smoke runs); ignored with ``pretrained``.
        network: an already built :class:`DiffDeIDUNet`.
        face_model: the :class:`~.conditions.FaceReconstructor` (default: the fitted
            :class:`~.conditions.LandmarkFaceModel` stand-in saved with the checkpoint).
        renderer: a :class:`~.conditions.FaceRenderer` (default: :class:`~.conditions.ContourRenderer`
            stand-in over the landmark model; a D3DFR reconstructor needs a BFM renderer).
        masker: a :class:`~.conditions.FaceMasker` (default: :class:`~.conditions.HullMasker` stand-in).
        embedder: the recognizer giving z_id (name for :func:`anonloader.identity.embedders.load_embedder`
            or an object); its dimension must equal the network's ``id_dim``.
        id_sampler, shape_sampler: the LDS of z_id (unit vectors) and of α (``unit_norm=False``).
        bank: an ``IdentityBank`` of the embedder's space (``synthetic_ids`` index it).
        num_inference_steps: DDIM steps (default 50; the paper does not say).
        deid_level: None, or 1..10 (see the module docstring); ``level_draws`` = m.
        max_redraws: posterior re-draws before failing closed (default 4).
        posterior_check: embed each output and re-draw while it matches the real face.
        device: where the network runs (default: the crops' device).
    """

    name = "diffdeid"
    template = "ffhq"

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        config: str | dict[str, Any] | None = None,
        network: DiffDeIDUNet | None = None,
        face_model: Any = None,
        renderer: Any = None,
        masker: Any = None,
        embedder: Any = "dlib",
        id_sampler: LatentIDSampler | None = None,
        shape_sampler: LatentIDSampler | None = None,
        bank: Any = None,
        num_inference_steps: int = 50,
        deid_level: int | None = None,
        level_draws: int = 3,
        max_redraws: int = 4,
        posterior_check: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if deid_level is not None and not 1 <= int(deid_level) <= 10:
            raise ConfigError(f"deid_level must be 1..10 or None, got {deid_level}")
        if level_draws < 1 or max_redraws < 0:
            raise ConfigError(f"level_draws must be >= 1 and max_redraws >= 0, got {level_draws}, {max_redraws}")
        self._weights_hash: str | None = None
        if network is None:
            if pretrained is not None:
                network, self._weights_hash, stored = self._load(Path(pretrained))
                face_model = face_model if face_model is not None else stored.get("face_model")
                id_sampler = id_sampler if id_sampler is not None else stored.get("id_sampler")
                shape_sampler = shape_sampler if shape_sampler is not None else stored.get("shape_sampler")
            elif config is not None:
                network = DiffDeIDUNet(config)
            else:
                raise ConfigError(
                    "DiffDeID needs trained weights: pass pretrained=<folder from save_pretrained / "
                    "python -m anonloader.methods.diffdeid.train image>, or config='tiny' for random weights"
                )
        if not network.identity_condition:
            raise ConfigError("this network was built with identity_condition=False (the video network); the image method needs the identity one")
        self.device = None if device is None else torch.device(device)
        self.network = network.to(self.device or "cpu").eval()
        self.crop_size = self.network.crop_size
        self.layout = RhoLayout.from_dict(self.network.network_config["rho_parts"])
        self.face_model = face_model if face_model is not None else LandmarkFaceModel(self.network.network_config["rho_parts"])
        if renderer is None:
            if not isinstance(self.face_model, LandmarkFaceModel):
                raise ConfigError(
                    f"a {getattr(self.face_model, 'kind', type(self.face_model).__name__)} reconstructor gives BFM coefficients: "
                    "pass renderer=<a FaceRenderer for that 3DMM>; the contour renderer only draws the landmark stand-in's shapes"
                )
            renderer = ContourRenderer(self.face_model)
        self.renderer = renderer
        self.masker = masker if masker is not None else HullMasker()
        if isinstance(embedder, str):
            from anonloader.identity.embedders import load_embedder

            embedder = load_embedder(embedder)
        self.embedder = embedder
        if int(embedder.dim) != self.network.id_dim:
            raise ConfigError(
                f"the {embedder.name} recognizer gives {embedder.dim}-d z_id but the network's C has width {self.network.id_dim}; "
                f"use a network with id_dim={embedder.dim} (e.g. config={{'preset': 'paper', 'id_dim': {embedder.dim}}}) or another embedder"
            )
        self.threshold = float(embedder.threshold)
        self.id_sampler, self.shape_sampler = id_sampler, shape_sampler
        for sampler, dim, what in ((id_sampler, self.network.id_dim, "id_sampler"), (shape_sampler, self.layout.size("alpha"), "shape_sampler")):
            if sampler is not None and sampler.dim != dim:
                raise ConfigError(f"{what} draws {sampler.dim}-d vectors, expected {dim}")
        if id_sampler is not None and id_sampler.space not in (None, embedder.name):
            raise ConfigError(f"id_sampler was trained on {id_sampler.space!r} embeddings but the embedder is {embedder.name!r}")
        if shape_sampler is not None and shape_sampler.unit_norm:
            raise ConfigError("shape_sampler must be built with unit_norm=False (3DMM α is not a unit vector)")
        self.bank = bank
        if bank is not None:
            space = (bank.meta.get("recognizer") or {}).get("name") if isinstance(bank.meta.get("recognizer"), dict) else None
            if space is not None and space != embedder.name:
                raise ConfigError(f"the bank holds {space!r} embeddings but DiffDeID's recognizer is {embedder.name!r}; build the bank in that space")
            if bank.dim != self.network.id_dim:
                raise ConfigError(f"the bank's {bank.dim}-d embeddings do not fit the network's id_dim {self.network.id_dim}")
        self.num_inference_steps, self.deid_level = int(num_inference_steps), None if deid_level is None else int(deid_level)
        self.level_draws, self.max_redraws, self.posterior_check = int(level_draws), int(max_redraws), bool(posterior_check)

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _load(path: Path) -> tuple[DiffDeIDUNet, str, dict[str, Any]]:
        from safetensors.torch import load_file

        network, digest, meta = load_network(path)
        stored: dict[str, Any] = {}
        if (path / _FACE_MODEL_FILE).is_file():
            stored["face_model"] = LandmarkFaceModel(meta["network"]["rho_parts"]).load_state_dict(load_file(str(path / _FACE_MODEL_FILE)))
        if (path / _LDS_ID_FILE).is_file():
            stored["id_sampler"] = LatentIDSampler.load(path / _LDS_ID_FILE)
        if (path / _LDS_SHAPE_FILE).is_file():
            stored["shape_sampler"] = LatentIDSampler.load(path / _LDS_SHAPE_FILE)
        return network, digest, stored

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> DiffDeID:
        """Load a folder written by :meth:`save_pretrained`; ``kwargs`` as in the constructor."""
        meta_path = Path(path) / _CONFIG_FILE
        sampling = json.loads(meta_path.read_text()).get("sampling", {}) if meta_path.is_file() else {}
        return cls(pretrained=path, **{**sampling, **kwargs})

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``diffdeid.json``, ``model.safetensors`` and the stand-in face model and
        samplers when set, under ``path``; returns ``path``."""
        from safetensors.torch import save_file

        path = save_network(self.network, path, {"sampling": self._sampling(), "conditions": self._conditions()})
        if isinstance(self.face_model, LandmarkFaceModel):
            save_file({k: v.contiguous() for k, v in self.face_model.state_dict().items()}, str(path / _FACE_MODEL_FILE))
        if self.id_sampler is not None:
            self.id_sampler.save(path / _LDS_ID_FILE)
        if self.shape_sampler is not None:
            self.shape_sampler.save(path / _LDS_SHAPE_FILE)
        return path

    def _sampling(self) -> dict[str, Any]:
        return {"num_inference_steps": self.num_inference_steps, "deid_level": self.deid_level, "level_draws": self.level_draws,
                "max_redraws": self.max_redraws, "posterior_check": self.posterior_check}

    def _conditions(self) -> dict[str, Any]:
        return {"face_model": self.face_model.config(), "renderer": self.renderer.config(), "masker": self.masker.config(),
                "embedder": self.embedder.config()}

    def config(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = state_hash(self.network)
        return {"name": self.name, "crop_size": self.crop_size, "template": self.template, **self._sampling(),
                "network": self.network.config(), "weights_sha256": self._weights_hash, **self._conditions(),
                "id_sampler": None if self.id_sampler is None else self.id_sampler.digest(),
                "shape_sampler": None if self.shape_sampler is None else self.shape_sampler.digest(),
                "bank": None if self.bank is None else self.bank.fingerprint()}

    # ------------------------------------------------------------------ conditions
    def identity_embeddings(self, crops: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """z_id: ``F,3,S,S`` crops in [0,1] and their ``F,5,2`` landmarks (crop pixels) ->
        ``F,D`` embedder vectors of the crops warped to the embedder's template."""
        return embed_faces(self.embedder, crops, landmarks)

    def _sample_alpha(self, seeds: list[int]) -> torch.Tensor:
        if self.shape_sampler is None:
            raise MethodError(
                "DiffDeID needs an α sampler (eq. 3): pass shape_sampler=LatentIDSampler(80, unit_norm=False) trained with "
                "`python -m anonloader.methods.diffdeid.train lds`, or load a checkpoint that holds lds_shape.pt"
            )
        return self.shape_sampler.sample(seeds=seeds, steps=50)

    def _draw_identity(self, i: int, seed: int, real: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """(z'_id ``D``, candidate index) for LDS face ``i`` from its seed, filtered against ``real``."""
        if self.id_sampler is None:
            raise MethodError(
                f"face {i}: no synthetic identity: pass bank=<IdentityBank> with an identity assigner, or id_sampler=<trained "
                "LatentIDSampler> (`python -m anonloader.methods.diffdeid.train lds`)"
            )
        try:
            if self.deid_level is not None:
                m = self.level_draws
                ranked = self.id_sampler.sample_ranked(seed, reference=real, threshold=self.threshold, count=10 * m, start=start * 10 * m)
                return ranked[(self.deid_level - 1) * m + m // 2], start
            vectors, used = self.id_sampler.sample_filtered([seed], avoid=real[None], threshold=self.threshold, start=[start])
        except MethodError:
            raise
        except Exception as error:
            raise MethodError(f"face {i}: {error}") from error
        return vectors[0], used[0]

    def synthetic_identities(self, conditions: FaceConditions, real: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
        """(z'_id ``F,D``, α' ``F,n_α``, candidate index per face, drawn-from-LDS per face)."""
        ids, alphas, used, drawn = [], [], [], []
        for i, (sid, seed) in enumerate(zip(conditions.synthetic_ids, conditions.seeds, strict=True)):
            if self.bank is not None and sid is not None:
                if not 0 <= sid < len(self.bank):
                    raise MethodError(f"face {i}: synthetic id {sid} is outside the bank of {len(self.bank)}; was the mapping made with another bank?")
                ids.append(self.bank.embeddings[sid])
                coefficients = getattr(self.bank, "coefficients", None)
                alphas.append(coefficients[sid].float() if coefficients is not None else self._sample_alpha([_seed_for("bank", self.bank.fingerprint(), sid)])[0])
                used.append(0)
                drawn.append(False)
            else:
                z, k = self._draw_identity(i, int(seed), real[i], starts[i])
                ids.append(z)
                alphas.append(self._sample_alpha([derive_seed(int(seed), 1_000_003 + k)])[0])
                used.append(k)
                drawn.append(True)
        return torch.stack(ids).float(), torch.stack(alphas).float(), used, drawn

    # ------------------------------------------------------------------ inference
    def generate(
        self, crops: torch.Tensor, masks: torch.Tensor, rendered: torch.Tensor, rho: torch.Tensor, identity: torch.Tensor, seeds: list[int]
    ) -> torch.Tensor:
        """DDIM from per-seed noise: crops, masks ``F,1,S,S`` in {0,1}, I_3d ``F,3,S,S`` in [0,1],
        ρ' ``F,n_ρ``, z'_id ``F,D`` -> ``F,3,S,S float32 in [0,1]`` on the network's device."""
        return ddim_generate(self.network, crops * (1 - masks), rendered, rho, identity, seeds, self.num_inference_steps)

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor, conditions: FaceConditions) -> torch.Tensor:
        """Anonymize ``F,3,S,S float32 in [0,1]`` ffhq-aligned crops; returns the same shape/device."""
        s = self.crop_size
        if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[-1] != s or crops.shape[-2] != s:
            raise MethodError(f"DiffDeID expects F,3,{s},{s} crops (ffhq template), got {tuple(crops.shape)}")
        if len(conditions) != crops.shape[0]:
            raise MethodError(f"{crops.shape[0]} crops but {len(conditions)} conditions")
        if crops.shape[0] == 0:
            return crops.clone()
        out_device, dev = crops.device, self.device or crops.device
        if next(self.network.parameters()).device != dev:
            self.network.to(dev)
        cpu = crops.detach().float().cpu()
        landmarks = conditions.landmarks.detach().float().cpu()
        points = landmarks_68(cpu, landmarks)
        rho = self.face_model(cpu, points).float()
        masks = self.masker(cpu, points).float()
        real = self.identity_embeddings(cpu, landmarks)
        seeds = [int(x) for x in conditions.seeds]
        starts = [0] * len(seeds)
        pending = list(range(len(seeds)))
        out = torch.empty_like(cpu)
        for attempt in range(self.max_redraws + 1):
            sub = FaceConditions([seeds[i] for i in pending], [conditions.identity_keys[i] for i in pending],
                                 [conditions.synthetic_ids[i] for i in pending], landmarks[pending])
            identity, alpha, used, drawn = self.synthetic_identities(sub, real[pending], [starts[i] for i in pending])
            rho_prime = self.layout.replace(rho[pending], "alpha", alpha)
            rendered = self.renderer(rho_prime, s).float()
            faces = self.generate(cpu[pending], masks[pending], rendered, rho_prime, identity, sub.seeds).float().cpu()
            out[pending] = faces
            if not self.posterior_check:
                break
            check = [j for j, d in enumerate(drawn) if d]
            if not check:
                break
            again = self.identity_embeddings(faces[check], landmarks[[pending[j] for j in check]])
            similar = torch.nn.functional.cosine_similarity(again, real[[pending[j] for j in check]], dim=1) >= self.threshold
            retry = [pending[check[j]] for j in range(len(check)) if bool(similar[j])]
            for j, index in enumerate(pending):
                starts[index] = used[j] + 1
            if not retry:
                break
            if attempt == self.max_redraws:
                raise MethodError(
                    f"faces {retry}: the generated face still matched the real one (cosine >= {self.threshold}) after "
                    f"{self.max_redraws} re-draws of the synthetic identity; the face is not released (fail closed)"
                )
            pending = retry
        return out.to(out_device, crops.dtype)
