from __future__ import annotations

import numpy as np
import pytest
import torch

from anonloader.assets import sample_photo


# Tiny models on a 2-core machine: one intra-op thread avoids oversubscription (measured
# 10-40x slower MTCNN and tiny UNets with the default two threads under load).
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def _as_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)


@pytest.fixture(scope="session")
def t1_pil():
    """insightface's t1.jpg: six people around a table, 1280x886 RGB."""
    return sample_photo("t1")


@pytest.fixture(scope="session")
def astronaut_pil():
    """scikit-image's astronaut: one face, 512x512 RGB."""
    return sample_photo("astronaut")


@pytest.fixture(scope="session")
def t1_image(t1_pil) -> torch.Tensor:
    """t1.jpg as ``3,886,1280 float32 in [0,1]``."""
    return _as_tensor(t1_pil)


@pytest.fixture(scope="session")
def astronaut_image(astronaut_pil) -> torch.Tensor:
    """astronaut as ``3,512,512 float32 in [0,1]``."""
    return _as_tensor(astronaut_pil)
