"""Clustering a dataset's faces at the recognizer threshold, at the scale of millions.

Algorithm (``method="graph"``, the default of :func:`anonloader.identity.keys.cluster_embeddings`):

1. Canonical order: faces sorted by content hash (ties by input position: equal hashes are
   equal crops, hence equal embeddings), so nothing below depends on the input order.
2. k-NN graph: each face's ``k`` nearest faces by cosine similarity from a
   :class:`~anonloader.identity.index.VectorIndex` (exact up to ``exact_limit`` faces, faiss
   IVF above), keeping the pairs whose similarity, recomputed in float64
   (:func:`~anonloader.identity.index.pair_similarity`), is ``>= threshold``.
3. Edges ``i - j`` when either lists the other (``mutual=False``, default): the graph is the
   recognizer's same-person graph limited to each face's ``k`` nearest, i.e. single linkage at
   the threshold. ``mutual=True`` keeps only pairs where each lists the other, so a "hub" face
   close to many people cannot chain their clusters; but it splits large dense clusters
   (a group of ``k`` faces of one person that list only each other becomes its own cluster:
   measured here on 15-40 faces per person with ``k=16``), so it is off by default.
4. Connected components by hooking each root onto the smallest root it touches and pointer
   jumping (numpy, order-free): every component's root is its smallest canonical row, i.e.
   its face with the smallest content hash, which names the cluster as before
   (``"cluster:" + hash``).

Step 2 is the only expensive step and is independent per face, so it shards: give
``shards > 1`` with Ray installed and the rows are searched in blocks by Ray Data tasks against
one index put in the object store; the edges come back to this node, where step 3-4 run (a few
seconds for 10^6 faces). The result is the same edge set, hence the same keys.

Compared with the leader clustering it replaces (:func:`leader_labels`, kept for comparison),
the graph joins two faces of one person through a chain of same-person pairs even when no
single centroid is within the threshold of both, and it never depends on processing order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anonloader.errors import ConfigError
from anonloader.identity.index import VectorIndex, faiss_available, pair_similarity

__all__ = [
    "CLUSTER_METHODS",
    "CanonicalRows",
    "canonical_order",
    "cluster_centroids",
    "component_roots",
    "graph_labels",
    "knn_edges",
    "leader_labels",
    "pairwise_precision_recall",
]

logger = logging.getLogger(__name__)

CLUSTER_METHODS = ("graph", "leader")
#: float32 scores may be this far below their float64 value; candidates within it are re-scored
_SLACK = 1e-4


class CanonicalRows:
    """The embeddings in canonical order, L2-normalised, read on demand (no full copy).

    ``rows[a:b]`` and ``rows[index_array]`` give ``M,D float32`` unit vectors of canonical rows
    (``source[order[...]]``, each row divided by its norm on its own, so a row reads the same
    in any block). ``source`` is an ``N,D`` array, memory map or tensor.
    """

    def __init__(self, source: Any, order: np.ndarray) -> None:
        self.source = source.detach().cpu().float().numpy() if isinstance(source, torch.Tensor) else source
        self.order = np.asarray(order, dtype=np.int64)
        self.shape = (len(self.order), int(self.source.shape[1]))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, rows: Any) -> np.ndarray:
        picked = self.order[rows]
        if isinstance(rows, slice) and len(picked) and np.all(np.diff(picked) == 1):
            block = np.asarray(self.source[int(picked[0]) : int(picked[-1]) + 1], dtype=np.float32)
        else:
            block = np.asarray(self.source[picked], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float32))[:, None]
        return np.ascontiguousarray(block / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)

    def materialize(self) -> np.ndarray:
        """All rows as one ``N,D float32`` array (for small N)."""
        return np.concatenate([self[s : s + 65536] for s in range(0, len(self), 65536)]) if len(self) else np.zeros(self.shape, np.float32)


def canonical_order(content_hashes: Sequence[str]) -> np.ndarray:
    """``N int64`` positions sorted by (content hash, position)."""
    return np.asarray(sorted(range(len(content_hashes)), key=lambda i: (content_hashes[i], i)), dtype=np.int64)


def knn_edges(vectors: np.ndarray, index: VectorIndex, start: int, stop: int, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Directed same-person edges of rows ``start..stop-1``.

    Args:
        vectors: ``N,D float32`` L2-normalised vectors (the index's rows, same order).
        index: the index over ``vectors``.
        k: neighbours asked per row (itself included, so ``k - 1`` others at most).
        threshold: cosine similarity in ``[-1, 1]`` at which two faces are the same person.
    Returns:
        ``(E int64 source rows, E int64 neighbour rows)``, each pair at float64 cosine
        ``>= threshold``, no self pairs.
    """
    sims, ids = index.search(vectors[start:stop], k)
    rows = np.arange(start, stop, dtype=np.int64)[:, None].repeat(ids.shape[1], axis=1)
    keep = (ids >= 0) & (ids != rows) & (sims >= threshold - _SLACK)
    src, dst, score = rows[keep], ids[keep], sims[keep]
    # float32 scores of unit vectors are within ~1e-6 of the exact value: only pairs within
    # _SLACK of the threshold need the float64 score to decide the same way on every machine
    near = score < threshold + _SLACK
    accept = ~near
    accept[near] = pair_similarity(vectors, src[near], dst[near]) >= threshold
    return src[accept], dst[accept]


def _mutual(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected pairs ``(a < b)`` present in both directions (each row lists a neighbour once)."""
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    codes, counts = np.unique(a * np.int64(n) + b, return_counts=True)
    codes = codes[counts >= 2]
    return codes // n, codes % n


def component_roots(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``N int64``: each row's connected component's smallest row, for undirected edges
    ``left[e] - right[e]`` (the result does not depend on the edges' order)."""
    parent = np.arange(n, dtype=np.int64)
    if len(left) == 0:
        return parent
    while True:
        pl, pr = parent[left], parent[right]
        differ = pl != pr
        if not differ.any():
            return parent
        lo, hi = np.minimum(pl[differ], pr[differ]), np.maximum(pl[differ], pr[differ])
        np.minimum.at(parent, hi, lo)  # hook roots onto smaller roots (parents are roots here)
        while True:  # pointer jumping until every row points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def graph_labels(
    vectors: np.ndarray,
    threshold: float,
    *,
    k: int = 16,
    mutual: bool = False,
    exact_limit: int = 50_000,
    index_kind: str | None = None,
    nprobe: int = 8,
    shards: int = 1,
) -> np.ndarray:
    """Cluster roots of ``N,D`` L2-normalised float32 vectors given in canonical order.

    Args:
        vectors: ``N,D float32`` unit vectors, rows in canonical (content-hash) order: an array
            or :class:`CanonicalRows` (read in blocks; an exact search reads it whole).
        threshold: same-person cosine similarity in ``[-1, 1]``.
        k: nearest neighbours per face (including itself).
        mutual: keep only mutual k-NN edges (see module doc; off by default).
        exact_limit: up to this many faces the search is exact, above it faiss IVF.
        index_kind: force ``"exact"`` or ``"ivf"``.
        nprobe: IVF buckets searched per query (8: recall of same-person neighbours 0.9999 at
            N=10^5 on the benchmark's data; raise it for low thresholds such as ArcFace's 0.3).
        shards: >1: search the rows in that many blocks with Ray Data (see module doc).
    Returns:
        ``N int64``: each row's cluster root (its cluster's smallest row).
    """
    n = len(vectors)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    kind = index_kind or ("exact" if n <= exact_limit or not faiss_available() else "ivf")
    if kind == "exact" and isinstance(vectors, CanonicalRows):
        vectors = vectors.materialize()
    index = VectorIndex.build(vectors, kind=kind, nprobe=nprobe)
    k = min(int(k), n)
    if shards > 1:
        src, dst = _ray_edges(vectors, index, k, threshold, shards)
    else:
        parts = [knn_edges(vectors, index, s, min(s + 65536, n), k, threshold) for s in range(0, n, 65536)]
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
    if mutual:
        left, right = _mutual(n, src, dst)
    else:
        left, right = np.minimum(src, dst), np.maximum(src, dst)
    logger.info("identity graph: %d faces, %d edges, index %s", n, len(left), kind)
    return component_roots(n, left, right)


# ---------------------------------------------------------------------------------- Ray
_WORKER_STATE: dict[str, Any] = {}


def _edges_batch(batch: dict[str, np.ndarray], refs: list[Any], k: int, threshold: float) -> dict[str, np.ndarray]:
    """Ray Data task: the edges of the rows in ``batch["id"]`` (one index load per worker)."""
    import ray

    token = refs[0].hex()
    if _WORKER_STATE.get("token") != token:
        _WORKER_STATE.update(token=token, vectors=ray.get(refs[0]), index=ray.get(refs[1]))
    vectors, index = _WORKER_STATE["vectors"], _WORKER_STATE["index"]
    rows = np.sort(np.asarray(batch["id"], dtype=np.int64))
    srcs, dsts = [], []
    for start, stop in _runs(rows):
        s, d = knn_edges(vectors, index, start, stop, k, threshold)
        srcs.append(s)
        dsts.append(d)
    empty = np.zeros(0, dtype=np.int64)
    return {"src": np.concatenate(srcs) if srcs else empty, "dst": np.concatenate(dsts) if dsts else empty}


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted row ids -> ``[start, stop)`` runs of consecutive ids."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


def _ray_edges(vectors: np.ndarray, index: VectorIndex, k: int, threshold: float, shards: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ConfigError("sharded clustering needs Ray: pip install 'anonloader[ray]' (or use shards=1)") from error
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    refs = [ray.put(vectors), ray.put(index)]
    n = len(vectors)
    dataset = ray.data.range(n, override_num_blocks=int(shards))
    edges = dataset.map_batches(
        _edges_batch, fn_kwargs={"refs": refs, "k": k, "threshold": float(threshold)}, batch_size=max(1, math.ceil(n / shards))
    )
    srcs, dsts = [], []
    for batch in edges.iter_batches(batch_format="numpy", batch_size=None):
        srcs.append(np.asarray(batch["src"], dtype=np.int64))
        dsts.append(np.asarray(batch["dst"], dtype=np.int64))
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(srcs) if srcs else empty), (np.concatenate(dsts) if dsts else empty)


# ---------------------------------------------------------------------------------- centroids, old method, quality
def cluster_centroids(vectors: Any, labels: np.ndarray, count: int, *, chunk: int = 65536) -> torch.Tensor:
    """``C,D float32`` L2-normalised member means, summed in float64 in row order.

    Args:
        vectors: ``N,D float32`` unit vectors (canonical order; array or :class:`CanonicalRows`).
        labels: ``N int64`` cluster numbers in ``[0, count)``.
    """
    sums = torch.zeros(count, vectors.shape[1], dtype=torch.float64)
    for start in range(0, len(vectors), chunk):
        block = torch.from_numpy(np.ascontiguousarray(vectors[start : start + chunk])).double()
        sums.index_add_(0, torch.from_numpy(labels[start : start + chunk]), block)
    return torch.nn.functional.normalize(sums, dim=1).float()


def leader_labels(vectors: torch.Tensor, threshold: float) -> np.ndarray:
    """The previous algorithm, kept for comparison: leader clustering in the given (canonical)
    order, then every face to its nearest leader centroid at the threshold (else alone).

    Args:
        vectors: ``N,D float32`` unit vectors in canonical order.
    Returns:
        ``N int64`` group numbers (a face's group; any numbering).
    """
    n = len(vectors)
    sums: list[torch.Tensor] = []
    for i in range(n):
        if sums:
            centroids = torch.nn.functional.normalize(torch.stack(sums), dim=1)
            sims = centroids @ vectors[i]
            best = int(sims.argmax())
            if float(sims[best]) >= threshold:
                sums[best] = sums[best] + vectors[i]
                continue
        sums.append(vectors[i].clone())
    centroids = torch.nn.functional.normalize(torch.stack(sums), dim=1)
    best_sims, best = (vectors @ centroids.T).max(dim=1)
    labels = best.numpy().astype(np.int64)
    alone = (best_sims < threshold).numpy()
    labels[alone] = len(sums) + np.flatnonzero(alone)
    return labels


def pairwise_precision_recall(predicted: Sequence[Any] | np.ndarray, truth: Sequence[Any] | np.ndarray) -> tuple[float, float]:
    """Pairwise precision and recall of a clustering against true identities.

    A pair of faces is *predicted* same when both have one predicted label, *true* same when
    both have one true label. Precision = true-same predicted pairs / predicted pairs,
    recall = true-same predicted pairs / true pairs (1.0 when the denominator is 0). Counted
    from the contingency table (no N^2 loop).
    """
    _, pred = np.unique(np.asarray(predicted), return_inverse=True)
    _, true = np.unique(np.asarray(truth), return_inverse=True)
    if len(pred) != len(true):
        raise ConfigError(f"{len(pred)} predicted labels for {len(true)} true ones")

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    _, joint = np.unique(pred.astype(np.int64) * (int(true.max()) + 1) + true, return_counts=True)
    both = pairs(joint)
    predicted_pairs = pairs(np.bincount(pred))
    true_pairs = pairs(np.bincount(true))
    return (both / predicted_pairs if predicted_pairs else 1.0), (both / true_pairs if true_pairs else 1.0)
