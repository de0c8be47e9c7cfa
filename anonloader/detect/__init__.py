"""Face detectors behind one protocol: batch of images in, boxes + 5 landmarks + scores out.

- ``"mtcnn"`` (default): facenet-pytorch's MTCNN, weights in its wheel, works offline.
- ``"scrfd"`` / ``"insightface"`` / ``"retinaface"``: insightface's SCRFD (or RetinaFace) ONNX
  models from a local model root; downloads only with ``allow_download=True`` (non-commercial
  models).
- ``None``: no detector; faces come from the dataset's annotations through
  :func:`detections_from_annotations`.
"""

from __future__ import annotations

from typing import Any

from anonloader.detect.annotations import MEAN_FACE_IN_BOX, detections_from_annotations, landmarks_from_boxes
from anonloader.detect.base import Detector
from anonloader.detect.mtcnn import MTCNNDetector
from anonloader.detect.scrfd import SCRFDDetector
from anonloader.errors import ConfigError

__all__ = [
    "DETECTORS",
    "MEAN_FACE_IN_BOX",
    "Detector",
    "MTCNNDetector",
    "SCRFDDetector",
    "detections_from_annotations",
    "landmarks_from_boxes",
    "load_detector",
]

#: detector names accepted by :func:`load_detector`, and the class each builds
DETECTORS: dict[str, type] = {
    "mtcnn": MTCNNDetector,
    "scrfd": SCRFDDetector,
    "insightface": SCRFDDetector,
    "retinaface": SCRFDDetector,
}


def load_detector(spec: str | Detector | None = "mtcnn", **kwargs: Any) -> Detector | None:
    """The detector named by ``spec``, built with ``kwargs``.

    Args:
        spec: a name from :data:`DETECTORS` (case-insensitive), an object following the
            :class:`Detector` protocol (returned as is), or None (no detector: faces come from
            annotations; returns None).
        kwargs: constructor arguments of the named detector (e.g. ``min_score=0.9``).

    Raises:
        ConfigError: unknown name, kwargs given with an object or None, or a wrong type.
        ModelLoadError: the named detector's model is missing (SCRFD without a local model).
    """
    if spec is None or isinstance(spec, Detector):
        if kwargs:
            raise ConfigError(
                f"load_detector got keyword arguments {sorted(kwargs)} with "
                f"{'None' if spec is None else type(spec).__name__}; they only apply to a detector name"
            )
        return spec
    if not isinstance(spec, str):
        raise ConfigError(
            f"detector must be a name ({', '.join(DETECTORS)}), an object with name, __call__(images) and "
            f"config(), or None; got {type(spec).__name__}"
        )
    key = spec.strip().lower()
    if key not in DETECTORS:
        raise ConfigError(f"unknown detector {spec!r}; choose one of {', '.join(DETECTORS)} (or None)")
    try:
        return DETECTORS[key](**kwargs)
    except TypeError as error:
        raise ConfigError(f"detector {key!r}: {error}") from error
