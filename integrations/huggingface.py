"""Hugging Face ``datasets``: :func:`anonymize_hf`.

    >>> from anonloader.integrations.huggingface import anonymize_hf
    >>> ds = anonymize_hf(load_dataset("my/faces", split="train"), image_column="image")  # doctest: +SKIP

Two modes:

- ``"lazy"`` (default): ``Dataset.with_transform`` — faces are anonymized when rows are read
  (DataLoader workers each load their own models). The original Arrow data is untouched.
- ``"map"``: ``Dataset.map`` — a new, materialized dataset holding only anonymized images
  (``num_proc`` processes; with ``cache=`` the LMDB cache is read and filled on the way, so a
  second run, or a later lazy dataset with the same cache, computes nothing).

Image columns may hold ``Image()`` features of any mode (RGB, L, RGBA, ...; each image keeps
its mode), ``Image(decode=False)`` dicts of encoded bytes, ``ArrayND`` images, or a list of
images per row. Every other column is checked too: a value there that looks like an image is
an error naming the row and the column, unless the column is in ``passthrough_columns``.
Rows whose image the fail-closed policy dropped are removed in ``"map"`` mode; in ``"lazy"``
mode their image columns come back as ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import logging

import numpy as np

from anonloader.data.dataset import PER_SAMPLE_ERRORS
from anonloader.errors import ConfigError
from anonloader.integrations._common import anonymize_sample, as_keys, build_stage, resolve_anonymizer

__all__ = ["HFAnonymizeFunction", "anonymize_hf"]

logger = logging.getLogger(__name__)

_DROPPED = "__anonloader_dropped__"


class HFAnonymizeFunction:
    """The batched function both modes apply: a ``{column: [values]}`` batch in, the same out.

    Each row is walked as one sample (``{column: value}``): the image columns are anonymized,
    and any *other* column whose value looks like an image (an undeclared ``Image()`` column,
    an ``Array2D`` / ``Array3D`` / ``Array4D`` of image shape, encoded image bytes) is a named
    :class:`~anonloader.errors.InputError` unless it is in ``passthrough_columns``.

    Args:
        stage: the anonymizing stage (``PipelineStage`` / ``CachedStage``).
        image_columns: columns holding images.
        label_column: column whose value is the identity label (``label`` strategy), or None.
        mark_dropped: add a boolean column saying which rows were dropped (``"map"`` mode).
        passthrough_columns: columns that hold no face, left as they are whatever they hold.
        array_columns: ``{column: dtype}`` of the ``ArrayND`` features; their nested lists are
            read as arrays of that dtype (and image ones come back as numpy arrays).
        alpha_channel: arrays with 2 or 4 channels carry alpha in the last one.
        drop_bad_input: a row that fails on its own (a named per-sample error such as a
            corrupt or 16-bit image) is dropped with a warning instead of raising
            (``on_error="drop"``).
    """

    def __init__(
        self,
        stage: Any,
        image_columns: Sequence[str],
        label_column: str | None = None,
        *,
        mark_dropped: bool = False,
        passthrough_columns: Sequence[str] | None = None,
        array_columns: dict[str, str] | None = None,
        alpha_channel: bool = False,
        drop_bad_input: bool = False,
    ) -> None:
        self.stage = stage
        self.drop_bad_input = drop_bad_input
        self.image_columns = list(image_columns)
        self.label_column = label_column
        self.mark_dropped = mark_dropped
        self.passthrough_columns = list(passthrough_columns or [])
        self.array_columns = dict(array_columns or {})
        self.alpha_channel = alpha_channel

    def _row(self, row: dict[str, Any], index: int) -> dict[str, Any] | None:
        """One row with its images anonymized, or None when the fail-closed policy dropped it."""
        for column in self.image_columns:
            value = row[column]
            if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
                with open(value["path"], "rb") as handle:  # Image(decode=False) on local files
                    row[column] = {"bytes": handle.read(), "path": value["path"]}
        for column, dtype in self.array_columns.items():
            if row.get(column) is not None and column not in self.passthrough_columns:
                row[column] = np.asarray(row[column], dtype=dtype)
        label = row[self.label_column] if self.label_column else None
        keys = [c for c in self.image_columns if row[c] is not None]
        try:
            out, _ = anonymize_sample(
                self.stage,
                row,
                index=index,
                image_keys=keys,
                label=label,
                passthrough_keys=self.passthrough_columns,
                alpha_channel=self.alpha_channel,
                strict=True,
                require_image=False,
            )
        except PER_SAMPLE_ERRORS as error:
            if not self.drop_bad_input:
                raise
            logger.warning("dropped row %d (on_error='drop'): %s: %s", index, type(error).__name__, error)
            return None
        return out

    def __call__(self, batch: dict[str, list[Any]], indices: list[int] | None = None) -> dict[str, list[Any]]:
        rows = len(next(iter(batch.values()))) if batch else 0
        indices = indices if indices is not None else list(range(rows))
        missing = [c for c in self.image_columns if c not in batch]
        if missing:
            raise ConfigError(f"the dataset has no column {missing[0]!r}; its columns are {sorted(batch)}")
        out: dict[str, list[Any]] = {column: [] for column in batch}
        dropped = []
        for r in range(rows):
            result = self._row({column: values[r] for column, values in batch.items()}, indices[r])
            dropped.append(result is None)
            for column, values in batch.items():
                if result is not None:
                    out[column].append(result[column])
                else:  # every image column of a dropped row is emptied, never passed on
                    out[column].append(None if column in self.image_columns else values[r])
        if self.mark_dropped:
            out[_DROPPED] = dropped
        return out


def _array_columns(ds: Any) -> dict[str, str]:
    import datasets

    kinds = tuple(getattr(datasets, name) for name in ("Array2D", "Array3D", "Array4D", "Array5D") if hasattr(datasets, name))
    return {name: feature.dtype for name, feature in ds.features.items() if isinstance(feature, kinds)}


def _image_columns(ds: Any, image_column: str | Sequence[str] | None) -> list[str]:
    if image_column is None:
        from datasets import Image

        found = [name for name, feature in ds.features.items() if isinstance(feature, Image)]
        if not found:
            raise ConfigError(f"found no Image() column among {list(ds.features)}; pass image_column=")
        return found
    columns = [image_column] if isinstance(image_column, str) else list(image_column)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"the dataset has no column {missing[0]!r}; its columns are {ds.column_names}")
    return columns


def anonymize_hf(
    ds: Any,
    image_column: str | Sequence[str] | None = "image",
    method: Any = "blur",
    *,
    mode: Literal["lazy", "map"] = "lazy",
    num_proc: int | None = None,
    batch_size: int = 16,
    label_column: str | None = None,
    passthrough_columns: str | Sequence[str] | None = None,
    alpha_channel: bool = False,
    anonymizer: Any = None,
    cache: Any = None,
    cache_mode: str = "read-through",
    secret: str | bytes | None = None,
    **anonymizer_kwargs: Any,
) -> Any:
    """A ``datasets.Dataset`` whose image columns have every face anonymized.

    Args:
        ds: a ``datasets.Dataset`` (a ``DatasetDict`` is handled split by split).
        image_column: column(s) holding images; None: every ``Image()`` column.
        method: method name or instance, or a ready :class:`~anonloader.pipeline.Anonymizer`.
        mode: ``"lazy"`` (``with_transform``) or ``"map"`` (materialized with ``map``).
        num_proc: processes for ``"map"``.
        batch_size: rows per ``map`` batch.
        label_column: column holding the identity label (``label`` identity strategy).
        passthrough_columns: columns that hold no face and are left as they are. Any other
            column whose value looks like an image is an error naming the row and column.
        alpha_channel: ``ArrayND`` images with 2 or 4 channels carry alpha in the last one
            (otherwise they are an error; ``Image()`` RGBA needs no flag).
        anonymizer: a ready Anonymizer (instead of ``method`` + options).
        cache, cache_mode, secret: read / fill an LMDB cache (see :func:`anonloader.anonymize`).
        **anonymizer_kwargs: :class:`~anonloader.pipeline.Anonymizer` options.
    """
    import datasets

    if mode not in ("lazy", "map"):
        raise ConfigError(f"mode must be 'lazy' or 'map', got {mode!r}")
    resolved = resolve_anonymizer(anonymizer, method, **anonymizer_kwargs)
    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict(
            {
                split: anonymize_hf(
                    part, image_column, mode=mode, num_proc=num_proc, batch_size=batch_size, label_column=label_column,
                    passthrough_columns=passthrough_columns, alpha_channel=alpha_channel,
                    anonymizer=resolved, cache=cache, cache_mode=cache_mode, secret=secret,
                )
                for split, part in ds.items()
            }
        )
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"anonymize_hf needs a datasets.Dataset or DatasetDict, got {type(ds).__name__}")
    columns = _image_columns(ds, image_column)
    stage = build_stage(resolved, cache=cache, cache_mode=cache_mode, secret=secret)
    options = {
        "passthrough_columns": as_keys(passthrough_columns),
        "array_columns": _array_columns(ds),
        "alpha_channel": alpha_channel,
        "drop_bad_input": resolved.on_error == "drop",
    }
    if mode == "lazy":
        function = HFAnonymizeFunction(stage, columns, label_column, **options)
        return ds.with_transform(function)
    function = HFAnonymizeFunction(stage, columns, label_column, mark_dropped=True, **options)
    features = ds.features.copy()
    features[_DROPPED] = datasets.Value("bool")
    fingerprint = None
    if getattr(ds, "_fingerprint", None):
        from anonloader.fingerprint import fingerprint_of

        fingerprint = fingerprint_of(
            {
                "source": ds._fingerprint,
                "pipeline": resolved.fingerprint(),
                "columns": columns,
                "label": label_column,
                "passthrough": options["passthrough_columns"],
                "alpha": alpha_channel,
            }
        )[:32]
    mapped = ds.map(
        function,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc,
        features=features,
        new_fingerprint=fingerprint,
        desc="anonymizing faces",
    )
    if any(mapped[_DROPPED]):
        mapped = mapped.filter(lambda flags: [not f for f in flags], input_columns=[_DROPPED], batched=True)
    return mapped.remove_columns(_DROPPED)

