"""FAMS training: 20 steps on a few crops lower the reconstruction loss; only the UNet and the
ReferenceNets' attention blocks train; the curriculum triplets."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lightning")

from anonloader.methods.fams import build_tiny_components  # noqa: E402
from anonloader.methods.fams.training import (  # noqa: E402
    CurriculumTripletData,
    FAMSTrainingModule,
    SwapRecord,
    TripletDataset,
)



def _records(n=2):
    g = torch.Generator().manual_seed(4)
    return [SwapRecord(*(torch.rand(3, 16, 16, generator=g) for _ in range(4))) for _ in range(n)]


def test_only_unet_and_referencenet_attention_train():
    module = FAMSTrainingModule(build_tiny_components(0))
    trainable = {id(p) for p in module.trainable_parameters()}
    assert all(id(p) in trainable for p in module.unet.parameters())
    assert not any(id(p) in trainable for p in module.vae.parameters())
    assert not any(id(p) in trainable for p in module.image_encoder.parameters())
    ref = module.referencenet
    attention = {id(p) for p in ref.attention_parameters()}
    assert attention and all(id(p) in trainable for p in ref.model.parameters() if id(p) in attention)
    assert not any(id(p) in trainable for p in ref.model.conv_in.parameters())
    assert not any(id(p) in trainable for p in ref.model.down_blocks[0].resnets.parameters())


def test_twenty_steps_lower_the_loss():
    torch.manual_seed(0)
    module = FAMSTrainingModule(build_tiny_components(0), learning_rate=1e-3, unconditional_probability=0.1)
    optimizer = module.configure_optimizers()
    record = _records(1)[0]
    batch = {k: v.unsqueeze(0).repeat(2, 1, 1, 1) for k, v in TripletDataset([record], "synthetic_driving")[0].items()}

    def loss_at(seed):  # same noise, timesteps and dropout draw for every evaluation
        torch.manual_seed(seed)
        return module.compute_loss(batch)

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(3))
    for step in range(20):
        loss = loss_at(100 + step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(3))
    assert after < 0.8 * before, (before, after)
    # the ReferenceNets' attention received gradients through the UNet's self-attention
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.referencenet.attention_parameters())


def test_trainer_with_accumulation_and_curriculum_runs():
    import lightning as L

    torch.manual_seed(0)
    module = FAMSTrainingModule(build_tiny_components(0), learning_rate=1e-4)
    records = _records(2)
    data = CurriculumTripletData(records, switch_epoch=1, batch_size=2)

    class ServedTriplets(L.Callback):  # what the trainer really iterated, batch by batch
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for i in range(batch["driving"].shape[0]):
                self.seen.append((trainer.current_epoch, *(batch[k][i].clone() for k in ("source", "driving", "target"))))

    served = ServedTriplets()
    trainer = L.Trainer(
        max_epochs=2, accumulate_grad_batches=2, reload_dataloaders_every_n_epochs=1, accelerator="cpu", callbacks=[served],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    before = module.unet.conv_in.weight.detach().clone()
    trainer.fit(module, datamodule=data)
    assert not torch.equal(before, module.unet.conv_in.weight)

    def kind(source, driving, target):  # which curriculum triplet a served item is, from its tensors
        for r in records:
            if torch.equal(source, r.source) and torch.equal(driving, r.swapped) and torch.equal(target, r.ground_truth):
                return "synthesized driving"
            if torch.equal(source, r.donor) and torch.equal(driving, r.ground_truth) and torch.equal(target, r.swapped):
                return "real driving"
        raise AssertionError("a served triplet is none of the curriculum's")

    by_epoch = {epoch: sorted(kind(*t) for e, *t in served.seen if e == epoch) for epoch in (0, 1)}
    # epoch 0, stage "mixed": each record once with the synthesized driving image and once with the
    # real one (4 items); epoch 1, after the switch: synthesized driving images only (2 items)
    assert by_epoch == {0: ["real driving"] * 2 + ["synthesized driving"] * 2, 1: ["synthesized driving"] * 2}
    assert len(served.seen) == 6


def test_curriculum_triplets():
    records = _records(2)
    mixed, late = TripletDataset(records, "mixed"), TripletDataset(records, "synthetic_driving")
    assert len(mixed) == 4 and len(late) == 2
    first = late[0]  # synthesized driving image, real target
    assert torch.equal(first["driving"], records[0].swapped) and torch.equal(first["target"], records[0].ground_truth)
    reverse = mixed[2]  # real driving image, the swap as target, the donor as source
    assert torch.equal(reverse["driving"], records[0].ground_truth)
    assert torch.equal(reverse["target"], records[0].swapped) and torch.equal(reverse["source"], records[0].donor)
    with pytest.raises(ValueError):
        TripletDataset(records, "late")
