"""The seam between the pipeline and identity handling (keys, keyed mapping, banks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["IdentityAssigner", "IdentityAssignment"]


@dataclass(frozen=True)
class IdentityAssignment:
    """The synthetic identity chosen for one real face.

    Attributes:
        key_digest: hex HMAC-SHA256 of the real-identity key under the user's secret
            (never the raw key, never an embedding).
        synthetic_id: index of the synthetic identity in the bank, or None without a bank.
        seed: 63-bit generation seed derived from ``key_digest``.
    """

    key_digest: str
    synthetic_id: int | None
    seed: int


@runtime_checkable
class IdentityAssigner(Protocol):
    """Gives every face of a batch its stable synthetic identity.

    ``assign(crops, image_index, labels)``:
        crops: ``F,3,S,S float32 in [0,1]`` aligned crops (template of the pipeline's method).
        image_index: ``F int64``, the image each crop came from.
        labels: one dataset-provided identity label per image (``label`` strategy), or None.
    Returns one :class:`IdentityAssignment` per crop; raises
    :class:`~anonloader.errors.IdentityError` (or ``SecretError``) on failure.

    Optional attributes ``crop_size``, ``template`` and ``margin`` name the alignment the
    assigner wants its crops in (its recognizer's); when present the pipeline aligns the faces
    for it separately, otherwise it receives the method's crops.

    ``config()``: JSON-able settings that change assignments (strategy, bank fingerprint,
    recognizer, thresholds) — never the secret itself, only a keyed check value.
    """

    def assign(
        self, crops: torch.Tensor, image_index: torch.Tensor, labels: Sequence[Any] | None
    ) -> list[IdentityAssignment]: ...

    def config(self) -> dict[str, Any]: ...
