"""Precompute on a Ray cluster: Ray Data ``map_batches`` over an actor pool.

Each actor holds one copy of the pipeline (models load once per actor) and turns a batch of
sample indices into sealed cache values; GPU actors (``num_gpus=1``) are used when the cluster
has GPUs. The driver is the single LMDB writer: it commits every batch it receives in one
transaction, so an interrupted run resumes from its last commit.

What crosses Ray's object store (which may spill to disk) is bytes at rest in the cache's own
format: per sample one :func:`~anonloader.cache.format.pack_result` value (plain msgpack of
values sealed with the MAC key), in a binary column — no pickle of results, and the actors
hold only the subkeys derived from the secret (``job.keys``), never the secret. The driver
checks every value's tag again before it commits (a value altered in the object store is
refused).

Recovery keys (Diff-Privacy, ``precompute(key_password=...)``): the driver derives the key and
opens ``<cache>/recovery.lmdb``; the job the actors receive carries the derived cipher
(``job.key_cipher``), never the password. Each actor returns, beside a sample's result, its
faces' keys already encrypted (AES-256-GCM, bound to the pipeline fingerprint, entry key and
face) as plain msgpack ``[[entry key hex, [blob, ...]], ...]`` in a second binary column; the
driver decrypts every blob once to authenticate it, checks that its entry is one of the
sample's, and stores the blobs just before the commit that stores the entries.

Tested on a local cluster (``ray.init(num_cpus=2)``); on a real cluster call ``ray.init``
with its address before :func:`anonloader.cache.precompute` (an already initialised Ray is
used as it is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SampleActor", "check_keys", "run_ray"]


class SampleActor:
    """A Ray Data actor: ``{"index": ...}`` batches -> ``{"index", "payload"}`` (``payload``: one
    :func:`~anonloader.cache.format.pack_result` bytes value per sample), plus ``"keys"`` (msgpack
    of the sample's encrypted recovery keys) when the job writes keys."""

    def __init__(self, job: Any, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = [int(i) for i in batch["index"]]
        out = {"index": np.asarray(batch["index"])}
        if self.job.key_cipher is None:
            results, keys = [self.job.compute(i) for i in indices], None
        else:
            import msgpack

            pairs = [self.job.compute_with_keys(i) for i in indices]
            results = [packed for packed, _ in pairs]
            keys = [msgpack.packb([[entry, list(blobs)] for entry, blobs in sealed], use_bin_type=True) for _, sealed in pairs]
        out["payload"] = np.empty(len(results), dtype=object)
        out["payload"][:] = results
        if keys is not None:
            out["keys"] = np.empty(len(keys), dtype=object)
            out["keys"][:] = keys
        return out


def check_result(cache: Any, packed: bytes) -> bytes:
    """``packed`` after checking the tag and structure of every sealed value in it against
    ``cache``'s keys (raises :class:`~anonloader.errors.CacheCorruptError`)."""
    from anonloader.cache.format import EntryRecord, FailureRecord, SampleView, unpack_result

    index, entries, sample, failure, _, _ = unpack_result(packed)
    for key, value in entries:
        EntryRecord.unpack(cache.sealer, key, value, f"Ray result entry {key.hex()} of sample {index}")
    if sample is not None:
        SampleView.open(cache.sealer, index, sample, f"Ray result sample {index}").skeleton()
    if failure is not None:
        FailureRecord.unpack(cache.sealer, index, failure, f"Ray result failure of sample {index}")
    return packed


def check_keys(keystore: Any, packed: bytes, data: bytes) -> list[tuple[str, list[bytes]]]:
    """The ``(entry key hex, blobs)`` of one sample's ``keys`` column after checking them: plain
    msgpack of that shape, every entry one of the sample's (``packed``), every blob
    authenticated by ``keystore``'s cipher.

    Raises:
        CacheCorruptError: malformed, or an entry that is not the sample's.
        SecretError: a blob fails authentication (altered on the way, or sealed under another key).
    """
    import msgpack

    from anonloader.cache.format import unpack_result
    from anonloader.errors import CacheCorruptError

    index, entries, _, _, _, _ = unpack_result(packed)
    try:
        sealed = [(str(entry), [bytes(b) for b in blobs]) for entry, blobs in msgpack.unpackb(data, raw=False, use_list=True)]
    except Exception as error:  # noqa: BLE001 - malformed actor output
        raise CacheCorruptError(f"Ray result of sample {index}: its recovery keys are malformed ({type(error).__name__}: {error})") from error
    own = {key.hex() for key, _ in entries}
    for entry, blobs in sealed:
        if entry not in own:
            raise CacheCorruptError(f"Ray result of sample {index}: recovery keys for entry {entry}, which is not one of the sample's")
        for face, blob in enumerate(blobs):
            keystore.cipher.decrypt(entry, face, blob)
    return sealed


def run_ray(job: Any, cache: Any, report: Any, *, actors: int = 1, batch_size: int = 8, progress: bool = True, keystore: Any = None) -> None:
    """Computes every sample not yet in ``cache`` on Ray actors and writes them from the driver
    (with their encrypted recovery keys into ``keystore`` when the job writes keys)."""
    import ray
    from tqdm.auto import tqdm

    from anonloader.cache.precompute import pending_indices, write_results
    from anonloader.errors import CacheError

    if (job.key_cipher is None) != (keystore is None):
        raise CacheError("a Ray run with recovery keys needs both the job's cipher and the driver's key store")
    if not ray.is_initialized():
        ray.init(num_cpus=max(actors, 1), include_dashboard=False, log_to_driver=False)
    pending = pending_indices(cache, range(len(job.dataset)))
    report.skipped += len(job.dataset) - len(pending)
    if not pending:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # results travel as a native Arrow binary column; never let Ray fall back to pickling them
    ctx.enable_fallback_to_arrow_object_ext_type = False
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
            results: list[Any] = [check_result(cache, bytes(p)) for p in batch["payload"]]
            if keystore is not None:
                results = [(packed, check_keys(keystore, packed, bytes(k))) for packed, k in zip(results, batch["keys"], strict=True)]
            write_results(cache, results, report, keystore)
            bar.update(len(results))
