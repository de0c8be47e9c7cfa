"""torchvision: :class:`AnonymizeFaces`, a ``transforms.v2`` transform.

    >>> from torchvision.transforms import v2
    >>> from anonloader.integrations.torchvision import AnonymizeFaces
    >>> transform = v2.Compose([AnonymizeFaces("blur"), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])  # doctest: +SKIP

Put it first, before normalisation (the pipeline needs pixels in [0,1] or integers). It walks
the whole sample (fail closed, unlike v2's rule of transforming only the first plain tensor):
PIL images, ``tv_tensors.Image`` (``C,H,W`` or ``...,C,H,W``), ``tv_tensors.Video`` (every
frame) and every other value that looks like an image (plain tensors and numpy arrays ``H,W``,
``C,H,W``, ``H,W,C``, stacks, encoded bytes; the rule is in :mod:`anonloader.data.adapters`)
are anonymized, or raise a named :class:`~anonloader.errors.InputError`. The other tv_tensors
— bounding boxes, keypoints, masks — pass through untouched: the face is replaced in place, so
geometry does not change. Declare other fields that hold no face with ``passthrough_keys``
(positions in the flattened sample, as ``torch.utils._pytree.tree_flatten`` orders it).
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2._utils import is_pure_tensor

from anonloader.errors import AnonymizationFailed
from anonloader.integrations._common import (
    anonymize_sample,
    as_keys,
    build_stage,
    resolve_anonymizer,
)

__all__ = ["AnonymizeFaces"]


def _is_declared_image(value: Any) -> bool:
    return isinstance(value, (tv_tensors.Image, tv_tensors.Video))


def _is_other_tv_tensor(value: Any) -> bool:
    """Boxes, keypoints, masks: geometry and labels, never pictures."""
    return isinstance(value, tv_tensors.TVTensor) and not _is_declared_image(value)


class AnonymizeFaces(v2.Transform):
    """Replaces every face of an image (torchvision ``transforms.v2`` transform).

    Args:
        method: method name or instance, or a ready :class:`~anonloader.pipeline.Anonymizer`.
        anonymizer: a ready Anonymizer (instead of ``method`` + options).
        cache, cache_mode, secret: serve / store results in an LMDB cache (see
            :func:`anonloader.anonymize`).
        passthrough_keys: positions in the flattened sample of leaves that hold no face.
        alpha_channel: tensors / arrays with 2 or 4 channels carry alpha in the last one
            (otherwise they are an error; PIL ``RGBA`` needs no flag).
        **anonymizer_kwargs: :class:`~anonloader.pipeline.Anonymizer` options.

    An image the fail-closed policy drops cannot be dropped from inside a transform; it raises
    :class:`~anonloader.errors.AnonymizationFailed` instead (use ``on_error="obscure"``, the
    default, to get a mosaic of the image).
    """

    _transformed_types = (PIL.Image.Image, tv_tensors.Image, tv_tensors.Video, is_pure_tensor)

    def __init__(
        self,
        method: Any = "blur",
        *,
        anonymizer: Any = None,
        cache: Any = None,
        cache_mode: str = "read-through",
        secret: str | bytes | None = None,
        passthrough_keys: Any = None,
        alpha_channel: bool = False,
        **anonymizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.anonymizer = resolve_anonymizer(anonymizer, method, **anonymizer_kwargs)
        self.stage = build_stage(self.anonymizer, cache=cache, cache_mode=cache_mode, secret=secret)
        self.passthrough_keys = as_keys(passthrough_keys)
        self.alpha_channel = alpha_channel
        self._calls = 0

    def forward(self, *inputs: Any) -> Any:
        """The sample (one value, or the positional values as a tuple) with every image-like
        leaf anonymized, each in its own type; other leaves as they were."""
        flat, spec = tree_flatten(inputs if len(inputs) > 1 else inputs[0])
        leaves: list[Any] = []
        declared: list[int] = []
        for position, leaf in enumerate(flat):
            if isinstance(leaf, torch.Tensor) and not _is_other_tv_tensor(leaf):
                plain = leaf.as_subclass(torch.Tensor)
                if plain.ndim > 4 and plain.shape[-3] <= 4:  # ...,C,H,W batches of images / videos
                    plain = plain.reshape(-1, *plain.shape[-3:])
                if _is_declared_image(leaf):
                    declared.append(position)
                leaves.append(plain)
            else:
                leaves.append(leaf)
        index = self._calls
        self._calls += 1
        out, processed = anonymize_sample(
            self.stage,
            leaves,
            index=index,
            image_keys=declared,
            passthrough_keys=self.passthrough_keys,
            alpha_channel=self.alpha_channel,
            strict=False,
            require_image=False,
            skip=_is_other_tv_tensor,
        )
        if out is None:
            errors = "; ".join(p.error or "dropped" for p in processed)
            raise AnonymizationFailed(f"image {index}: the fail-closed policy dropped it ({errors}); use on_error='obscure'")
        for position, (before, after) in enumerate(zip(flat, out, strict=True)):
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and after is not before:
                after = after.reshape(before.shape)
                out[position] = tv_tensors.wrap(after, like=before) if isinstance(before, tv_tensors.TVTensor) else after
        return tree_unflatten(list(out), spec)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.forward(inpt)

    def extra_repr(self) -> str:
        return f"method={self.anonymizer.method.name!r}, fingerprint={self.anonymizer.fingerprint()[:12]}"
