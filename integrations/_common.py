"""What the framework integrations share: building the pipeline stage, and anonymizing the
images of one sample in whatever type they came in."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from anonloader.data.adapters import as_keys
from anonloader.errors import AnonloaderError, ConfigError, UnsupportedImageError

__all__ = ["anonymize_sample", "as_keys", "build_stage", "resolve_anonymizer"]


def resolve_anonymizer(anonymizer: Any = None, method: Any = "blur", **anonymizer_kwargs: Any) -> Any:
    """An :class:`~anonloader.pipeline.Anonymizer`: ``anonymizer`` itself when given, else one
    built from ``method`` and ``anonymizer_kwargs`` (``method`` may be a ready Anonymizer too)."""
    from anonloader.pipeline import Anonymizer

    if anonymizer is None and isinstance(method, Anonymizer):
        anonymizer = method
    if anonymizer is not None:
        if not isinstance(anonymizer, Anonymizer):
            raise ConfigError(f"anonymizer must be an anonloader.Anonymizer, got {type(anonymizer).__name__}")
        if anonymizer_kwargs:
            raise ConfigError(f"options {sorted(anonymizer_kwargs)} given with a ready Anonymizer; set them on it instead")
        return anonymizer
    return Anonymizer(method, **anonymizer_kwargs)


def build_stage(
    anonymizer: Any,
    *,
    cache: str | os.PathLike[str] | Any | None = None,
    cache_mode: str = "read-through",
    secret: str | bytes | None = None,
) -> Any:
    """The per-sample stage: the pipeline, behind the LMDB cache when ``cache`` is given."""
    from anonloader.data.stage import PipelineStage

    stage: Any = PipelineStage(anonymizer)
    if cache is not None:
        from anonloader.cache.stage import CachedStage

        stage = CachedStage(stage, cache, mode=cache_mode, secret=secret)  # type: ignore[arg-type]
    return stage


def anonymize_sample(
    stage: Any,
    sample: Any,
    *,
    index: int,
    image_keys: Sequence[Hashable] | None = None,
    label: Any = None,
    passthrough_keys: Sequence[Hashable] | None = None,
    alpha_channel: bool = False,
    strict: bool | None = None,
    require_image: bool = True,
    skip: Callable[[Any], bool] | None = None,
) -> tuple[Any, list[Any]]:
    """The sample with every image anonymized (same types), and its :class:`ProcessedImage` list.

    The sample is ``None`` when the fail-closed policy dropped one of its images. Every
    image-like field is anonymized or raises a named :class:`~anonloader.errors.InputError`
    (the rule: :mod:`anonloader.data.adapters`).

    Args:
        stage: a ``PipelineStage`` or ``CachedStage``.
        sample: an image, or any nesting of tuples / lists / dicts holding images.
        index: the sample's index (cache keys and messages).
        image_keys: fields that are images (decoded whatever they look like), or None to find them.
        label: identity label of the sample (``label`` / ``track`` identity strategies).
        passthrough_keys, alpha_channel, strict, require_image, skip: as in
            :func:`anonloader.data.adapters.split_sample`.
    """
    from anonloader.data.adapters import join_sample, split_sample

    images, skeleton = split_sample(
        sample,
        image_keys,
        index=index,
        passthrough_keys=passthrough_keys,
        alpha_channel=alpha_channel,
        strict=strict,
        require_image=require_image,
        skip=skip,
    )
    if not images:
        return sample, []
    labels = None if label is None else [label] * len(images)
    processed = stage.process(index, images, labels)
    if any(p.image is None for p in processed):
        return None, processed
    try:
        out = join_sample(skeleton, [p.image for p in processed], [s.alpha for s in images], images)
    except AnonloaderError:
        raise
    except Exception as error:
        fields = ", ".join(s.slot.field or "(the sample)" for s in images)
        raise UnsupportedImageError(
            f"the anonymized images ({fields}) could not be written back in their own type "
            f"({type(error).__name__}: {error}); convert the images to PNG or arrays first",
            index=index,
        ) from error
    return out, processed
