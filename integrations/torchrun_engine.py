"""Precompute under ``torchrun``: every rank fills its own shard; rank 0 writes the manifest.

    torchrun --nproc_per_node 2 -m anonloader.cache.commands precompute SRC OUT --engine torchrun

Rank and world size come from the environment (``RANK``, ``WORLD_SIZE``; a single process
without them is rank 0 of 1). Ranks synchronise over ``gloo`` on CPU (``nccl`` when each rank
has a GPU). Rank ``r`` of ``w`` anonymizes ``shard_range(n, w, r)`` into
``OUT/shard-r-of-w``; because keys and identity mapping depend only on content, fingerprint
and secret, the union of the shards equals a single-process run entry for entry.

Nothing crosses between ranks but the barrier (and, with recovery keys, the derived key
below): each rank writes sealed, pickle-free values (:mod:`anonloader.cache.format`) into
its own shard, and holds only the subkeys derived from
the secret (``job.keys``), never the secret. Failed samples are recorded in each shard and
listed in the manifest; running the command again retries them.

Recovery keys (Diff-Privacy with ``--key-password-file``): only rank 0 reads the password. It
derives the key and broadcasts the derived key with the public Argon2id salt and costs (raw
bytes in a tensor, :func:`share_key_cipher`), so every rank seals its faces' keys under the one
derivation into ``<shard>/recovery.lmdb``. ``anonloader cache merge`` copies them into one
store; ``anonloader cache recover`` finds a sample's shard through the manifest. gloo and NCCL
do not encrypt: the derived key crosses the process group's network in the clear, so run such
a job on a network you trust as you trust it with the cache's own data.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["process_group", "rank_and_world_size", "run_torchrun", "share_key_cipher"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The default process group for this rank's run: started here (``gloo`` on CPU, ``nccl``
    when each rank has a GPU) unless one exists or there is a single rank; destroyed at exit
    only if started here."""
    import torch
    import torch.distributed as dist

    started = False
    if rank_and_world_size()[1] > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        started = True
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


#: rank 0 -> the others: status (1 ok), the derived key (32), the Argon2id salt (16) and costs (3 x uint32)
_KEY_MESSAGE = 1 + 32 + 16 + 12


def share_key_cipher(fingerprint: str, read_password: Any, shard: Path, map_size: int) -> Any:
    """This rank's recovery-key store in ``shard``, opened with the run's one derived key.

    Rank 0 (``read_password`` given) reads the password, opens (or creates) its shard's store,
    which fixes the Argon2id salt and costs, and sends the status, the derived key, the salt and
    the costs to every rank as raw bytes in a ``uint8`` tensor (no pickle); the other ranks
    never see the password. A failure on rank 0 is sent as a status, so every rank stops.

    Raises:
        CacheError: (ranks other than 0) rank 0 could not open the key store.
        SecretError, ConfigError: (rank 0) the password is missing or wrong.
    """
    import struct

    import torch
    import torch.distributed as dist

    from anonloader.errors import CacheError
    from anonloader.methods.diffprivacy.crypto import KdfParams, KeyCipher
    from anonloader.methods.diffprivacy.store import RecoveryKeyStore

    rank, world_size = rank_and_world_size()
    message = bytearray(_KEY_MESSAGE)
    failure: BaseException | None = None
    store = None
    if rank == 0:
        try:
            store = RecoveryKeyStore.create(shard, read_password(), fingerprint=fingerprint, map_size=map_size)
            kdf = KdfParams.from_dict(RecoveryKeyStore.read_meta(shard)["kdf"])
            message[:] = b"\x01" + store.cipher.export_key() + kdf.salt + struct.pack("<III", kdf.memory_cost, kdf.iterations, kdf.lanes)
        except Exception as error:  # noqa: BLE001 - re-raised below, after the others are told
            failure = error
    if world_size > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.frombuffer(message, dtype=torch.uint8).clone().to(device)
        dist.broadcast(tensor, src=0)
        message = bytearray(tensor.cpu().numpy().tobytes())
        del tensor
    if failure is not None:
        raise failure
    if message[0] != 1:
        raise CacheError(f"rank {rank}: rank 0 could not open the recovery-key store (see rank 0's error); nothing was computed")
    if store is not None:
        return store
    memory, iterations, lanes = struct.unpack("<III", bytes(message[49:61]))
    kdf = KdfParams(bytes(message[33:49]), memory, iterations, lanes)
    return RecoveryKeyStore.create_with_cipher(shard, KeyCipher(bytes(message[1:33]), fingerprint), kdf, map_size=map_size)


def run_torchrun(
    job: Any,
    root: Path,
    report: Any,
    *,
    workers: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    map_size: int = 1 << 30,
    recovery_keys: bool = False,
    read_password: Any = None,
) -> None:
    """Fills this rank's shard of the cache under ``root`` and, on rank 0, the manifest.

    With ``recovery_keys`` each rank writes its faces' encrypted keys into
    ``<shard>/recovery.lmdb`` under the key rank 0 derives from the password
    (``read_password()``, called on rank 0 only; see :func:`share_key_cipher`)."""
    import torch.distributed as dist

    from anonloader.cache.manifest import shard_name, write_manifest
    from anonloader.cache.precompute import fill_cache, open_for_job, shard_range

    rank, world_size = rank_and_world_size()
    with process_group():
        root.mkdir(parents=True, exist_ok=True)
        shard = root / shard_name(rank, world_size)
        cache = open_for_job(job, shard, map_size=map_size)
        keystore = None
        try:
            if recovery_keys:
                keystore = share_key_cipher(job.fingerprint, read_password, shard, map_size)
                job.key_cipher = keystore.cipher
            indices = shard_range(len(job.dataset), world_size, rank)
            fill_cache(job, cache, indices, report, workers=workers, batch_size=batch_size,
                       progress=progress and rank == 0, description=f"precompute rank {rank}/{world_size}", keystore=keystore)
        finally:
            job.key_cipher = None
            cache.close()
            if keystore is not None:
                keystore.close()
        report.shards = [str(root / shard_name(r, world_size)) for r in range(world_size)]
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            write_manifest(root, report.shards, secret=job.keys if job.keys.keyed else None)
        if world_size > 1:
            dist.barrier()
