"""Cost growth of ``KeyedIdentityAssigner("cluster").fit`` on synthetic clustered embeddings.

    python benchmarks/identity_scale.py                    # N = 10^4, 10^5; 128-d
    python benchmarks/identity_scale.py --dim 512
    python benchmarks/identity_scale.py --full             # adds N = 10^6 (minutes)
    python benchmarks/identity_scale.py --search-only --sizes 10000   # faiss vs torch k-NN search

Data (stated, seeded): N unit vectors around K = N / 10 random unit identity centres,
``centre + 0.3 * g / sqrt(D)`` with ``g`` standard normal, so same-person pairs have cosine
about 0.92 on both sides of the threshold 0.917 (dlib's) and different people about 0.
Each run is a fresh subprocess: wall and CPU time (user + system, all threads) of ``fit`` (clustering + keyed mapping of every
cluster into a bank of 2K random identities), the process's peak RSS (data included), the
number of clusters and the pairwise precision / recall against the true identities. The old
algorithm (leader clustering, ``method="leader"``, one torch thread) runs only up to ``--old-max`` faces. The
machine's load average is printed, since other jobs share its cores.

Measured 2026-12-02 on this 2-core machine with nothing else running (load average 1.4-1.9,
i.e. the benchmark itself), ``python benchmarks/identity_scale.py --full`` and
``python benchmarks/identity_scale.py --dim 512 [--sizes 1000000]``:

    D    N          method  wall     CPU      peak RSS  clusters  precision  recall
    128  10^4       leader    6.8 s    6.7 s  1.19 GiB    1581    1.0000     0.8962
    128  10^4       graph     0.5 s    0.8 s  0.59 GiB    1281    1.0000     0.9543
    128  10^5       graph     4.9 s    8.1 s  0.80 GiB   12580    1.0000     0.9607
    128  10^6       graph    94.9 s  165.4 s  2.58 GiB  128305    1.0000     0.9573
    512  10^4       leader   25.7 s   25.5 s  2.34 GiB    1655    1.0000     0.8880
    512  10^4       graph     0.9 s    1.6 s  0.67 GiB    1263    1.0000     0.9609
    512  10^5       graph    12.1 s   21.2 s  1.50 GiB   12518    1.0000     0.9624
    512  10^6       graph   274.9 s  500.3 s  6.29 GiB  128175    1.0000     0.9576

(10^4 graph searches exactly; 10^5 and up use faiss IVF, nprobe 8. Growth from 10^5 to 10^6:
19x wall at 128-d, 23x at 512-d (IVF with nlist = 4 sqrt(N): N^1.5). The old leader
clustering grows as N x clusters: 10^4 took 6.8 s / 25.7 s, so 10^6 faces of 10^5 people
would take about 10^4 times that. Peak RSS includes the benchmark's own copy of the
embeddings (2 GiB at 512-d 10^6).)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

NOISE = 0.3
THRESHOLD = 0.917


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``N,D float32`` unit vectors, their ``N`` true identities and ``N`` hex content hashes."""
    rng = np.random.default_rng(seed)
    identities = max(1, n // 10)
    centres = rng.standard_normal((identities, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, identities, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: bounded temporaries
        stop = min(n, start + 100_000)
        block = centres[truth[start:stop]] + NOISE * rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    hashes = [hashlib.sha256(b"face-%d" % i).hexdigest() for i in range(n)]
    return x, truth, hashes


def run_one(n: int, dim: int, method: str, shards: int) -> dict[str, float]:
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.identity.bank import IdentityBank
    from anonloader.identity.clustering import pairwise_precision_recall

    if method == "leader":
        torch.set_num_threads(1)  # its many tiny products only wait on a second thread of a shared machine
    x, truth, hashes = synthetic(n, dim)
    bank_rng = np.random.default_rng(1)
    bank = IdentityBank(torch.from_numpy(bank_rng.standard_normal((max(16, n // 5), dim), dtype=np.float32)))
    assigner = KeyedIdentityAssigner("cluster", secret="benchmark secret 0123456789abcdef", bank=bank, embedder=None)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = assigner.fit(embeddings=x, content_hashes=hashes, method=method, shards=shards)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    precision, recall = pairwise_precision_recall(result.labels, truth)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"n": n, "dim": dim, "method": method, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gib": peak,
            "clusters": len(result.cluster_keys), "precision": precision, "recall": recall}


def search_only(n: int, dim: int) -> dict[str, float]:
    """Exact k=16 search of every row: faiss (``knn``) vs torch (blocked matmul + topk), and IVF."""
    from anonloader.identity.index import VectorIndex

    x, _, _ = synthetic(n, dim)
    out: dict[str, float] = {"n": n, "dim": dim}
    for name, kwargs in (("faiss_exact", {"backend": "faiss"}), ("torch_exact", {"backend": "torch"}), ("faiss_ivf", {"kind": "ivf", "nprobe": 4})):
        start = time.perf_counter()
        VectorIndex.build(x, **kwargs).search(x, 16)
        out[name] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--full", action="store_true", help="also N = 10^6")
    parser.add_argument("--old-max", type=int, default=10_000, help="largest N for the old leader clustering")
    parser.add_argument("--shards", type=int, default=1, help="Ray Data blocks for the k-NN search (1: none)")
    parser.add_argument("--search-only", action="store_true", help="compare faiss and torch exact search (and IVF)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="N values instead of 10^4, 10^5 (and 10^6 with --full)")
    parser.add_argument("--one", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n, method = int(args.one[0]), args.one[1]
        result = search_only(n, args.dim) if method == "search" else run_one(n, args.dim, method, args.shards)
        print(json.dumps(result))
        return
    sizes = args.sizes or [10_000, 100_000] + ([1_000_000] if args.full else [])
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores; D={args.dim}, K=N/10, noise {NOISE}, threshold {THRESHOLD}", flush=True)
    jobs = [(n, "search") for n in sizes if args.search_only] or [
        (n, m) for n in sizes for m in ("leader", "graph") if m == "graph" or n <= args.old_max
    ]
    for n, method in jobs:
        command = [sys.executable, __file__, "--one", str(n), method, "--dim", str(args.dim), "--shards", str(args.shards)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"N={n} {method}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if method == "search":
            print(f"N={n:>9,} D={r['dim']}  exact k=16 search: faiss {r['faiss_exact']:.2f}s  torch {r['torch_exact']:.2f}s  "
                  f"faiss IVF (nprobe 4) {r['faiss_ivf']:.2f}s", flush=True)
        else:
            print(f"N={n:>9,} {method:>6}: {r['seconds']:8.1f}s wall {r['cpu_seconds']:8.1f}s CPU  peak {r['peak_gib']:.2f} GiB  {r['clusters']:>7} clusters  "
                  f"precision {r['precision']:.4f}  recall {r['recall']:.4f}  (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
