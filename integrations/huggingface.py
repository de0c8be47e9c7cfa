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
its mode), ``Image(decode=False)`` dicts of encoded bytes, or a list of images per row. Rows
whose image the fail-closed policy dropped are removed in ``"map"`` mode; in ``"lazy"`` mode
the image comes back as ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from anonloader.errors import ConfigError
from anonloader.integrations._common import anonymize_sample, build_stage, resolve_anonymizer

__all__ = ["HFAnonymizeFunction", "anonymize_hf"]

_DROPPED = "__anonloader_dropped__"


class HFAnonymizeFunction:
    """The batched function both modes apply: a ``{column: [values]}`` batch in, the same out.

    Args:
        stage: the anonymizing stage (``PipelineStage`` / ``CachedStage``).
        image_columns: columns holding images.
        label_column: column whose value is the identity label (``label`` strategy), or None.
        mark_dropped: add a boolean column saying which rows were dropped (``"map"`` mode).
    """

    def __init__(self, stage: Any, image_columns: Sequence[str], label_column: str | None = None, *, mark_dropped: bool = False) -> None:
        self.stage = stage
        self.image_columns = list(image_columns)
        self.label_column = label_column
        self.mark_dropped = mark_dropped

    def _value(self, value: Any, index: int, label: Any) -> Any:
        """Anonymizes one cell: an image, an encoded ``{"bytes", "path"}`` dict, or a list of them."""
        if value is None:
            return None
        if isinstance(value, dict) and "bytes" in value:
            if value.get("bytes") is None:
                with open(value["path"], "rb") as handle:
                    value = {"bytes": handle.read(), "path": value["path"]}
            out, _ = anonymize_sample(self.stage, {"image": value["bytes"]}, index=index, image_keys=["image"], label=label)
            return None if out is None else {"bytes": out["image"], "path": None}
        if isinstance(value, list):
            items = [self._value(v, index, label) for v in value]
            return None if any(i is None for i, v in zip(items, value) if v is not None) else items
        out, _ = anonymize_sample(self.stage, value, index=index, label=label)
        return out

    def __call__(self, batch: dict[str, list[Any]], indices: list[int] | None = None) -> dict[str, list[Any]]:
        rows = len(next(iter(batch.values()))) if batch else 0
        indices = indices if indices is not None else list(range(rows))
        out = dict(batch)
        dropped = [False] * rows
        for column in self.image_columns:
            if column not in batch:
                raise ConfigError(f"the dataset has no column {column!r}; its columns are {sorted(batch)}")
            values = []
            for row, value in enumerate(batch[column]):
                label = batch[self.label_column][row] if self.label_column else None
                result = self._value(value, indices[row], label)
                dropped[row] |= result is None and value is not None
                values.append(result)
            out[column] = values
        if self.mark_dropped:
            out[_DROPPED] = dropped
        return out


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
                    anonymizer=resolved, cache=cache, cache_mode=cache_mode, secret=secret,
                )
                for split, part in ds.items()
            }
        )
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"anonymize_hf needs a datasets.Dataset or DatasetDict, got {type(ds).__name__}")
    columns = _image_columns(ds, image_column)
    stage = build_stage(resolved, cache=cache, cache_mode=cache_mode, secret=secret)
    if mode == "lazy":
        function = HFAnonymizeFunction(stage, columns, label_column)
        return ds.with_transform(function)
    function = HFAnonymizeFunction(stage, columns, label_column, mark_dropped=True)
    features = ds.features.copy()
    features[_DROPPED] = datasets.Value("bool")
    fingerprint = None
    if getattr(ds, "_fingerprint", None):
        from anonloader.fingerprint import fingerprint_of

        fingerprint = fingerprint_of({"source": ds._fingerprint, "pipeline": resolved.fingerprint(), "columns": columns, "label": label_column})[:32]
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

