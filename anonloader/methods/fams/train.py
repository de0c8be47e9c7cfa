"""Command line training for FAMS (paper 4.1) over records from :mod:`anonloader.methods.fams.data`.

Fine-tune the released weights (the paper: AdamW lr 1e-5, batch 1 with 8 accumulation steps,
512 px; the curriculum switches from real and synthesized driving images to synthesized only)::

    python -m anonloader.methods.fams.data build /data/photos runs/fams_records --weights hkung/face-anon-simple
    python -m anonloader.methods.fams.train --records runs/fams_records --weights hkung/face-anon-simple \\
        --out runs/fams --epochs 10 --switch-epoch 5

``--tiny`` trains tiny random networks instead (a dry run on the CPU). The networks keep the
reference routing they were loaded with (the released one for the authors' weights), and the
result is written with :func:`~anonloader.methods.fams.weights.save_components` to ``out/final``,
loadable with ``FAMS.from_pretrained("runs/fams/final")``. Lightning checkpoints go to
``out/checkpoints`` (``--resume`` continues one).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anonloader.methods.fams.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", required=True, type=Path, help="folder written by python -m anonloader.methods.fams.data build")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--weights", default=None, help="FAMS weights to fine-tune (directory or hub id)")
    parser.add_argument("--tiny", action="store_true", help="tiny random networks (a dry run)")
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--switch-epoch", type=int, default=None, help="first epoch with synthesized driving images only (default: half way)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=8, help="gradient accumulation steps (paper: 8)")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    parser.add_argument("--unconditional-probability", type=float, default=0.1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, default=None, help="Lightning checkpoint to resume")
    return parser


def main(argv: list[str] | None = None) -> Path:
    import lightning as L

    from .data import SwapRecordFolder
    from .model import FAMS
    from .training import CurriculumTripletData, FAMSTrainingModule
    from .weights import save_components

    args = build_parser().parse_args(argv)
    if args.tiny == (args.weights is not None):
        raise SystemExit("give either --weights (FAMS weights to fine-tune) or --tiny")
    if isinstance(args.devices, str) and args.devices.isdigit():
        args.devices = int(args.devices)
    L.seed_everything(args.seed, workers=True)
    records = SwapRecordFolder(args.records)
    resolution = int(records.manifest["resolution"])
    fams = (
        FAMS(tiny=True, tiny_seed=args.seed, resolution=resolution, crop_size=resolution)
        if args.tiny
        else FAMS(args.weights, allow_download=args.allow_download, resolution=resolution, crop_size=resolution)
    )
    components = fams.load()
    module = FAMSTrainingModule(components, learning_rate=args.lr, unconditional_probability=args.unconditional_probability)
    switch = args.switch_epoch if args.switch_epoch is not None else max(1, args.epochs // 2)
    data = CurriculumTripletData(records, switch_epoch=switch, batch_size=args.batch_size, num_workers=args.num_workers)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        reload_dataloaders_every_n_epochs=1,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        default_root_dir=args.out,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=args.out / "checkpoints")],
        log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    components.eval().to(device="cpu", dtype=torch.float32)
    settings: dict[str, Any] = fams.settings.to_dict()
    final = save_components(components, args.out / "final", settings=settings)
    log.info("FAMS trained for %d steps; weights in %s", trainer.global_step, final)
    return final


if __name__ == "__main__":  # pragma: no cover
    main()
