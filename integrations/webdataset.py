"""WebDataset: an anonymizing stage for ``wds.DataPipeline``.

    >>> import webdataset as wds
    >>> from anonloader.integrations import webdataset as anon_wds
    >>> pipeline = wds.DataPipeline(
    ...     wds.SimpleShardList("faces-{000000..000009}.tar"),
    ...     wds.tarfile_to_samples(),
    ...     anon_wds.anonymize("blur", handler=wds.warn_and_continue),
    ...     wds.decode("pil"),
    ...     wds.to_tuple("jpg", "cls"),
    ... )  # doctest: +SKIP

The stage works before decoding (image entries are the encoded file bytes, written back in
the same format) and after it (PIL images, tensors, arrays come back as the same type). Image
entries are found by their extension (``jpg``, ``png``, ``left.jpg`` ...) or by their value, at
any depth (the rule: :mod:`anonloader.data.adapters`); an image-like value that cannot be
anonymized is a named error. Name the images with ``image_key=`` to be explicit, and entries
that hold no face with ``passthrough_keys=``. It is a ``pipelinefilter`` stage, so it pickles into
DataLoader workers (each worker loads its own models on first use).

Errors follow WebDataset's handler convention: ``handler(exn)`` returning True skips the sample,
False stops the stream, raising propagates (``wds.reraise_exception``, the default). A sample
whose image the fail-closed policy dropped is skipped, and so, with ``on_error="drop"``, is a
sample with a named per-sample error (corrupt, 16-bit or ambiguous image), with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

from anonloader.data.dataset import PER_SAMPLE_ERRORS
from anonloader.integrations._common import anonymize_sample, as_keys, build_stage, resolve_anonymizer

__all__ = ["IMAGE_EXTENSIONS", "anonymize", "anonymize_samples", "image_keys_of"]

logger = logging.getLogger(__name__)

#: extensions whose entries are encoded images
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "gif"})


def _reraise(exn: Exception) -> bool:
    raise exn


def image_keys_of(sample: dict[str, Any]) -> list[str]:
    """The keys of a WebDataset sample that hold images: by extension, or by decoded value."""
    from anonloader.data.adapters import looks_like_image

    keys = []
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        extension = key.rsplit(".", 1)[-1].lower()
        if extension in IMAGE_EXTENSIONS or looks_like_image(value):
            keys.append(key)
    return keys


def _handle(exn: Exception, sample: Any, handler: Callable[[Exception], bool]) -> bool:
    """``handler(exn)`` with the sample's key added to the message; True: skip the sample."""
    if isinstance(sample, dict) and "__key__" in sample:
        where = f"webdataset sample {sample['__key__']!r}"
        if len(exn.args) == 1 and isinstance(exn.args[0], str):
            exn.args = (f"{exn.args[0]} ({where})",)  # str(exn) stays one readable message
        else:
            exn.args = (*exn.args, where)
    return handler(exn)


def anonymize_samples(
    data: Iterable[dict[str, Any]],
    stage: Any,
    image_keys: Sequence[Hashable] | None = None,
    handler: Callable[[Exception], bool] = _reraise,
    passthrough_keys: Sequence[Hashable] | None = None,
    alpha_channel: bool = False,
    drop_bad_input: bool = False,
) -> Iterator[dict[str, Any]]:
    """The pipeline stage itself: yields each sample of ``data`` with its images anonymized.

    Args:
        data: WebDataset samples (dicts with ``__key__`` and one entry per file extension).
        stage: the anonymizing stage (``PipelineStage`` / ``CachedStage``).
        image_keys: the entries holding images (any other image-like entry is then an
            error); None: the entries with an image extension are images, and every other
            image-like value, at any depth, is anonymized too.
        handler: WebDataset-style exception handler.
        passthrough_keys: entries that hold no face, left as they are.
        alpha_channel: arrays with 2 or 4 channels carry alpha in the last one.
        drop_bad_input: a sample with a named per-sample error (corrupt, 16-bit, ambiguous
            image) is skipped with a warning before the handler sees it (``on_error="drop"``).
    """
    for index, sample in enumerate(data):
        try:
            declared = list(image_keys) if image_keys is not None else None
            by_extension = declared if declared is not None else [
                key for key in sample if not str(key).startswith("__") and str(key).rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
            ]
            passthrough = [*(passthrough_keys or ()), *(k for k in sample if str(k).startswith("__"))]
            out, _ = anonymize_sample(
                stage,
                sample,
                index=index,
                image_keys=[k for k in by_extension if k not in (passthrough_keys or ())],
                passthrough_keys=passthrough,
                alpha_channel=alpha_channel,
                strict=declared is not None,
                require_image=False,
            )
        except PER_SAMPLE_ERRORS as exn:
            if not drop_bad_input:
                if _handle(exn, sample, handler):
                    continue
                break
            logger.warning("dropped webdataset sample %d (on_error='drop'): %s: %s", index, type(exn).__name__, exn)
            continue
        except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset's own stages
            if _handle(exn, sample, handler):
                continue
            break
        if out is not None:
            yield out


def anonymize(
    method: Any = "blur",
    *,
    image_key: Hashable | Sequence[Hashable] | None = None,
    passthrough_keys: Hashable | Sequence[Hashable] | None = None,
    alpha_channel: bool = False,
    handler: Callable[[Exception], bool] | None = None,
    anonymizer: Any = None,
    cache: Any = None,
    cache_mode: str = "read-through",
    secret: str | bytes | None = None,
    **anonymizer_kwargs: Any,
) -> Any:
    """A ``wds.DataPipeline`` stage that anonymizes every face of every sample.

    Args:
        method: method name or instance, or a ready :class:`~anonloader.pipeline.Anonymizer`.
        image_key: entry name(s) of the images (``"jpg"``, ``["left.png", "right.png"]``);
            any other entry that looks like an image is then an error. Default: every entry
            with an image extension, and every other value that looks like an image.
        passthrough_keys: entries that hold no face (a segmentation mask ``"seg.png"``, a
            depth map), left as they are.
        alpha_channel: arrays with 2 or 4 channels carry alpha in the last one (otherwise
            they are an error; PIL ``RGBA`` needs no flag).
        handler: WebDataset exception handler (default ``wds.reraise_exception``).
        anonymizer: a ready Anonymizer (instead of ``method`` + options).
        cache, cache_mode, secret: serve / store results in an LMDB cache.
        **anonymizer_kwargs: :class:`~anonloader.pipeline.Anonymizer` options.

    Returns:
        A picklable ``webdataset.filters.FilterFunction``.
    """
    from webdataset.filters import pipelinefilter, reraise_exception

    resolved = resolve_anonymizer(anonymizer, method, **anonymizer_kwargs)
    stage = build_stage(resolved, cache=cache, cache_mode=cache_mode, secret=secret)
    return pipelinefilter(anonymize_samples)(
        stage,
        as_keys(image_key),
        handler or reraise_exception,
        as_keys(passthrough_keys),
        alpha_channel,
        resolved.on_error == "drop",
    )
