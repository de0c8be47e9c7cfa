"""The keyed, stable real-to-synthetic identity mapping.

Every keyed operation below uses the *mapping key*
``K = HMAC-SHA256(secret, "anonloader/subkey/v1\\0identity-mapping")`` (:meth:`Secret.derive`),
never the secret itself: the mapper (and so every DataLoader worker or Ray actor it is pickled
into) holds only ``K``. ``digest = HMAC-SHA256(K, "anonloader/key/v1\\0" + key)`` turns a
real-identity key (a dataset label, a track id, a cluster's canonical content hash) into a keyed
digest that nobody without the secret can link back to the key. From the digest:

- the candidate order over the bank: ``c_j = int(HMAC-SHA256(K, digest || j)) mod N`` for
  ``j = 0, 1, ...`` (repeats skipped, then the remaining ids in ascending order), a pure function
  of (secret, key, bank size) — the same on every process and machine;
- the generation seed: the first 63 bits of ``SHA-256("anonloader/seed/v1" || digest)``.

The synthetic identity is the first candidate that is (a) not within the recognizer's threshold
of the real face (``cos(real, bank[c]) < threshold - margin``; the margin keeps the decision the
same for every photo of one person) and (b) not yet given to another key in this mapper's
assignment table. The table (``digest -> synthetic id``) makes distinct keys get distinct
synthetic identities while the bank has free ones (after that, ids are shared: the first
admissible candidate). Without a persisted table, two keys may collide with birthday
probability ``~k^2 / 2N``; :meth:`KeyedMapper.map_many` assigns a whole set of keys in
canonical (digest) order, so the result does not depend on the order keys were seen.

Nearness (IDDiffuse paper sec. 3.2: the synthetic identity is *near* the real face in E_I space
so that non-identity attributes fit, yet not the same person). With ``candidate_pool=K`` and a
real face's attribute-space feature (``real_feature``; the bank holds the same space in
``bank.features``, or a ``ranker`` orders the bank), the candidates are first the ``K`` bank
identities nearest to that feature, taken in a keyed order among themselves — ascending
``HMAC-SHA256(K, "anonloader/pool/v1" || digest || id)`` (rendezvous hashing: the order of
two members does not depend on the ranking, so a small change of the feature that keeps the
winner in the pool keeps the choice) — then, when every pool member is within the recognizer
threshold or taken, the global keyed order above. The threshold and distinctness rules are the
same as without a pool. Without ``real_feature`` (or ``candidate_pool=None``) the global order is
used, exactly as before.

Stability with a pool: two photos of one person have slightly different features, so their
pools may differ. The *first* assignment of a key digest is kept — in the mapper's table for
the process's life and, with ``store=``, on disk — so every later image of that person gets the
same synthetic identity, whatever its feature. Without a persisted table, another process sees
the same id as long as the first feature it sees keeps the same pool winner (usually, thanks to
the rendezvous order, but not guaranteed); persist the table (``store=``) or map a canonical
feature per key (e.g. a cluster's mean, as :meth:`KeyedIdentityAssigner.fit
<anonloader.identity.assigner.KeyedIdentityAssigner.fit>` does) when that must hold across
machines. Features are used only for ranking and never stored.

The table persists as JSON with only keyed digests, synthetic ids, the bank fingerprint and a
keyed check value ``HMAC(K, "anonloader/check/v1")``: loading it with another secret
raises :class:`~anonloader.errors.SecretError` instead of silently mapping differently. Stores of
format version 1 (digests under the raw secret, before the mapping key existed) cannot be
converted (they hold no keys) and are refused with an :class:`~anonloader.errors.IdentityError`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError, IdentityError, SecretError
from anonloader.identity.base import IdentityAssignment

__all__ = [
    "MAPPING_PURPOSE",
    "REGISTRY_PURPOSE",
    "SECRET_ENV",
    "SECRET_FILE_ENV",
    "KeyedMapper",
    "Secret",
    "SubKey",
    "resolve_key",
    "resolve_secret",
    "seed_from_digest",
]

SECRET_ENV = "ANONLOADER_SECRET"
SECRET_FILE_ENV = "ANONLOADER_SECRET_FILE"
_STORE_FORMAT = "anonloader-identity-map"
_STORE_VERSION = 2  # 2: digests under the derived mapping key (1: under the raw secret)
_SUBKEY_CONTEXT = b"anonloader/subkey/v1\0"
#: purpose of the key that turns identity keys into digests, candidate orders and pools
MAPPING_PURPOSE = "identity-mapping"
#: purpose of the online registry's key
REGISTRY_PURPOSE = "identity-registry"


class Secret:
    """The user's mapping secret, held only by the process that resolved it.

    Its ``repr`` never shows the value and it never pickles: DataLoader workers, Ray actors and
    anything else that receives a pickle get purpose-bound :class:`SubKey` objects from
    :meth:`derive` instead (the identity mapping key, the registry key), which can compute
    exactly the keyed digests of their purpose and cannot be turned back into the secret.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not value:
            raise SecretError("the identity mapping secret is empty; set a random value of at least 16 bytes")
        self._value = bytes(value)

    def derive(self, purpose: str) -> SubKey:
        """The subkey for ``purpose``: ``HMAC-SHA256(secret, "anonloader/subkey/v1\\0" + purpose)``.

        A pure function of (secret, purpose), so every process and machine derives the same one;
        subkeys of different purposes are independent (knowing one reveals neither the secret
        nor another purpose's subkey).
        """
        if not isinstance(purpose, str) or not purpose:
            raise ConfigError(f"a subkey purpose is a non-empty string, got {purpose!r}")
        return SubKey(purpose, hmac.new(self._value, _SUBKEY_CONTEXT + purpose.encode("utf-8"), hashlib.sha256).digest())

    def digest(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under the secret (in this process only; see :meth:`derive`)."""
        return hmac.new(self._value, message, hashlib.sha256).digest()

    def check_value(self) -> str:
        """A keyed check value (HMAC of a constant): tells a wrong secret apart, reveals nothing."""
        return self.digest(b"anonloader/check/v1").hex()[:32]

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self.check_value())

    def __reduce__(self) -> Any:
        raise SecretError(
            "the raw secret never leaves the process that read it, so a Secret cannot be pickled; "
            "pass a derived key instead (secret.derive(purpose)), as KeyedMapper and IdentityRegistry do"
        )


class SubKey:
    """A purpose-bound key derived from a :class:`Secret` (:meth:`Secret.derive`).

    It computes ``HMAC-SHA256(subkey, message)`` for its purpose and pickles as (purpose,
    subkey): what worker processes and Ray actors receive instead of the secret.

    Attributes:
        purpose: what it was derived for (e.g. :data:`MAPPING_PURPOSE`).
    """

    __slots__ = ("_key", "purpose")

    def __init__(self, purpose: str, key: bytes) -> None:
        if len(key) != 32:
            raise SecretError(f"a derived key has 32 bytes, got {len(key)}")
        self.purpose = str(purpose)
        self._key = bytes(key)

    def digest(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under this subkey (32 bytes)."""
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def check_value(self) -> str:
        """A keyed check value of this subkey (HMAC of a constant, 32 hex): tells a wrong secret
        apart without revealing the subkey or the secret."""
        return self.digest(b"anonloader/check/v1").hex()[:32]

    def require(self, purpose: str) -> SubKey:
        """This key when it was derived for ``purpose``; :class:`SecretError` otherwise."""
        if self.purpose != purpose:
            raise SecretError(f"a key derived for {self.purpose!r} was given where one for {purpose!r} is needed; pass the secret itself")
        return self

    def __repr__(self) -> str:
        return f"SubKey({self.purpose!r}, ***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubKey) and self.purpose == other.purpose and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash((self.purpose, self.check_value()))

    def __getstate__(self) -> tuple[str, bytes]:
        return (self.purpose, self._key)

    def __setstate__(self, state: tuple[str, bytes]) -> None:
        self.purpose, self._key = state


def resolve_key(secret: str | bytes | Secret | SubKey | None, purpose: str, secret_file: str | os.PathLike[str] | None = None) -> SubKey:
    """The ``purpose`` subkey of the secret from :func:`resolve_secret` (a :class:`SubKey` of that
    purpose is used as it is, so objects rebuilt in a worker never need the raw secret)."""
    if isinstance(secret, SubKey):
        return secret.require(purpose)
    return resolve_secret(secret, secret_file).derive(purpose)


def resolve_secret(secret: str | bytes | Secret | None = None, secret_file: str | os.PathLike[str] | None = None) -> Secret:
    """The mapping secret from (in order) ``secret``, ``secret_file``, ``$ANONLOADER_SECRET`` or
    the file named by ``$ANONLOADER_SECRET_FILE``; :class:`SecretError` when none is given."""
    if isinstance(secret, Secret):
        return secret
    if secret is not None:
        return Secret(secret.encode() if isinstance(secret, str) else bytes(secret))
    file = secret_file or os.environ.get(SECRET_FILE_ENV)
    if file:
        path = Path(file).expanduser()
        try:
            value = path.read_bytes().strip()
        except OSError as error:
            raise SecretError(f"cannot read the secret file {path}: {error.strerror}") from error
        return Secret(value)
    env = os.environ.get(SECRET_ENV)
    if env:
        return Secret(env.encode())
    raise SecretError(
        "a keyed identity mapping needs a secret and none was given: pass secret=... or "
        f"secret_file=..., or set the {SECRET_ENV} environment variable (or {SECRET_FILE_ENV} to "
        "a file holding it). Use a random value of at least 16 bytes, e.g. "
        "`python -c 'import secrets; print(secrets.token_hex(32))'`, and keep it: another secret "
        "gives another mapping."
    )


def seed_from_digest(digest: str) -> int:
    """63-bit generation seed of a keyed digest (hex)."""
    return int.from_bytes(hashlib.sha256(b"anonloader/seed/v1" + bytes.fromhex(digest)).digest()[:8], "big") >> 1


@dataclass
class _Table:
    assignments: dict[str, int]


class KeyedMapper:
    """Keyed, deterministic real key -> synthetic identity in a bank (see module doc).

    Args:
        secret: the secret, or None to take it from the environment (:func:`resolve_secret`).
        bank: an :class:`~anonloader.identity.bank.IdentityBank` (or None: digests and seeds
            only, ``synthetic_id=None``), or an int bank size (no similarity skipping).
        threshold: cosine similarity at which a bank identity counts as the real person
            (default: the embedder's threshold, else 0.917 = dlib's).
        margin: skip candidates with cosine ``>= threshold - margin``.
        store: path of a persisted assignment table (JSON); created on :meth:`save`.
        secret_file: file holding the secret (instead of ``secret``).
        candidate_pool: rank by nearness: try first the ``K`` bank identities nearest to the real
            face's attribute-space feature (see module doc); None (default) = keyed order only.
            Needs ``bank.features`` or a ``ranker``.
        ranker: optional ``real_feature -> order`` callable (``N int64`` bank ids, nearest
            first) replacing the default cosine ranking over ``bank.features``.
    """

    def __init__(
        self,
        secret: str | bytes | Secret | None,
        bank: Any = None,
        *,
        embedder: Any = None,
        threshold: float | None = None,
        margin: float = 0.05,
        store: str | os.PathLike[str] | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        candidate_pool: int | None = None,
        ranker: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.key = resolve_key(secret, MAPPING_PURPOSE, secret_file)
        self.bank = bank
        self.embedder = embedder
        if threshold is None:
            threshold = getattr(embedder, "threshold", None) or 0.917
        self.threshold = float(threshold)
        self.margin = float(margin)
        self.store = Path(store) if store is not None else None
        if candidate_pool is not None:
            if isinstance(candidate_pool, bool) or int(candidate_pool) < 1:
                raise ConfigError(f"candidate_pool must be a positive number of bank identities, got {candidate_pool!r}")
            candidate_pool = int(candidate_pool)
            if ranker is None and (bank is None or isinstance(bank, int) or getattr(bank, "features", None) is None):
                raise ConfigError(
                    "candidate_pool ranks the bank by nearness to the real face, so the bank needs features in "
                    "that space: add them with bank.with_features(...) (for IDDiffuse: "
                    "IDDiffuse.with_bank_features(bank)), or pass ranker=..."
                )
        self.candidate_pool = candidate_pool
        self.ranker = ranker
        self._table = _Table({})
        self._taken: dict[int, str] = {}
        self._indexes: dict[str, Any] = {}  # nearest-neighbour indexes, built on first use, not pickled
        if self.store is not None and self.store.exists():
            self._load_store()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_indexes"] = {}
        return state

    # ---------------------------------------------------------------- keys and candidates
    @property
    def bank_size(self) -> int:
        if self.bank is None:
            return 0
        return int(self.bank) if isinstance(self.bank, int) else len(self.bank)

    def bank_fingerprint(self) -> str | None:
        if self.bank is None:
            return None
        if isinstance(self.bank, int):
            return f"size:{self.bank}"
        return self.bank.fingerprint()

    def digest(self, key: str) -> str:
        """Keyed hex digest of a real-identity key."""
        if not isinstance(key, str):
            raise ConfigError(f"identity keys are strings, got {type(key).__name__}")
        return self.key.digest(b"anonloader/key/v1\0" + key.encode("utf-8")).hex()

    def candidates(self, digest: str) -> Iterator[int]:
        """The candidate order over the bank for a keyed digest (each id once, lazily)."""
        n = self.bank_size
        seen: set[int] = set()
        raw = bytes.fromhex(digest)
        for j in range(4 * n):
            value = int.from_bytes(self.key.digest(b"anonloader/candidate/v1" + raw + j.to_bytes(4, "big")), "big") % n
            if value not in seen:
                seen.add(value)
                yield value
                if len(seen) == n:
                    return
        yield from (i for i in range(n) if i not in seen)

    def rank(self, real_feature: torch.Tensor) -> torch.Tensor:
        """``N int64`` bank ids, nearest to ``real_feature`` first.

        Args:
            real_feature: ``D' float`` attribute-space feature of the real face (any
                normalisation); ranked by cosine similarity to ``bank.features`` (float64, ties
                by id), or by the ``ranker`` given to the mapper.
        """
        if self.ranker is not None:
            order = torch.as_tensor(self.ranker(real_feature)).long().reshape(-1).cpu()
        else:
            features = getattr(self.bank, "features", None)
            if features is None:
                raise ConfigError("ranking by nearness needs bank.features (IdentityBank.with_features) or a ranker")
            real = real_feature.detach().double().reshape(-1).cpu()
            if real.numel() != features.shape[1]:
                raise IdentityError(
                    f"the real face's feature has {real.numel()} dims but the bank's features have "
                    f"{features.shape[1]}; compute both with the same model (e.g. IDDiffuse.with_bank_features)"
                )
            sims = features.double() @ torch.nn.functional.normalize(real, dim=0)
            order = torch.sort(-sims, stable=True).indices
        n = self.bank_size
        if len(order) and (int(order.min()) < 0 or int(order.max()) >= n):
            raise IdentityError(f"the ranker returned ids outside the bank of {n} identities")
        return order

    def nearest(self, real_feature: torch.Tensor, count: int) -> list[int]:
        """The first ``count`` ids of :meth:`rank` (same order, ties by id), found through the
        bank's :class:`~anonloader.identity.index.VectorIndex` instead of sorting the whole bank.

        The index proposes ``count + 16`` candidates by float32 score; they are re-scored in
        float64 as :meth:`rank` does. When the ``count``-th float64 score is not clear of the
        weakest proposed float32 score (near-ties at the boundary, e.g. duplicate features), the
        whole bank is ranked instead, so the answer is always exactly :meth:`rank`'s.
        """
        n = self.bank_size
        features = getattr(self.bank, "features", None)
        count = min(int(count), n)
        if self.ranker is not None or features is None or count + 16 >= n:
            return list(dict.fromkeys(self.rank(real_feature).tolist()))[:count]
        real = real_feature.detach().double().reshape(-1).cpu()
        if real.numel() != features.shape[1]:
            return self.rank(real_feature).tolist()[:count]  # raises the dimension error
        real = torch.nn.functional.normalize(real, dim=0)
        index = self._indexes.get("features")
        if index is None:
            from anonloader.identity.index import VectorIndex

            index = self._indexes["features"] = VectorIndex.build(features, kind="exact")
        scores, ids = index.search(real.float()[None], count + 16)
        ids = ids[0][ids[0] >= 0]
        exact = features[torch.from_numpy(ids)].double() @ real
        order = sorted(range(len(ids)), key=lambda e: (-float(exact[e]), int(ids[e])))
        kth = float(exact[order[count - 1]])
        if kth <= float(scores[0][len(ids) - 1]) + 1e-5:
            return self.rank(real_feature).tolist()[:count]
        return [int(ids[e]) for e in order[:count]]

    def pool(self, digest: str, real_feature: torch.Tensor) -> list[int]:
        """The ``candidate_pool`` nearest bank ids to ``real_feature``, in the keyed (rendezvous)
        order of ``digest`` (see module doc)."""
        if self.candidate_pool is None:
            raise ConfigError("this mapper has no candidate_pool")
        members = self.nearest(real_feature, self.candidate_pool)
        raw = bytes.fromhex(digest)
        return sorted(members, key=lambda i: (self.key.digest(b"anonloader/pool/v1" + raw + i.to_bytes(4, "big")), i))

    def _candidate_order(self, digest: str, real_feature: torch.Tensor | None) -> Iterator[int]:
        if self.candidate_pool is None or real_feature is None:
            yield from self.candidates(digest)
            return
        pool = self.pool(digest, real_feature)
        yield from pool
        tried = set(pool)
        yield from (c for c in self.candidates(digest) if c not in tried)

    def _admissible(self, candidate: int, real_embedding: torch.Tensor | None) -> bool:
        if real_embedding is None or isinstance(self.bank, int) or getattr(self.bank, "embeddings", None) is None:
            return True
        bank_vector = self.bank.embeddings[candidate].float()
        real = torch.nn.functional.normalize(real_embedding.float().reshape(-1), dim=0)
        if bank_vector.shape != real.shape:
            raise IdentityError(
                f"the real face's embedding has {real.numel()} dims but the bank was built with "
                f"{bank_vector.numel()}; build the bank with the same recognizer"
            )
        return float(bank_vector @ real) < self.threshold - self.margin

    # ---------------------------------------------------------------- mapping
    def map(self, key: str, real_embedding: torch.Tensor | None = None, real_feature: torch.Tensor | None = None) -> IdentityAssignment:
        """The synthetic identity of one real key (a key already in the table keeps its id).

        Args:
            key: the real-identity key (never stored; only its keyed digest is).
            real_embedding: ``D float`` recognizer embedding of the real face (any normalisation),
                used to skip bank identities within the recognizer threshold.
            real_feature: ``D' float`` attribute-space feature of the real face (e.g. E_I), used
                only to rank candidates when the mapper has a ``candidate_pool``; never stored.
        """
        digest = self.digest(key)
        seed = seed_from_digest(digest)
        if self.bank_size == 0:
            return IdentityAssignment(digest, None, seed)
        if digest in self._table.assignments:
            return IdentityAssignment(digest, self._table.assignments[digest], seed)
        first_admissible = None
        chosen = None
        exhausted = len(self._taken) >= self.bank_size  # then the first admissible one is shared
        for candidate in self._candidate_order(digest, real_feature):
            if not self._admissible(candidate, real_embedding):
                continue
            if first_admissible is None:
                first_admissible = candidate
            if exhausted:
                break
            if candidate not in self._taken:
                chosen = candidate
                break
        if chosen is None:
            if first_admissible is None:
                raise IdentityError(
                    "every identity in the bank is within the recognizer threshold of this face; "
                    "use a larger or more diverse bank"
                )
            chosen = first_admissible  # the bank is exhausted: identities are shared from here on
        self._table.assignments[digest] = chosen
        self._taken.setdefault(chosen, digest)
        return IdentityAssignment(digest, chosen, seed)

    def is_assigned(self, digest: str) -> bool:
        """Whether the table already holds ``digest`` (its id no longer depends on features)."""
        return digest in self._table.assignments

    def map_many(
        self, keys: list[str], real_embeddings: torch.Tensor | None = None, real_features: torch.Tensor | None = None
    ) -> list[IdentityAssignment]:
        """Map a set of keys in canonical (digest) order, so the result does not depend on their order.

        Args:
            keys: real-identity keys (repeats allowed).
            real_embeddings: ``K,D`` embeddings aligned with ``keys`` (for a repeated key, the
                first row is used), or None.
            real_features: ``K,D'`` attribute-space features aligned with ``keys`` (ranking
                only, first row of a repeated key), or None.
        """
        digests = [self.digest(k) for k in keys]
        first: dict[str, int] = {}
        for i, d in enumerate(digests):
            first.setdefault(d, i)
        by_digest: dict[str, IdentityAssignment] = {}
        for d in sorted(first):
            i = first[d]
            by_digest[d] = self.map(
                keys[i],
                None if real_embeddings is None else real_embeddings[i],
                None if real_features is None else real_features[i],
            )
        return [by_digest[d] for d in digests]

    # ---------------------------------------------------------------- persisted table
    def state(self) -> dict[str, Any]:
        """The persisted form: keyed digests, synthetic ids, bank fingerprint, check value."""
        state = {
            "format": _STORE_FORMAT,
            "version": _STORE_VERSION,
            "check": self.key.check_value(),
            "bank": self.bank_fingerprint(),
            "threshold": self.threshold,
            "margin": self.margin,
            "assignments": dict(sorted(self._table.assignments.items())),
        }
        if self.candidate_pool is not None:
            state["candidate_pool"] = self.candidate_pool
        return state

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the assignment table (atomically) to ``path`` or the mapper's ``store``."""
        target = Path(path) if path is not None else self.store
        if target is None:
            raise ConfigError("KeyedMapper.save needs a path (or construct the mapper with store=...)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as handle:
            json.dump(self.state(), handle, indent=1, sort_keys=True)
        os.replace(handle.name, target)
        return target

    def _load_store(self) -> None:
        assert self.store is not None
        try:
            state = json.loads(self.store.read_text())
        except (OSError, ValueError) as error:
            raise IdentityError(f"cannot read the identity mapping store {self.store}: {error}") from error
        if state.get("format") != _STORE_FORMAT:
            raise IdentityError(f"{self.store} is not an anonloader identity mapping store")
        if state.get("version") != _STORE_VERSION:
            raise IdentityError(
                f"the identity mapping store {self.store} has format version {state.get('version')} and this "
                f"anonloader reads version {_STORE_VERSION} (digests under the derived mapping key); its digests "
                "cannot be converted, so start a new mapping with a new store path"
            )
        if not hmac.compare_digest(str(state.get("check", "")), self.key.check_value()):
            raise SecretError(
                f"the secret does not match the identity mapping store {self.store}: it was written "
                f"with another secret. Use the original secret ({SECRET_ENV} or secret_file), or a "
                "new store path to start a new mapping."
            )
        if state.get("bank") != self.bank_fingerprint():
            raise IdentityError(
                f"the identity mapping store {self.store} was written for another bank "
                f"({state.get('bank')}); use the same bank or a new store path"
            )
        self._table = _Table({str(k): int(v) for k, v in state.get("assignments", {}).items()})
        self._taken = {}
        for digest, synthetic in sorted(self._table.assignments.items()):
            self._taken.setdefault(synthetic, digest)

    def config(self) -> dict[str, Any]:
        """Settings that change assignments — the secret only as its keyed check value."""
        config: dict[str, Any] = {
            "check": self.key.check_value(),
            "bank": self.bank_fingerprint(),
            "threshold": self.threshold,
            "margin": self.margin,
            "persisted": self.store is not None,
        }
        if self.candidate_pool is not None:  # absent otherwise, so existing fingerprints stay the same
            config["candidate_pool"] = self.candidate_pool
            if self.ranker is not None:
                config["ranker"] = getattr(self.ranker, "__qualname__", type(self.ranker).__name__)
        return config
