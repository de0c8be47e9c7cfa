"""The per-sample stage between a dataset wrapper and the :class:`~anonloader.pipeline.Anonymizer`.

A stage turns the images of one sample into anonymized images. :class:`PipelineStage` runs the
pipeline; the cache's ``CachedStage`` wraps a stage with the same ``process`` signature, so the
dataset wrappers do not care which one they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from anonloader.data.adapters import SourceImage
from anonloader.errors import AnonloaderError, AnonymizationFailed
from anonloader.types import Detections, FaceRecord

__all__ = ["PipelineStage", "ProcessedImage"]


@dataclass
class ProcessedImage:
    """One anonymized image of a sample.

    Attributes:
        image: ``3,H,W float32 in [0,1]``, quantized to multiples of 1/255, or ``None`` when
            the fail-closed policy dropped it.
        records: one :class:`FaceRecord` per face.
        error: why the image failed, when it did.
    """

    image: torch.Tensor | None
    records: list[FaceRecord]
    error: str | None = None


class PipelineStage:
    """Runs an :class:`~anonloader.pipeline.Anonymizer` on the images of one sample.

    Args:
        anonymizer: the pipeline.
    """

    def __init__(self, anonymizer: Any) -> None:
        self.anonymizer = anonymizer

    def fingerprint(self) -> str:
        return self.anonymizer.fingerprint()

    def process(
        self,
        index: int,
        images: Sequence[SourceImage],
        labels: Sequence[Any] | None,
        detections: Sequence[Detections] | None = None,
    ) -> list[ProcessedImage]:
        """Anonymizes the ``images`` of sample ``index``.

        Args:
            index: the sample's index in its dataset (for messages).
            images: the sample's images.
            labels: one identity label per image (``label`` strategy), or None.
            detections: faces per image from the dataset's annotations, or None to detect.

        Raises:
            AnonloaderError: what the pipeline raises; any other exception is wrapped in
                :class:`~anonloader.errors.AnonymizationFailed` naming the sample (cause chained).
        """
        return self.process_with_keys(index, images, labels, detections, want_keys=False)[0]

    def process_with_keys(
        self,
        index: int,
        images: Sequence[SourceImage],
        labels: Sequence[Any] | None,
        detections: Sequence[Detections] | None = None,
        *,
        want_keys: bool = True,
    ) -> tuple[list[ProcessedImage], list[list[Any]]]:
        """:meth:`process`, plus each image's recovery keys (a recoverable method's
        :class:`~anonloader.pipeline.AnonymizationResult.keys`; empty lists without ``want_keys``)."""
        try:
            options = {"want_keys": True} if want_keys else {}
            result = self.anonymizer([s.tensor for s in images], detections=detections, labels=labels, **options)
        except AnonloaderError:
            raise
        except Exception as error:
            raise AnonymizationFailed(
                f"sample {index}: the pipeline failed ({type(error).__name__}: {error}); fix the cause, "
                "or choose on_error='drop' to drop such samples"
            ) from error
        processed = [
            ProcessedImage(image, records, error)
            for image, records, error in zip(result.images, result.records, result.errors, strict=True)
        ]
        keys = result.keys if want_keys and result.keys is not None else [[] for _ in processed]
        return processed, keys
