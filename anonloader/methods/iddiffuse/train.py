"""Command line training for IDDiffuse (two stages, as in the paper).

Stage 1, identity mapper E_I (paper: 50 epochs on DCFace's 10k synthetic identities)::

    python -m anonloader.methods.iddiffuse.train mapper \\
        --data /data/dcface_0.5m --arcface-weights /models/ms1mv3_arcface_r50/backbone.pth \\
        --out runs/iddiffuse_stage1 --epochs 50

Stage 2, dual-condition diffusion (paper: 20 epochs, batch 128, AdamW lr 1e-3 on CASIA-WebFace,
real identities paired with their nearest synthetic identity in E_I space)::

    python -m anonloader.methods.iddiffuse.train diffusion \\
        --init runs/iddiffuse_stage1 --real /data/casia_webface_112 --synthetic /data/dcface_0.5m \\
        --out runs/iddiffuse --epochs 20 --batch-size 128 --devices 4 --precision 16-mixed

Both folders hold one sub-folder per identity of ArcFace-aligned crops (112 x 112). Stage 1
writes an IDDiffuse checkpoint with the loaded recognizers, the trained mapper and an untrained
UNet; stage 2 writes ``out/final`` (EMA weights), loadable with
``IDDiffuse.from_pretrained("runs/iddiffuse/final", bank=...)`` or
``anonloader.anonymize(..., method="iddiffuse", pretrained="runs/iddiffuse/final", ...)``.
Lightning checkpoints of stage 2 go to ``out/checkpoints`` (``--resume`` continues one).
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


def _network_config(args: argparse.Namespace) -> dict[str, Any]:
    from anonloader.methods.iddiffuse.network import resolve_config

    config = resolve_config(json.loads(Path(args.config).read_text()) if Path(args.config).is_file() else args.config)
    if args.arcface_weights:  # the IResNet recognizers / texture backbone load arcface_torch weights
        for spec in [*config["identity"]["recognizers"], config["texture"]["backbone"]]:
            if spec["kind"] == "iresnet":
                spec["weights"] = str(args.arcface_weights)
    if args.facenet_weights:
        config["identity"]["recognizers"].append({"kind": "facenet", "weights": str(args.facenet_weights)})
    return config


def _strip_weights(config: dict[str, Any]) -> dict[str, Any]:
    """The config saved with a checkpoint: weights live in model.safetensors, not as paths."""
    for spec in [*config["identity"]["recognizers"], config["texture"]["backbone"]]:
        spec.pop("weights", None)
    return config


@torch.no_grad()
def _embed_folder(encoder: Any, folder: Any, batch_size: int, device: torch.device, num_workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=num_workers)
    return torch.cat([encoder.embed(images.to(device)).cpu() for images, _ in loader])


@torch.no_grad()
def _identity_means(encoder: Any, folder: Any, batch_size: int, device: torch.device, num_workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=num_workers)
    features = torch.cat([encoder(images.to(device)).cpu() for images, _ in loader])
    labels = torch.tensor(folder.labels)
    sums = torch.zeros(len(folder.names), features.shape[1]).index_add_(0, labels, features)
    return torch.nn.functional.normalize(sums, dim=1)


def _trainer(args: argparse.Namespace, **kwargs: Any) -> Any:
    import lightning as L

    return L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, accelerator=args.accelerator,
                     devices=args.devices, precision=args.precision, default_root_dir=args.out,
                     log_every_n_steps=10, **kwargs)


def train_mapper(args: argparse.Namespace) -> Path:
    import lightning as L

    from anonloader.methods.iddiffuse.data import FaceFolder, IdentityBatchSampler
    from anonloader.methods.iddiffuse.model import IDDiffuse
    from anonloader.methods.iddiffuse.network import IDDiffuseNetwork
    from anonloader.methods.iddiffuse.training import IdentityMapperModule

    L.seed_everything(args.seed, workers=True)
    config = _network_config(args)
    network = IDDiffuseNetwork(config)
    device = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
    encoder = network.identity_encoder.to(device).eval()
    folder = FaceFolder(args.data, network.crop_size, min_images=2)
    log.info("embedding %d images of %d identities", len(folder), len(folder.names))
    embeddings = _embed_folder(encoder, folder, args.embed_batch_size, device, args.num_workers)
    labels = torch.tensor(folder.labels)
    mapper_cfg = encoder.mapper.config()
    module = IdentityMapperModule(mapper_cfg["input_dim"], tuple(mapper_cfg["hidden_dims"]), mapper_cfg["output_dim"],
                                  margin=args.margin, learning_rate=args.lr or 1e-3)
    sampler = IdentityBatchSampler(folder.labels, args.identities_per_batch, args.images_per_identity, seed=args.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(embeddings, labels), batch_sampler=sampler)
    _trainer(args, enable_checkpointing=False).fit(module, loader)
    network.identity_encoder.mapper.load_state_dict(module.mapper.state_dict())
    network.network_config = _strip_weights(network.network_config)
    out = IDDiffuse(network=network.cpu()).save_pretrained(args.out)
    log.info("stage-1 checkpoint written to %s", out)
    return out


def train_diffusion(args: argparse.Namespace) -> Path:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from anonloader.methods.iddiffuse.data import FaceFolder, PairedFaceDataset, pair_identities
    from anonloader.methods.iddiffuse.model import IDDiffuse
    from anonloader.methods.iddiffuse.training import IDDiffuseModule

    L.seed_everything(args.seed, workers=True)
    if args.init is None:
        raise ConfigError("stage 2 needs --init <stage-1 checkpoint folder> (python -m ... train mapper ...)")
    network = IDDiffuse.from_pretrained(args.init).network
    device = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
    real = FaceFolder(args.real, network.crop_size)
    synthetic = FaceFolder(args.synthetic, network.crop_size)
    encoder = network.identity_encoder.to(device).eval()
    pairing = pair_identities(_identity_means(encoder, real, args.embed_batch_size, device, args.num_workers),
                              _identity_means(encoder, synthetic, args.embed_batch_size, device, args.num_workers),
                              min_distance=args.min_pair_distance)
    network.cpu()
    dataset = PairedFaceDataset(real, synthetic, pairing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                         drop_last=len(dataset) > args.batch_size, persistent_workers=args.num_workers > 0)
    module = IDDiffuseModule(network, learning_rate=args.lr or 1e-3, identity_loss_weight=args.identity_loss_weight,
                             texture_weight=args.texture_weight, gamma_order=args.gamma_order,
                             condition_dropout=args.condition_dropout, ema_decay=args.ema_decay)
    checkpoint = ModelCheckpoint(dirpath=Path(args.out) / "checkpoints", save_last=True)
    _trainer(args, callbacks=[checkpoint]).fit(module, loader, ckpt_path=args.resume)
    out = module.export_pretrained(Path(args.out) / "final")
    log.info("IDDiffuse weights (EMA) written to %s", out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anonloader.methods.iddiffuse.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ("mapper", "diffusion"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, type=Path, help="output folder")
        p.add_argument("--config", default="paper", help="preset name (paper, tiny) or a JSON network config file")
        p.add_argument("--arcface-weights", type=Path, help="insightface arcface_torch backbone.pth (IResNet-50 for 'paper')")
        p.add_argument("--facenet-weights", type=Path, help="facenet-pytorch InceptionResnetV1 state dict: adds FaceNet to E_I")
        p.add_argument("--epochs", type=int, default=50 if name == "mapper" else 20)
        p.add_argument("--max-steps", type=int, default=-1)
        p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3, the paper's)")
        p.add_argument("--accelerator", default="auto")
        p.add_argument("--devices", default="auto")
        p.add_argument("--precision", default="32-true")
        p.add_argument("--num-workers", type=int, default=4)
        p.add_argument("--embed-batch-size", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
    m = sub.choices["mapper"]
    m.add_argument("--data", required=True, type=Path, help="synthetic identity set (DCFace layout: one folder per identity)")
    m.add_argument("--margin", type=float, default=0.2, help="triplet margin alpha (eq. 4)")
    m.add_argument("--identities-per-batch", type=int, default=32)
    m.add_argument("--images-per-identity", type=int, default=4)
    d = sub.choices["diffusion"]
    d.add_argument("--init", type=Path, help="stage-1 checkpoint folder")
    d.add_argument("--real", required=True, type=Path, help="real identity set (CASIA-WebFace layout)")
    d.add_argument("--synthetic", required=True, type=Path, help="synthetic identity set (DCFace layout)")
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--identity-loss-weight", type=float, default=0.05)
    d.add_argument("--texture-weight", type=float, default=0.05, help="lambda of eq. 7")
    d.add_argument("--gamma-order", type=float, default=1.0)
    d.add_argument("--condition-dropout", type=float, default=0.1)
    d.add_argument("--ema-decay", type=float, default=0.9999)
    d.add_argument("--min-pair-distance", type=float, default=0.3, help="cosine distance in E_I space below which a synthetic identity is not paired")
    d.add_argument("--resume", type=Path, default=None, help="Lightning checkpoint to resume")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if isinstance(args.devices, str) and args.devices.isdigit():
        args.devices = int(args.devices)
    return train_mapper(args) if args.stage == "mapper" else train_diffusion(args)


if __name__ == "__main__":
    main()
