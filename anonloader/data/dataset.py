"""``anonloader.anonymize(dataset)``: the one-line wrap.

The wrapped dataset yields the same samples as the original — same types, dtypes, labels —
with every face in every image anonymized. Map-style datasets stay map-style (same length,
same order); iterable datasets stay iterable. Models load lazily in each DataLoader worker.

A sample whose image the fail-closed policy dropped comes back as ``None`` from a map-style
dataset (use :func:`collate_skip_dropped` in the DataLoader) and is skipped by an iterable one.
A sample that cannot be used as it is (an image-like field that is ambiguous, 16-bit, corrupt
or too large; bad annotations; see :mod:`anonloader.data.adapters`) raises a named
:class:`~anonloader.errors.InputError` subclass naming its index and field, and so does any
per-sample failure under ``on_error="raise"``; with ``on_error="drop"`` every such sample is
dropped the same way, with a warning (:data:`PER_SAMPLE_ERRORS`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, default_collate

from anonloader.data.adapters import SourceImage, as_keys, join_sample, split_sample
from anonloader.data.stage import PipelineStage
from anonloader.detect.annotations import check_detections, detections_from_annotations
from anonloader.errors import (
    AlignmentError,
    AnnotationError,
    AnonloaderError,
    AnonymizationFailed,
    ConfigError,
    DetectionError,
    ImageDecodeError,
    ImageTooLargeError,
    InputError,
    MethodError,
    UnsupportedImageError,
)
from anonloader.types import Detections

logger = logging.getLogger(__name__)

__all__ = [
    "PER_SAMPLE_ERRORS",
    "AnonymizedDataset",
    "AnonymizedIterableDataset",
    "PreparedSample",
    "anonymize",
    "as_detections",
    "collate_skip_dropped",
    "prepare_sample",
    "read_sample",
    "restore_sample",
]

CacheMode = Literal["read-through", "read-only", "write-only"]
Annotations = Callable[[Any], Any]


def collate_skip_dropped(batch: list[Any]) -> Any:
    """``default_collate`` that leaves out samples the fail-closed policy dropped (``None``)."""
    return default_collate([sample for sample in batch if sample is not None])


def as_detections(
    value: Any,
    count: int,
    index: int,
    *,
    sizes: Sequence[tuple[int, int]] | None = None,
    fields: Sequence[str] | None = None,
) -> list[Detections]:
    """Annotations of one sample -> one checked Detections per image.

    Args:
        value: what ``annotations(sample)`` returned: a :class:`Detections`, a ``(boxes,
            landmarks[, scores])`` tuple (one image), or a list with one of those per image.
        count: the sample's number of images.
        index: the sample's index, named in error messages.
        sizes: ``(H, W)`` per image; when given every face is checked against its image with
            :func:`~anonloader.detect.annotations.check_detections`.
        fields: per image its field in the sample, named in error messages.

    Raises:
        AnnotationError: the wrong number of entries, malformed, non-finite, normalised or
            out-of-image boxes and landmarks.
    """
    if isinstance(value, Detections) or (isinstance(value, tuple) and len(value) in (1, 2, 3) and count == 1):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise AnnotationError(
            f"annotations must give one Detections (or a (boxes, landmarks) tuple) per image; "
            f"got {type(value).__name__} for {count} image(s)",
            index=index,
        )
    out = []
    for i, item in enumerate(value):
        size = None if sizes is None else sizes[i]
        field = None if fields is None else fields[i] or None
        if isinstance(item, Detections):
            out.append(item if size is None else check_detections(item, size, index=index, field=field))
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
            out.append(detections_from_annotations(*item, index=index, image_size=size, field=field))
        else:
            raise AnnotationError(
                f"annotations for image {i} must be a Detections or a (boxes, landmarks[, scores]) tuple, "
                f"got {type(item).__name__}",
                index=index,
                field=field,
            )
    return out


@dataclass
class PreparedSample:
    """A sample taken apart for a stage: its images, skeleton, identity labels and faces."""

    images: list[SourceImage]
    skeleton: Any
    labels: list[Any] | None
    detections: list[Detections] | None


def _call_user(function: Callable[[Any], Any], sample: Any, index: int, what: str) -> Any:
    """``function(sample)``; whatever it raises becomes an :class:`InputError` naming the sample."""
    try:
        return function(sample)
    except AnonloaderError:
        raise
    except Exception as error:
        raise InputError(f"{what}(sample) raised {type(error).__name__}: {error}", index=index) from error


def prepare_sample(
    sample: Any,
    index: int,
    image_keys: Sequence[Hashable] | None = None,
    annotations: Annotations | None = None,
    identity_label: Callable[[Any], Any] | None = None,
    *,
    passthrough_keys: Sequence[Hashable] | None = None,
    alpha_channel: bool = False,
) -> PreparedSample:
    """Splits sample ``index`` into what :meth:`PipelineStage.process` takes (see
    :func:`~anonloader.data.adapters.split_sample`, :func:`anonymize` for the arguments).

    Raises:
        InputError: naming the sample (and the field): an image-like field that cannot be
            anonymized, bad annotations, or ``annotations`` / ``identity_label`` raising.
    """
    images, skeleton = split_sample(
        sample, image_keys, index=index, passthrough_keys=passthrough_keys, alpha_channel=alpha_channel
    )
    labels = None if identity_label is None else [_call_user(identity_label, sample, index, "identity_label")] * len(images)
    detections = None
    if annotations is not None:
        given = _call_user(annotations, sample, index, "annotations")
        sizes = [(int(s.tensor.shape[1]), int(s.tensor.shape[2])) for s in images]
        detections = as_detections(given, len(images), index, sizes=sizes, fields=[s.slot.field for s in images])
    return PreparedSample(images, skeleton, labels, detections)


#: errors that concern one sample: ``on_error="drop"`` drops the sample (setup errors such as
#: ConfigError, ModelLoadError or CacheError always raise)
PER_SAMPLE_ERRORS = (InputError, DetectionError, AlignmentError, MethodError, AnonymizationFailed)


def read_sample(read: Callable[[], Any], index: int) -> Any:
    """``read()`` (a dataset's own ``dataset[index]``), with the image-reading errors PIL raises
    in it (decompression bomb, unidentified or truncated file) turned into named
    :class:`InputError` subclasses; other exceptions (``IndexError`` ...) pass unchanged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return read()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(
            f"the dataset's image is larger than PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} ({error}); "
            "remove the file, or raise the limit if you trust it",
            index=index,
        ) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(f"the dataset could not read its image ({error}); remove or replace the file", index=index) from error
    except (OSError, SyntaxError, ValueError) as error:
        if not _raised_in_pil(error):
            raise
        raise ImageDecodeError(
            f"the dataset could not read its image ({type(error).__name__}: {error}); the file is corrupt or "
            "truncated: re-download, remove or replace it",
            index=index,
        ) from error


def _raised_in_pil(error: BaseException) -> bool:
    """Whether ``error`` was raised inside PIL (a decoder), not in the dataset's own code."""
    trace = error.__traceback__
    module = ""
    while trace is not None:
        module = trace.tb_frame.f_globals.get("__name__", "")
        trace = trace.tb_next
    return module == "PIL" or module.startswith("PIL.")


def restore_sample(index: int, prepared: PreparedSample, images: Sequence[Any]) -> Any:
    """The sample of ``prepared`` with its anonymized ``images`` (``3,H,W float in [0,1]``, one
    per :class:`SourceImage`) put back in their own types.

    Raises:
        UnsupportedImageError: an image cannot be written back as it came (e.g. an encoded
            format PIL reads but cannot write), naming the sample and the field.
    """
    try:
        return join_sample(prepared.skeleton, images, [s.alpha for s in prepared.images], prepared.images)
    except AnonloaderError:
        raise
    except Exception as error:
        fields = ", ".join(s.slot.field or "(the sample)" for s in prepared.images)
        raise UnsupportedImageError(
            f"the anonymized images ({fields}) could not be written back in their own type "
            f"({type(error).__name__}: {error}); convert the images to PNG or arrays in the dataset",
            index=index,
        ) from error


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
        passthrough_keys: Sequence[Hashable] | None = None,
        alpha_channel: bool = False,
    ) -> None:
        self.dataset = dataset
        self.stage = stage
        self.image_keys = image_keys
        self.annotations = annotations
        self.identity_label = identity_label
        self.drop_bad_input = drop_bad_input
        self.passthrough_keys = passthrough_keys
        self.alpha_channel = alpha_channel

    def _anonymize_sample(self, index: int, read: Callable[[], Any]) -> Any:
        try:
            sample = read_sample(read, index)
            prepared = prepare_sample(
                sample,
                index,
                self.image_keys,
                self.annotations,
                self.identity_label,
                passthrough_keys=self.passthrough_keys,
                alpha_channel=self.alpha_channel,
            )
            processed = self.stage.process(index, prepared.images, prepared.labels, prepared.detections)
            if any(p.image is None for p in processed):
                return None
            return restore_sample(index, prepared, [p.image for p in processed])
        except PER_SAMPLE_ERRORS as error:
            if not self.drop_bad_input:
                raise
            logger.warning("dropped sample %d (on_error='drop'): %s: %s", index, type(error).__name__, error)
            return None

    def __getattr__(self, name: str) -> Any:
        # attributes of the wrapped dataset (classes, targets, ...) stay reachable
        if name.startswith("__") or name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self.dataset, name)


_OWN_ATTRIBUTES = frozenset(
    {"dataset", "stage", "image_keys", "annotations", "identity_label", "drop_bad_input", "passthrough_keys", "alpha_channel"}
)


class AnonymizedDataset(_Wrapper, Dataset):
    """A map-style dataset whose samples have every face anonymized."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self._anonymize_sample(index, lambda: self.dataset[index])


class AnonymizedIterableDataset(_Wrapper, IterableDataset):
    """An iterable dataset whose samples have every face anonymized; dropped samples are skipped.

    An error raised by the source's own iterator (a file it cannot read) ends the iteration:
    it is re-raised as a named :class:`~anonloader.errors.InputError` when it is an image-reading
    error, since the source cannot be resumed after it.
    """

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataset)
        index = 0
        while True:
            try:
                sample = read_sample(lambda: next(iterator), index)
            except StopIteration:
                return
            out = self._anonymize_sample(index, lambda s=sample: s)
            index += 1
            if out is not None:
                yield out


def anonymize(
    dataset: Any,
    method: Any = "blur",
    *,
    image_key: Hashable | Sequence[Hashable] | None = None,
    passthrough_keys: Hashable | Sequence[Hashable] | None = None,
    alpha_channel: bool = False,
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
            are images or any nesting of tuples / lists / dicts holding images: PIL images,
            tensors and arrays ``H,W`` / ``C,H,W`` / ``H,W,C`` (and ``N,...`` stacks) of uint8
            (0..255) or float (values in [0,1]), encoded image bytes. Every field that looks
            like an image is anonymized or is an error naming the sample and the field (the
            rule: :mod:`anonloader.data.adapters`).
        method: method name or instance (see :func:`anonloader.get_method`), or a ready
            :class:`~anonloader.pipeline.Anonymizer`.
        image_key: dict key(s) or tuple position(s) of the images, or paths to nested ones
            given in a list (``[("views", 1)]``); they are decoded whatever they look like, and any *other* image-like
            field is then an error (name it here or in ``passthrough_keys``). Default: every
            image-like field is anonymized.
        passthrough_keys: fields (same forms) that cannot show a face and are left as they
            are, e.g. a segmentation mask or a depth map.
        alpha_channel: tensors / arrays with 2 or 4 channels carry alpha in the last channel
            (kept; the rest anonymized). Without it they are an error, since the 4th channel
            may be another band (near infrared, depth). PIL ``RGBA`` / ``LA`` need no flag.
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
        anonymizer = Anonymizer(method, secret=secret, **anonymizer_kwargs)
    if anonymizer.detector is None and annotations is None:
        raise ConfigError("detector=None needs annotations=f(sample) giving the faces of each sample")
    stage: Any = PipelineStage(anonymizer)
    if cache is not None:
        from anonloader.cache.stage import CachedStage

        stage = CachedStage(stage, cache, mode=cache_mode, secret=secret)
    keys = as_keys(image_key)
    is_map = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and not isinstance(dataset, IterableDataset)
    kind = AnonymizedDataset if is_map else AnonymizedIterableDataset
    if not is_map and not hasattr(dataset, "__iter__"):
        raise ConfigError(f"{type(dataset).__name__} is neither a map-style nor an iterable dataset")
    return kind(
        dataset,
        stage,
        keys,
        annotations,
        identity_label,
        anonymizer.on_error == "drop",
        passthrough_keys=as_keys(passthrough_keys),
        alpha_channel=alpha_channel,
    )
