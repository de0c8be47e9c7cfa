"""Command line training for DiffDeID's image path (``python -m anonloader.methods.diffdeid.train``).

Four steps; every folder holds face images aligned like FFHQ / CelebAMask-HQ (any size, resized
to the network's crop size; other data: align first with :func:`anonloader.align.align_faces`,
template ``"ffhq"``)::

    # 1. the landmark face model (offline stand-in for D3DFR): identity / expression PCA bases
    #    from one sub-folder per identity
    python -m anonloader.methods.diffdeid.train face-model --data /data/celebamask_hq_by_id \\
        --out runs/diffdeid/face_model.safetensors

    # 2. ρ, z_id (dlib), M (hull stand-in), I_3d (contour stand-in) of every training image
    python -m anonloader.methods.diffdeid.train prepare --images /data/CelebAMask-HQ/CelebA-HQ-img \\
        --face-model runs/diffdeid/face_model.safetensors --config paper --out runs/diffdeid/prepared.pt

    # 3. the two LDS (eqs. 2-3): z_id (unit vectors) and α (unit_norm=False)
    python -m anonloader.methods.diffdeid.train lds --prepared runs/diffdeid/prepared.pt --out runs/diffdeid/lds

    # 4. the UNet (eqs. 8-11; paper: Adam 2e-4, batch 8, 200k iterations)
    python -m anonloader.methods.diffdeid.train image --prepared runs/diffdeid/prepared.pt --config paper \\
        --face-model runs/diffdeid/face_model.safetensors --lds runs/diffdeid/lds \\
        --vgg-weights /models/vgg16-397923af.pth --max-steps 200000 --batch-size 8 \\
        --devices 1 --accelerator gpu --out runs/diffdeid

    # 5. the video network (sec. 3.4; paper: VoxCeleb1): frame pairs of one clip, reference ->
    #    target, one sub-folder of ffhq-aligned frames per clip
    python -m anonloader.methods.diffdeid.train video --clips /data/voxceleb1_fomm_frames \
        --face-model runs/diffdeid/face_model.safetensors --config paper --lambda-per 1 \
        --vgg-weights /models/vgg16-397923af.pth --max-steps 200000 --batch-size 8 --out runs/diffdeid_video

``image`` writes ``out/final`` (loadable with ``DiffDeID.from_pretrained`` or
``anonloader.anonymize(..., method="diffdeid", pretrained="runs/diffdeid/final")``) and Lightning
checkpoints under ``out/checkpoints`` (``--resume`` continues one; the loss phase is kept). The
``prepare`` output is one ``torch.save`` file of tensors only (loaded with ``weights_only``).
``video`` writes ``out/final`` holding the video network, loadable with
``DiffDeIDVideo(image_method, "runs/diffdeid_video/final")``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {folder}")
    return files


def _load(path: Path, size: int) -> torch.Tensor:
    """An image file -> ``3,size,size float in [0,1]``."""
    from torchvision.io import ImageReadMode, decode_image

    image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _template(size: int, n: int) -> torch.Tensor:
    from anonloader.align import template_points

    return template_points(size, "ffhq")[None].expand(n, 5, 2).clone()


def _face_model(path: str | None, rho_parts: dict[str, int] | None = None) -> Any:
    from safetensors.torch import load_file

    from anonloader.methods.diffdeid.conditions import LandmarkFaceModel

    if path is None:
        raise ConfigError("pass --face-model <file from `train face-model`>")
    return LandmarkFaceModel(rho_parts).load_state_dict(load_file(path))


def cmd_face_model(args: argparse.Namespace) -> Path:
    from safetensors.torch import save_file

    from anonloader.methods.diffdeid.conditions import LandmarkFaceModel, landmarks_68

    root = Path(args.data)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(folders) < 2:
        raise ConfigError(f"{root} needs one sub-folder of images per identity, at least two")
    size = args.size
    points, labels = [], []
    for label, folder in enumerate(folders):
        crops = torch.stack([_load(p, size) for p in _images(folder)])
        points.append(landmarks_68(crops, _template(size, len(crops))))
        labels += [label] * len(crops)
    model = LandmarkFaceModel().fit(torch.cat(points), labels, size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    log.info("face model from %d faces of %d identities -> %s", len(labels), len(folders), out)
    return out


def cmd_prepare(args: argparse.Namespace) -> Path:
    from anonloader.identity.embedders import load_embedder
    from anonloader.methods.diffdeid.conditions import (
        ContourRenderer,
        HullMasker,
        landmarks_68,
    )
    from anonloader.methods.diffdeid.model import embed_faces
    from anonloader.methods.diffdeid.network import resolve_config

    config = resolve_config(args.config)
    size = int(config["crop_size"])
    face_model = _face_model(args.face_model, config["rho_parts"])
    renderer, masker = ContourRenderer(face_model), HullMasker()
    embedder = load_embedder(args.embedder)
    files = _images(Path(args.images))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("image", "mask", "rendered", "rho", "z_id")}
    for start in range(0, len(files), args.chunk):
        crops = torch.stack([_load(p, size) for p in files[start:start + args.chunk]])
        landmarks = _template(size, len(crops))
        points = landmarks_68(crops, landmarks)
        rho = face_model(crops, points)
        parts["image"].append((crops * 255).round().to(torch.uint8))
        parts["mask"].append(masker(crops, points).to(torch.uint8))
        parts["rendered"].append((renderer(rho, size) * 255).round().to(torch.uint8))
        parts["rho"].append(rho)
        parts["z_id"].append(embed_faces(embedder, crops, landmarks))
    data = {k: torch.cat(v) for k, v in parts.items()}
    data["meta"] = torch.tensor(list(json.dumps({"embedder": embedder.name, "crop_size": size}).encode()), dtype=torch.uint8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out)
    log.info("prepared %d faces -> %s", len(files), out)
    return out


def _read_prepared(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    meta = json.loads(bytes(data.pop("meta").tolist()).decode())
    return data, meta


def cmd_lds(args: argparse.Namespace) -> Path:
    from anonloader.identity.sampler import LatentIDSampler
    from anonloader.methods.diffdeid.conditions import RhoLayout

    data, meta = _read_prepared(args.prepared)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = LatentIDSampler(data["z_id"].shape[1], hidden=args.hidden, depth=args.depth, space=meta["embedder"])
    ids.fit(data["z_id"], steps=args.steps, batch_size=args.batch_size)
    ids.save(out / "lds_id.pt")
    alpha = data["rho"][:, RhoLayout().slice("alpha")]
    shapes = LatentIDSampler(alpha.shape[1], hidden=args.hidden, depth=args.depth, unit_norm=False, space="landmark-standin")
    shapes.fit(alpha, steps=args.steps, batch_size=args.batch_size)
    shapes.save(out / "lds_shape.pt")
    return out


class _Prepared(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["image"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.data["image"][i].float() / 255, "mask": self.data["mask"][i].float(),
                "rendered": self.data["rendered"][i].float() / 255, "rho": self.data["rho"][i], "z_id": self.data["z_id"][i]}


def cmd_image(args: argparse.Namespace) -> Path:
    import lightning as L

    from anonloader.identity.sampler import LatentIDSampler
    from anonloader.methods.diffdeid.model import DiffDeID
    from anonloader.methods.diffdeid.network import resolve_config
    from anonloader.methods.diffdeid.training import DiffDeIDModule

    data, meta = _read_prepared(args.prepared)
    config = resolve_config(args.config)
    config["id_dim"] = int(data["z_id"].shape[1])
    if int(config["crop_size"]) != int(meta["crop_size"]):
        raise ConfigError(f"{args.prepared} holds {meta['crop_size']} px faces but the config's crop_size is {config['crop_size']}; prepare again")
    module = DiffDeIDModule(config, vgg_weights=args.vgg_weights, lambda_per=args.lambda_per, learning_rate=args.lr)
    loader = torch.utils.data.DataLoader(_Prepared(data), batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                         drop_last=len(data["image"]) >= args.batch_size)
    out = Path(args.out)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator=args.accelerator, devices=args.devices, precision=args.precision,
                        default_root_dir=str(out), logger=False, enable_progress_bar=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True)])
    trainer.fit(module, loader, ckpt_path=args.resume)
    lds = Path(args.lds) if args.lds else None
    method = DiffDeID(
        network=module.network.cpu(), face_model=_face_model(args.face_model, config["rho_parts"]) if args.face_model else None,
        embedder=meta["embedder"],
        id_sampler=LatentIDSampler.load(lds / "lds_id.pt") if lds else None,
        shape_sampler=LatentIDSampler.load(lds / "lds_shape.pt") if lds else None,
    )
    return method.save_pretrained(out / "final")


class _FramePairs(torch.utils.data.Dataset):
    """Ordered pairs (reference r, target t != r) of frames of one clip: the target with its ρ̂
    (α, δ, γ of the reference; β, p, ω window means around t) and rendered I_3d."""

    def __init__(self, clips: list[torch.Tensor], rhos: list[torch.Tensor], renderer: Any, window: int) -> None:
        from anonloader.methods.diffdeid.conditions import RhoLayout

        self.clips, self.rhos, self.renderer, self.window = clips, rhos, renderer, window
        self.layout = RhoLayout()
        self.pairs = [(c, r, t) for c, frames in enumerate(clips) for r in range(len(frames)) for t in range(len(frames)) if r != t]
        if not self.pairs:
            raise ConfigError("video training needs clips of at least two frames")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from anonloader.methods.diffdeid.video import video_rho

        c, r, t = self.pairs[i]
        rho = self.rhos[c]
        hat = video_rho(self.layout, rho, rho[r], torch.arange(len(rho)), self.window)[t]
        size = int(self.clips[c].shape[-1])
        return {"image": self.clips[c][t], "reference": self.clips[c][r], "rho": hat, "rendered": self.renderer(hat[None], size)[0]}


def cmd_video(args: argparse.Namespace) -> Path:
    import lightning as L

    from anonloader.methods.diffdeid.conditions import ContourRenderer, landmarks_68
    from anonloader.methods.diffdeid.model import save_network
    from anonloader.methods.diffdeid.network import resolve_config
    from anonloader.methods.diffdeid.training import DiffDeIDModule

    config = resolve_config(args.config)
    config["identity_condition"] = False
    size = int(config["crop_size"])
    face_model = _face_model(args.face_model, config["rho_parts"])
    root = Path(args.clips)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise ConfigError(f"{root} needs one sub-folder of aligned frames per clip")
    clips, rhos = [], []
    for folder in folders:
        frames = torch.stack([_load(p, size) for p in _images(folder)])
        clips.append(frames)
        rhos.append(face_model(frames, landmarks_68(frames, _template(size, len(frames)))).float())
    module = DiffDeIDModule(config, vgg_weights=args.vgg_weights, lambda_per=args.lambda_per, learning_rate=args.lr)
    dataset = _FramePairs(clips, rhos, ContourRenderer(face_model), args.window)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                         drop_last=len(dataset) >= args.batch_size)
    out = Path(args.out)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator=args.accelerator, devices=args.devices, precision=args.precision,
                        default_root_dir=str(out), logger=False, enable_progress_bar=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True)])
    trainer.fit(module, loader, ckpt_path=args.resume)
    return save_network(module.network.cpu(), out / "final", {"video": {"window": args.window}})


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="paper")
    p.add_argument("--out", required=True)
    p.add_argument("--face-model")
    p.add_argument("--vgg-weights")
    p.add_argument("--lambda-per", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anonloader.methods.diffdeid.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("face-model", help="fit the landmark face model's identity/expression bases")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p = sub.add_parser("prepare", help="precompute ρ, z_id, M, I_3d")
    p.add_argument("--images", required=True)
    p.add_argument("--face-model", required=True)
    p.add_argument("--config", default="paper")
    p.add_argument("--embedder", default="dlib")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--out", required=True)
    p = sub.add_parser("lds", help="train the z_id and α samplers (eqs. 2-3)")
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p = sub.add_parser("image", help="train the image network (eqs. 8-11)")
    p.add_argument("--prepared", required=True)
    p.add_argument("--lds")
    _training_options(p)
    p = sub.add_parser("video", help="train the video network on frame pairs (sec. 3.4)")
    p.add_argument("--clips", required=True)
    p.add_argument("--window", type=int, default=2)
    _training_options(p)
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    command = {"face-model": cmd_face_model, "prepare": cmd_prepare, "lds": cmd_lds, "image": cmd_image, "video": cmd_video}[args.command]
    return command(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
