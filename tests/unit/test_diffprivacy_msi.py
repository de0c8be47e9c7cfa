"""MSI (eqs. 5-7): stage embeddings, the pseudo-word slot, and Lightning training that changes
only MSI's weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lightning")

from anonloader.methods.diffprivacy.backbone import build_tiny_backbone, module_digest
from anonloader.methods.diffprivacy.msi import (
    MSI,
    anchor_embedding,
    clip_class_tokens,
    default_layers,
    encode_stage_words,
    prompt_slot,
    stage_index,
    stage_timesteps,
)
from anonloader.methods.diffprivacy.training import (
    MSIModule,
    cross_attention_dropouts,
    msi_loss,
)


@pytest.fixture(scope="module")
def backbone():
    return build_tiny_backbone(0)


def _msi(backbone, seed: int = 0) -> MSI:
    torch.manual_seed(seed)
    vision = backbone.image_encoder.config
    return MSI(vision_width=vision.hidden_size, text_width=backbone.text_width, layers=default_layers(vision.num_hidden_layers), num_heads=2)


def test_stage_arithmetic():
    assert stage_timesteps() == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert [stage_index(t) for t in (0, 99, 100, 581, 999)] == [0, 0, 1, 5, 9]
    assert default_layers(24) == (5, 10, 14, 19, 24) and default_layers(5) == (1, 2, 3, 4, 5)


def test_placeholder_word_goes_through_the_real_text_encoder(backbone):
    slot = prompt_slot(backbone)
    assert backbone.tokenizer.convert_ids_to_tokens(int(slot.ids[slot.position])) == "*</w>"
    with torch.no_grad():
        # the token's own embedding in the slot gives exactly the encoder's output for the prompt
        same = encode_stage_words(backbone, slot, anchor_embedding(backbone, slot)[None])
        assert torch.equal(same[0], backbone.text_encoder(input_ids=slot.ids[None]).last_hidden_state[0])
        other = encode_stage_words(backbone, slot, torch.randn(1, backbone.text_width))
    # causal attention: tokens before the slot are unchanged, the slot and later ones change
    assert torch.equal(other[0, : slot.position], same[0, : slot.position])
    assert not torch.allclose(other[0, slot.position :], same[0, slot.position :])


def test_msi_gives_ten_stage_embeddings(backbone):
    msi = _msi(backbone).eval()
    slot = prompt_slot(backbone)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    features = clip_class_tokens(backbone, images, msi.config.layers)
    assert features.shape == (2, 5, 24)
    with torch.no_grad():
        words = msi(features, torch.tensor(stage_timesteps()), anchor_embedding(backbone, slot))
        conds = encode_stage_words(backbone, slot, words)
        again = encode_stage_words(backbone, slot, msi(features, torch.tensor(stage_timesteps()), anchor_embedding(backbone, slot)))
    assert words.shape == (2, 10, backbone.text_width) and conds.shape == (2, 10, 77, backbone.text_width)
    assert torch.equal(conds, again)  # eval is deterministic
    assert not torch.equal(words[0], words[1])  # different faces, different words
    # the time modulation is zero-initialised: every stage starts equal; training separates them
    assert torch.allclose(words[:, 0], words[:, 9])


def test_msi_round_trips_through_save_pretrained(backbone, tmp_path):
    msi = _msi(backbone, seed=3)
    msi.save_pretrained(tmp_path / "msi", safe_serialization=True)
    loaded = MSI.from_pretrained(tmp_path / "msi")
    assert module_digest(loaded) == module_digest(msi) and tuple(loaded.config.layers) == tuple(msi.config.layers)


def test_training_uses_each_samples_own_stage(backbone):
    msi = _msi(backbone)
    slot = prompt_slot(backbone)
    seen: list[torch.Tensor] = []
    handle = msi.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    try:
        loss, t = msi_loss(backbone, msi, slot, torch.rand(6, 3, 32, 32), torch.Generator().manual_seed(4))
    finally:
        handle.remove()
    assert loss.ndim == 0 and loss.requires_grad
    assert torch.equal(seen[0][:, 0], (t // 100) * 100 + 50)


def test_two_lightning_steps_change_only_msi(backbone, tmp_path):
    import lightning.pytorch as pl

    msi = _msi(backbone, seed=5)
    frozen = {name: module_digest(net) for name, net in backbone.networks().items()}
    before = {k: v.clone() for k, v in msi.state_dict().items()}
    module = MSIModule(backbone, msi, lr=1e-2)
    modes: list[tuple[bool, bool, float]] = []
    probe = cross_attention_dropouts(backbone.unet)[0]
    handle = probe.register_forward_pre_hook(lambda m, _a: modes.append((m.training, backbone.unet.training, m.p)))
    data = torch.utils.data.DataLoader(torch.rand(4, 3, 32, 32), batch_size=2)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    handle.remove()
    assert modes == [(True, False, 0.05)] * 2  # dropout on in the cross-attention only, while training
    assert {name: module_digest(net) for name, net in backbone.networks().items()} == frozen
    changed = [k for k, v in msi.state_dict().items() if not torch.equal(v, before[k])]
    assert "out.weight" in changed and any(k.startswith("projections.") for k in changed)
    assert all(not p.requires_grad for net in backbone.networks().values() for p in net.parameters())
    dropouts = cross_attention_dropouts(backbone.unet)
    assert len(dropouts) == 16 and all(d.p == 0.05 and not d.training for d in dropouts)
    assert "_backbone" not in dict(module.named_children()) and all(k.startswith("msi.") for k in module.state_dict())
