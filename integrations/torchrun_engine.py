"""Precompute under ``torchrun``: every rank fills its own shard; rank 0 writes the manifest.

    torchrun --nproc_per_node 2 -m anonloader.cache.commands precompute SRC OUT --engine torchrun

Rank and world size come from the environment (``RANK``, ``WORLD_SIZE``; a single process
without them is rank 0 of 1). Ranks synchronise over ``gloo`` on CPU (``nccl`` when each rank
has a GPU). Rank ``r`` of ``w`` anonymizes ``shard_range(n, w, r)`` into
``OUT/shard-r-of-w``; because keys and identity mapping depend only on content, fingerprint
and secret, the union of the shards equals a single-process run entry for entry.

Nothing crosses between ranks but the barrier: each rank writes sealed, pickle-free values
(:mod:`anonloader.cache.format`) into its own shard, and holds only the subkeys derived from
the secret (``job.keys``), never the secret. Failed samples are recorded in each shard and
listed in the manifest; running the command again retries them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["rank_and_world_size", "run_torchrun"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_torchrun(
    job: Any,
    root: Path,
    report: Any,
    *,
    workers: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    map_size: int = 1 << 30,
) -> None:
    """Fills this rank's shard of the cache under ``root`` and, on rank 0, the manifest."""
    import torch
    import torch.distributed as dist

    from anonloader.cache.manifest import shard_name, write_manifest
    from anonloader.cache.precompute import fill_cache, open_for_job, shard_range

    rank, world_size = rank_and_world_size()
    started_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        started_group = True
    try:
        root.mkdir(parents=True, exist_ok=True)
        shard = root / shard_name(rank, world_size)
        cache = open_for_job(job, shard, map_size=map_size)
        try:
            indices = shard_range(len(job.dataset), world_size, rank)
            fill_cache(job, cache, indices, report, workers=workers, batch_size=batch_size,
                       progress=progress and rank == 0, description=f"precompute rank {rank}/{world_size}")
        finally:
            cache.close()
        report.shards = [str(root / shard_name(r, world_size)) for r in range(world_size)]
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            write_manifest(root, report.shards, secret=job.keys if job.keys.keyed else None)
        if world_size > 1:
            dist.barrier()
    finally:
        if started_group:
            dist.destroy_process_group()
