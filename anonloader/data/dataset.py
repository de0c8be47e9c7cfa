"""``anonloader.anonymize(dataset)``: the one-line wrap.

The wrapped dataset yields the same samples as the original — same types, dtypes, labels —
with every face in every image anonymized. Map-style datasets stay map-style (same length,
same order); iterable datasets stay iterable. Models load lazily in each DataLoader worker.

A sample whose image the fail-closed policy dropped comes back as ``None`` from a map-style
dataset (use :func:`collate_skip_dropped` in the DataLoader) and is skipped by an iterable one.
A sample that holds no usable image (corrupt bytes, zero size, a non-image) raises an
:class:`~anonloader.errors.InputError` naming its index, unless ``on_error="drop"``: then it is
dropped the same way, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset, IterableDataset, default_collate

from anonloader.data.adapters import SourceImage, join_sample, split_sample
from anonloader.data.stage import PipelineStage
from anonloader.detect.annotations import detections_from_annotations
from anonloader.errors import ConfigError, InputError
from anonloader.types import Detections

logger = logging.getLogger(__name__)

__all__ = [
    "AnonymizedDataset",
    "AnonymizedIterableDataset",
    "PreparedSample",
    "anonymize",
    "as_detections",
    "collate_skip_dropped",
    "prepare_sample",
]

CacheMode = Literal["read-through", "read-only", "write-only"]
Annotations = Callable[[Any], Any]


def collate_skip_dropped(batch: list[Any]) -> Any:
    """``default_collate`` that leaves out samples the fail-closed policy dropped (``None``)."""
    return default_collate([sample for sample in batch if sample is not None])


def as_detections(value: Any, count: int, index: int) -> list[Detections]:
    """Annotations of one sample -> one Detections per image."""
    if isinstance(value, Detections):
        value = [value]
    elif isinstance(value, tuple) and len(value) in (1, 2, 3) and count == 1:
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise InputError(
            f"annotations must give one Detections (or a (boxes, landmarks) tuple) per image; "
            f"got {type(value).__name__} for {count} image(s)",
            index=index,
        )
    out = []
    for item in value:
        if isinstance(item, Detections):
            out.append(item)
        else:
            out.append(detections_from_annotations(*item))
    return out


@dataclass
class PreparedSample:
    """A sample taken apart for a stage: its images, skeleton, identity labels and faces."""

    images: list[SourceImage]
    skeleton: Any
    labels: list[Any] | None
    detections: list[Detections] | None


def prepare_sample(
    sample: Any,
    index: int,
    image_keys: Sequence[Hashable] | None = None,
    annotations: Annotations | None = None,
    identity_label: Callable[[Any], Any] | None = None,
) -> PreparedSample:
    """Splits sample ``index`` into what :meth:`PipelineStage.process` takes (see
    :func:`~anonloader.data.adapters.split_sample`, :func:`anonymize` for the arguments)."""
    images, skeleton = split_sample(sample, image_keys, index=index)
    labels = None if identity_label is None else [identity_label(sample)] * len(images)
    detections = None if annotations is None else as_detections(annotations(sample), len(images), index)
    return PreparedSample(images, skeleton, labels, detections)


class _Wrapper:
    """What both dataset kinds share: turning one sample into its anonymized twin."""

    def __init__(
        self,
        dataset: Any,
        stage: Any,
        image_keys: Sequence[Hashable] | None,
        annotations: Annotations | None,
        identity_label: Callable[[Any], Any] | None,
        drop_bad_input: bool = False,
    ) -> None:
        self.dataset = dataset
        self.stage = stage
        self.image_keys = image_keys
        self.annotations = annotations
        self.identity_label = identity_label
        self.drop_bad_input = drop_bad_input

    def _anonymize_sample(self, index: int, sample: Any) -> Any:
        try:
            prepared = prepare_sample(sample, index, self.image_keys, self.annotations, self.identity_label)
        except InputError as error:
            if not self.drop_bad_input:
                raise
            logger.warning("dropped a sample that is not a usable image (on_error='drop'): %s", error)
            return None
        processed = self.stage.process(index, prepared.images, prepared.labels, prepared.detections)
        if any(p.image is None for p in processed):
            return None
        return join_sample(prepared.skeleton, [p.image for p in processed], [s.alpha for s in prepared.images])

    def __getattr__(self, name: str) -> Any:
        # attributes of the wrapped dataset (classes, targets, ...) stay reachable
        if name.startswith("__") or name in ("dataset", "stage", "image_keys", "annotations", "identity_label", "drop_bad_input"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class AnonymizedDataset(_Wrapper, Dataset):
    """A map-style dataset whose samples have every face anonymized."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self._anonymize_sample(index, self.dataset[index])


class AnonymizedIterableDataset(_Wrapper, IterableDataset):
    """An iterable dataset whose samples have every face anonymized; dropped samples are skipped."""

    def __iter__(self) -> Iterator[Any]:
        for index, sample in enumerate(self.dataset):
            out = self._anonymize_sample(index, sample)
            if out is not None:
                yield out


def anonymize(
    dataset: Any,
    method: Any = "blur",
    *,
    image_key: Hashable | Sequence[Hashable] | None = None,
    annotations: Annotations | None = None,
    identity_label: Callable[[Any], Any] | None = None,
    cache: str | Path | Any | None = None,
    cache_mode: CacheMode = "read-through",
    secret: str | bytes | None = None,
    **anonymizer_kwargs: Any,
) -> AnonymizedDataset | AnonymizedIterableDataset:
    """Wraps ``dataset`` so every face in every sample is anonymized.

    Args:
        dataset: a map-style (``__getitem__`` + ``__len__``) or iterable dataset whose samples
            are images or tuples / lists / dicts holding images (PIL, ``C,H,W`` tensors uint8
            or float in [0,1], ``H,W,C`` uint8 numpy, encoded bytes).
        method: method name or instance (see :func:`anonloader.get_method`), or a ready
            :class:`~anonloader.pipeline.Anonymizer`.
        image_key: dict key(s) or tuple position(s) of the images; default: every image found.
        annotations: ``f(sample) -> Detections | (boxes, landmarks) | list per image`` to use
            the dataset's own face annotations instead of a detector (pass ``detector=None``).
        identity_label: ``f(sample) -> label`` for the ``label`` identity strategy.
        cache: path of an :class:`~anonloader.cache.AnonCache` (or the cache itself).
        cache_mode: ``"read-through"`` (compute misses and store them), ``"read-only"``
            (misses follow the fail-closed policy; nothing is computed) or ``"write-only"``.
        secret: salts the cache keys (and keys identity mappings); never stored.
        **anonymizer_kwargs: :class:`~anonloader.pipeline.Anonymizer` options (``detector``,
            ``identity``, ``on_error``, ``on_no_face``, ``device``, method options ...).

    Returns:
        A dataset of the same kind (map-style or iterable).
    """
    from anonloader.pipeline import Anonymizer

    if isinstance(method, Anonymizer):
        if anonymizer_kwargs:
            raise ConfigError(f"options {sorted(anonymizer_kwargs)} given with a ready Anonymizer")
        anonymizer = method
    else:
        if annotations is not None:
            anonymizer_kwargs.setdefault("detector", None)
        anonymizer = Anonymizer(method, **anonymizer_kwargs)
    if anonymizer.detector is None and annotations is None:
        raise ConfigError("detector=None needs annotations=f(sample) giving the faces of each sample")
    stage: Any = PipelineStage(anonymizer)
    if cache is not None:
        from anonloader.cache.stage import CachedStage

        stage = CachedStage(stage, cache, mode=cache_mode, secret=secret)
    keys = None if image_key is None else ([image_key] if isinstance(image_key, (str, int)) else list(image_key))
    is_map = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, IterableDataset)
    kind = AnonymizedDataset if is_map else AnonymizedIterableDataset
    if not is_map and not hasattr(dataset, "__iter__"):
        raise ConfigError(f"{type(dataset).__name__} is neither a map-style nor an iterable dataset")
    return kind(dataset, stage, keys, annotations, identity_label, anonymizer.on_error == "drop")
