"""Command line training of Diff-Privacy's MSI (paper eq. 7).

Amortized (default): one MSI over a folder of aligned face crops (``ffhq`` template, e.g.
FFHQ / CelebA-HQ), Lightning, AdamW::

    python -m anonloader.methods.diffprivacy.train msi \\
        --images /data/celebahq_512 --base-model /models/sd-v1-5 \\
        --clip-model /models/clip-vit-large-patch14 --out runs/diffprivacy \\
        --steps 20000 --batch-size 8 --lr 1e-4 --precision bf16-mixed

writes ``runs/diffprivacy/msi/`` for ``DiffPrivacy("runs/diffprivacy", base_model=..., ...)`` or
``anonloader.anonymize(..., method="diffprivacy", weights="runs/diffprivacy", ...)``.

Per image (the paper's regime: batch 1, lr 1e-3, a fresh MSI per image)::

    python -m anonloader.methods.diffprivacy.train msi --images /data/faces --per-image-steps 6000 ...

writes ``out/words/<image stem>.safetensors`` (the image's 10 pseudo-words, key ``words``) and
``out/words/index.json``; pass them to the method per face as
``conditions.extra["stage_words"]``.

``--tiny`` trains on tiny random backbones (tests, smoke runs on a CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError, InputError

__all__ = ["CropFolder", "build_parser", "main"]

log = logging.getLogger(__name__)

_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class CropFolder(torch.utils.data.Dataset):
    """Every image under ``root`` (recursively, sorted) as ``3,R,R float32 in [0,1]`` (bicubic
    resize to ``resolution``). The crops should already be aligned with the ``ffhq`` template."""

    def __init__(self, root: str | Path, resolution: int, limit: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"--images {self.root} is not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in _SUFFIXES)[:limit]
        if not self.files:
            raise ConfigError(f"no images ({', '.join(sorted(_SUFFIXES))}) under {self.root}")
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        except (OSError, UnidentifiedImageError) as error:
            raise InputError(f"cannot decode ({error}); remove or replace the file", index=index, source=str(path)) from error
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(self.resolution, self.resolution, 3)
        return data.permute(2, 0, 1).float().div(255.0)


def _method(args: argparse.Namespace) -> Any:
    from .model import DiffPrivacy

    kwargs: dict[str, Any] = {"guidance_scale": 0.0, "select": "first"}
    if args.tiny:
        return DiffPrivacy(tiny=True, tiny_seed=args.seed, **kwargs)
    from .backbone import load_backbone, locate_backbone
    from .msi import MSI, default_layers

    dirs, digests = locate_backbone(args.base_model, args.clip_model, allow_download=args.allow_download)
    backbone = load_backbone(dirs, digests)
    vision = backbone.image_encoder.config
    torch.manual_seed(args.seed)
    heads = 8 if backbone.text_width % 8 == 0 else 1
    msi = MSI(vision_width=vision.hidden_size, text_width=backbone.text_width, layers=default_layers(vision.num_hidden_layers), num_heads=heads)
    return DiffPrivacy(backbone=backbone, msi=msi, resolution=args.resolution, crop_size=args.resolution, **kwargs)


def train_amortized(args: argparse.Namespace) -> Path:
    import lightning.pytorch as pl

    from .training import MSIModule

    pl.seed_everything(args.seed, workers=True)
    method = _method(args)
    backbone, msi, _ = method.load()
    msi.train().requires_grad_(True)
    data = CropFolder(args.images, method.resolution, args.limit)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, drop_last=len(data) > args.batch_size,
        persistent_workers=args.num_workers > 0,
    )
    module = MSIModule(backbone, msi, lr=args.lr, dropout=args.dropout)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator=args.accelerator, devices=args.devices, precision=args.precision,
        default_root_dir=args.out, logger=False, enable_checkpointing=False, log_every_n_steps=10,
        enable_progress_bar=args.progress,
    )
    trainer.fit(module, loader)
    backbone.to(device="cpu")
    msi.cpu().eval().requires_grad_(False)
    out = method.save_pretrained(args.out)
    log.info("MSI written to %s/msi", out)
    return Path(out)


def train_per_image(args: argparse.Namespace) -> Path:
    from safetensors.torch import save_file

    from .msi import prompt_slot
    from .training import per_image_words

    method = _method(args)
    backbone, template, _ = method.load()
    device = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
    backbone.to(device=device)
    slot = prompt_slot(backbone)
    data = CropFolder(args.images, method.resolution, args.limit)
    folder = Path(args.out) / "words"
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    for i in range(len(data)):
        torch.manual_seed(args.seed)
        words, loss = per_image_words(
            backbone, template, slot, data[i][None].to(device), args.per_image_steps, lr=args.lr, seed=args.seed + i
        )
        words = words.float().cpu().contiguous()
        name = f"{data.files[i].stem}.safetensors"
        save_file({"words": words}, str(folder / name))
        index[str(data.files[i].relative_to(data.root))] = name
        log.info("image %d/%d %s: final loss %s", i + 1, len(data), data.files[i].name, "-" if loss is None else f"{float(loss):.4f}")
    (folder / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anonloader.methods.diffprivacy.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    msi = sub.add_parser("msi", help="train the multi-scale image inversion module (eq. 7)")
    msi.add_argument("--images", required=True, help="folder of aligned face crops (ffhq template)")
    msi.add_argument("--out", required=True)
    msi.add_argument("--base-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="SD v1.x, diffusers layout")
    msi.add_argument("--clip-model", default="openai/clip-vit-large-patch14")
    msi.add_argument("--allow-download", action="store_true")
    msi.add_argument("--tiny", action="store_true", help="tiny random backbones (tests)")
    msi.add_argument("--resolution", type=int, default=512)
    msi.add_argument("--steps", type=int, default=20000, help="amortized: optimizer steps")
    msi.add_argument("--per-image-steps", type=int, default=0, help="the paper's regime: a fresh MSI per image for N steps")
    msi.add_argument("--batch-size", type=int, default=8)
    msi.add_argument("--lr", type=float, default=1e-3)
    msi.add_argument("--dropout", type=float, default=0.05)
    msi.add_argument("--limit", type=int, default=None, help="use only the first N images")
    msi.add_argument("--accelerator", default="auto")
    msi.add_argument("--devices", default="auto")
    msi.add_argument("--precision", default="32-true")
    msi.add_argument("--num-workers", type=int, default=4)
    msi.add_argument("--seed", type=int, default=0)
    msi.add_argument("--progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.tiny:
        args.resolution = 32
    if args.per_image_steps < 0 or args.steps < 1:
        raise ConfigError("--steps must be >= 1 and --per-image-steps >= 0")
    return train_per_image(args) if args.per_image_steps else train_amortized(args)


if __name__ == "__main__":
    main()
