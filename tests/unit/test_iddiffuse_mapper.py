"""E_I identity mapper: triplet loss (eq. 4), batch-hard mining, Lightning training on synthetic
clustered embeddings whose identity signal is buried under larger nuisance variation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning")

from anonloader.methods.iddiffuse.identity_mapper import IdentityEncoder, IdentityMapper, mine_hard_triplets, triplet_loss




def test_triplet_loss_matches_equation_4() -> None:
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.1, 0.0]])
    n = torch.tensor([[0.0, 0.5], [0.0, 2.0]])
    # max(|a-p|^2 - |a-n|^2 + 0.2, 0): (1 - 0.25 + 0.2) = 0.95 and (0.01 - 4 + 0.2) -> 0
    assert triplet_loss(a, p, n, margin=0.2).item() == pytest.approx(0.95 / 2)


def test_mine_hard_triplets_picks_farthest_positive_and_nearest_negative() -> None:
    features = torch.tensor([[0.0], [1.0], [3.0], [1.5], [10.0]])
    labels = torch.tensor([0, 0, 0, 1, 2])
    anchor, positive, negative = mine_hard_triplets(features, labels)
    assert anchor.tolist() == [0, 1, 2]  # identities 1 and 2 have no positive
    assert positive.tolist() == [2, 2, 0]
    assert negative.tolist() == [3, 3, 3]


def _clustered(n_ids: int, per_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(n_ids, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    identity = centers[labels] + 0.15 * torch.randn(len(labels), 8, generator=generator)
    nuisance = 1.5 * torch.randn(len(labels), 24, generator=generator)  # pose/lighting-like, shared by all ids
    return torch.cat([identity, nuisance], dim=1), labels


def _nearest_neighbour_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    dist = torch.cdist(features, features)
    dist.fill_diagonal_(float("inf"))
    return (labels[dist.argmin(1)] == labels).float().mean().item()


def test_triplet_training_separates_identities() -> None:
    import lightning as L

    from anonloader.methods.iddiffuse.training import IdentityMapperModule

    g = torch.Generator().manual_seed(1)
    train_x, train_y = _clustered(16, 32, g)
    test_x, test_y = _clustered(16, 4, g)  # held-out samples of the same identities, fresh noise

    raw_accuracy = _nearest_neighbour_accuracy(torch.nn.functional.normalize(test_x, dim=1), test_y)
    assert raw_accuracy < 0.5, "the synthetic data must be hard in the raw space for this test to mean anything"

    torch.manual_seed(0)
    module = IdentityMapperModule(input_dim=32, hidden_dims=(64,), output_dim=16, margin=0.2, learning_rate=3e-3)
    with torch.no_grad():
        loss_before = module.eval().triplet_step(test_x, test_y).item()
    module.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, train_y), batch_size=128, shuffle=True)
    trainer = L.Trainer(max_epochs=35, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    module.eval()
    with torch.no_grad():
        mapped = module.mapper(test_x)
    assert _nearest_neighbour_accuracy(mapped, test_y) > 0.9
    with torch.no_grad():
        assert module.triplet_step(test_x, test_y).item() < 0.5 * loss_before


def test_identity_encoder_input_size_is_the_recognizers_sum() -> None:
    tiny = {"kind": "iresnet", "widths": [4, 4, 8, 8], "depths": [1, 1, 1, 1], "embedding_dim": 12, "input_size": 32}
    encoder = IdentityEncoder([tiny, {**tiny, "embedding_dim": 20}], hidden_dims=(16,), output_dim=8).eval()
    assert encoder.mapper.input_dim == 32
    out = encoder(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError):
        IdentityMapper(32)(torch.zeros(2, 31))
