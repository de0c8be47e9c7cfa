"""Content-addressed cache keys.

A key is the xxh3-128 digest of three parts, each length-prefixed so no two different triples
can run into each other:

1. the image's canonical content bytes: the encoded file bytes when the source has them
   (hashing bytes is far cheaper than decoding them), otherwise the decoded pixels with their
   shape and dtype (``SourceImage.content_bytes()``);
2. the pipeline fingerprint (method, parameters, weights, detector, cache format version);
3. a salt derived from the user's secret by HMAC-SHA256 — never the secret itself.

A changed setting changes the fingerprint, so a stale image can never be served, and without
the secret nobody can tell from a key which original image it came from. Without a secret the
keys are unsalted: anyone holding a candidate photo can compute its key and test whether it
is in the cache (a membership test), so writing such a cache logs a warning.

:class:`CacheKeys` holds the subkeys derived from the secret (key salt, MAC key for
authenticating stored values, and the public salt check); it is what crosses into worker
processes and Ray actors — the secret itself never does.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = ["KEY_SIZE", "CacheKeys", "cache_key", "derive_mac_key", "derive_salt", "salt_check"]

#: bytes of a key (xxh3-128).
KEY_SIZE = 16

_SALT_CONTEXT = b"anonloader/cache-salt/v1"
_CHECK_CONTEXT = b"anonloader/cache-salt-check/v1"
_MAC_CONTEXT = b"anonloader/cache-mac/v1"


def _derive(secret: Any, context: bytes) -> bytes:
    """HMAC-SHA256 of ``context`` under ``secret`` (``str``, ``bytes`` or an
    :class:`anonloader.identity.mapper.Secret`, through its public ``digest``)."""
    if hasattr(secret, "digest") and not isinstance(secret, (str, bytes, bytearray, memoryview)):
        return bytes(secret.digest(context))
    value = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hmac.new(value, context, hashlib.sha256).digest()


def derive_salt(secret: Any) -> bytes:
    """The 32-byte key salt for ``secret`` (HMAC-SHA256 of a fixed context); empty without one."""
    if secret is None:
        return b""
    return _derive(secret, _SALT_CONTEXT)


def derive_mac_key(secret: Any) -> bytes | None:
    """The 32-byte key that authenticates stored values (HMAC-SHA256 of another context)."""
    if secret is None:
        return None
    return _derive(secret, _MAC_CONTEXT)


def salt_check(salt: bytes) -> str:
    """A short public check value of a salt, stored in the cache so a wrong secret is detected.

    It is a one-way function of the salt (itself one-way from the secret): it reveals neither.
    """
    if not salt:
        return "none"
    return hmac.new(salt, _CHECK_CONTEXT, hashlib.sha256).hexdigest()[:16]


def cache_key(content: bytes, fingerprint: str, salt: bytes = b"") -> bytes:
    """The 16-byte key of one image under one pipeline.

    Args:
        content: canonical bytes of the source image (encoded file bytes, or pixels + shape +
            dtype), e.g. ``SourceImage.content_bytes()``.
        fingerprint: the pipeline fingerprint (hex).
        salt: :func:`derive_salt` of the user's secret (``b""`` without a secret).
    """
    hasher = xxhash.xxh3_128()
    for part in (content, fingerprint.encode("ascii"), salt):
        hasher.update(struct.pack("<Q", len(part)))
        hasher.update(part)
    return hasher.digest()


@dataclass(frozen=True)
class CacheKeys:
    """The subkeys a cache needs, derived from the secret once (the secret is not kept).

    Attributes:
        salt: 32-byte key salt (``b""`` without a secret).
        mac_key: 32-byte HMAC-SHA256 key authenticating every stored value, or ``None``.
    """

    salt: bytes = b""
    mac_key: bytes | None = None

    @classmethod
    def from_secret(cls, secret: Any) -> CacheKeys:
        """Subkeys of ``secret`` (``str``, ``bytes``, a ``Secret``, ``CacheKeys`` or ``None``)."""
        if isinstance(secret, CacheKeys):
            return secret
        return cls(derive_salt(secret), derive_mac_key(secret))

    @property
    def keyed(self) -> bool:
        return self.mac_key is not None

    @property
    def salt_check(self) -> str:
        return salt_check(self.salt)

    def __repr__(self) -> str:
        return f"CacheKeys(keyed={self.keyed}, salt_check={self.salt_check!r})"
