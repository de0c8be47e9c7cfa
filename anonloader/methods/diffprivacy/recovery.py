"""Putting recovered faces back into an anonymized image.

:func:`recover_image` decrypts every key of one cache entry, regenerates the original crops
(:meth:`DiffPrivacy.recover`) and pastes them with ``paste_back(feather=0, color_match=False)``.
With feather 0 the paste's support is exactly the anonymization mask's (the same ellipse, hard
edged), so every pixel outside it keeps the anonymized image's bytes, which there are the
original's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anonloader.errors import ConfigError

if TYPE_CHECKING:
    from .model import DiffPrivacy
    from .store import RecoveryKeyStore

__all__ = ["recover_image"]


def recover_image(
    method: DiffPrivacy, store: RecoveryKeyStore, entry_key: str, image: torch.Tensor, faces: list[int] | None = None
) -> torch.Tensor:
    """The anonymized ``image`` (``3,H,W float in [0,1]``) with the faces of ``entry_key`` recovered.

    Args:
        method: a Diff-Privacy with the models the keys were made with.
        store: the opened key store (the right password already checked).
        entry_key: the cache entry the image belongs to.
        faces: which faces (default: every face with a key).

    Returns:
        ``3,H,W float32 in [0,1]``.

    Raises:
        SecretError: a key fails authentication; ConfigError: a key has no placement (affine)
        or was made with other models.
    """
    from anonloader.kernels.paste_back import paste_back

    indices = store.faces(entry_key) if faces is None else list(faces)
    if not indices:
        return image.clone()
    keys = [store.get(entry_key, f) for f in indices]
    for face, key in zip(indices, keys, strict=True):
        if "affine" not in key.meta:
            raise ConfigError(f"the recovery key of cache entry {entry_key}, face {face} has no affine; it cannot be placed")
    crops = method.recover(keys)
    affines = torch.tensor([key.meta["affine"] for key in keys], dtype=torch.float32)
    index = torch.zeros(len(keys), dtype=torch.int64)
    return paste_back([image.float().cpu()], crops, affines, index, feather=0.0, color_match=False)[0]
