"""Password-derived encryption of recovery keys.

    password --Argon2id(salt, m, t, p)--> master key (32 B, once per process)
    master key --HKDF-SHA256(info = tag | entry key | face)--> per-face key (32 B)
    per-face key --AES-256-GCM(random 96-bit nonce, AAD = tag | fingerprint | entry key | face)--> blob

A blob is ``nonce (12 B) ‖ ciphertext ‖ tag (16 B)``. The Argon2id parameters (RFC 9106's second
recommendation by default: m = 64 MiB, t = 3, p = 4) and the random 16-byte salt are stored in the
key store's metadata beside a keyed check value (HMAC-SHA256 under an HKDF subkey of the master
key), so a wrong password fails when the store is opened, before any blob is read. Binding the
entry key and face index into both the subkey and the AAD makes a blob moved to another entry or
face fail authentication; a flipped byte fails it too. The password lives only in a
:class:`Secret` (never printed, logged or pickled); worker processes receive the derived
:class:`KeyCipher`, never the password.

Security note: the AEAD is the security. The diffusion keys themselves (z_T, pseudo-words) are
not secret-keyed transforms: anyone holding them and the public models recovers the face.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anonloader.errors import ConfigError, SecretError

__all__ = ["FORMAT_TAG", "KdfParams", "KeyCipher", "Secret", "derive_cipher"]

FORMAT_TAG = b"anonloader.diffprivacy.keys/1"
ENV_VARIABLE = "ANONLOADER_KEY_PASSWORD"


class Secret:
    """A password held so that it cannot leak by accident: ``repr``/``str`` hide it, pickling
    refuses (hand workers the derived :class:`KeyCipher` instead)."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if not data:
            raise SecretError("the key password is empty; give a non-empty password")
        self._value = data

    def reveal(self) -> bytes:
        """The password's bytes (for key derivation only)."""
        return self._value

    @classmethod
    def from_sources(
        cls, key_password: str | bytes | Secret | None = None, key_password_file: str | os.PathLike[str] | None = None
    ) -> Secret:
        """From ``key_password``, else the first line of ``key_password_file``, else
        ``$ANONLOADER_KEY_PASSWORD``.

        Raises:
            SecretError: none of them is given, or the file cannot be read (the message names
                the file, never its content).
        """
        if isinstance(key_password, Secret):
            return key_password
        if key_password is not None:
            return cls(key_password)
        if key_password_file is not None:
            path = Path(key_password_file).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as error:
                raise SecretError(f"cannot read the key password file {path} ({type(error).__name__}); check its path and permissions") from None
            return cls(text.splitlines()[0] if text else "")
        value = os.environ.get(ENV_VARIABLE)
        if value:
            return cls(value)
        raise SecretError(
            f"recovery keys need a password: pass key_password=, key_password_file= or set ${ENV_VARIABLE}; "
            "or build the method with recoverable=False"
        )

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is never pickled; pass the derived KeyCipher to worker processes")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return id(self)


@dataclass(frozen=True)
class KdfParams:
    """Argon2id settings: ``salt`` (16 random bytes), ``memory_cost`` in KiB (65536 = 64 MiB),
    ``iterations`` (t = 3), ``lanes`` (p = 4). Lower values are for tests only."""

    salt: bytes
    memory_cost: int = 65536
    iterations: int = 3
    lanes: int = 4

    @classmethod
    def new(cls, **kwargs: Any) -> KdfParams:
        return cls(salt=os.urandom(16), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": "argon2id", "salt": self.salt.hex(), "memory_cost": self.memory_cost, "iterations": self.iterations, "lanes": self.lanes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KdfParams:
        if data.get("algorithm") != "argon2id":
            raise ConfigError(f"unknown key-derivation algorithm {data.get('algorithm')!r} in the key store")
        return cls(bytes.fromhex(data["salt"]), int(data["memory_cost"]), int(data["iterations"]), int(data["lanes"]))


def _hkdf(master: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def _face_context(entry_key: str, face: int) -> bytes:
    return entry_key.encode("utf-8") + b"|" + int(face).to_bytes(4, "big")


class KeyCipher:
    """AES-256-GCM under per-face HKDF subkeys of a master key derived from the password.

    Picklable (the master key travels, the password never does). ``fingerprint`` (the pipeline's)
    is bound into every blob's AAD and the check value.
    """

    def __init__(self, master_key: bytes, fingerprint: str) -> None:
        if len(master_key) != 32:
            raise ConfigError("KeyCipher needs a 32-byte master key")
        self._master = bytes(master_key)
        self.fingerprint = str(fingerprint)

    def __repr__(self) -> str:
        return f"KeyCipher(fingerprint={self.fingerprint[:12]}…, key=<hidden>)"

    def export_key(self) -> bytes:
        """The 32-byte derived master key, for handing this cipher to a peer process over a
        channel the caller trusts (a torchrun process group: rank 0 derives, the other ranks
        never see the password). Never log or store it; ``KeyCipher(key, fingerprint)`` rebuilds
        the cipher."""
        return self._master

    def check_value(self) -> str:
        """HMAC-SHA256 of the format tag and fingerprint under the ``check`` subkey (hex)."""
        key = _hkdf(self._master, FORMAT_TAG + b"|check")
        return hmac.new(key, FORMAT_TAG + b"|" + self.fingerprint.encode(), hashlib.sha256).hexdigest()

    def _aad(self, entry_key: str, face: int) -> bytes:
        return FORMAT_TAG + b"|" + self.fingerprint.encode() + b"|" + _face_context(entry_key, face)

    def encrypt(self, entry_key: str, face: int, plaintext: bytes) -> bytes:
        """``nonce ‖ ciphertext ‖ tag`` for one face's key bytes."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        key = _hkdf(self._master, FORMAT_TAG + b"|face|" + _face_context(entry_key, face))
        return nonce + AESGCM(key).encrypt(nonce, plaintext, self._aad(entry_key, face))

    def decrypt(self, entry_key: str, face: int, blob: bytes) -> bytes:
        """The key bytes of ``entry_key``'s face ``face``.

        Raises:
            SecretError: authentication failed (wrong password, a changed byte, or a blob that
                belongs to another entry or face).
        """
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = _hkdf(self._master, FORMAT_TAG + b"|face|" + _face_context(entry_key, face))
        try:
            return AESGCM(key).decrypt(blob[:12], blob[12:], self._aad(entry_key, face))
        except (InvalidTag, ValueError):
            raise SecretError(
                f"recovery key of cache entry {entry_key}, face {face}: authentication failed (wrong password, "
                "or the stored blob was changed or moved); check the password and restore the key store from a backup"
            ) from None


def derive_cipher(secret: Secret, params: KdfParams, fingerprint: str) -> KeyCipher:
    """Argon2id(password, salt) -> the master key -> a :class:`KeyCipher` (~0.1-0.5 s at the
    default 64 MiB; do it once per process)."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    kdf = Argon2id(salt=params.salt, length=32, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_cost)
    return KeyCipher(kdf.derive(secret.reveal()), fingerprint)
