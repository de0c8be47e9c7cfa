"""MTCNN from facenet-pytorch: the offline default detector (weights ship in its wheel, MIT).

facenet-pytorch 2.5.3 ships ``data/pnet.pt``, ``rnet.pt`` and ``onet.pt`` (about 2 MB) inside
the installed package, so this detector works on a fresh machine with no download. It gives
boxes, a face probability and the classic 5 points (eyes, nose, mouth corners) per face.

On insightface's ``t1.jpg`` it finds the 6 people at p >= 0.975 and two false positives at
p ~ 0.86-0.90, hence the default ``min_score=0.95``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anonloader.detect.image_checks import check_images, detect_by_size
from anonloader.errors import ConfigError, ModelLoadError
from anonloader.fingerprint import hash_file
from anonloader.types import Detections

__all__ = ["MTCNNDetector", "mtcnn_weight_files"]

_WEIGHT_NAMES = ("pnet.pt", "rnet.pt", "onet.pt")


def mtcnn_weight_files() -> dict[str, Path]:
    """The P-, R- and O-net weight files inside the installed facenet-pytorch, by file name.

    Raises:
        ModelLoadError: facenet-pytorch is not installed or its wheel lacks a weight file.
    """
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the MTCNN detector needs facenet-pytorch, which is not installed; "
            "run: pip install facenet-pytorch==2.5.3 (its wheel ships the MTCNN weights)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: data / name for name in _WEIGHT_NAMES}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ModelLoadError(
            f"MTCNN weight files missing from the installed facenet-pytorch: {', '.join(missing)}; "
            "reinstall it: pip install --force-reinstall --no-deps facenet-pytorch==2.5.3"
        )
    return files


@functools.cache
def _weights_sha256(paths: tuple[Path, ...]) -> dict[str, str]:
    return {path.name: hash_file(path) for path in paths}


class MTCNNDetector:
    """Multi-task cascaded CNN face detector (facenet-pytorch's P-, R- and O-nets), batched.

    Args:
        min_score: faces with an O-net probability below this are dropped (in [0,1]).
        min_face_size: smallest face side searched for, in pixels; images whose shorter side is
            below it cannot hold such a face and yield no detections.
        thresholds: P-, R- and O-net probability thresholds of the cascade.
        factor: scale step of the image pyramid, in (0,1).
        device: where the networks run (``"cpu"``, ``"cuda"``, ...).

    The networks are built on first use (and again in every DataLoader worker: pickling drops
    them). Boxes are ``x1, y1, x2, y2`` pixels and may extend past the image border for faces
    cut by it; landmarks are left eye, right eye, nose, left and right mouth corner as seen in
    the image. Detections come sorted by descending score, on the images' device.
    """

    name = "mtcnn"

    def __init__(
        self,
        min_score: float = 0.95,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"MTCNNDetector: min_score must be in [0,1], got {min_score!r}")
        if int(min_face_size) != min_face_size or int(min_face_size) < 1:
            raise ConfigError(f"MTCNNDetector: min_face_size must be a positive integer, got {min_face_size!r}")
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ConfigError(
                f"MTCNNDetector: thresholds must be three probabilities (P-, R-, O-net), got {thresholds!r}"
            )
        if not 0.0 < float(factor) < 1.0:
            raise ConfigError(f"MTCNNDetector: factor (pyramid scale step) must be in (0,1), got {factor!r}")
        self.min_score = float(min_score)
        self.min_face_size = int(min_face_size)
        self.thresholds: tuple[float, float, float] = thresholds  # type: ignore[assignment]
        self.factor = float(factor)
        self.device = torch.device(device)
        self._nets: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module] | None = None

    def __repr__(self) -> str:
        return (
            f"MTCNNDetector(min_score={self.min_score}, min_face_size={self.min_face_size}, "
            f"thresholds={self.thresholds}, factor={self.factor}, device={str(self.device)!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_nets"] = None  # every process builds its own networks
        return state

    def config(self) -> dict[str, Any]:
        """Everything that changes the detections: backend, weight hashes, thresholds, pyramid."""
        files = mtcnn_weight_files()
        return {
            "backend": self.name,
            "implementation": "facenet-pytorch",
            "implementation_version": importlib.metadata.version("facenet-pytorch"),
            "weights_sha256": _weights_sha256(tuple(files.values())),
            "min_score": self.min_score,
            "min_face_size": self.min_face_size,
            "thresholds": list(self.thresholds),
            "factor": self.factor,
            "input": "RGB rounded to 8-bit levels",
        }

    def _networks(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        if self._nets is None:
            mtcnn_weight_files()  # a clear error before facenet-pytorch's own
            try:
                from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

                nets = tuple(net().to(self.device).eval() for net in (PNet, RNet, ONet))
            except Exception as error:  # noqa: BLE001 - any failure to build the nets is a load error
                raise ModelLoadError(
                    f"could not load MTCNN from facenet-pytorch ({type(error).__name__}: {error}); "
                    "check that facenet-pytorch==2.5.3 is installed and importable"
                ) from error
            self._nets = nets  # type: ignore[assignment]
        return self._nets  # type: ignore[return-value]

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        """Detect faces in a batch.

        Args:
            images: list of ``3,H,W float in [0,1]`` RGB tensors; sizes may differ.

        Returns:
            One :class:`Detections` per image (boxes ``N,4``, landmarks ``N,5,2``, scores ``N``,
            all pixels of that image).

        Raises:
            UnsupportedImageError: an entry is not a ``3,H,W`` floating-point tensor.
            DetectionError: the cascade failed on an image (the message names its index).
        """
        check_images(images, detector=self.name)
        return detect_by_size(images, self._detect_same_size, detector="MTCNN", min_side=self.min_face_size)

    def _detect_same_size(self, images: list[torch.Tensor]) -> list[Detections]:
        """Run the cascade on images of one size; ``images`` are ``3,H,W float in [0,1]``."""
        from facenet_pytorch.models.utils.detect_face import detect_face

        pnet, rnet, onet = self._networks()
        batch = torch.stack([image.detach() for image in images]).to(self.device, torch.float32)
        # facenet-pytorch takes B,H,W,3 in [0,255]; rounding matches the uint8 photos it was tuned on
        batch = batch.clamp(0.0, 1.0).mul(255.0).round().permute(0, 2, 3, 1).contiguous()
        with torch.no_grad():
            batch_boxes, batch_points = detect_face(
                batch, self.min_face_size, pnet, rnet, onet, list(self.thresholds), self.factor, self.device
            )
        results = []
        for image, boxes, points in zip(images, batch_boxes, batch_points):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
            points = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
            keep = boxes[:, 4] >= self.min_score
            boxes, points = boxes[keep], points[keep]
            order = np.argsort(-boxes[:, 4], kind="stable")
            boxes, points = boxes[order], points[order]
            results.append(
                Detections(
                    boxes=torch.from_numpy(np.ascontiguousarray(boxes[:, :4])).to(image.device),
                    landmarks=torch.from_numpy(np.ascontiguousarray(points)).to(image.device),
                    scores=torch.from_numpy(np.ascontiguousarray(boxes[:, 4])).to(image.device),
                )
            )
        return results

