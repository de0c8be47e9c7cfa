"""Content-addressed cache keys.

A key is the xxh3-128 digest of three parts, each length-prefixed so no two different triples
can run into each other:

1. the image's canonical content bytes: the encoded file bytes when the source has them
   (hashing bytes is far cheaper than decoding them), otherwise the decoded pixels with their
   shape and dtype (``SourceImage.content_bytes()``);
2. the pipeline fingerprint (method, parameters, weights, detector, cache format version);
3. a salt derived from the user's secret by HMAC-SHA256 — never the secret itself.

A changed setting changes the fingerprint, so a stale image can never be served, and without
the secret nobody can tell from a key which original image it came from.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import xxhash

__all__ = ["KEY_SIZE", "cache_key", "derive_salt", "salt_check"]

#: bytes of a key (xxh3-128).
KEY_SIZE = 16

_SALT_CONTEXT = b"anonloader/cache-salt/v1"
_CHECK_CONTEXT = b"anonloader/cache-salt-check/v1"


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def derive_salt(secret: str | bytes | None) -> bytes:
    """The 32-byte key salt for ``secret`` (HMAC-SHA256 of a fixed context); empty without one."""
    if secret is None:
        return b""
    return hmac.new(_secret_bytes(secret), _SALT_CONTEXT, hashlib.sha256).digest()


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
