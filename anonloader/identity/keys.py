"""Real-identity keys: which faces are the same real person.

A key is a string; it never leaves the process in the clear (the mapper stores only its keyed
digest). Strategies:

- :func:`label_key`: from the dataset (a function of the sample's label, e.g. CelebA's identity).
- :class:`FaceTracker`: faces linked across the frames of one clip by box IoU and recognizer
  similarity; track ids are numbered in order of first appearance (frame order, then left to
  right), so they are deterministic for a given clip.
- :func:`cluster_embeddings`: global clustering of a whole dataset's embeddings at the
  recognizer threshold, independent of input order and of sharding (faces in content-hash
  order; a k-NN graph at the threshold and its connected components, see
  :mod:`anonloader.identity.clustering`); key = content hash of the cluster's canonical member
  (the smallest hash). The previous leader clustering stays available as ``method="leader"``.
- :class:`IdentityRegistry`: the online variant for streams: a face joins the nearest known
  identity at the threshold or starts a new one keyed by its own content hash. Persisted with
  only keyed digests and synthetic ids (via the mapper); embeddings are written only when
  ``store_embeddings=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anonloader.errors import ConfigError, IdentityError, SecretError

__all__ = [
    "ClusterResult",
    "FaceTracker",
    "IdentityRegistry",
    "box_iou",
    "cluster_embeddings",
    "face_content_hash",
    "label_key",
]


def label_key(label: Any, key_fn: Callable[[Any], Any] | None = None) -> str:
    """The key of a dataset label: ``"label:" + str(key_fn(label))`` (identity when no ``key_fn``)."""
    value = key_fn(label) if key_fn is not None else label
    if value is None:
        raise IdentityError("the identity label is None; give every sample a label or use the cluster strategy")
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else tuple(value.tolist())
    return f"label:{value}"


def face_content_hash(crop: torch.Tensor) -> str:
    """SHA-256 (hex) of an aligned crop's pixels (``3,S,S float [0,1]``, quantised to uint8)."""
    pixels = (crop.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return hashlib.sha256(bytes(str(tuple(pixels.shape)), "ascii") + pixels.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------- tracks
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``N,M`` of boxes ``N,4`` and ``M,4`` (xyxy pixels)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter).clamp_min(1e-9)


@dataclass
class _Track:
    number: int
    box: torch.Tensor | None
    embedding: torch.Tensor
    last_frame: int


class FaceTracker:
    """Links the faces of one clip's frames into tracks (call :meth:`update` frame by frame).

    A face continues a track when ``score = iou_weight * IoU + cos`` is highest among tracks
    seen within ``max_gap`` frames, with cosine ``>= threshold - slack`` (same person to the
    recognizer, with slack for motion blur) or, when boxes are given, IoU ``>= min_iou`` and
    cosine ``>= threshold - 2 * slack``. Matching is greedy by score with ties broken by track
    number, so ids are deterministic.

    Args:
        clip: the clip's name, part of every key (``"track:<clip>:<n>"``).
        threshold: the recognizer's same-person cosine similarity.
    """

    def __init__(
        self, clip: str, threshold: float, *, min_iou: float = 0.3, slack: float = 0.05, iou_weight: float = 0.5, max_gap: int = 30
    ) -> None:
        self.clip = str(clip)
        self.threshold, self.min_iou, self.slack, self.iou_weight, self.max_gap = threshold, min_iou, slack, iou_weight, max_gap
        self.tracks: list[_Track] = []
        self.frame = -1

    def update(self, embeddings: torch.Tensor, boxes: torch.Tensor | None = None) -> list[str]:
        """Keys for the faces of the next frame.

        Args:
            embeddings: ``F,D`` recognizer embeddings (L2-normalised) of the frame's faces.
            boxes: ``F,4`` xyxy pixel boxes, or None (embedding-only linking).
        """
        self.frame += 1
        n = len(embeddings)
        if boxes is not None and len(boxes) != n:
            raise ConfigError(f"{len(boxes)} boxes for {n} embeddings")
        order = list(range(n))
        if boxes is not None:  # left to right, so new track numbers do not depend on detector order
            order.sort(key=lambda i: (float(boxes[i, 0]), float(boxes[i, 1])))
        live = [t for t in self.tracks if self.frame - t.last_frame <= self.max_gap]
        pairs = []
        for i in order:
            for t in live:
                cos = float(embeddings[i] @ t.embedding)
                iou = float(box_iou(boxes[i : i + 1], t.box[None])[0, 0]) if boxes is not None and t.box is not None else 0.0
                if cos >= self.threshold - self.slack or (iou >= self.min_iou and cos >= self.threshold - 2 * self.slack):
                    pairs.append((-(self.iou_weight * iou + cos), t.number, i, t))
        pairs.sort(key=lambda p: (p[0], p[1], p[2]))
        assigned: dict[int, _Track] = {}
        used: set[int] = set()
        for _, number, i, track in pairs:
            if i in assigned or number in used:
                continue
            assigned[i] = track
            used.add(number)
        keys: list[str] = [""] * n
        for i in order:
            track = assigned.get(i)
            if track is None:
                track = _Track(len(self.tracks), None, embeddings[i].clone(), self.frame)
                self.tracks.append(track)
            track.embedding = torch.nn.functional.normalize(0.7 * track.embedding + 0.3 * embeddings[i], dim=0)
            track.box = None if boxes is None else boxes[i].clone()
            track.last_frame = self.frame
            keys[i] = f"track:{self.clip}:{track.number}"
        return keys


# ---------------------------------------------------------------------------------- clusters
@dataclass(frozen=True)
class ClusterResult:
    """Global clusters of a dataset's faces.

    Attributes:
        keys: one key per input face (``"cluster:" + canonical member's content hash``).
        centroids: ``C,D`` L2-normalised mean embeddings, one per cluster (in memory only).
        cluster_keys: ``C`` keys, aligned with ``centroids`` (ascending canonical hash).
        labels: ``N int64`` cluster number of each input face (indexes ``cluster_keys``), or
            None.
        members: ``(M uint64, M int64)``: the sorted first 64 bits of the clustered faces'
            content hashes and each one's cluster number, so that a face of the clustered set
            gets its own cluster even where single linkage put it far from the centroid; or None.
    """

    keys: list[str]
    centroids: torch.Tensor
    cluster_keys: list[str]
    labels: np.ndarray | None = field(default=None, compare=False)
    members: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    _index: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def index(self) -> Any:
        """The exact :class:`~anonloader.identity.index.VectorIndex` over ``centroids`` (built once)."""
        if "index" not in self._index:
            from anonloader.identity.index import VectorIndex

            self._index["index"] = VectorIndex.build(self.centroids, kind="exact")
        return self._index["index"]

    def key_of(self, embeddings: torch.Tensor, threshold: float, content_hashes: Sequence[str] | None = None) -> list[str | None]:
        """Keys of faces (``F,D`` embeddings): a face of the clustered set (same content hash)
        gets its cluster; any other the nearest centroid's at cosine ``>= threshold``, else None."""
        if len(self.centroids) == 0 or len(embeddings) == 0:
            return [None] * len(embeddings)
        out: list[str | None] = [None] * len(embeddings)
        if content_hashes is not None and self.members is not None:
            prefixes, numbers = self.members
            wanted = hash_prefixes(content_hashes)
            at = np.minimum(np.searchsorted(prefixes, wanted), len(prefixes) - 1)
            for f in np.flatnonzero(prefixes[at] == wanted):
                out[f] = self.cluster_keys[int(numbers[at[f]])]
        rest = [f for f, key in enumerate(out) if key is None]
        if rest:
            vectors = torch.nn.functional.normalize(embeddings[rest].detach().float().cpu(), dim=1)
            sims, index = self.index().nearest(vectors)
            for f, s, j in zip(rest, sims, index):
                out[f] = self.cluster_keys[int(j)] if j >= 0 and float(s) >= threshold else None
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = {f: getattr(self, f) for f in ("keys", "centroids", "cluster_keys", "labels", "members")}
        return state | {"_index": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)


def hash_prefixes(content_hashes: Sequence[str]) -> np.ndarray:
    """``N uint64``: the first 64 bits of hex content hashes (enough to tell 10^7 faces apart:
    a chance collision among them is about 3e-6)."""
    return np.fromiter((int(h[:16], 16) for h in content_hashes), dtype=np.uint64, count=len(content_hashes))


def cluster_embeddings(
    embeddings: torch.Tensor | np.ndarray,
    content_hashes: Sequence[str],
    threshold: float,
    *,
    method: str = "graph",
    k: int = 16,
    shards: int = 1,
    exact_limit: int = 50_000,
    index_kind: str | None = None,
) -> ClusterResult:
    """Cluster a whole dataset's faces at the recognizer threshold, independently of input order.

    Args:
        embeddings: ``N,D`` L2-normalised embeddings of every face (tensor or array, e.g. a
            memory-mapped :class:`~anonloader.identity.store.EmbeddingStore` column).
        content_hashes: ``N`` content hashes of the faces (:func:`face_content_hash`); they fix
            the processing order and name the clusters.
        threshold: the recognizer's same-person cosine similarity.
        method: ``"graph"`` (k-NN graph at the threshold + connected components, see
            :mod:`anonloader.identity.clustering`) or ``"leader"`` (the previous two-pass leader
            clustering, O(N x clusters); for comparison and small data).
        k: graph: neighbours per face. shards: graph: Ray Data blocks for the k-NN search
            (1 = in this process; the result is the same). exact_limit, index_kind: graph:
            when the search is exact (see :func:`~anonloader.identity.clustering.graph_labels`).
    """
    from anonloader.identity import clustering

    if method not in clustering.CLUSTER_METHODS:
        raise ConfigError(f"unknown clustering method {method!r}; use one of {', '.join(clustering.CLUSTER_METHODS)}")
    n = len(embeddings)
    if len(content_hashes) != n:
        raise ConfigError(f"{len(content_hashes)} content hashes for {n} embeddings")
    dim = int(embeddings.shape[-1]) if getattr(embeddings, "ndim", 0) == 2 else 0
    if n == 0:
        return ClusterResult([], torch.zeros(0, dim), [], np.zeros(0, dtype=np.int64))
    order = clustering.canonical_order(content_hashes)
    # the rows in canonical order, normalised as they are read: no second full copy of the
    # embeddings (the input may be a memory map of an EmbeddingStore)
    canonical = clustering.CanonicalRows(embeddings, order)
    if method == "graph":
        roots = clustering.graph_labels(canonical, threshold, k=k, shards=shards, exact_limit=exact_limit, index_kind=index_kind)
    else:
        groups = clustering.leader_labels(torch.from_numpy(canonical.materialize()), threshold)
        first = np.full(int(groups.max()) + 1, n, dtype=np.int64)
        np.minimum.at(first, groups, np.arange(n, dtype=np.int64))
        roots = first[groups]  # a group's smallest canonical row
    unique_roots = np.unique(roots)  # ascending row = ascending smallest hash
    canonical_labels = np.searchsorted(unique_roots, roots).astype(np.int64)
    centroids = clustering.cluster_centroids(canonical, canonical_labels, len(unique_roots))
    cluster_keys = ["cluster:" + content_hashes[int(order[r])] for r in unique_roots]
    labels = np.empty(n, dtype=np.int64)
    labels[order] = canonical_labels
    keys = [cluster_keys[c] for c in labels.tolist()]
    prefixes = hash_prefixes(content_hashes)
    by_prefix = np.argsort(prefixes, kind="stable")
    return ClusterResult(keys, centroids, cluster_keys, labels, (prefixes[by_prefix], labels[by_prefix]))


# ---------------------------------------------------------------------------------- online
class IdentityRegistry:
    """Online identity keys for streams, persisted.

    ``key_of(embeddings, content_hashes)`` gives each face the key of the nearest registered
    identity at the threshold, or registers a new identity keyed by the face's content hash.

    Persisted state (``path``, JSON, format version 2): the keyed check value of the registry key
    (derived from the secret for this purpose; the registry never holds the secret itself) and,
    per identity, the keyed digest of its key — never the key or an embedding. With ``store_embeddings=True`` the
    identities' mean embeddings are stored too (opt-in: they are biometric data of real people),
    which lets a later process recognise returning people; without it, a new process starts with
    no embeddings and only keeps the digests (so a returning person gets a new key unless the
    exact same face crop — same content hash — comes back).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, secret: Any, threshold: float, *, store_embeddings: bool = False
    ) -> None:
        from anonloader.identity.mapper import REGISTRY_PURPOSE, resolve_key

        self.path = Path(path) if path is not None else None
        self.key = resolve_key(secret, REGISTRY_PURPOSE)
        self.threshold = float(threshold)
        self.store_embeddings = bool(store_embeddings)
        self.keys: list[str] = []
        self.digests: list[str] = []
        self.sums: list[torch.Tensor] = []
        self._index: Any = None  # VectorIndex of identity means, rows -> identities in _rows
        self._rows: list[int] = []
        self._row_of: dict[int, int] = {}
        if self.path is not None and self.path.exists():
            self._load()
        self._digest_ids = {d: i for i, d in enumerate(self.digests)}

    def _digest(self, key: str) -> str:
        return self.key.digest(b"anonloader/registry/v1\0" + key.encode()).hex()

    def key_of(self, embeddings: torch.Tensor, content_hashes: Sequence[str]) -> list[str]:
        """Keys of ``F,D`` L2-normalised embeddings, in order (registers new identities).

        Each face is one query to the registry's exact :class:`~anonloader.identity.index.VectorIndex`
        of identity means (no Python loop over identities); a face that joins an identity moves
        that identity's row to the new mean before the next face is looked up.
        """
        out = []
        for vector, content in zip(torch.nn.functional.normalize(embeddings.detach().float().cpu(), dim=1), content_hashes):
            index = self._live_index(len(vector))
            best = None
            if len(index):
                score, row = index.nearest(vector[None])
                if int(row[0]) >= 0 and float(score[0]) >= self.threshold:
                    best = self._rows[int(row[0])]
            if best is None:
                key = "online:" + content
                digest = self._digest(key)
                best = self._digest_ids.get(digest)
                if best is not None:  # the same crop came back after a restart
                    self.keys[best] = key
                    self.sums[best] = vector.clone()
                else:
                    self.keys.append(key)
                    self.digests.append(digest)
                    self.sums.append(vector.clone())
                    best = len(self.keys) - 1
                    self._digest_ids[digest] = best
            else:
                self.sums[best] = self.sums[best] + vector
            self._place(best)
            out.append(self.keys[best])
        return out

    def _live_index(self, dim: int) -> Any:
        """The index over the normalised means of identities that have one (built on first use)."""
        if self._index is None:
            from anonloader.identity.index import VectorIndex

            self._index = VectorIndex(dim, kind="exact")
            self._rows, self._row_of = [], {}
            for identity, total in enumerate(self.sums):
                if total is not None:
                    self._place(identity)
        return self._index

    def _place(self, identity: int) -> None:
        """Write identity's current normalised mean into the index (a new row or its own)."""
        mean = torch.nn.functional.normalize(self.sums[identity].float(), dim=0)[None]
        row = self._row_of.get(identity)
        if row is None:
            self._row_of[identity] = int(self._index.add(mean)[0])
            self._rows.append(identity)
        else:
            self._index.replace([row], mean)

    def save(self) -> None:
        if self.path is None:
            raise ConfigError("IdentityRegistry.save needs a path")
        state: dict[str, Any] = {
            "format": "anonloader-identity-registry",
            "version": 2,
            "check": self.key.check_value(),
            "threshold": self.threshold,
            "digests": self.digests,
            "store_embeddings": self.store_embeddings,
        }
        if self.store_embeddings:
            state["keys"] = self.keys
            state["embeddings"] = [
                None if s is None else torch.nn.functional.normalize(s, dim=0).tolist() for s in self.sums
            ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(state, handle)
        os.replace(handle.name, self.path)

    def _load(self) -> None:
        assert self.path is not None
        state = json.loads(self.path.read_text())
        if state.get("format") != "anonloader-identity-registry":
            raise IdentityError(f"{self.path} is not an anonloader identity registry")
        if state.get("version") != 2:
            raise IdentityError(
                f"the identity registry {self.path} has format version {state.get('version')}; this anonloader "
                "reads version 2 (digests under the derived registry key) and cannot convert it: use a new registry path"
            )
        if state.get("check") != self.key.check_value():
            raise SecretError(f"the secret does not match the identity registry {self.path}; use the secret it was written with")
        self.digests = list(state["digests"])
        if state.get("store_embeddings") and "embeddings" in state:
            self.keys = list(state["keys"])
            self.sums = [None if e is None else torch.tensor(e) for e in state["embeddings"]]
        else:
            self.keys = ["" for _ in self.digests]
            self.sums = [None for _ in self.digests]  # type: ignore[misc]
