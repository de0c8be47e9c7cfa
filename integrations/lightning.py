"""Lightning: :class:`AnonymizedDataModule` wraps any ``LightningDataModule``.

    >>> from anonloader.integrations.lightning import AnonymizedDataModule
    >>> trainer.fit(model, datamodule=AnonymizedDataModule(MyFaces(), method="blur"))  # doctest: +SKIP

Two stages:

- ``stage="sample"`` (default): the datasets inside the wrapped module's dataloaders are
  wrapped with :func:`anonloader.anonymize`; the loaders are rebuilt with the same batch size,
  sampler, workers and collate function (dropped samples are left out of the batch), so the
  anonymization runs in DataLoader workers.
- ``stage="batch"``: whole batches are anonymized on the training device in
  ``on_after_batch_transfer`` (where diffusion belongs). The wrapped module's own
  ``on_after_batch_transfer`` (or the LightningModule's, when only the model overrides it) runs
  first, on the batch as it came; the anonymized batch is what the model sees. Images must
  still hold pixels (uint8, or float in [0,1]) at that point: normalise in the model.

Which splits are anonymized is configurable (``splits=("train",)``; default: all four).

DDP: nothing here is rank-specific. Each process builds its own pipeline lazily, the rebuilt
loaders are ordinary ``DataLoader`` s that Lightning re-instantiates with its
``DistributedSampler``, so each rank anonymizes exactly its own shard; ``prepare_data`` is only
passed through (Lightning calls it on the ranks it chooses).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, default_collate

from anonloader.errors import ConfigError, UnsupportedImageError
from anonloader.integrations._common import resolve_anonymizer

__all__ = ["SPLITS", "AnonymizedDataModule", "SkipDroppedCollate", "anonymize_batch"]

SPLITS = ("train", "val", "test", "predict")
_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device")


class SkipDroppedCollate:
    """A collate function that leaves out samples the fail-closed policy dropped (``None``)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, batch: list[Any]) -> Any:
        return self.collate_fn([sample for sample in batch if sample is not None])


def _is_image_batch(value: Any) -> bool:
    """A collated batch of images: ``B,C,H,W`` or ``B,H,W,C`` by the sample walker's image rule."""
    from anonloader.data.adapters import image_layout

    return image_layout(value) in ("nchw", "nhwc")


def _anonymize_tensor(
    anonymizer: Any, images: torch.Tensor, labels: Sequence[Any] | None, *, alpha_channel: bool = False
) -> torch.Tensor:
    """``B,C,H,W`` or ``B,H,W,C`` uint8 / float in [0,1] (C in 1, 3, 4) -> the same, every face
    anonymized. A 4th channel is kept as alpha only with ``alpha_channel=True``, else an error."""
    from anonloader.data.adapters import join_sample, split_sample

    plain = images.as_subclass(torch.Tensor) if type(images) is not torch.Tensor else images
    sources = [split_sample([image], [0], index=i, alpha_channel=alpha_channel) for i, image in enumerate(plain.detach().cpu())]
    result = anonymizer([s[0][0].tensor.to(images.device) for s in sources], labels=labels)
    if any(out is None for out in result.images):
        failed = [i for i, out in enumerate(result.images) if out is None]
        raise UnsupportedImageError(
            f"batch images {failed} were dropped by the fail-closed policy ({result.errors[failed[0]]}); "
            "a batch stage cannot drop samples: use on_error='obscure'"
        )
    restored = [join_sample(skeleton, [out], [s[0].alpha])[0] for (s, skeleton), out in zip(sources, result.images, strict=True)]
    return torch.stack(restored).to(images.device)


def _refuse_unclaimed_images(batch: Any, claimed: Sequence[Hashable], passthrough: Sequence[Hashable]) -> None:
    """Fail closed on a side door: an image-like field the batch stage would leave untouched."""
    from anonloader.data.adapters import looks_like_image

    fields = batch.items() if isinstance(batch, dict) else enumerate(batch)
    for key, value in fields:
        leaves = value if isinstance(value, (list, tuple)) else [value]
        if key not in claimed and key not in passthrough and any(looks_like_image(v) for v in leaves):
            raise UnsupportedImageError(
                f"batch field {key!r} looks like images but is not a B,C,H,W or B,H,W,C tensor the batch stage "
                "can anonymize; collate it as one, or name it in passthrough_keys= if it holds no face"
            )


def anonymize_batch(
    anonymizer: Any,
    batch: Any,
    image_keys: Sequence[Hashable] | None = None,
    labels: Sequence[Any] | None = None,
    *,
    passthrough_keys: Sequence[Hashable] = (),
    alpha_channel: bool = False,
) -> Any:
    """A collated batch with every image tensor anonymized, everything else as it was.

    Args:
        anonymizer: the pipeline.
        batch: a ``B,C,H,W`` (or ``B,H,W,C``) tensor, or a tuple / list / dict holding such tensors.
        image_keys: dict keys / tuple positions of the image tensors; None: every field that is a
            batch of images by the sample walker's rule (:func:`anonloader.data.adapters.image_layout`).
        labels: identity labels per batch item (``label`` strategy), or None.
        passthrough_keys: fields that hold no face, left as they are whatever they look like.
        alpha_channel: 4-channel images carry alpha in the last channel (kept); else an error.

    Raises:
        UnsupportedImageError: a field that looks like images but cannot be anonymized here
            (fail closed: it would otherwise reach the model as it was).
    """
    if _is_image_batch(batch) and image_keys is None:
        return _anonymize_tensor(anonymizer, batch, labels, alpha_channel=alpha_channel)
    if isinstance(batch, dict):
        keys = list(image_keys) if image_keys is not None else [k for k, v in batch.items() if _is_image_batch(v) and k not in passthrough_keys]
        _refuse_unclaimed_images(batch, keys, passthrough_keys)
        out = dict(batch)
        for key in keys:
            out[key] = _anonymize_tensor(anonymizer, batch[key], labels, alpha_channel=alpha_channel)
        return type(batch)(out) if type(batch) is not dict else out
    if isinstance(batch, (tuple, list)):
        positions = list(image_keys) if image_keys is not None else [i for i, v in enumerate(batch) if _is_image_batch(v) and i not in passthrough_keys]
        _refuse_unclaimed_images(batch, positions, passthrough_keys)
        items = list(batch)
        for position in positions:
            items[position] = _anonymize_tensor(anonymizer, batch[position], labels, alpha_channel=alpha_channel)
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    raise ConfigError(f"found no B,C,H,W image tensor in a {type(batch).__name__} batch; pass image_key=")


class AnonymizedDataModule(pl.LightningDataModule):
    """A ``LightningDataModule`` whose images have every face anonymized.

    Args:
        datamodule: the module to wrap (any ``LightningDataModule``).
        anonymizer: a ready :class:`~anonloader.pipeline.Anonymizer` (or give ``method``).
        method: method name or instance (used when ``anonymizer`` is None).
        stage: ``"sample"`` (in the DataLoader workers) or ``"batch"`` (on the device).
        splits: the splits to anonymize, of ``"train"``, ``"val"``, ``"test"``, ``"predict"``.
        image_key: dict key / tuple position of the image in a sample (``"sample"``) or in a
            batch (``"batch"``); default: every image found.
        identity_label: ``f(sample) -> label`` (``"sample"`` stage, ``label`` identity strategy).
        cache, cache_mode, secret: LMDB cache for the ``"sample"`` stage (see
            :func:`anonloader.anonymize`).
        passthrough_keys: fields that hold no face (kept as they are, whatever they look like).
        alpha_channel: 4-channel images carry alpha in the last channel (kept as it is).
        **anonymizer_kwargs: :class:`~anonloader.pipeline.Anonymizer` options.
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        anonymizer: Any = None,
        *,
        method: Any = "blur",
        stage: Literal["sample", "batch"] = "sample",
        splits: Sequence[str] = SPLITS,
        image_key: Hashable | Sequence[Hashable] | None = None,
        identity_label: Callable[[Any], Any] | None = None,
        cache: Any = None,
        cache_mode: str = "read-through",
        secret: str | bytes | None = None,
        passthrough_keys: Sequence[Hashable] = (),
        alpha_channel: bool = False,
        **anonymizer_kwargs: Any,
    ) -> None:
        if stage not in ("sample", "batch"):
            raise ConfigError(f"stage must be 'sample' or 'batch', got {stage!r}")
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ConfigError(f"unknown split {unknown[0]!r}; splits are {', '.join(SPLITS)}")
        if stage == "batch" and cache is not None:
            raise ConfigError("the LMDB cache serves the 'sample' stage; the 'batch' stage anonymizes on the device")
        self.datamodule = datamodule
        super().__init__()
        self.anonymizer = resolve_anonymizer(anonymizer, method, **anonymizer_kwargs)
        self.anonymize_stage = stage
        self.splits = tuple(splits)
        self.image_keys = None if image_key is None else ([image_key] if isinstance(image_key, (str, int)) else list(image_key))
        self.identity_label = identity_label
        self.cache, self.cache_mode, self.secret = cache, cache_mode, secret
        self.passthrough_keys, self.alpha_channel = tuple(passthrough_keys), bool(alpha_channel)
        self._bind_batch_hooks()

    # -- the wrapped module's state and hooks -------------------------------------------------
    @property
    def trainer(self) -> Any:
        return self.__dict__.get("_trainer")

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self.__dict__["_trainer"] = trainer
        if "datamodule" in self.__dict__:
            self.datamodule.trainer = trainer

    def _bind_batch_hooks(self) -> None:
        """Pass the transfer hooks the wrapped module overrides through (and only those, so that
        Lightning still picks the LightningModule's own hooks where the wrapped module has none);
        ``on_after_batch_transfer`` is ours in the batch stage."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        for name in _BATCH_HOOKS:
            if is_overridden(name, self.datamodule):
                setattr(self, name, getattr(self.datamodule, name))
        if self.anonymize_stage == "batch":
            self.on_after_batch_transfer = types.MethodType(_anonymize_after_transfer, self)
        elif is_overridden("on_after_batch_transfer", self.datamodule):
            self.on_after_batch_transfer = self.datamodule.on_after_batch_transfer

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in (*_BATCH_HOOKS, "on_after_batch_transfer"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind_batch_hooks()

    def __getattr__(self, name: str) -> Any:
        # attributes of the wrapped module (num_classes, dims, ...) stay reachable
        if name.startswith("__") or name == "datamodule" or "datamodule" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["datamodule"], name)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)

    # -- dataloaders ------------------------------------------------------------------------
    def train_dataloader(self) -> Any:
        return self._loaders("train", self.datamodule.train_dataloader())

    def val_dataloader(self) -> Any:
        return self._loaders("val", self.datamodule.val_dataloader())

    def test_dataloader(self) -> Any:
        return self._loaders("test", self.datamodule.test_dataloader())

    def predict_dataloader(self) -> Any:
        return self._loaders("predict", self.datamodule.predict_dataloader())

    def _loaders(self, split: str, loaders: Any) -> Any:
        if self.anonymize_stage != "sample" or split not in self.splits:
            return loaders
        if isinstance(loaders, DataLoader):
            return self._wrap_loader(loaders)
        if isinstance(loaders, dict):
            return {k: self._loaders(split, v) for k, v in loaders.items()}
        if isinstance(loaders, (list, tuple)):
            return type(loaders)(self._loaders(split, v) for v in loaders)
        raise ConfigError(f"cannot anonymize a {type(loaders).__name__} {split} loader; return DataLoaders (or lists / dicts of them)")

    def _wrap_loader(self, loader: DataLoader) -> DataLoader:
        from anonloader.data.dataset import anonymize

        dataset = anonymize(
            loader.dataset, self.anonymizer, image_key=self.image_keys, identity_label=self.identity_label,
            cache=self.cache, cache_mode=self.cache_mode, secret=self.secret,  # type: ignore[arg-type]
            passthrough_keys=self.passthrough_keys, alpha_channel=self.alpha_channel,
        )
        options: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": SkipDroppedCollate(loader.collate_fn),
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "generator": loader.generator,
            "persistent_workers": loader.persistent_workers,
            "multiprocessing_context": loader.multiprocessing_context,
        }
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            return DataLoader(dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **options)
        batch_sampler = loader.batch_sampler
        if batch_sampler is not None and type(batch_sampler) is not BatchSampler:  # a custom batch sampler
            return DataLoader(dataset, batch_sampler=batch_sampler, **options)
        if loader.batch_size is None:  # no automatic batching
            return DataLoader(dataset, batch_size=None, sampler=loader.sampler, **options)
        sampler = loader.sampler
        if type(sampler) is RandomSampler and sampler.replacement is False and sampler.num_samples == len(loader.dataset):
            return DataLoader(dataset, batch_size=loader.batch_size, shuffle=True, drop_last=loader.drop_last, **options)
        if type(sampler) is SequentialSampler:
            return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, drop_last=loader.drop_last, **options)
        return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last, **options)

    # -- the batch stage ----------------------------------------------------------------------
    def _current_split(self) -> str | None:
        trainer = self.trainer
        if trainer is None:
            return None
        if trainer.training:
            return "train"
        if trainer.validating or trainer.sanity_checking:
            return "val"
        if trainer.testing:
            return "test"
        if trainer.predicting:
            return "predict"
        return None


def _anonymize_after_transfer(self: AnonymizedDataModule, batch: Any, dataloader_idx: int) -> Any:
    """``on_after_batch_transfer`` of the batch stage: the wrapped hook first, then anonymize."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if is_overridden("on_after_batch_transfer", self.datamodule):
        batch = self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
    elif self.trainer is not None and is_overridden("on_after_batch_transfer", self.trainer.lightning_module):
        batch = self.trainer.lightning_module.on_after_batch_transfer(batch, dataloader_idx)
    split = self._current_split()
    if split is not None and split not in self.splits:
        return batch
    return anonymize_batch(
        self.anonymizer, batch, self.image_keys, passthrough_keys=self.passthrough_keys, alpha_channel=self.alpha_channel
    )
