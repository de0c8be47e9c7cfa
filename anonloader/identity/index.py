"""The nearest-neighbour index shared by every identity search.

The ``cluster`` strategy's k-NN graph, the online registry's "nearest known identity" and the
mapper's "nearest bank identities" all go through :class:`VectorIndex`, so none of them loops in
Python over all identities per face. Vectors are L2-normalised embeddings, ``N,D float32``, and
the score is their inner product (cosine similarity, in ``[-1, 1]``).

Kinds:

- ``"exact"``: every stored vector is scored (faiss's ``knn`` on the stored array, BLAS
  underneath; torch matrix products in blocks when faiss is not installed). Rows can be added
  and replaced (the registry moves an identity's mean as faces join it).
- ``"ivf"``: faiss ``IndexIVFFlat``: vectors are bucketed by their nearest of ``nlist``
  k-means centroids, and a query scores only the ``nprobe`` nearest buckets. Approximate, built
  once, far cheaper for large ``N`` (see ``benchmarks/identity_scale.py``). Its k-means runs
  on a strided subsample of the vectors *in the order given* with a fixed seed, so callers that
  give a canonical order get the same index in every process.

Library choice (measured on this 2-core machine while other jobs ran, load average 7-12;
``benchmarks/identity_scale.py --search-only``): exact search of every row's 16 nearest at
N=10^4 took 5.35 s with faiss and 5.46 s with torch's blocked matmul + ``topk`` for 128-d,
6.40 s vs 7.58 s for 512-d (both are one BLAS product per block); at N=10^5, 128-d (k=32,
lighter load) 121 s vs 276 s — and exact search grows as N^2, about 3.4 h at N=10^6. Only
faiss has the IVF index that makes 10^6 feasible: 2.46 s at N=10^4 and 38 s at N=10^5 with
recall 1.0 of the same-person neighbours; the whole ``fit`` of 10^6 128-d faces took 160 s
of CPU. faiss (``faiss-cpu``, MIT, maintained by Meta) is optional: without it every search
is exact through torch, and :class:`~anonloader.errors.ConfigError` says to install
``anonloader[scale]`` when an IVF index is asked for.

Scores are float32 and may differ in the last bits between machines and libraries; callers that
make a decision at a threshold recompute in float64 the scores of candidate pairs near it
(:func:`pair_similarity`), so the index only chooses *candidates*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anonloader.errors import ConfigError

__all__ = ["INDEX_KINDS", "VectorIndex", "faiss_available", "pair_similarity"]

INDEX_KINDS = ("exact", "ivf")
_BLOCK = 4096  # queries per block (bounds the B x N score matrix)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """Whether the ``faiss`` package (``pip install 'anonloader[scale]'``) can be imported."""
    return _faiss() is not None


def _as_matrix(vectors: Any, dim: int | None = None) -> np.ndarray:
    """``N,D`` C-contiguous float32 numpy array (from a tensor or array; no copy when possible)."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().float().numpy()
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        want = f"N,{dim}" if dim is not None else "N,D"
        raise ConfigError(f"the index takes {want} float32 vectors, got shape {tuple(array.shape)}")
    return array


def pair_similarity(vectors: np.ndarray, left: np.ndarray, right: np.ndarray, *, chunk: int = 1 << 18) -> np.ndarray:
    """Cosine similarity of the pairs ``(vectors[left[e]], vectors[right[e]])`` in float64.

    Args:
        vectors: ``N,D float32`` L2-normalised vectors.
        left, right: ``E int64`` row indices.
    Returns:
        ``E float64`` inner products in ``[-1, 1]``, each summed over D in one fixed order, so
        they do not depend on how the pairs were found or batched.
    """
    out = np.empty(len(left), dtype=np.float64)
    for start in range(0, len(left), chunk):
        a = vectors[left[start : start + chunk]].astype(np.float64)
        b = vectors[right[start : start + chunk]].astype(np.float64)
        out[start : start + chunk] = np.einsum("ij,ij->i", a, b)
    return out


class VectorIndex:
    """Inner-product k-nearest-neighbour search over L2-normalised vectors (see module doc).

    Args:
        dim: ``D``, the vectors' dimension.
        kind: ``"exact"`` or ``"ivf"``.
        nlist: IVF buckets (default ``4 * sqrt(N)`` at :meth:`build`, at least 1).
        nprobe: IVF buckets scored per query (more: slower, higher recall).
        backend: ``"auto"`` (faiss when installed), ``"faiss"`` or ``"torch"`` (exact only).
    """

    def __init__(self, dim: int, *, kind: str = "exact", nlist: int | None = None, nprobe: int = 16, backend: str = "auto") -> None:
        if kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")
        if backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"unknown index backend {backend!r}; use 'auto', 'faiss' or 'torch'")
        if backend == "auto":
            backend = "faiss" if faiss_available() else "torch"
        if backend == "faiss" and not faiss_available():
            raise ConfigError("the faiss backend needs faiss-cpu: pip install 'anonloader[scale]'")
        if kind == "ivf" and backend != "faiss":
            raise ConfigError("an IVF index needs faiss: pip install 'anonloader[scale]' (or use kind='exact')")
        self.dim, self.kind, self.backend = int(dim), kind, backend
        self.nlist, self.nprobe = nlist, int(nprobe)
        self._data = np.zeros((0, self.dim), dtype=np.float32)  # exact: rows [0, _size) are live
        self._size = 0
        self._ivf: Any = None

    @classmethod
    def build(
        cls, vectors: Any, *, kind: str = "exact", nlist: int | None = None, nprobe: int = 16, backend: str = "auto"
    ) -> VectorIndex:
        """An index over ``N,D`` vectors (tensor or array; for ``"ivf"`` also any row source
        with ``shape``, ``len`` and numpy-style slice / index-array reads returning ``M,D
        float32``, e.g. :class:`~anonloader.identity.clustering.CanonicalRows`, read in blocks
        so no second full copy is made); row ``i`` gets id ``i``."""
        if kind == "ivf" and not isinstance(vectors, (np.ndarray, torch.Tensor)):
            index = cls(int(vectors.shape[1]), kind=kind, nlist=nlist, nprobe=nprobe, backend=backend)
            index._build_ivf(vectors)
            return index
        matrix = _as_matrix(vectors)
        index = cls(matrix.shape[1], kind=kind, nlist=nlist, nprobe=nprobe, backend=backend)
        if kind == "ivf":
            index._build_ivf(matrix)
        else:
            index.add(matrix)
        return index

    def __len__(self) -> int:
        return self._size if self._ivf is None else int(self._ivf.ntotal)

    @property
    def vectors(self) -> np.ndarray:
        """``N,D float32`` stored rows (exact kind; a view, do not modify)."""
        if self.kind != "exact":
            raise ConfigError("only an exact index keeps its vectors readable")
        return self._data[: self._size]

    # ------------------------------------------------------------------ exact storage
    def add(self, vectors: Any) -> np.ndarray:
        """Append ``M,D`` vectors (exact kind); returns their ``M int64`` ids."""
        if self.kind != "exact":
            raise ConfigError("an IVF index is built once with VectorIndex.build")
        matrix = _as_matrix(vectors, self.dim)
        need = self._size + len(matrix)
        if need > len(self._data):
            grown = np.zeros((max(need, 2 * len(self._data), 64), self.dim), dtype=np.float32)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : need] = matrix
        ids = np.arange(self._size, need, dtype=np.int64)
        self._size = need
        return ids

    def replace(self, ids: Sequence[int] | np.ndarray, vectors: Any) -> None:
        """Overwrite rows ``ids`` with ``M,D`` vectors (exact kind)."""
        if self.kind != "exact":
            raise ConfigError("an IVF index is built once with VectorIndex.build")
        rows = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self._size):
            raise ConfigError(f"index rows {rows.tolist()} outside 0..{self._size - 1}")
        self._data[rows] = _as_matrix(vectors, self.dim)

    # ------------------------------------------------------------------ IVF
    def _build_ivf(self, matrix: Any) -> None:
        faiss = _faiss()
        n = len(matrix)
        nlist = self.nlist or max(1, int(4 * math.sqrt(n)))
        nlist = max(1, min(nlist, n))
        self.nlist = nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = 1234
        ivf.cp.min_points_per_centroid = 1  # small test sets: no warning, same algorithm
        ivf.cp.niter = 10
        # k-means on a strided subsample (~16 points per bucket) of the rows in the given order:
        # buckets only route the search, so a coarse k-means costs recall nothing measurable
        # (0.9998 at nprobe=4, N=10^5) and its cost stays linear in N
        stride = max(1, n // (16 * nlist))
        ivf.train(np.ascontiguousarray(matrix[np.arange(0, n, stride)], dtype=np.float32))
        for start in range(0, n, 65536):  # in blocks: the source may be a memory map or a view
            ivf.add(np.ascontiguousarray(matrix[start : start + 65536], dtype=np.float32))
        ivf.nprobe = min(self.nprobe, nlist)
        self._ivf = ivf

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` highest-scoring stored vectors of each query.

        Args:
            queries: ``F,D`` vectors (tensor or array), L2-normalised.
            k: neighbours per query.
        Returns:
            ``(F,k float32 scores, F,k int64 ids)``, best first; where fewer than ``k`` rows
            exist (or an IVF probe finds fewer), ids are -1 and scores -inf.
        """
        matrix = _as_matrix(queries, self.dim)
        f, k = len(matrix), int(k)
        scores = np.full((f, k), -np.inf, dtype=np.float32)
        ids = np.full((f, k), -1, dtype=np.int64)
        if f == 0 or k <= 0 or len(self) == 0:
            return scores, ids
        if self._ivf is not None:
            found_scores, found_ids = self._ivf.search(matrix, k)
            missing = found_ids < 0
            found_scores[missing] = -np.inf
            return found_scores.astype(np.float32), found_ids.astype(np.int64)
        kk = min(k, self._size)
        stored = self._data[: self._size]
        if self.backend == "faiss":
            faiss = _faiss()
            for start in range(0, f, _BLOCK):
                s, i = faiss.knn(matrix[start : start + _BLOCK], stored, kk, metric=faiss.METRIC_INNER_PRODUCT)
                scores[start : start + _BLOCK, :kk], ids[start : start + _BLOCK, :kk] = s, i
        else:
            base = torch.from_numpy(stored)
            for start in range(0, f, _BLOCK):
                block = torch.from_numpy(matrix[start : start + _BLOCK]) @ base.T
                s, i = block.topk(kk, dim=1)
                scores[start : start + _BLOCK, :kk], ids[start : start + _BLOCK, :kk] = s.numpy(), i.numpy()
        return scores, ids

    def nearest(self, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(F float32 best score, F int64 id)`` per query (id -1 on an empty index)."""
        scores, ids = self.search(queries, 1)
        return scores[:, 0], ids[:, 0]

    # ------------------------------------------------------------------ pickling (Ray, workers)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = self._data[: self._size].copy()
        if self._ivf is not None:
            state["_ivf"] = _faiss().serialize_index(self._ivf)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._ivf is not None:
            faiss = _faiss()
            ivf = faiss.deserialize_index(self._ivf)
            faiss.extract_index_ivf(ivf).nprobe = min(self.nprobe, int(self.nlist or 1))
            self._ivf = ivf
