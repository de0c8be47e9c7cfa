"""DiffDeID's condition models (paper sec. 3.2): 3DMM coefficients ρ, the rendered face I_3d and
the identity mask M, each a protocol with a real loader and an offline stand-in.

ρ = {α, β, δ, γ, p, ω} (eq. 1) is one ``F,261`` float32 vector laid out in that order with the
sizes of :data:`anonloader.methods.diffdeid.network.RHO_PARTS` (identity 80, expression 64,
texture 80, SH light 27, pose 6, gaze 4); :class:`RhoLayout` names the slices.

Real models (the user's local files; nothing is downloaded):

- :class:`D3DFRReconstructor`: Deep3DFaceRecon's regressor layout (a torchvision ResNet-50
  trunk and one 1x1 convolution per coefficient group, 80+64+80+3+27+2+1 = 257 outputs:
  identity, expression, texture, angles, SH light, xy translation, z translation) loaded from a
  checkpoint (``{"net_recon": state}`` or a bare state dict). Crops are resized to 224 px.
- :class:`OnnxFaceParser`: a face-parsing network in ONNX (e.g. a BiSeNet export) run by
  onnxruntime; the mask is the given face classes minus the mouth classes.

Offline stand-ins (named as such in their ``kind`` and in ``config()``):

- :class:`LandmarkFaceModel` (**stand-in** for D3DFR): dlib's 68 points. p = (yaw, pitch) from
  ``cv2.solvePnP`` against insightface's 3-D mean shape (:mod:`anonloader.eval.utility_models`)
  plus (roll, log scale, x, y) of the 2-D similarity that normalises the points; α, β = the
  between- and within-identity PCA of the similarity-normalised points (fitted with
  :meth:`LandmarkFaceModel.fit`, ``train face-model``); δ = the mean colour of a 5 x 5 grid over
  the face box plus luminance and channel spreads; γ = per-channel least-squares fit of the 9
  real spherical harmonics on an ellipsoid normal map over the face box. Deviation: the points
  are normalised by a 2-D similarity, not frontalised in 3-D (yaw and pitch stay in α and β).
- :class:`ContourRenderer` (**stand-in** for a BFM renderer): the landmark model's shape
  ``S̄ + P_id α' + P_exp β`` placed by p, the face hull filled with δ's grid colours, the part
  contours drawn darker.
- :class:`HullMasker` (**stand-in** for the parser): 1 inside the 68-point hull, 0 inside the
  outer lip polygon (the paper keeps the mouth); an ellipse from the 5 points when the hull is
  degenerate.

ω (both paths): per eye, ``(pupil - eye centre) / eye width`` with the pupil the centroid of the
pixels inside the eye contour darker than the midpoint of their minimum and median grey level
(no gaze model ships offline).

- :class:`BFMRenderer`: the user's Basel Face Model ``.mat`` in Deep3DFaceRecon's layout
  (``meanshape``, ``idBase``, ``exBase``, ``meantex``, ``texBase``, ``tri``) and a torch z-buffer
  point-splat rasterizer: S = S̄ + P_id α' + P_exp β, T = T̄ + P_t δ, SH light γ (9 bands per
  colour, D3DFR's constants and its 0.8 ambient offset), rotation ``Rz Ry Rx`` of p's angles,
  p's translation, a pinhole camera (focal 1015, centre 112, distance 10: D3DFR's 224 px frame,
  scaled to the crop side). Each vertex splats a square of ``2 radius + 1`` pixels; per pixel the
  nearest vertex wins. Deviation: D3DFR aligns its input with its own 5-point template at
  224 px; here the ffhq crop is resized, so the render sits where D3DFR's frame puts it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from anonloader.errors import ConfigError, MethodError, ModelLoadError
from anonloader.onnx_sessions import new_session
from anonloader.methods.diffdeid.network import RHO_PARTS

__all__ = [
    "BFMRenderer",
    "ContourRenderer",
    "D3DFRNet",
    "D3DFRReconstructor",
    "FaceMasker",
    "FaceReconstructor",
    "FaceRenderer",
    "HullMasker",
    "LandmarkFaceModel",
    "OnnxFaceParser",
    "RhoLayout",
    "gaze_vectors",
    "landmarks_68",
]

_MOUTH = list(range(48, 60))
_LEFT_EYE, _RIGHT_EYE = list(range(36, 42)), list(range(42, 48))
_CONTOURS = [list(range(17)), list(range(17, 22)), list(range(22, 27)), list(range(27, 31)), list(range(31, 36)),
             _LEFT_EYE + [36], _RIGHT_EYE + [42], _MOUTH + [48], list(range(60, 68)) + [60]]


@dataclass(frozen=True)
class RhoLayout:
    """Where each part of ρ sits: ``parts`` name -> size, in the order α, β, δ, γ, p, ω."""

    parts: tuple[tuple[str, int], ...] = tuple(RHO_PARTS.items())

    @classmethod
    def from_dict(cls, parts: dict[str, int]) -> RhoLayout:
        """Sizes by name (any key order: JSON configs are stored sorted); laid out as α, β, δ, γ, p, ω."""
        if set(parts) != set(RHO_PARTS):
            raise ConfigError(f"ρ parts must be {list(RHO_PARTS)}, got {list(parts)}")
        return cls(tuple((k, int(parts[k])) for k in RHO_PARTS))

    @property
    def dim(self) -> int:
        return sum(n for _, n in self.parts)

    def slice(self, name: str) -> slice:
        start = 0
        for key, n in self.parts:
            if key == name:
                return slice(start, start + n)
            start += n
        raise KeyError(name)

    def size(self, name: str) -> int:
        return dict(self.parts)[name]

    def pack(self, **parts: torch.Tensor) -> torch.Tensor:
        """``F,n_k`` parts by name (all six) -> ``F,dim``."""
        return torch.cat([parts[k].float() for k, _ in self.parts], dim=1)

    def replace(self, rho: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
        """A copy of ``rho`` (``F,dim``) with part ``name`` replaced by ``value`` (``F,n``): eq. 4
        with ``name="alpha"``."""
        out = rho.clone()
        out[:, self.slice(name)] = value.to(rho.dtype)
        return out


def _fixed(vector: np.ndarray, size: int) -> np.ndarray:
    """Truncate or zero-pad a 1-D vector to ``size``."""
    out = np.zeros(size, dtype=np.float64)
    n = min(size, len(vector))
    out[:n] = vector[:n]
    return out


def _uint8(crop: torch.Tensor) -> np.ndarray:
    return (crop.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def landmarks_68(crops: torch.Tensor, landmarks5: torch.Tensor) -> torch.Tensor:
    """dlib's 68 points on aligned crops.

    Args:
        crops: ``F,3,S,S float in [0,1]``.
        landmarks5: ``F,5,2 float32`` crop pixels (eyes, nose, mouth corners).
    Returns:
        ``F,68,2 float32`` crop pixels (iBUG order). The face rectangle given to dlib is a square
        of 3.18 x the eye distance centred 0.45 x the eye distance above the 5 points' centroid.
    """
    from anonloader.eval.utility_models import predict_landmarks_68

    if len(crops) == 0:
        return torch.zeros(0, 68, 2)
    pts = landmarks5.detach().double().cpu()
    eye = (pts[:, 1] - pts[:, 0]).norm(dim=1)
    centre = pts.mean(1)
    cx, cy, half = centre[:, 0], centre[:, 1] - 0.45 * eye, 1.59 * eye
    boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1).float()
    return torch.cat(predict_landmarks_68([c.cpu() for c in crops], [b[None] for b in boxes]))


def gaze_vectors(crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """ω: ``F,3,S,S`` crops in [0,1] and ``F,68,2`` points -> ``F,4`` (left dx, dy, right dx, dy),
    each ``(pupil - eye centre) / eye width``, the pupil the centroid of the contour's pixels at
    or below ``(min + median) / 2`` grey; 0 for an eye whose contour holds no pixel."""
    import cv2

    out = np.zeros((len(crops), 4))
    for i, (crop, pts) in enumerate(zip(crops, points.detach().cpu().numpy())):
        gray = _uint8(crop).astype(np.float64).mean(axis=2)
        for j, eye in enumerate((_LEFT_EYE, _RIGHT_EYE)):
            contour = pts[eye]
            mask = np.zeros(gray.shape, np.uint8)
            cv2.fillPoly(mask, [np.round(contour).astype(np.int32)], 1)
            ys, xs = np.nonzero(mask)
            width = float(np.linalg.norm(contour[3] - contour[0]))
            if len(xs) == 0 or width < 1e-6:
                continue
            values = gray[ys, xs]
            dark = values <= 0.5 * (values.min() + np.median(values))
            pupil = np.array([xs[dark].mean(), ys[dark].mean()])
            out[i, 2 * j:2 * j + 2] = (pupil - contour.mean(0)) / width
    return torch.from_numpy(out).float()


# ---------------------------------------------------------------------------- protocols
@runtime_checkable
class FaceReconstructor(Protocol):
    """M_3D (eq. 1): ``(crops F,3,S,S in [0,1], points F,68,2 crop pixels) -> ρ F,261 float32``."""

    kind: str

    def __call__(self, crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


@runtime_checkable
class FaceRenderer(Protocol):
    """ρ' ``F,261`` (and the crop side ``size``) -> I_3d ``F,3,size,size float in [0,1]``."""

    kind: str

    def __call__(self, rho: torch.Tensor, size: int) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


@runtime_checkable
class FaceMasker(Protocol):
    """``(crops F,3,S,S in [0,1], points F,68,2) -> M F,1,S,S float in {0,1}`` (1 = erased);
    I_m = I·(1−M)."""

    kind: str

    def __call__(self, crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------- landmark stand-in
def _sh_basis(nx: np.ndarray, ny: np.ndarray, nz: np.ndarray) -> np.ndarray:
    """The 9 real spherical harmonics (bands 0-2, unnormalised constants as in D3DFR) -> ``N,9``."""
    return np.stack([np.ones_like(nx), ny, nz, nx, nx * ny, ny * nz, 3 * nz * nz - 1, nx * nz, nx * nx - ny * ny], axis=1)


class LandmarkFaceModel:
    """Offline **stand-in** for D3DFR: ρ from dlib's 68 points and the crop's colours (see the
    module docstring). Fit the identity/expression bases with :meth:`fit` before use.

    Args:
        rho_parts: sizes of α, β, δ, γ, p, ω (default 80, 64, 80, 27, 6, 4).
    """

    kind = "landmark-standin"

    def __init__(self, rho_parts: dict[str, int] | None = None) -> None:
        self.layout = RhoLayout.from_dict(dict(rho_parts or RHO_PARTS))
        self.mean = torch.zeros(136)
        self.p_id = torch.zeros(136, self.layout.size("alpha"))
        self.p_exp = torch.zeros(136, self.layout.size("beta"))
        self.fitted = False

    # -------------------------------------------------------------- geometry
    @staticmethod
    def normalise(points: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``F,68,2`` crop pixels -> (``F,136`` points with centroid 0, RMS radius 1, outer eye
        corners level; ``F,4`` similarity (roll rad, log(rms / size), cx / size - 0.5, cy / size - 0.5))."""
        pts = points.double()
        centre = pts.mean(1, keepdim=True)
        centred = pts - centre
        rms = centred.square().sum(2).mean(1).sqrt().clamp_min(1e-9)
        eye = pts[:, 45] - pts[:, 36]
        roll = torch.atan2(eye[:, 1], eye[:, 0])
        cos, sin = roll.cos(), roll.sin()
        rot = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # rotate by -roll
        normal = torch.einsum("fij,fnj->fni", rot, centred) / rms[:, None, None]
        sim = torch.stack([roll, (rms / size).log(), centre[:, 0, 0] / size - 0.5, centre[:, 0, 1] / size - 0.5], 1)
        return normal.reshape(len(pts), 136).float(), sim.float()

    @staticmethod
    def denormalise(normal: torch.Tensor, sim: torch.Tensor, size: int) -> torch.Tensor:
        """Inverse of :meth:`normalise`: ``F,136`` and ``F,4`` -> ``F,68,2`` crop pixels."""
        pts = normal.double().view(-1, 68, 2)
        roll, scale = sim[:, 0].double(), sim[:, 1].double().exp() * size
        cos, sin = roll.cos(), roll.sin()
        rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        centre = torch.stack([(sim[:, 2].double() + 0.5) * size, (sim[:, 3].double() + 0.5) * size], 1)
        return (torch.einsum("fij,fnj->fni", rot, pts) * scale[:, None, None] + centre[:, None]).float()

    def fit(self, points: torch.Tensor, labels: torch.Tensor | list[int], size: int) -> LandmarkFaceModel:
        """Fit S̄, P_id (between-identity PCA) and P_exp (within-identity PCA, orthogonal to P_id).

        Args:
            points: ``N,68,2`` crop pixels of aligned faces; labels: ``N`` identity ids (at
                least two identities); size: the crop side.
        """
        labels = torch.as_tensor(labels)
        if points.ndim != 3 or points.shape[1:] != (68, 2) or len(labels) != len(points):
            raise ConfigError(f"fit expects N,68,2 points and N labels, got {tuple(points.shape)} and {len(labels)}")
        ids = labels.unique()
        if len(ids) < 2:
            raise ConfigError("fit needs faces of at least two identities")
        x = self.normalise(points, size)[0].double()
        mean = x.mean(0)
        id_means = torch.stack([x[labels == i].mean(0) for i in ids])
        self.mean = mean.float()
        self.p_id = self._pca(id_means - mean, self.layout.size("alpha"))
        within = x - id_means[torch.searchsorted(ids, labels)]
        within = within - within @ self.p_id.double() @ self.p_id.double().T
        self.p_exp = self._pca(within, self.layout.size("beta"))
        self.fitted = True
        return self

    @staticmethod
    def _pca(rows: torch.Tensor, k: int) -> torch.Tensor:
        """``136,k`` principal directions scaled by their standard deviation (so coefficients are
        about unit variance); zero columns past the data's rank."""
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        std = s / math.sqrt(max(len(rows) - 1, 1))
        keep = int((std > 1e-8 * max(float(std[0]), 1e-12)).sum()) if len(std) else 0
        out = torch.zeros(136, k, dtype=torch.float64)
        n = min(k, keep)
        out[:, :n] = vh[:n].T * std[:n]
        return out.float()

    def _coefficients(self, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α = P_id⁺ (x - S̄), β = P_exp⁺ (x - S̄ - P_id α) (least squares) -> ``F,80``, ``F,64``."""
        d = (normal - self.mean).double()
        alpha = d @ torch.linalg.pinv(self.p_id.double()).T
        rest = d - alpha @ self.p_id.double().T
        beta = rest @ torch.linalg.pinv(self.p_exp.double()).T
        return alpha.float(), beta.float()

    def shape(self, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """S = S̄ + P_id α + P_exp β: ``F,80``, ``F,64`` -> ``F,136`` normalised points."""
        return self.mean + alpha.float() @ self.p_id.T + beta.float() @ self.p_exp.T

    # -------------------------------------------------------------- colours
    def _colours(self, crop: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """δ and γ of one face: ``S,S,3 float in [0,1]``, ``68,2`` -> (``n_δ``, ``n_γ``)."""
        s = crop.shape[0]
        x0, y0 = np.clip(np.floor(pts.min(0)).astype(int), 0, s - 1)
        x1, y1 = np.clip(np.ceil(pts.max(0)).astype(int) + 1, x0 + 1, s)
        box = crop[y0:y1, x0:x1]
        h, w = box.shape[:2]
        grid = np.zeros((5, 5, 3))
        for r in range(5):
            for c in range(5):
                cell = box[r * h // 5:max((r + 1) * h // 5, r * h // 5 + 1), c * w // 5:max((c + 1) * w // 5, c * w // 5 + 1)]
                grid[r, c] = cell.reshape(-1, 3).mean(0)
        luminance = box @ np.array([0.299, 0.587, 0.114])
        spreads = np.array([luminance.mean(), luminance.std(), *box.reshape(-1, 3).std(0)])
        delta = _fixed(np.concatenate([grid.reshape(-1), spreads]), self.layout.size("delta"))
        ys, xs = np.mgrid[0:h, 0:w]
        nx, ny = (xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1
        inside = nx * nx + ny * ny < 1
        nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
        basis = _sh_basis(nx[inside], ny[inside], nz[inside])
        if len(basis) >= 9:
            coeffs, *_ = np.linalg.lstsq(basis, box[inside], rcond=None)  # 9,3
            gamma = coeffs.T.reshape(-1)
        else:
            gamma = np.zeros(27)
        return delta, _fixed(gamma, self.layout.size("gamma"))

    def __call__(self, crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """ρ of ``F,3,S,S`` crops in [0,1] with their ``F,68,2`` points -> ``F,261 float32``."""
        from anonloader.eval.utility_models import head_pose_from_landmarks_68

        if not self.fitted:
            raise MethodError(
                "the landmark face model (offline stand-in for D3DFR) has no identity/expression bases: fit it with "
                "`python -m anonloader.methods.diffdeid.train face-model` or LandmarkFaceModel.fit(points, labels, size)"
            )
        size = int(crops.shape[-1])
        normal, sim = self.normalise(points, size)
        alpha, beta = self._coefficients(normal)
        angles = head_pose_from_landmarks_68(points, (size, size))[:, :2].nan_to_num(0.0) * (math.pi / 180)
        pose = torch.cat([angles, sim], dim=1)
        deltas, gammas = [], []
        for crop, pts in zip(crops, points.detach().cpu().numpy()):
            d, g = self._colours(_uint8(crop).astype(np.float64) / 255.0, pts)
            deltas.append(d)
            gammas.append(g)
        parts = {"alpha": alpha, "beta": beta, "delta": torch.from_numpy(np.stack(deltas)),
                 "gamma": torch.from_numpy(np.stack(gammas)), "pose": _fit_width(pose, self.layout.size("pose")),
                 "omega": _fit_width(gaze_vectors(crops, points), self.layout.size("omega"))}
        return self.layout.pack(**parts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "p_id": self.p_id, "p_exp": self.p_exp}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> LandmarkFaceModel:
        if state["p_id"].shape != self.p_id.shape or state["p_exp"].shape != self.p_exp.shape:
            raise ModelLoadError(f"face model bases {tuple(state['p_id'].shape)}/{tuple(state['p_exp'].shape)} do not fit ρ parts {dict(self.layout.parts)}")
        self.mean, self.p_id, self.p_exp = (state[k].float().contiguous() for k in ("mean", "p_id", "p_exp"))
        self.fitted = bool(self.p_id.abs().sum() > 0)
        return self

    def digest(self) -> str:
        h = hashlib.sha256()
        for key, value in self.state_dict().items():
            h.update(key.encode())
            h.update(value.contiguous().numpy().tobytes())
        return h.hexdigest()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "standin_for": "D3DFR", "rho_parts": dict(self.layout.parts), "bases_sha256": self.digest()}


def _fit_width(x: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(len(x), size)
    n = min(size, x.shape[1])
    out[:, :n] = x[:, :n].float()
    return out


# ---------------------------------------------------------------------------- renderer stand-in
class ContourRenderer:
    """Offline **stand-in** for a BFM renderer: ρ' -> the landmark model's part contours on the
    face hull filled with δ's 5 x 5 grid colours (see the module docstring).

    Args:
        face_model: the fitted :class:`LandmarkFaceModel` whose S̄, P_id, P_exp give the shape.
    """

    kind = "contour-standin"

    def __init__(self, face_model: LandmarkFaceModel) -> None:
        self.face_model = face_model

    def points(self, rho: torch.Tensor, size: int) -> torch.Tensor:
        """The 68 points ``F,68,2`` (crop pixels) of S = S̄ + P_id α' + P_exp β placed by p."""
        layout = self.face_model.layout
        normal = self.face_model.shape(rho[:, layout.slice("alpha")], rho[:, layout.slice("beta")])
        sim = rho[:, layout.slice("pose")][:, 2:6]
        return self.face_model.denormalise(normal, sim, size)

    def __call__(self, rho: torch.Tensor, size: int) -> torch.Tensor:
        """ρ' ``F,261`` -> I_3d ``F,3,size,size float in [0,1]`` (0 off the face)."""
        import cv2

        layout = self.face_model.layout
        points = self.points(rho, size).numpy()
        out = np.zeros((len(rho), size, size, 3), np.float32)
        for i, pts in enumerate(points):
            grid = rho[i, layout.slice("delta")][:75].reshape(5, 5, 3).clamp(0, 1).numpy().astype(np.float32)
            x0, y0 = np.floor(pts.min(0)).astype(int)
            x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
            w, h = max(x1 - x0, 1), max(y1 - y0, 1)
            if w > 4 * size or h > 4 * size:
                continue  # a degenerate shape: nothing to draw
            colours = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
            canvas = np.zeros((size, size, 3), np.float32)
            ys, xs = slice(max(y0, 0), min(y1, size)), slice(max(x0, 0), min(x1, size))
            if ys.start < ys.stop and xs.start < xs.stop:
                canvas[ys, xs] = colours[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
            hull = np.zeros((size, size), np.uint8)
            cv2.fillConvexPoly(hull, cv2.convexHull(np.round(pts).astype(np.int32)), 1)
            image = canvas * hull[:, :, None]
            for contour in _CONTOURS:
                poly = np.round(pts[contour]).astype(np.int32)
                colour = tuple(float(v) for v in 0.5 * image[np.clip(poly[:, 1], 0, size - 1), np.clip(poly[:, 0], 0, size - 1)].mean(0))
                cv2.polylines(image, [poly], False, colour, 1)
            out[i] = image
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "standin_for": "BFM renderer", "face_model": self.face_model.config()["bases_sha256"]}


# ---------------------------------------------------------------------------- masker stand-in
class HullMasker:
    """Offline **stand-in** for a face parser: M = 68-point hull minus the outer lip polygon
    (5-point ellipse when the hull is degenerate)."""

    kind = "hull-standin"

    def __init__(self, min_area: float = 16.0) -> None:
        self.min_area = float(min_area)

    @staticmethod
    def ellipse(landmarks5: np.ndarray, size: int) -> np.ndarray:
        """An ellipse around the 5 points (eye distance e: axes 1.1 e x 1.5 e, centred on the
        points' centroid) -> ``S,S uint8``."""
        import cv2

        mask = np.zeros((size, size), np.uint8)
        eye = float(np.linalg.norm(landmarks5[1] - landmarks5[0]))
        centre = landmarks5.mean(0)
        cv2.ellipse(mask, (round(centre[0]), round(centre[1])), (max(1, round(1.1 * eye)), max(1, round(1.5 * eye))), 0, 0, 360, 1, -1)
        return mask

    def __call__(self, crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``F,3,S,S`` and ``F,68,2`` -> M ``F,1,S,S float in {0,1}``."""
        import cv2

        size = int(crops.shape[-1])
        out = np.zeros((len(crops), 1, size, size), np.float32)
        for i, pts in enumerate(points.detach().cpu().numpy()):
            hull = cv2.convexHull(np.round(pts).astype(np.int32))
            if cv2.contourArea(hull) < self.min_area:
                five = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])
                mask = self.ellipse(five, size)
            else:
                mask = np.zeros((size, size), np.uint8)
                cv2.fillConvexPoly(mask, hull, 1)
            cv2.fillPoly(mask, [np.round(pts[_MOUTH]).astype(np.int32)], 0)
            out[i, 0] = mask
        return torch.from_numpy(out)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "standin_for": "face parser", "min_area": self.min_area}


# ---------------------------------------------------------------------------- real loaders
class OnnxFaceParser:
    """A face-parsing network in ONNX run by onnxruntime (CPU provider).

    Args:
        path: the ``.onnx`` file (input ``1,3,H,W`` float, ImageNet-normalised RGB; output
            ``1,K,H,W`` class scores).
        face_classes: class ids that make up the face to erase (skin, brows, eyes, nose, ...).
        mouth_classes: class ids kept (mouth, lips).
        input_size: the side the network expects (default 512, as BiSeNet face parsers).
    """

    kind = "onnx-parser"

    def __init__(self, path: str | Path, face_classes: list[int], mouth_classes: list[int], input_size: int = 512) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"face parser not found: {self.path}; pass the path of your local .onnx export")
        try:
            import onnxruntime  # noqa: F401 - fail early with ModelLoadError when it is missing
        except ImportError as error:
            raise ModelLoadError("OnnxFaceParser needs onnxruntime: pip install onnxruntime") from error
        try:
            self.session = new_session(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{self.path} is not a loadable ONNX model: {error}") from error
        self.face_classes, self.mouth_classes = [int(c) for c in face_classes], [int(c) for c in mouth_classes]
        self.input_size = int(input_size)
        self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def __call__(self, crops: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
        """``F,3,S,S`` in [0,1] -> M ``F,1,S,S float in {0,1}`` (``points`` unused)."""
        size = int(crops.shape[-1])
        x = torch.nn.functional.interpolate(crops.float().cpu(), size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
        x = ((x - mean) / std).numpy()
        name = self.session.get_inputs()[0].name
        masks = []
        for i in range(len(x)):
            scores = torch.from_numpy(np.asarray(self.session.run(None, {name: x[i:i + 1]})[0]))
            labels = scores.argmax(1, keepdim=True).float()
            labels = torch.nn.functional.interpolate(labels, size=(size, size), mode="nearest").long()
            face = torch.isin(labels, torch.tensor(self.face_classes)) & ~torch.isin(labels, torch.tensor(self.mouth_classes))
            masks.append(face.float())
        return torch.cat(masks) if masks else torch.zeros(0, 1, size, size)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": self._digest, "face_classes": self.face_classes,
                "mouth_classes": self.mouth_classes, "input_size": self.input_size}


_D3DFR_GROUPS = (80, 64, 80, 3, 27, 2, 1)  # id, exp, tex, angle, gamma, xy, z


class D3DFRNet(torch.nn.Module):
    """Deep3DFaceRecon's regressor layout: a torchvision ResNet trunk (no fc) and one 1x1
    convolution per coefficient group; ``B,3,224,224 in [0,1]`` -> ``B,257``."""

    def __init__(self, backbone: str = "resnet50") -> None:
        super().__init__()
        import torchvision

        if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ConfigError(f"D3DFR backbone must be a torchvision ResNet, got {backbone!r}")
        trunk = getattr(torchvision.models, backbone)(weights=None)
        width = trunk.fc.in_features
        trunk.fc = torch.nn.Identity()
        self.backbone = trunk
        self.final_layers = torch.nn.ModuleList(torch.nn.Conv2d(width, n, 1) for n in _D3DFR_GROUPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[:, :, None, None]
        return torch.cat([layer(features).flatten(1) for layer in self.final_layers], dim=1)


class D3DFRReconstructor:
    """The real M_3D: a D3DFR checkpoint (``{"net_recon": state}`` or a bare state dict of
    :class:`D3DFRNet`) -> ρ with α, β, δ, γ from the network, p = (3 angles, 3 translation) and
    ω from :func:`gaze_vectors`.

    Args:
        checkpoint: the user's local ``.pth`` file.
        backbone: torchvision ResNet name of the trunk (``resnet50`` in D3DFR).
    """

    kind = "d3dfr"

    def __init__(self, checkpoint: str | Path, backbone: str = "resnet50") -> None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"D3DFR checkpoint not found: {path}; pass the path of your local epoch_*.pth")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "net_recon" in state:
            state = state["net_recon"]
        self.net = D3DFRNet(backbone)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as error:
            raise ModelLoadError(f"{path} does not hold a D3DFR {backbone} regressor: {error}") from error
        self.net.eval().requires_grad_(False)
        self.backbone, self.path = backbone, path
        self._digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.layout = RhoLayout()

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``F,3,S,S`` in [0,1] and ``F,68,2`` -> ρ ``F,261``."""
        device = next(self.net.parameters()).device
        x = torch.nn.functional.interpolate(crops.float().to(device), size=(224, 224), mode="bilinear", align_corners=False)
        out = self.net(x).float().cpu()
        alpha, beta, delta, angle, gamma, xy, z = out.split(list(_D3DFR_GROUPS), dim=1)
        return self.layout.pack(alpha=alpha, beta=beta, delta=delta, gamma=gamma, pose=torch.cat([angle, xy, z], 1),
                                omega=gaze_vectors(crops.cpu(), points))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "backbone": self.backbone, "sha256": self._digest}


# ---------------------------------------------------------------------------- BFM renderer
_SH_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_SH_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi), 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))


def sh_shading(normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """D3DFR's SH lighting: ``normals`` ``B,N,3`` unit, ``gamma`` ``B,27`` (3 colours x 9 bands,
    0.8 added to each colour's band 0) -> ``B,N,3`` irradiance."""
    a, c = _SH_A, _SH_C
    nx, ny, nz = normals.unbind(-1)
    basis = torch.stack([
        torch.full_like(nx, a[0] * c[0]), -a[1] * c[1] * ny, a[1] * c[1] * nz, -a[1] * c[1] * nx,
        a[2] * c[2] * nx * ny, -a[2] * c[2] * ny * nz, 0.5 * a[2] * c[2] / math.sqrt(3.0) * (3 * nz * nz - 1),
        -a[2] * c[2] * nx * nz, 0.5 * a[2] * c[2] * (nx * nx - ny * ny),
    ], dim=-1)  # B,N,9
    g = gamma.reshape(-1, 3, 9).clone()
    g[:, :, 0] += 0.8
    return torch.einsum("bnk,bck->bnc", basis, g)


def euler_rotation(angles: torch.Tensor) -> torch.Tensor:
    """``B,3`` (x, y, z) radians -> ``B,3,3`` ``Rz Ry Rx`` (column vectors)."""
    x, y, z = angles.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], -1).view(-1, 3, 3)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1).view(-1, 3, 3)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def splat(points: torch.Tensor, depth: torch.Tensor, colours: torch.Tensor, size: int, radius: int = 1) -> torch.Tensor:
    """z-buffer point splatting: ``points`` ``N,2`` pixel (x, y), ``depth`` ``N`` (smaller is
    nearer), ``colours`` ``N,3`` -> ``3,size,size`` (0 where nothing lands)."""
    offsets = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    px = (points[:, 0].round().long()[:, None] + dx.reshape(1, -1)).reshape(-1)
    py = (points[:, 1].round().long()[:, None] + dy.reshape(1, -1)).reshape(-1)
    source = torch.arange(len(points)).repeat_interleave(dx.numel())
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    px, py, source = px[inside], py[inside], source[inside]
    pixel = py * size + px
    d = depth[source].float()
    best = torch.full((size * size,), float("inf")).scatter_reduce(0, pixel, d, reduce="amin")
    winner = d <= best[pixel]
    chosen = torch.full((size * size,), -1, dtype=torch.long).scatter_reduce(0, pixel[winner], source[winner], reduce="amax")
    image = torch.zeros(size * size, 3)
    hit = chosen >= 0
    image[hit] = colours[chosen[hit]].float()
    return image.T.reshape(3, size, size)


class BFMRenderer:
    """The real renderer: the user's BFM ``.mat`` (Deep3DFaceRecon layout) and a z-buffer point
    splatter (see the module docstring).

    Args:
        path: ``BFM_model_front.mat`` or another file with ``meanshape`` (``1,3N``), ``idBase``
            (``3N,80``), ``exBase`` (``3N,64``), ``meantex`` (``1,3N``, 0..255), ``texBase``
            (``3N,80``) and ``tri`` (``M,3``, 1-based vertex ids).
        radius: splat half-width in pixels at 224 px (scaled with the crop side, at least 0).
    """

    kind = "bfm"

    def __init__(self, path: str | Path, radius: int = 1) -> None:
        import scipy.io

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"BFM file not found: {path}; pass the path of your local BFM_model_front.mat")
        try:
            mat = scipy.io.loadmat(str(path))
        except Exception as error:  # scipy raises several types for bad files
            raise ModelLoadError(f"{path} is not a readable .mat file: {error}") from error
        missing = [k for k in ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri") if k not in mat]
        if missing:
            raise ModelLoadError(f"{path} lacks {missing}; expected Deep3DFaceRecon's BFM_model_front.mat layout")
        shape = torch.from_numpy(np.asarray(mat["meanshape"], np.float64)).float().reshape(-1, 3)
        self.mean_shape = shape - shape.mean(0, keepdim=True)  # D3DFR centres the mean shape
        self.id_base = torch.from_numpy(np.asarray(mat["idBase"], np.float32))
        self.exp_base = torch.from_numpy(np.asarray(mat["exBase"], np.float32))
        self.mean_tex = torch.from_numpy(np.asarray(mat["meantex"], np.float32)).reshape(-1, 3)
        self.tex_base = torch.from_numpy(np.asarray(mat["texBase"], np.float32))
        self.tri = torch.from_numpy(np.asarray(mat["tri"], np.int64)) - 1
        self.radius = int(radius)
        self.path, self._digest = path, hashlib.sha256(path.read_bytes()).hexdigest()
        self.layout = RhoLayout()
        n = len(self.mean_shape)
        if self.id_base.shape[0] != 3 * n or self.exp_base.shape[0] != 3 * n or self.tex_base.shape[0] != 3 * n:
            raise ModelLoadError(f"{path}: bases do not match the {n} vertices of meanshape")

    def geometry(self, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vertices in camera space ``B,N,3``, vertex normals ``B,N,3``, albedo ``B,N,3`` in [0,1])."""
        lay = self.layout
        alpha, beta, delta = rho[:, lay.slice("alpha")].float(), rho[:, lay.slice("beta")].float(), rho[:, lay.slice("delta")].float()
        pose = rho[:, lay.slice("pose")].float()
        b = len(rho)
        shape = self.mean_shape[None] + (alpha @ self.id_base.T + beta @ self.exp_base.T).view(b, -1, 3)
        albedo = (self.mean_tex[None] + (delta @ self.tex_base.T).view(b, -1, 3)) / 255.0
        tri = self.tri
        v0, v1, v2 = shape[:, tri[:, 0]], shape[:, tri[:, 1]], shape[:, tri[:, 2]]
        face_normals = torch.cross(v1 - v0, v2 - v1, dim=-1)
        normals = torch.zeros_like(shape)
        for k in range(3):
            normals.index_add_(1, tri[:, k], face_normals)
        normals = torch.nn.functional.normalize(normals, dim=-1)
        rotation = euler_rotation(pose[:, :3])
        vertices = shape @ rotation.transpose(1, 2) + pose[:, None, 3:6]
        return vertices, normals @ rotation.transpose(1, 2), albedo

    def project(self, vertices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera-space ``B,N,3`` -> (pixels ``B,N,2`` in the ``size`` crop, depth ``B,N``)."""
        depth = 10.0 - vertices[..., 2]
        scale = size / 224.0
        x = (1015.0 * vertices[..., 0] / depth + 112.0) * scale
        y = (224.0 - (1015.0 * vertices[..., 1] / depth + 112.0)) * scale  # image rows grow downwards
        return torch.stack([x, y], -1), depth

    @torch.no_grad()
    def __call__(self, rho: torch.Tensor, size: int) -> torch.Tensor:
        """ρ' ``F,261`` -> I_3d ``F,3,size,size float in [0,1]`` (0 off the face)."""
        vertices, normals, albedo = self.geometry(rho.cpu())
        colours = (albedo * sh_shading(normals, rho[:, self.layout.slice("gamma")].float().cpu())).clamp(0, 1)
        points, depth = self.project(vertices, size)
        radius = max(0, round(self.radius * size / 224))
        return torch.stack([splat(points[i], depth[i], colours[i], size, radius) for i in range(len(rho))])

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": self._digest, "radius": self.radius}
