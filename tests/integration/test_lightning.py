"""AnonymizedDataModule with a real Lightning Trainer on CPU: the model sees anonymized pixels
and the labels it would have seen anyway; hook order pinned; state passthrough; DDP sampler."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from anonloader.integrations.lightning import AnonymizedDataModule
from anonloader.pipeline import Anonymizer
from tests.integration._small_faces import face_region, small_faces, to_uint8_tensor

FACES = [to_uint8_tensor(p) for p in small_faces(4)]
LABELS = [3, 1, 4, 1]


class Faces(Dataset):
    def __len__(self):
        return len(FACES)

    def __getitem__(self, i):
        return {"image": FACES[i], "label": LABELS[i], "index": i}


class FaceData(pl.LightningDataModule):
    """A plain DataModule that logs its calls and carries state."""

    def __init__(self, log, with_hooks=False):
        super().__init__()
        self.log, self.counter, self.num_classes = log, 0, 5
        if with_hooks:  # only this instance overrides the transfer hooks
            self.on_before_batch_transfer = self._before
            self.transfer_batch_to_device = self._transfer
            self.on_after_batch_transfer = self._after

    def prepare_data(self):
        self.log.append("prepare_data")

    def setup(self, stage):
        self.log.append("setup:" + str(getattr(stage, "value", stage)))

    def train_dataloader(self):
        self.counter += 1
        return DataLoader(Faces(), batch_size=2, shuffle=False)

    def val_dataloader(self):
        return DataLoader(Faces(), batch_size=2)

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]

    def _before(self, batch, dataloader_idx):
        self.log.append("dm.on_before_batch_transfer")
        return batch

    def _transfer(self, batch, device, dataloader_idx):
        self.log.append("dm.transfer_batch_to_device")
        return pl.LightningDataModule.transfer_batch_to_device(self, batch, device, dataloader_idx)

    def _after(self, batch, dataloader_idx):
        # the wrapped module's own hook sees the batch as it came, before anonymization
        self.log.append("dm.on_after_batch_transfer")
        self.log.append(("raw", torch.equal(batch["image"], torch.stack([FACES[i] for i in batch["index"].tolist()]))))
        return batch


class TinyModel(pl.LightningModule):
    def __init__(self, log):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 5))
        self.log_calls, self.seen = log, []

    def training_step(self, batch, batch_idx):
        self.log_calls.append("model.training_step")
        self.seen.append({k: v.detach().clone() for k, v in batch.items()})
        logits = self.net(batch["image"].float() / 255)
        return torch.nn.functional.cross_entropy(logits, batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(steps):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def anonymizer():
    return Anonymizer("pixelate")


@pytest.fixture(scope="module")
def expected(anonymizer):
    result = anonymizer([f.float() / 255 for f in FACES])
    return [img.mul(255).round().to(torch.uint8) for img in result.images]


def _check_seen(seen, expected):
    assert len(seen) == 2
    for batch in seen:
        for image, label, index in zip(batch["image"], batch["label"].tolist(), batch["index"].tolist()):
            assert label == LABELS[index]  # the labels it would have seen anyway
            assert image.dtype == torch.uint8 and image.shape == FACES[index].shape
            # the pipeline's output (to one grey level: batch composition changes float rounding)
            assert (image.int() - expected[index].int()).abs().max() <= 1
            rows, cols = face_region()
            change = (image[:, rows, cols].float() - FACES[index][:, rows, cols].float()).abs().mean()
            assert change > 3, f"face of sample {index} barely changed ({change:.2f})"


def test_sample_stage_fit(anonymizer, expected):
    log = []
    data = AnonymizedDataModule(FaceData(log), anonymizer)
    model = TinyModel(log)
    _trainer(2).fit(model, datamodule=data)
    _check_seen(model.seen, expected)
    assert log[:2] == ["prepare_data", "setup:fit"]
    assert data.num_classes == 5  # attributes of the wrapped module stay reachable


def test_batch_stage_fit_and_hook_order(anonymizer, expected):
    log = []
    inner = FaceData(log, with_hooks=True)
    data = AnonymizedDataModule(inner, anonymizer, stage="batch")
    model = TinyModel(log)
    _trainer(2).fit(model, datamodule=data)
    _check_seen(model.seen, expected)
    step = ["dm.on_before_batch_transfer", "dm.transfer_batch_to_device", "dm.on_after_batch_transfer", ("raw", True), "model.training_step"]
    assert log == ["prepare_data", "setup:fit", *step, *step]
    assert inner.trainer is data.trainer is not None


def test_split_selection_leaves_other_splits_alone(anonymizer):
    data = AnonymizedDataModule(FaceData([]), anonymizer, splits=("val",))
    train = next(iter(data.train_dataloader()))
    assert torch.equal(train["image"], torch.stack(FACES[:2]))
    val = next(iter(data.val_dataloader()))
    assert not torch.equal(val["image"], torch.stack(FACES[:2]))
    with pytest.raises(Exception, match="unknown split"):
        AnonymizedDataModule(FaceData([]), anonymizer, splits=("training",))


def test_state_dict_passthrough_and_pickling(anonymizer):
    inner = FaceData([])
    data = AnonymizedDataModule(inner, anonymizer)
    data.train_dataloader()
    assert data.state_dict() == {"counter": 1}
    data.load_state_dict({"counter": 7})
    assert inner.counter == 7
    clone = pickle.loads(pickle.dumps(AnonymizedDataModule(FaceData([], with_hooks=False), anonymizer, stage="batch")))
    assert clone.anonymizer.fingerprint() == anonymizer.fingerprint()
    assert "on_after_batch_transfer" in clone.__dict__  # the batch hook is bound again


def test_ddp_sampler_injection_shards_the_anonymized_dataset(anonymizer):
    """Lightning re-instantiates the loader with a DistributedSampler per rank (what DDP does)."""
    from lightning.pytorch.utilities.data import _update_dataloader

    data = AnonymizedDataModule(FaceData([]), anonymizer)
    loader = data.train_dataloader()
    seen = []
    for rank in (0, 1):
        sharded = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False))
        assert type(sharded.dataset).__name__ == "AnonymizedDataset"
        seen += [i for batch in sharded for i in batch["index"].tolist()]
    assert sorted(seen) == [0, 1, 2, 3]  # each rank its own shard, together all samples once
