"""Run by ``test_lightning_ddp.py`` as a script: a real 2-process DDP fit on the CPU (gloo) with
the sample stage of :class:`AnonymizedDataModule`. Each rank writes what its model saw.

    python _ddp_fit.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _small_faces import small_faces, to_uint8_tensor
from torch.utils.data import DataLoader, Dataset

from anonloader.integrations.lightning import AnonymizedDataModule

SAMPLES = 8


class Faces(Dataset):
    """``(3,96,96 uint8 image, index)`` samples: small real face photos."""

    def __init__(self) -> None:
        self.images = [to_uint8_tensor(p) for p in small_faces(SAMPLES, size=96)]

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int):
        return self.images[index], index


class FacesModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Faces(), batch_size=2, shuffle=False)


class Recorder(pl.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.net = torch.nn.Linear(3, 2)
        self.seen: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        pixels, index = batch
        for image, i in zip(pixels, index.tolist(), strict=True):
            self.seen[i] = int(image.to(torch.int64).sum())
        return self.net(pixels.float().mean(dim=(2, 3)) / 255).sum()

    def on_train_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps({"world": self.trainer.world_size, "seen": self.seen}))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Recorder(out), datamodule=AnonymizedDataModule(FacesModule(), method="blur", stage="sample"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
