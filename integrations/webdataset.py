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
entries are found by their extension (``jpg``, ``png``, ``left.jpg`` ...) or by their value; name
them with ``image_key=`` to be explicit. It is a ``pipelinefilter`` stage, so it pickles into
DataLoader workers (each worker loads its own models on first use).

Errors follow WebDataset's handler convention: ``handler(exn)`` returning True skips the sample,
False stops the stream, raising propagates (``wds.reraise_exception``, the default). A sample
whose image the fail-closed policy dropped is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

from anonloader.integrations._common import anonymize_sample, build_stage, resolve_anonymizer

__all__ = ["IMAGE_EXTENSIONS", "anonymize", "anonymize_samples", "image_keys_of"]

#: extensions whose entries are encoded images
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "gif"})


def _reraise(exn: Exception) -> bool:
    raise exn


def image_keys_of(sample: dict[str, Any]) -> list[str]:
    """The keys of a WebDataset sample that hold images: by extension, or by decoded value."""
    from anonloader.data.adapters import _is_image

    keys = []
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        extension = key.rsplit(".", 1)[-1].lower()
        if extension in IMAGE_EXTENSIONS or _is_image(value):
            keys.append(key)
    return keys


def anonymize_samples(
    data: Iterable[dict[str, Any]],
    stage: Any,
    image_keys: Sequence[Hashable] | None = None,
    handler: Callable[[Exception], bool] = _reraise,
) -> Iterator[dict[str, Any]]:
    """The pipeline stage itself: yields each sample of ``data`` with its images anonymized.

    Args:
        data: WebDataset samples (dicts with ``__key__`` and one entry per file extension).
        stage: the anonymizing stage (``PipelineStage`` / ``CachedStage``).
        image_keys: the entries holding images; None finds them per sample.
        handler: WebDataset-style exception handler.
    """
    for index, sample in enumerate(data):
        try:
            keys = list(image_keys) if image_keys is not None else image_keys_of(sample)
            if not keys:
                yield sample  # nothing that could show a face
                continue
            out, _ = anonymize_sample(stage, sample, index=index, image_keys=keys)
        except Exception as exn:  # noqa: BLE001 - the handler decides, as in webdataset's own stages
            if isinstance(sample, dict) and "__key__" in sample:
                exn.args = (*exn.args, f"webdataset sample {sample['__key__']!r}")
            if handler(exn):
                continue
            break
        if out is not None:
            yield out


def anonymize(
    method: Any = "blur",
    *,
    image_key: Hashable | Sequence[Hashable] | None = None,
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
            default: every entry with an image extension or an image value.
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
    keys = None if image_key is None else ([image_key] if isinstance(image_key, (str, int)) else list(image_key))
    return pipelinefilter(anonymize_samples)(stage, keys, handler or reraise_exception)
