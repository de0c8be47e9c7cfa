"""A real 2-process DDP fit (CPU, gloo): each rank anonymizes its own shard, together they see
every sample once, and each saw exactly the pixels a single process produces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
from _ddp_fit import SAMPLES, Faces  # noqa: E402

import anonloader  # noqa: E402

HERE = Path(__file__).parent


def test_ddp_ranks_anonymize_their_own_shards(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(HERE / "_ddp_fit.py"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    seen = [{int(i): s for i, s in r["seen"].items()} for r in ranks]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # disjoint shards
    assert set(seen[0]) | set(seen[1]) == set(range(SAMPLES))  # every sample once

    single = anonloader.anonymize(Faces(), method="blur")
    for shard in seen:
        for index, pixel_sum in shard.items():
            image, label = single[index]
            assert label == index
            assert abs(int(image.to(torch.int64).sum()) - pixel_sum) == 0
            assert pixel_sum != int(Faces()[index][0].to(torch.int64).sum())  # anonymized, not the original
