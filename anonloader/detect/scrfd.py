"""insightface's SCRFD / RetinaFace ONNX detectors, with our own pre- and post-processing.

onnxruntime runs the graph; resizing, normalisation, anchor decoding, the score threshold and
NMS are done here in torch, so they are deterministic, testable and part of the fingerprint.

Model files follow insightface's model-zoo layout, ``<root>/models/<pack>/det_*.onnx`` (e.g.
``~/.insightface/models/buffalo_l/det_10g.onnx``). They are downloaded only when the user passes
``allow_download=True``, through insightface's own model-zoo download function. insightface's
pretrained models are licensed for non-commercial research use only.

The graph contract (insightface's order): input ``1,3,H,W`` float32 RGB, ``(pixel - 127.5) / 128``;
outputs ``scores`` for every stride, then ``bbox`` distances, then ``kps`` distances, each
``N_s,C`` (or ``1,N_s,C``) with ``C`` = 1, 4, 10 and ``N_s = (H/s) * (W/s) * anchors``, anchors
laid out row-major over the feature map with the anchors of one location next to each other.
Distances are in units of the stride from the anchor centre ``(x * s, y * s)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anonloader.detect.image_checks import check_images, empty_detections
from anonloader.errors import ConfigError, DetectionError, ModelLoadError
from anonloader.onnx_sessions import is_current, new_session
from anonloader.fingerprint import hash_file
from anonloader.types import Detections

__all__ = [
    "INPUT_MEAN",
    "INPUT_STD",
    "SCRFDDetector",
    "decode_scrfd_outputs",
    "find_scrfd_model",
    "preprocess_for_scrfd",
]

INPUT_MEAN = 127.5
INPUT_STD = 128.0
#: strides of the feature pyramid, by number of outputs (3 heads per stride with keypoints)
_STRIDES_BY_OUTPUTS = {9: (8, 16, 32), 15: (8, 16, 32, 64, 128)}
LICENCE_NOTE = (
    "insightface's pretrained models (buffalo_l, antelopev2, SCRFD, RetinaFace) are released for "
    "non-commercial research use only; check that your use is allowed before downloading them"
)


def find_scrfd_model(name: str = "buffalo_l", model_root: str | os.PathLike[str] = "~/.insightface") -> Path | None:
    """The local detection model for ``name`` under ``model_root``, or None when absent.

    ``name`` is a model pack (``"buffalo_l"``: the pack's ``det_*.onnx`` is used) or an ONNX file
    name (``"det_10g.onnx"``, ``"scrfd_10g_bnkps.onnx"``). ``model_root`` is insightface's root,
    which holds ``models/``; a folder that holds the packs directly works too.
    """
    root = Path(model_root).expanduser()
    for base in (root / "models", root):
        candidate = base / name
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            detectors = sorted(candidate.glob("det_*.onnx"))
            if detectors:
                return detectors[0]
        if name.endswith(".onnx") and base.is_dir():
            nested = sorted(base.glob(f"*/{name}"))
            if nested:
                return nested[0]
    return None


def preprocess_for_scrfd(image: torch.Tensor, input_size: tuple[int, int]) -> tuple[torch.Tensor, float, float]:
    """Resize keeping the aspect ratio into the top-left of a zero canvas and normalise.

    Args:
        image: ``3,H,W float in [0,1]`` RGB.
        input_size: ``(width, height)`` of the network input.

    Returns:
        ``(blob, scale_x, scale_y)``: ``blob`` is ``1,3,height,width float32`` with
        ``(255 * pixel - 127.5) / 128`` (the canvas outside the image holds ``-127.5 / 128``);
        network-input pixels divided by ``scale_x`` / ``scale_y`` give image pixels.
    """
    width, height = input_size
    image_height, image_width = image.shape[-2:]
    if image_height / image_width > height / width:
        new_height = height
        new_width = max(1, int(new_height * image_width / image_height))
    else:
        new_width = width
        new_height = max(1, int(new_width * image_height / image_width))
    pixels = image.detach().to(torch.float32).clamp(0.0, 1.0).unsqueeze(0) * 255.0
    # bilinear without antialiasing, as the models were trained and evaluated (cv2.resize)
    resized = F.interpolate(pixels, size=(new_height, new_width), mode="bilinear", align_corners=False)
    canvas = torch.zeros(1, 3, height, width, dtype=torch.float32, device=image.device)
    canvas[:, :, :new_height, :new_width] = resized
    blob = (canvas - INPUT_MEAN) / INPUT_STD
    return blob, new_width / image_width, new_height / image_height


def _anchor_centres(height: int, width: int, stride: int, anchors: int) -> torch.Tensor:
    """``height*width*anchors, 2`` anchor centres ``(x, y)`` in input pixels, row-major."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(torch.float32) * stride
    return centres.repeat_interleave(anchors, dim=0)


def decode_scrfd_outputs(
    outputs: Sequence[np.ndarray | torch.Tensor], input_height: int, input_width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode every anchor of SCRFD's raw outputs into boxes and 5 landmarks.

    Args:
        outputs: the graph's outputs in insightface's order (scores per stride, bbox distances
            per stride, keypoint distances per stride), each ``N_s,C`` or ``1,N_s,C``.
        input_height, input_width: size of the network input in pixels.

    Returns:
        ``(scores K, boxes K,4 xyxy, landmarks K,5,2)`` float32 in network-input pixels, for all
        ``K`` anchors of all strides (no threshold applied).

    Raises:
        DetectionError: the outputs do not have SCRFD's layout for this input size.
    """
    strides = _STRIDES_BY_OUTPUTS.get(len(outputs))
    if strides is None:
        raise DetectionError(
            f"SCRFD model returned {len(outputs)} outputs; anonloader needs a detector with 5 keypoints "
            "(9 outputs for strides 8/16/32 or 15 for strides 8-128)"
        )
    levels = len(strides)
    all_scores, all_boxes, all_landmarks = [], [], []
    for level, stride in enumerate(strides):
        scores, distances, keypoints = (
            torch.as_tensor(np.asarray(outputs[level + head * levels])).to(torch.float32) for head in range(3)
        )
        scores, distances, keypoints = scores.reshape(-1), distances.reshape(-1, 4), keypoints.reshape(-1, 10)
        rows = scores.shape[0]
        if distances.shape[0] != rows or keypoints.shape[0] != rows:
            raise DetectionError(
                f"SCRFD outputs of stride {stride} disagree: {rows} scores, {distances.shape[0]} boxes, "
                f"{keypoints.shape[0]} keypoint sets"
            )
        height, width = input_height // stride, input_width // stride
        if height * width == 0 or rows % (height * width) != 0:
            raise DetectionError(
                f"SCRFD output of stride {stride} has {rows} anchors, not a multiple of the "
                f"{height}x{width} feature map of a {input_width}x{input_height} input; "
                "is det_size the size the model was exported for?"
            )
        centres = _anchor_centres(height, width, stride, rows // (height * width))
        distances = distances * stride
        boxes = torch.cat([centres - distances[:, :2], centres + distances[:, 2:]], dim=1)
        landmarks = centres[:, None, :] + keypoints.reshape(-1, 5, 2) * stride
        all_scores.append(scores)
        all_boxes.append(boxes)
        all_landmarks.append(landmarks)
    return torch.cat(all_scores), torch.cat(all_boxes), torch.cat(all_landmarks)


class SCRFDDetector:
    """insightface SCRFD (or its RetinaFace export) through onnxruntime, from a local model file.

    Args:
        model_path: an ONNX file; takes precedence over ``model_root``/``name``.
        model_root: insightface's root folder, holding ``models/<pack>/det_*.onnx``.
        name: model pack (``"buffalo_l"``, ``"buffalo_s"``, ``"antelopev2"``) or ONNX file name.
        allow_download: fetch a missing pack/file through insightface's model zoo (needs internet;
            the models are non-commercial). Without it a missing model raises ModelLoadError.
        det_size: network input ``(width, height)``, multiples of 32.
        min_score: keep faces scoring at least this.
        nms_iou: IoU above which the lower-scoring of two boxes is suppressed.
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).

    The onnxruntime session is opened on first use and dropped when pickled (each DataLoader
    worker opens its own). A missing model is reported at construction; with
    ``allow_download=True`` the download happens on first use (``config()`` or a call).
    """

    name = "scrfd"

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_root: str | os.PathLike[str] = "~/.insightface",
        name: str = "buffalo_l",
        allow_download: bool = False,
        det_size: tuple[int, int] = (640, 640),
        min_score: float = 0.5,
        nms_iou: float = 0.4,
        providers: Sequence[str] | None = None,
    ) -> None:
        det_size = tuple(int(v) for v in det_size)  # type: ignore[assignment]
        if len(det_size) != 2 or any(v < 32 or v % 32 for v in det_size):
            raise ConfigError(f"SCRFDDetector: det_size must be (width, height), multiples of 32, got {det_size!r}")
        if not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"SCRFDDetector: min_score must be in [0,1], got {min_score!r}")
        if not 0.0 < float(nms_iou) <= 1.0:
            raise ConfigError(f"SCRFDDetector: nms_iou must be in (0,1], got {nms_iou!r}")
        self.model_root = Path(model_root).expanduser()
        self.model_name = str(name)
        self.allow_download = bool(allow_download)
        self.det_size: tuple[int, int] = det_size  # type: ignore[assignment]
        self.min_score = float(min_score)
        self.nms_iou = float(nms_iou)
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self._session: Any = None
        self._model_sha256: str | None = None
        if model_path is not None:
            self._model_file: Path | None = Path(model_path).expanduser()
            if not self._model_file.is_file():
                raise ModelLoadError(
                    f"SCRFD model file {self._model_file} does not exist; pass the path of a det_*.onnx "
                    f"file (insightface layout: {self.model_root / 'models' / 'buffalo_l' / 'det_10g.onnx'}). "
                    + LICENCE_NOTE
                )
        else:
            self._model_file = find_scrfd_model(self.model_name, self.model_root)
            if self._model_file is None and not self.allow_download:
                raise ModelLoadError(
                    f"no SCRFD model {self.model_name!r} under {self.model_root} "
                    f"(looked for {self.model_root / 'models' / self.model_name}"
                    f"{'' if self.model_name.endswith('.onnx') else '/det_*.onnx'}). Put the model there, pass "
                    "model_path=..., or let insightface download it with allow_download=True. "
                    + LICENCE_NOTE
                    + ". The offline default detector is detector='mtcnn'."
                )

    def __repr__(self) -> str:
        where = self._model_file if self._model_file is not None else self.model_root / "models" / self.model_name
        return (
            f"SCRFDDetector({str(where)!r}, det_size={self.det_size}, min_score={self.min_score}, "
            f"nms_iou={self.nms_iou})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # onnxruntime sessions do not pickle; each worker opens its own
        return state

    @property
    def model_file(self) -> Path:
        """The local ONNX file, downloading it first when missing and ``allow_download`` is set."""
        if self._model_file is None:
            self._model_file = self._download()
        return self._model_file

    def _download(self) -> Path:
        try:
            from insightface.utils.storage import download_onnx, ensure_available

            root = str(self.model_root)
            if self.model_name.endswith(".onnx"):
                download_onnx("models", self.model_name, root=root)  # network-ok: model_file is reached only with allow_download
            else:
                ensure_available("models", self.model_name, root=root)  # network-ok: as above
        except Exception as error:  # noqa: BLE001 - any download failure is a load error
            raise ModelLoadError(
                f"could not download insightface model {self.model_name!r} into {self.model_root} "
                f"({type(error).__name__}: {error}); download it by hand into "
                f"{self.model_root / 'models'}. " + LICENCE_NOTE
            ) from error
        found = find_scrfd_model(self.model_name, self.model_root)
        if found is None:
            raise ModelLoadError(
                f"insightface downloaded {self.model_name!r} but no det_*.onnx is in "
                f"{self.model_root / 'models' / self.model_name}; pass model_path=... to the detection model"
            )
        return found

    def config(self) -> dict[str, Any]:
        """Everything that changes the detections: model hash, input size, thresholds, NMS."""
        if self._model_sha256 is None:
            self._model_sha256 = hash_file(self.model_file)
        return {
            "backend": self.name,
            "model_file": self.model_file.name,
            "model_sha256": self._model_sha256,
            "det_size": list(self.det_size),
            "min_score": self.min_score,
            "nms_iou": self.nms_iou,
            "input_mean": INPUT_MEAN,
            "input_std": INPUT_STD,
            "resize": "bilinear, aspect kept, top-left on zero canvas",
        }

    def _open_session(self) -> Any:
        if not is_current(self._session):  # none yet, or inherited through fork
            try:
                import onnxruntime  # noqa: F401 - fail early with ModelLoadError when it is missing
            except ImportError as error:
                raise ModelLoadError(
                    "the SCRFD detector needs onnxruntime; run: pip install 'anonloader[insightface]'"
                ) from error
            try:
                session = new_session(str(self.model_file), providers=self.providers)
            except Exception as error:  # noqa: BLE001 - unreadable or invalid model file
                raise ModelLoadError(
                    f"onnxruntime could not open the SCRFD model {self.model_file} "
                    f"({type(error).__name__}: {error}); is it a complete det_*.onnx file?"
                ) from error
            shape = session.get_inputs()[0].shape
            fixed = shape[2:] if len(shape) == 4 else []
            if len(fixed) == 2 and all(isinstance(v, int) for v in fixed) and tuple(fixed[::-1]) != self.det_size:
                raise ConfigError(
                    f"the SCRFD model {self.model_file.name} takes a fixed {fixed[1]}x{fixed[0]} input; "
                    f"pass det_size=({fixed[1]}, {fixed[0]}) instead of {self.det_size}"
                )
            self._session = session
        return self._session

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        """Detect faces in a batch.

        Args:
            images: list of ``3,H,W float in [0,1]`` RGB tensors; sizes may differ.

        Returns:
            One :class:`Detections` per image (pixels of that image, by descending score, on the
            image's device).

        Raises:
            UnsupportedImageError: an entry is not a ``3,H,W`` floating-point tensor.
            ModelLoadError: the model cannot be opened.
            DetectionError: the model failed on an image (the message names its index).
        """
        check_images(images, detector=self.name)
        session = self._open_session()
        input_name = session.get_inputs()[0].name
        results = []
        for index, image in enumerate(images):
            if image.shape[-1] == 0 or image.shape[-2] == 0:
                results.append(empty_detections(image.device))
                continue
            try:
                results.append(self._detect_one(session, input_name, image))
            except Exception as error:  # noqa: BLE001 - backend errors become DetectionError
                raise DetectionError(
                    f"SCRFD failed on image {index} of the batch (shape {tuple(image.shape)}): "
                    f"{type(error).__name__}: {error}"
                ) from error
        return results

    def _detect_one(self, session: Any, input_name: str, image: torch.Tensor) -> Detections:
        from torchvision.ops import nms

        blob, scale_x, scale_y = preprocess_for_scrfd(image.cpu(), self.det_size)
        outputs = session.run(None, {input_name: blob.numpy()})
        scores, boxes, landmarks = decode_scrfd_outputs(outputs, blob.shape[2], blob.shape[3])
        keep = scores >= self.min_score
        scores, boxes, landmarks = scores[keep], boxes[keep], landmarks[keep]
        scale = torch.tensor([scale_x, scale_y], dtype=torch.float32)
        boxes = boxes / scale.repeat(2)
        landmarks = landmarks / scale
        order = nms(boxes, scores, self.nms_iou)  # kept indices, by descending score
        return Detections(
            boxes=boxes[order].contiguous().to(image.device),
            landmarks=landmarks[order].contiguous().to(image.device),
            scores=scores[order].contiguous().to(image.device),
        )
