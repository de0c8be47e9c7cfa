"""The encrypted recovery-key store: its own LMDB environment beside a cache.

Layout: ``<cache directory>/recovery.lmdb/`` (an LMDB environment of its own, so training reads
of the cache never open it), holding

- ``b"__meta__"``: JSON ``{"format", "aead": "AES-256-GCM", "hkdf": "SHA-256", "kdf": {argon2id
  salt and cost}, "check": keyed check value, "fingerprint": the pipeline's}`` (no password, no
  key material);
- ``b"k/<entry key>/<face:08d>"``: one blob per face (:class:`~.crypto.KeyCipher`), the
  plaintext being :meth:`~.keys.RecoveryKey.to_bytes`.

The environment is opened lazily, once per process (a forked DataLoader worker opens its own).
Deleting ``recovery.lmdb`` strips every key; the cache itself is unchanged.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any

from anonloader.errors import CacheError, ConfigError, SecretError
from anonloader.lmdb_envs import close_env, is_open, open_env

from .crypto import FORMAT_TAG, KdfParams, KeyCipher, Secret, derive_cipher
from .keys import RecoveryKey

__all__ = ["RECOVERY_DB", "RecoveryKeyStore"]

RECOVERY_DB = "recovery.lmdb"
_META = b"__meta__"


def _new_meta(params: KdfParams, cipher: KeyCipher) -> bytes:
    meta = {
        "format": FORMAT_TAG.decode(),
        "aead": "AES-256-GCM",
        "hkdf": "SHA-256",
        "kdf": params.to_dict(),
        "check": cipher.check_value(),
        "fingerprint": cipher.fingerprint,
    }
    return json.dumps(meta, sort_keys=True).encode()


class RecoveryKeyStore:
    """Encrypted per-face recovery keys of one cache.

    Build with :meth:`create` (a new store, or an existing one with the same password) or
    :meth:`open`; both derive the key from the password once and check it against the stored
    check value.
    """

    def __init__(self, directory: str | os.PathLike[str], cipher: KeyCipher, *, readonly: bool = False, map_size: int = 1 << 34) -> None:
        self.path = Path(directory) / RECOVERY_DB
        self.cipher = cipher
        self.readonly = readonly
        self.map_size = int(map_size)

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _raw_env(path: Path, readonly: bool, map_size: int) -> Any:
        """This process's environment for ``path`` (shared per path and process:
        :func:`~anonloader.lmdb_envs.open_env`)."""
        if readonly and not path.is_dir():
            raise CacheError(f"no recovery keys at {path}; this cache was written without key_password (or its keys were stripped)")
        return open_env(path, writable=not readonly, map_size=map_size)[0]

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        key_password: str | bytes | Secret | None = None,
        *,
        fingerprint: str,
        key_password_file: str | os.PathLike[str] | None = None,
        kdf: KdfParams | None = None,
        map_size: int = 1 << 34,
    ) -> RecoveryKeyStore:
        """Opens the store for writing, creating it (with a fresh salt) if absent.

        Raises:
            SecretError: no password given, or it does not open an existing store.
            ConfigError: an existing store belongs to another pipeline fingerprint.
        """
        secret = Secret.from_sources(key_password, key_password_file)
        if cls._stored_meta(directory, map_size) is None:
            params = kdf or KdfParams.new()
            return cls.create_with_cipher(directory, derive_cipher(secret, params, fingerprint), params, map_size=map_size)
        return cls.open(directory, secret, fingerprint=fingerprint, readonly=False, map_size=map_size)

    @classmethod
    def create_with_cipher(
        cls, directory: str | os.PathLike[str], cipher: KeyCipher, kdf: KdfParams, *, map_size: int = 1 << 34
    ) -> RecoveryKeyStore:
        """Opens for writing (creating if absent) a store for an already derived ``cipher``: a
        process that never held the password (a torchrun rank other than 0) writes keys that
        the password opens. ``kdf`` must be the parameters ``cipher`` was derived with.

        Raises:
            SecretError: an existing store here was made with another password or salt.
        """
        path = Path(directory) / RECOVERY_DB
        raw = cls._stored_meta(directory, map_size)
        if raw is None:
            with cls._raw_env(path, False, map_size).begin(write=True) as txn:
                txn.put(_META, _new_meta(kdf, cipher))
        else:
            meta = json.loads(raw)
            if meta.get("fingerprint") != cipher.fingerprint:
                raise ConfigError(f"the recovery keys at {path} belong to another pipeline (fingerprint differs)")
            if meta.get("kdf", {}).get("salt") != kdf.salt.hex() or not hmac.compare_digest(meta.get("check", ""), cipher.check_value()):
                raise SecretError(f"the recovery keys at {path} were made with another password or salt; give the password used at precompute")
        return cls(directory, cipher, map_size=map_size)

    @classmethod
    def _stored_meta(cls, directory: str | os.PathLike[str], map_size: int) -> bytes | None:
        """The raw metadata of the store in ``directory``, opened (created if absent) for writing;
        None for a new store."""
        path = Path(directory) / RECOVERY_DB
        path.mkdir(parents=True, exist_ok=True)
        with cls._raw_env(path, False, map_size).begin() as txn:
            return txn.get(_META)

    @classmethod
    def copy_sealed(cls, sources: list[str | os.PathLike[str]], destination: str | os.PathLike[str], *, map_size: int = 1 << 34) -> int:
        """Copies the encrypted keys of the stores in ``sources`` (cache or shard directories)
        into ``destination``'s store as they are (no password needed: each blob stays bound to
        its pipeline fingerprint, entry key and face, and is checked when it is decrypted).
        Returns the number of keys copied (0 when no source has a store).

        Raises:
            ConfigError: the stores were made by different pipelines, passwords or salts (they
                cannot share one store; recover from each source).
        """
        stores = [Path(s) for s in sources if (Path(s) / RECOVERY_DB).is_dir()]
        if not stores:
            return 0
        path = Path(destination) / RECOVERY_DB
        paths = [path, *(store / RECOVERY_DB for store in stores)]
        held = {p for p in paths if is_open(p)}
        copied = 0
        try:
            metas = [cls.read_meta(s) for s in stores]
            if len({(m["fingerprint"], m["kdf"]["salt"], m["check"]) for m in metas}) > 1:
                raise ConfigError(
                    "the recovery keys of " + ", ".join(str(s) for s in stores) + " were made by different pipelines, passwords "
                    "or salts and cannot be merged into one key store; recover from each source"
                )
            path.mkdir(parents=True, exist_ok=True)
            target = cls._raw_env(path, False, map_size)
            with target.begin(write=True) as out:
                raw = out.get(_META)
                if raw is not None and json.loads(raw)["check"] != metas[0]["check"]:
                    raise ConfigError(f"{path} already holds recovery keys of another password; merge into a new destination")
                out.put(_META, json.dumps(metas[0], sort_keys=True).encode())
                for store in stores:
                    with cls._raw_env(store / RECOVERY_DB, True, 1 << 20).begin() as txn:
                        for key, blob in txn.cursor():
                            if bytes(key).startswith(b"k/"):
                                out.put(bytes(key), bytes(blob))
                                copied += 1
        finally:
            for p in paths:  # close what this copy opened (stores opened before stay open)
                if p not in held:
                    close_env(p)
        return copied

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        key_password: str | bytes | Secret | None = None,
        *,
        key_password_file: str | os.PathLike[str] | None = None,
        fingerprint: str | None = None,
        readonly: bool = True,
        map_size: int = 1 << 34,
    ) -> RecoveryKeyStore:
        """Opens an existing store and checks the password (before any key is read).

        Raises:
            SecretError: no password, or the wrong one.
            CacheError: there is no store in ``directory``.
            ConfigError: ``fingerprint`` is given and differs from the store's.
        """
        secret = Secret.from_sources(key_password, key_password_file)
        meta = cls.read_meta(directory)
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise ConfigError(f"the recovery keys at {Path(directory) / RECOVERY_DB} belong to another pipeline (fingerprint differs)")
        cipher = derive_cipher(secret, KdfParams.from_dict(meta["kdf"]), meta["fingerprint"])
        if not hmac.compare_digest(cipher.check_value(), meta["check"]):
            raise SecretError(f"wrong key password for the recovery keys at {Path(directory) / RECOVERY_DB}; give the password used at precompute")
        return cls(directory, cipher, readonly=readonly, map_size=map_size)

    @classmethod
    def read_meta(cls, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """The store's metadata (salt, cost, check value, fingerprint; no secret)."""
        path = Path(directory) / RECOVERY_DB
        env = cls._raw_env(path, True, 1 << 20)
        with env.begin() as txn:
            raw = txn.get(_META)
        if raw is None:
            raise CacheError(f"{path} has no metadata; it is not a recovery-key store")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_TAG.decode():
            raise CacheError(f"{path} has key-store format {meta.get('format')!r}; this anonloader reads {FORMAT_TAG.decode()!r}")
        return meta

    @property
    def env(self) -> Any:
        """This process's LMDB environment (opened on first use, shared per path)."""
        return self._raw_env(self.path, self.readonly, self.map_size)

    def close(self) -> None:
        """Closes this process's environment of the path (any store of it reopens on use)."""
        close_env(self.path)

    def __repr__(self) -> str:
        return f"RecoveryKeyStore({str(self.path)!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _key(entry_key: str, face: int) -> bytes:
        if "/" in entry_key:
            raise ConfigError(f"cache entry keys may not contain '/': {entry_key!r}")
        return f"k/{entry_key}/{int(face):08d}".encode()

    def put(self, entry_key: str, face: int, key: RecoveryKey | bytes) -> None:
        """Encrypts and stores one face's key (replacing an older one)."""
        if self.readonly:
            raise CacheError(f"{self.path} is open read-only; open it with RecoveryKeyStore.create to write keys")
        data = key.to_bytes() if isinstance(key, RecoveryKey) else bytes(key)
        blob = self.cipher.encrypt(entry_key, face, data)
        with self.env.begin(write=True) as txn:
            txn.put(self._key(entry_key, face), blob)

    @staticmethod
    def seal_entry(cipher: KeyCipher, entry_key: str, keys: list[RecoveryKey], affines: Any, feather: float) -> list[bytes]:
        """The encrypted blobs of one entry's face keys with their placement (what
        :meth:`put_entry` stores); a worker process holding only the derived ``cipher`` seals
        here, the writer stores with :meth:`put_sealed`."""
        if len(keys) != len(affines):
            raise ConfigError(f"cache entry {entry_key}: {len(keys)} recovery keys but {len(affines)} affines")
        RecoveryKeyStore._key(entry_key, 0)  # refuses entry keys the layout cannot hold
        return [cipher.encrypt(entry_key, f, key.with_placement(affines[f], feather).to_bytes()) for f, key in enumerate(keys)]

    def put_sealed(self, entries: list[tuple[str, list[bytes]]]) -> None:
        """Stores ``(entry key, blobs per face)`` from :meth:`seal_entry` in one transaction (an
        entry's older face keys beyond its new count are removed)."""
        if self.readonly:
            raise CacheError(f"{self.path} is open read-only; open it with RecoveryKeyStore.create to write keys")
        stale = [(entry_key, face) for entry_key, blobs in entries for face in self.faces(entry_key) if face >= len(blobs)]
        with self.env.begin(write=True) as txn:
            for entry_key, face in stale:
                txn.delete(self._key(entry_key, face))
            for entry_key, blobs in entries:
                for f, blob in enumerate(blobs):
                    txn.put(self._key(entry_key, f), blob)

    def put_entry(self, entry_key: str, keys: list[RecoveryKey], affines: Any, feather: float) -> None:
        """The cache's hook: stores every face key of one entry with its placement (``F,2,3``
        affines, image pixels -> crop pixels, and the paste-back feather) in one transaction."""
        if self.readonly:
            raise CacheError(f"{self.path} is open read-only; open it with RecoveryKeyStore.create to write keys")
        self.put_sealed([(entry_key, self.seal_entry(self.cipher, entry_key, keys, affines, feather))])

    def get_bytes(self, entry_key: str, face: int) -> bytes:
        """The decrypted key bytes of one face (:class:`SecretError` when authentication fails)."""
        with self.env.begin() as txn:
            blob = txn.get(self._key(entry_key, face))
        if blob is None:
            raise CacheError(f"no recovery key for cache entry {entry_key}, face {face}; list them with faces(entry_key)")
        return self.cipher.decrypt(entry_key, face, bytes(blob))

    def get(self, entry_key: str, face: int) -> RecoveryKey:
        return RecoveryKey.from_bytes(self.get_bytes(entry_key, face))

    def faces(self, entry_key: str) -> list[int]:
        """The face indices with a key under ``entry_key``, ascending."""
        prefix = f"k/{entry_key}/".encode()
        out = []
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not bytes(key).startswith(prefix):
                        break
                    out.append(int(bytes(key)[len(prefix) :]))
        return out

    def entries(self) -> list[tuple[str, int]]:
        """Every ``(entry key, face)`` with a stored key."""
        out = []
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(values=False):
                parts = bytes(key).decode().split("/")
                if len(parts) == 3 and parts[0] == "k":
                    out.append((parts[1], int(parts[2])))
        return out
