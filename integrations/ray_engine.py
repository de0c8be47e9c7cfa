"""Precompute on a Ray cluster: Ray Data ``map_batches`` over an actor pool.

Each actor holds one copy of the pipeline (models load once per actor) and turns a batch of
sample indices into packed cache values; GPU actors (``num_gpus=1``) are used when the cluster
has GPUs. The driver is the single LMDB writer: it commits every batch it receives in one
transaction, so an interrupted run resumes from its last commit.

Tested on a local cluster (``ray.init(num_cpus=2)``); on a real cluster call ``ray.init``
with its address before :func:`anonloader.cache.precompute` (an already initialised Ray is
used as it is).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

__all__ = ["SampleActor", "run_ray"]


class SampleActor:
    """A Ray Data actor: ``{"index": ...}`` batches -> ``{"index", "payload"}`` (pickled results)."""

    def __init__(self, job: Any, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.job.compute(int(i)) for i in batch["index"]]
        payload = np.empty(len(results), dtype=object)
        payload[:] = [pickle.dumps(r, protocol=4) for r in results]
        return {"index": np.asarray(batch["index"]), "payload": payload}


def run_ray(job: Any, cache: Any, report: Any, *, actors: int = 1, batch_size: int = 8, progress: bool = True) -> None:
    """Computes every sample not yet in ``cache`` on Ray actors and writes them from the driver."""
    import ray
    from tqdm.auto import tqdm

    from anonloader.cache.precompute import write_results

    if not ray.is_initialized():
        ray.init(num_cpus=max(actors, 1), include_dashboard=False, log_to_driver=False)
    done = set(cache.sample_indices())
    pending = [i for i in range(len(job.dataset)) if i not in done]
    report.skipped += len(job.dataset) - len(pending)
    if not pending:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    items = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=max(1, min(len(pending) // batch_size, 64)))
    mapped = items.map_batches(
        SampleActor,
        fn_constructor_args=(job,),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus >= 1 else 0,
        num_cpus=1,
        batch_format="numpy",
    )
    with tqdm(total=len(job.dataset), initial=report.skipped, desc="precompute (ray)", unit="img", disable=not progress) as bar:
        for batch in mapped.iter_batches(batch_size=batch_size, batch_format="numpy"):
            results = [pickle.loads(p) for p in batch["payload"]]
            write_results(cache, results, report)
            bar.update(len(results))
