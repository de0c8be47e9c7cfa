"""E_t patch-wise texture extractor: token shape, invariance to permutations inside a grid cell,
sensitivity to moving features across cells."""

from __future__ import annotations

import pytest
import torch

from anonloader.methods.iddiffuse.texture import TextureEncoder, TextureExtractor




@pytest.fixture(scope="module")
def extractor() -> TextureExtractor:
    torch.manual_seed(0)
    head = TextureExtractor(in_channels=6, channels=5, grid=5, token_dim=12, dropout=0.3).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        head.norm_in.running_mean.uniform_(-0.5, 0.5)
        head.norm_in.running_var.uniform_(0.5, 2.0)
    return head


def test_output_shape(extractor: TextureExtractor) -> None:
    tokens = extractor(torch.randn(3, 6, 10, 10))
    assert tokens.shape == (3, 5 * 5 + 1, 12)
    assert extractor(torch.randn(2, 6, 13, 11)).shape == (2, 26, 12)  # sides not multiples of the grid


def _permute_within_cells(x: torch.Tensor, cell: int, generator: torch.Generator) -> torch.Tensor:
    """Shuffle the pixels inside each ``cell x cell`` block (the same way for all channels)."""
    out = x.clone()
    _, _, h, w = x.shape
    for i in range(0, h, cell):
        for j in range(0, w, cell):
            block = x[:, :, i:i + cell, j:j + cell].flatten(2)
            perm = torch.randperm(block.shape[-1], generator=generator)
            out[:, :, i:i + cell, j:j + cell] = block[:, :, perm].view(x.shape[0], x.shape[1], cell, cell)
    return out


def test_invariant_to_permutation_within_a_patch(extractor: TextureExtractor) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 10, 10, generator=g)  # 5x5 grid of 2x2 cells
    permuted = _permute_within_cells(x, 2, g)
    assert not torch.equal(permuted, x)
    torch.testing.assert_close(extractor(permuted), extractor(x), rtol=1e-4, atol=1e-5)


def test_not_invariant_to_permutation_across_patches(extractor: TextureExtractor) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 10, 10, generator=g)
    swapped = x.clone()
    swapped[:, :, 0, 0], swapped[:, :, 9, 9] = x[:, :, 9, 9], x[:, :, 0, 0]  # cell (0,0) <-> cell (4,4)
    diff = (extractor(swapped) - extractor(x)).abs()
    assert diff[:, 1 + 0].max() > 1e-3 and diff[:, 1 + 24].max() > 1e-3
    torch.testing.assert_close(diff[:, 0], torch.zeros_like(diff[:, 0]), rtol=0, atol=1e-5)  # global token unchanged


def test_texture_encoder_on_crops_keeps_backbone_frozen() -> None:
    torch.manual_seed(0)
    backbone = {"kind": "iresnet", "widths": [4, 4, 8, 8], "depths": [1, 1, 1, 1], "embedding_dim": 8, "input_size": 32}
    encoder = TextureEncoder(backbone, channels=4, grid=5, token_dim=8)
    encoder.train()
    assert not encoder.backbone.training and encoder.head.training
    before = encoder.backbone.bn1.running_mean.clone()
    tokens = encoder(torch.rand(4, 3, 32, 32))
    assert tokens.shape == (4, 26, 8)
    assert torch.equal(encoder.backbone.bn1.running_mean, before)
    tokens.sum().backward()
    assert all(p.grad is None for p in encoder.backbone.parameters())
    assert encoder.head.conv.weight.grad is not None
