"""The pipeline's identity stage: embedder + real-identity key strategy + keyed mapper.

>>> assigner = KeyedIdentityAssigner("cluster", secret=..., bank=IdentityBank.load("bank"))  # doctest: +SKIP
>>> anonymizer = Anonymizer("blur", identity=assigner)  # doctest: +SKIP

Strategies (see :mod:`anonloader.identity.keys`):

- ``"label"``: key from the label the pipeline passes per image (``key_fn`` maps it);
- ``"track"``: the pipeline's label per image is the clip name; faces are linked across
  consecutive calls with the same clip by recognizer similarity (the pipeline does not hand
  boxes to the assigner; :class:`~anonloader.identity.keys.FaceTracker` uses IoU too when called
  directly with boxes);
- ``"cluster"``: the clusters of :meth:`KeyedIdentityAssigner.fit` (a k-NN graph at the
  recognizer threshold over the whole dataset, in content-hash order, through the shared
  nearest-neighbour index; :mod:`anonloader.identity.clustering`); faces that match no cluster
  fall back to the online registry. For large datasets, embed once with ``anonloader identity
  embed`` and fit from the store (:meth:`EmbeddingStore.fit
  <anonloader.identity.store.EmbeddingStore.fit>`), optionally sharded over Ray (``shards=``);
- ``"online"``: the persisted online registry only.

Every face of one key gets the same assignment within a process (cached by digest); across
processes the mapper's HMAC candidate order (and its persisted table, when ``store`` is given)
keeps it the same.

Nearness (IDDiffuse sec. 3.2): with ``feature_fn`` (crops -> attribute-space features, e.g.
``IDDiffuse.identity_features``) and ``candidate_pool=K``, a new key's synthetic identity is
picked among the ``K`` bank identities nearest to its first face's feature (``bank.features``
in the same space; see :mod:`anonloader.identity.mapper`). Later faces of the key keep that
first assignment. The features are computed only for faces of keys not yet assigned, used for
ranking and never written anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from anonloader.errors import ConfigError, IdentityError
from anonloader.identity.base import IdentityAssignment
from anonloader.identity.keys import (
    ClusterResult,
    FaceTracker,
    IdentityRegistry,
    cluster_embeddings,
    face_content_hash,
    label_key,
)
from anonloader.identity.mapper import MAPPING_PURPOSE, REGISTRY_PURPOSE, KeyedMapper, SubKey, resolve_secret

__all__ = ["STRATEGIES", "KeyedIdentityAssigner", "default_assigner"]

STRATEGIES = ("label", "track", "cluster", "online")


class KeyedIdentityAssigner:
    """An :class:`~anonloader.identity.base.IdentityAssigner`.

    Args:
        strategy: one of :data:`STRATEGIES`.
        secret, secret_file: the mapping secret (or ``$ANONLOADER_SECRET``).
        bank: an :class:`~anonloader.identity.bank.IdentityBank` (or None: digests and seeds only).
        embedder: a recognizer (name or object); needed for every strategy but ``label`` and
            for skipping bank identities that look like the real face. Default ``"dlib"``.
        key_fn: ``label`` strategy: maps a label to the identity value.
        store: path of the mapper's persisted assignment table (JSON).
        registry_path: path of the online registry (``cluster`` fallback / ``online``).
        store_embeddings: opt in to writing real embeddings into the registry.
        template, margin: the alignment of the crops the pipeline passes (the method's).
        feature_fn: ``F,3,S,S float in [0,1]`` crops (aligned for the embedder) -> ``F,D'``
            attribute-space features for ranking the bank by nearness (needs ``candidate_pool``).
        candidate_pool: how many nearest bank identities to choose among (see module doc).
    """

    def __init__(
        self,
        strategy: str = "label",
        *,
        secret: Any = None,
        secret_file: str | os.PathLike[str] | None = None,
        bank: Any = None,
        embedder: Any = "dlib",
        key_fn: Callable[[Any], Any] | None = None,
        store: str | os.PathLike[str] | None = None,
        registry_path: str | os.PathLike[str] | None = None,
        store_embeddings: bool = False,
        template: str = "arcface",
        margin: float = 0.0,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        candidate_pool: int | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown identity strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        from anonloader.identity.embedders import load_embedder

        self.strategy = strategy
        if isinstance(embedder, str):
            kwargs = {"template": template, "margin": margin} if embedder == "dlib" else {}
            embedder = load_embedder(embedder, **kwargs)
        self.embedder = embedder
        if feature_fn is not None and candidate_pool is None:
            raise ConfigError("feature_fn ranks the bank by nearness; give candidate_pool=K (how many nearest identities to choose among)")
        self.feature_fn = feature_fn
        # the raw secret stays in this frame: the mapper and the registry keep derived keys only,
        # so pickling the assigner (DataLoader workers, Ray) never carries the secret
        root = resolve_secret(secret, secret_file) if not isinstance(secret, SubKey) else None
        mapping_key = secret if root is None else root.derive(MAPPING_PURPOSE)
        self.mapper = KeyedMapper(mapping_key, bank, embedder=embedder, store=store, candidate_pool=candidate_pool)
        self.key_fn = key_fn
        self.clusters: ClusterResult | None = None
        self.registry = (
            IdentityRegistry(registry_path, self._registry_key(root), self.threshold, store_embeddings=store_embeddings)
            if strategy in ("cluster", "online")
            else None
        )
        self._trackers: dict[str, FaceTracker] = {}
        self._assigned: dict[str, IdentityAssignment] = {}
        self._embedding_cache: dict[str, torch.Tensor] = {}

    def _registry_key(self, root: Any) -> SubKey:
        if root is None:
            raise ConfigError(
                f"the {self.strategy!r} strategy keeps an online registry, which needs its own derived key: "
                "pass the secret itself (secret=..., secret_file=... or $ANONLOADER_SECRET), not a SubKey"
            )
        return root.derive(REGISTRY_PURPOSE)

    @property
    def crop_size(self) -> int | None:
        """Crop side the recognizer wants (the pipeline aligns faces for it), or None."""
        return None if self.embedder is None else int(self.embedder.crop_size)

    @property
    def template(self) -> str:
        return "arcface" if self.embedder is None else str(self.embedder.template)

    @property
    def margin(self) -> float:
        return float(getattr(self.embedder, "margin", 0.0))

    @property
    def threshold(self) -> float:
        return float(getattr(self.embedder, "threshold", self.mapper.threshold))

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """``F,D`` embeddings of ``F,3,S,S`` crops (needs an embedder).

        Kept in memory by crop content hash (at most 4096), so that :meth:`fit` followed by
        :meth:`assign` over the same crops runs the recognizer once; never written to disk.
        """
        if self.embedder is None:
            raise ConfigError(f"the {self.strategy!r} strategy needs an embedder")
        hashes = [face_content_hash(c) for c in crops]
        todo = [f for f, h in enumerate(hashes) if h not in self._embedding_cache]
        if todo:
            if len(self._embedding_cache) + len(todo) > 4096:
                self._embedding_cache.clear()
            for f, vector in zip(todo, self.embedder(crops[todo])):
                self._embedding_cache[hashes[f]] = vector
        return torch.stack([self._embedding_cache[h] for h in hashes])

    def fit(
        self,
        crops: torch.Tensor | None = None,
        *,
        embeddings: torch.Tensor | Any | None = None,
        content_hashes: Sequence[str] | None = None,
        method: str = "graph",
        k: int = 16,
        shards: int = 1,
    ) -> ClusterResult:
        """Pass 2 of the ``cluster`` strategy: cluster every face of the dataset and map each
        cluster (in canonical digest order, so input order does not matter).

        Give ``crops`` (``N,3,S,S float in [0,1]``, all faces), or precomputed ``embeddings``
        (``N,D``, tensor or array, e.g. :meth:`EmbeddingStore.embeddings
        <anonloader.identity.store.EmbeddingStore.embeddings>`) with ``content_hashes``.
        ``method``, ``k`` and ``shards`` go to :func:`~anonloader.identity.keys.cluster_embeddings`
        (``shards > 1``: the k-NN search runs on Ray; same keys).
        """
        if embeddings is None:
            if crops is None:
                raise ConfigError("fit needs crops or embeddings + content_hashes")
            embeddings = self.embed(crops)
            content_hashes = [face_content_hash(c) for c in crops]
        if content_hashes is None:
            raise ConfigError("fit with embeddings needs their content_hashes")
        self.clusters = cluster_embeddings(embeddings, content_hashes, self.threshold, method=method, k=k, shards=shards)
        features = None
        if self.feature_fn is not None and crops is not None and self.clusters.cluster_keys:
            features = self._cluster_features(crops, content_hashes)
        assignments = self.mapper.map_many(self.clusters.cluster_keys, self.clusters.centroids, features)
        self._assigned.update({a.key_digest: a for a in assignments})
        return self.clusters

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """``F,D'`` float32 attribute-space features of ``F,3,S,S`` crops from ``feature_fn`` (CPU)."""
        if self.feature_fn is None:
            raise ConfigError("this assigner has no feature_fn")
        with torch.no_grad():
            features = torch.as_tensor(self.feature_fn(crops)).detach().float().cpu()
        if features.ndim != 2 or len(features) != len(crops):
            raise IdentityError(f"feature_fn must return F,D' features for F={len(crops)} crops, got {tuple(features.shape)}")
        return features

    def _cluster_features(self, crops: torch.Tensor, content_hashes: Sequence[str]) -> torch.Tensor:
        """One canonical feature per cluster: the normalised mean of its members' features,
        summed in content-hash order (so it does not depend on the input order)."""
        assert self.clusters is not None
        features = torch.nn.functional.normalize(self.features(crops), dim=1)
        members: dict[str, list[int]] = {}
        for f in sorted(range(len(crops)), key=lambda i: (content_hashes[i], i)):
            members.setdefault(self.clusters.keys[f], []).append(f)
        means = [features[members[k]].sum(0) if k in members else torch.zeros(features.shape[1]) for k in self.clusters.cluster_keys]
        return torch.nn.functional.normalize(torch.stack(means), dim=1)

    def keys(self, crops: torch.Tensor, image_index: torch.Tensor, labels: Sequence[Any] | None, embeddings: torch.Tensor | None) -> list[str]:
        """The real-identity key of every face."""
        index = [int(i) for i in image_index]
        if self.strategy == "label":
            if labels is None:
                raise IdentityError("the 'label' identity strategy needs labels: pass identity_label=... / labels=[...]")
            return [label_key(labels[i], self.key_fn) for i in index]
        assert embeddings is not None
        if self.strategy == "track":
            if labels is None:
                raise IdentityError("the 'track' identity strategy needs each image's clip name as its label")
            keys: list[str] = [""] * len(index)
            for image in sorted(set(index)):
                faces = [f for f, i in enumerate(index) if i == image]
                clip = str(labels[image] if self.key_fn is None else self.key_fn(labels[image]))
                tracker = self._trackers.setdefault(clip, FaceTracker(clip, self.threshold))
                for f, key in zip(faces, tracker.update(embeddings[faces])):
                    keys[f] = key
            return keys
        hashes = [face_content_hash(c) for c in crops]
        known = self.clusters.key_of(embeddings, self.threshold, hashes) if self.clusters is not None else [None] * len(index)
        missing = [f for f, k in enumerate(known) if k is None]
        if missing:
            assert self.registry is not None
            for f, key in zip(missing, self.registry.key_of(embeddings[missing], [hashes[f] for f in missing])):
                known[f] = key
        return [str(k) for k in known]

    def assign(self, crops: torch.Tensor, image_index: torch.Tensor, labels: Sequence[Any] | None) -> list[IdentityAssignment]:
        """One stable assignment per face.

        Args:
            crops: ``F,3,S,S float32 in [0,1]`` aligned crops (template ``self.embedder.template``).
            image_index: ``F int64``, the image each crop came from (indexes ``labels``).
            labels: one label per image (label / track strategies), or None.
        """
        if len(crops) == 0:
            return []
        needs_embeddings = self.strategy != "label" or (self.mapper.bank is not None and self.embedder is not None)
        embeddings = self.embed(crops) if needs_embeddings else None
        keys = self.keys(crops, image_index, labels, embeddings)
        digests = [self.mapper.digest(key) for key in keys]
        features: dict[int, torch.Tensor] = {}
        if self.feature_fn is not None and self.mapper.bank is not None:
            new = [f for f, d in enumerate(digests) if d not in self._assigned and not self.mapper.is_assigned(d)]
            if new:
                features = dict(zip(new, self.features(crops[new])))
        out = []
        for f, (key, digest) in enumerate(zip(keys, digests)):
            if digest not in self._assigned:
                self._assigned[digest] = self.mapper.map(key, None if embeddings is None else embeddings[f], features.get(f))
            out.append(self._assigned[digest])
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_embedding_cache"] = {}
        return state

    def save(self) -> None:
        """Persist the mapper's table and the online registry (where paths were given)."""
        if self.mapper.store is not None:
            self.mapper.save()
        if self.registry is not None and self.registry.path is not None:
            self.registry.save()

    def config(self) -> dict[str, Any]:
        """Strategy, recognizer, mapper settings and the secret's keyed check value (never the secret)."""
        return {
            "strategy": self.strategy,
            "embedder": None if self.embedder is None else self.embedder.config(),
            "mapper": self.mapper.config(),
            "key_fn": None if self.key_fn is None else getattr(self.key_fn, "__qualname__", repr(self.key_fn)),
        } | ({} if self.feature_fn is None else {"feature_fn": _describe(self.feature_fn)})


def _describe(fn: Callable[..., Any]) -> Any:
    """A JSON-able description of a feature function: its owner's config when it is a bound method
    of an object with ``config()`` (e.g. IDDiffuse: its weights hash), else its qualified name."""
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", type(fn).__name__)
    describe = getattr(owner, "feature_config", None)
    return {"name": name, **describe()} if callable(describe) else {"name": name}


def default_assigner(
    method: str,
    bank: Any,
    *,
    secret: Any = None,
    secret_file: str | os.PathLike[str] | None = None,
    embedder: Any = None,
    **options: Any,
) -> KeyedIdentityAssigner:
    """The keyed ``"online"`` assigner a method with a bank uses when the pipeline is given none
    (``method.default_identity()``): one synthetic identity of ``bank`` per real person, linked
    by ``embedder``.

    Args:
        method: the method's name, for error messages.
        bank: the method's :class:`~anonloader.identity.bank.IdentityBank`; its ``embeddings``
            must be in ``embedder``'s space.
        secret, secret_file: the mapping secret; default ``$ANONLOADER_SECRET`` or the file
            named by ``$ANONLOADER_SECRET_FILE``.
        embedder: the recognizer that links faces of one person (name or object); default the
            one recorded in the bank's metadata, else ``"dlib"``.
        options: more :class:`KeyedIdentityAssigner` options (``registry_path``, ``store``,
            ``feature_fn`` + ``candidate_pool``, ...).

    Raises:
        ConfigError: no secret anywhere, or a bank in another recognizer's space.
    """
    from anonloader.errors import SecretError
    from anonloader.identity.embedders import load_embedder
    from anonloader.identity.mapper import SECRET_ENV, SECRET_FILE_ENV

    try:
        root = resolve_secret(secret, secret_file)
    except SecretError as error:
        raise ConfigError(
            f"{method} keeps one synthetic identity per real person with a keyed mapping, and no secret was "
            f"given: set {SECRET_ENV} to a random value you keep (e.g. `python -c 'import secrets; "
            f"print(secrets.token_hex(32))'`) or {SECRET_FILE_ENV} to a file holding it, or pass secret= (the "
            "pipeline's, anonymize's or precompute's), identity=model.default_identity(secret_file=...) or an "
            "identity assigner of your own; identity=False gives up stable identities (each photo its own)"
        ) from error
    recorded = ((bank.meta or {}).get("recognizer") or {}).get("name")
    embedder = load_embedder(embedder if embedder is not None else recorded or "dlib")
    if (recorded is not None and recorded != embedder.name) or int(bank.dim) != int(embedder.dim):
        raise ConfigError(
            f"the {method} bank's embeddings ({bank.dim}-d, recognizer {recorded or 'not recorded'}) are not in "
            f"the space of the recognizer {embedder.name!r} ({embedder.dim}-d) that keys the default identity mapping: "
            f"build the bank with it (IdentityBank.from_folder(folder, load_embedder({embedder.name!r})) or "
            "anonloader bank build) or pass default_identity(embedder=<the bank's recognizer>)"
        )
    return KeyedIdentityAssigner("online", secret=root, bank=bank, embedder=embedder, **options)
