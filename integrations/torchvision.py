"""torchvision: :class:`AnonymizeFaces`, a ``transforms.v2`` transform.

    >>> from torchvision.transforms import v2
    >>> from anonloader.integrations.torchvision import AnonymizeFaces
    >>> transform = v2.Compose([AnonymizeFaces("blur"), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])  # doctest: +SKIP

Put it first, before normalisation (the pipeline needs pixels in [0,1] or integers). It
anonymizes PIL images, ``tv_tensors.Image`` (``C,H,W`` or ``B,C,H,W``), ``tv_tensors.Video``
(every frame) and plain tensors (by the v2 rule: the first plain tensor of a sample when the
sample holds no explicit image). Every other ``tv_tensor`` — bounding boxes, keypoints, masks —
passes through untouched: the face is replaced in place, so geometry does not change.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2._utils import is_pure_tensor

from anonloader.errors import AnonymizationFailed
from anonloader.integrations._common import anonymize_sample, build_stage, resolve_anonymizer

__all__ = ["AnonymizeFaces"]


class AnonymizeFaces(v2.Transform):
    """Replaces every face of an image (torchvision ``transforms.v2`` transform).

    Args:
        method: method name or instance, or a ready :class:`~anonloader.pipeline.Anonymizer`.
        anonymizer: a ready Anonymizer (instead of ``method`` + options).
        cache, cache_mode, secret: serve / store results in an LMDB cache (see
            :func:`anonloader.anonymize`).
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
        **anonymizer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.anonymizer = resolve_anonymizer(anonymizer, method, **anonymizer_kwargs)
        self.stage = build_stage(self.anonymizer, cache=cache, cache_mode=cache_mode, secret=secret)
        self._calls = 0

    def _one(self, image: Any) -> Any:
        index = self._calls
        self._calls += 1
        out, processed = anonymize_sample(self.stage, image, index=index, image_keys=None)
        if out is None:
            errors = "; ".join(p.error or "dropped" for p in processed)
            raise AnonymizationFailed(f"image {index}: the fail-closed policy dropped it ({errors}); use on_error='obscure'")
        return out

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``C,H,W`` or ``...,C,H,W`` (batches, videos): each ``C,H,W`` image anonymized."""
        if tensor.ndim == 3:
            return self._one(tensor.contiguous())
        if tensor.ndim < 3:
            return self._one(tensor)  # raises the adapters' precise error
        flat = tensor.reshape(-1, *tensor.shape[-3:])
        return torch.stack([self._one(image.contiguous()) for image in flat]).reshape(tensor.shape)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, PIL.Image.Image):
            return self._one(inpt)
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)):
            plain = inpt.as_subclass(torch.Tensor)
            return tv_tensors.wrap(self._tensor(plain), like=inpt)
        return self._tensor(inpt)

    def extra_repr(self) -> str:
        return f"method={self.anonymizer.method.name!r}, fingerprint={self.anonymizer.fingerprint()[:12]}"
