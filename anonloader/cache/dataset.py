"""``CachedDataset``: the training view of an :class:`~anonloader.cache.store.AnonCache`.

Built for DataLoader throughput: ``__getitems__`` (which ``torch.utils.data.DataLoader`` calls
with a whole batch of indices) reads a batch in one LMDB read transaction per shard, with
``buffers=True`` so each sample record is a view of the memory map: its tag is checked and its
images decoded straight from that view, and the decoded pixels are the only copy (a fresh
tensor the caller owns and may modify). One lookup per sample: the record holds the skeleton
(labels and other fields) and every image's encoded pixels. Face records and per-face
metadata live in the entries and are read only by :meth:`CachedDataset.face_records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anonloader.cache.format import SampleView
from anonloader.errors import CacheMissError
from anonloader.types import FaceRecord

__all__ = ["CachedDataset"]


class CachedDataset(torch.utils.data.Dataset):
    """Whole anonymized samples read from an :class:`AnonCache`, in the source's order.

    ``dataset[i]`` is the ``i``-th stored sample rebuilt with the original types and non-image
    fields (``3,H,W uint8`` tensors come back as ``3,H,W uint8`` tensors, other image kinds as
    ``join_sample`` restores them), or ``None`` when the pipeline dropped one of its images or
    the sample failed (use ``anonloader.collate_skip_dropped``). A failed image whose policy
    obscured it is served obscured — never the original. Safe in forked DataLoader workers.

    Args:
        cache: the cache.
        positions: ``(source index, shard number)`` of every sample served, in order.
    """

    def __init__(self, cache: Any, positions: Sequence[tuple[int, int]]) -> None:
        self.cache = cache
        self.positions = list(positions)
        self.indices = [index for index, _ in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def source_index(self, i: int) -> int:
        """The index in the original dataset of stored sample ``i``."""
        return self.indices[i]

    def _position(self, i: int) -> tuple[int, int]:
        if not -len(self.positions) <= i < len(self.positions):
            raise IndexError(f"index {i} is out of range for a cached dataset of {len(self.positions)} samples")
        return self.positions[i]

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices`` (positions in this dataset), in order, in one read
        transaction per shard."""
        return self.cache.read_samples([self._position(int(i)) for i in indices], self._build)

    def _build(self, index: int, view: SampleView | None) -> Any:
        if view is None:
            raise CacheMissError(self.cache.missing_message(1, len(self.positions)) + f" (sample {index})")
        if view.failure is not None:
            return None
        images = []
        for image in view.images:
            pixels = image.stored.pixels()
            if pixels is None:
                return None
            images.append(pixels)
        skeleton = view.skeleton()
        alphas = view.alphas()
        if alphas is None:
            filled = _fill_uint8_slots(skeleton, images)
            if filled is not _NOT_UINT8:
                return filled  # the stored uint8 pixels are the answer
        from anonloader.data.adapters import join_sample

        floats = None if alphas is None else [None if a is None else a.float().div_(255.0) for a in alphas]
        return join_sample(skeleton, [p.float().div_(255.0) for p in images], floats)

    def face_records(self, i: int) -> list[list[FaceRecord]]:
        """Per image of stored sample ``i``, the :class:`FaceRecord` of every face (read from
        the entries on demand; not part of the training read)."""
        record = self.cache.get_sample(self._position(i)[0])
        out = []
        for key in record.keys:
            entry = self.cache.get(key)
            out.append([] if entry is None else entry.face_records())
        return out


#: returned by :func:`_fill_uint8_slots` when a sample needs ``join_sample``
_NOT_UINT8 = object()


def _fill_uint8_slots(skeleton: Any, images: list[torch.Tensor]) -> Any:
    """The skeleton with each image slot replaced by its stored ``3,H,W uint8`` pixels, in one
    walk; :data:`_NOT_UINT8` when a slot is another kind of image or a container is one
    ``join_sample`` must rebuild (then the pixels go through it instead)."""
    from anonloader.data.adapters import ImageSlot

    def fill(value: Any) -> Any:
        if isinstance(value, ImageSlot):
            if value.kind == "tensor" and value.layout == "chw" and value.dtype == "uint8" and value.channels == 3:
                return images[value.position]
            raise _NotUint8
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            items = [fill(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray, np.generic)):
            return value
        raise _NotUint8

    try:
        return fill(skeleton) if images else _NOT_UINT8
    except _NotUint8:
        return _NOT_UINT8


class _NotUint8(Exception):
    """Raised inside :func:`_fill_uint8_slots`'s walk."""
