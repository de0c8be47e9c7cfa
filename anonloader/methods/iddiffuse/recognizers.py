"""The frozen, differentiable recognizers whose concatenated embeddings feed E_I.

The paper concatenates ArcFace, FaRL and FaceNet (3 x 512-d). Eq. 7 needs gradients of E_I with
respect to the predicted image, so every recognizer inside E_I is a torch module here:

- ``{"kind": "iresnet", ...IResNet args}``: ArcFace IResNet (:mod:`.backbone`), weights from an
  insightface ``arcface_torch`` checkpoint (``weights=<path>``) or from an IDDiffuse checkpoint.
- ``{"kind": "facenet", "pretrained": None | "vggface2" | "casia-webface"}``: facenet-pytorch's
  InceptionResnetV1 (512-d). With ``pretrained`` set, the released checkpoint is read from
  facenet-pytorch's own cache (``$TORCH_HOME/checkpoints/20180402-114759-vggface2.pt`` or
  ``...-casia-webface.pt``; :func:`facenet_weights_path`); when it is not there, facenet-pytorch
  downloads it only with ``"allow_download": True`` in the spec (or ``build_recognizer(spec,
  allow_download=True)``), else :class:`~anonloader.errors.ModelLoadError` says where to put it.
  With ``weights=<path>`` a local state dict is loaded instead.

FaRL is not available offline and has no torch package here; it is left out (see the module
docstring of :mod:`anonloader.methods.iddiffuse`). The non-differentiable embedders of
``anonloader.identity.embedders`` (dlib, ONNX ArcFace) serve the keyed mapping and the
recognizer-space threshold, not E_I.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError, ModelLoadError
from anonloader.methods.iddiffuse.backbone import IResNet

__all__ = ["FACENET_CHECKPOINTS", "FaceNetRecognizer", "build_recognizer", "facenet_weights_path"]

#: facenet-pytorch's released checkpoints: pretrained name -> (file name, classes of its logits layer)
FACENET_CHECKPOINTS = {
    "vggface2": ("20180402-114759-vggface2.pt", 8631),
    "casia-webface": ("20180408-102900-casia-webface.pt", 10575),
}


def facenet_weights_path(pretrained: str) -> Path:
    """Where facenet-pytorch keeps (and looks for) the ``pretrained`` checkpoint:
    ``$TORCH_HOME/checkpoints/<file>`` (``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``,
    i.e. ``~/.cache/torch``), the same rule as facenet-pytorch's own loader."""
    if pretrained not in FACENET_CHECKPOINTS:
        raise ConfigError(f"unknown FaceNet pretrained weights {pretrained!r}; use one of {', '.join(FACENET_CHECKPOINTS)} or None")
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "checkpoints" / FACENET_CHECKPOINTS[pretrained][0]


class FaceNetRecognizer(nn.Module):
    """facenet-pytorch InceptionResnetV1 on ``B,3,S,S float in [0,1]`` crops -> ``B,512`` unit vectors.

    Crops are resized to 160 px (its training size) and normalised to ``(x*255 - 127.5) / 128``.

    Args:
        pretrained: None (random weights), ``"vggface2"`` or ``"casia-webface"``: read from
            :func:`facenet_weights_path`; a missing file is downloaded by facenet-pytorch only
            with ``allow_download=True``, else :class:`~anonloader.errors.ModelLoadError`.
        allow_download: let facenet-pytorch fetch a missing checkpoint (needs internet).
    """

    def __init__(self, pretrained: str | None = None, *, allow_download: bool = False) -> None:
        super().__init__()
        from facenet_pytorch import InceptionResnetV1

        self.pretrained = pretrained
        self.dim = 512
        if pretrained is None:
            self.net = InceptionResnetV1(pretrained=None, classify=False)
            return
        path = facenet_weights_path(pretrained)
        if not path.is_file():
            if not allow_download:
                raise ModelLoadError(
                    f"the FaceNet {pretrained!r} weights are not on this machine ({path}) and downloading is off: "
                    f"put facenet-pytorch's released file {path.name} there (or set TORCH_HOME), give a local "
                    "state dict with weights=<path>, or allow the download with allow_download=True"
                )
            self.net = InceptionResnetV1(pretrained=pretrained, classify=False)  # network-ok: allow_download checked above
            return
        self.net = InceptionResnetV1(pretrained=None, classify=False)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelLoadError(f"could not read the FaceNet {pretrained!r} weights {path}: {exc}; delete the file and fetch it again") from exc
        # the released checkpoints carry the training classifier (logits.*), unused for embeddings
        embedding_state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        try:
            self.net.load_state_dict(embedding_state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{path} does not hold InceptionResnetV1 {pretrained!r} weights: {exc}") from exc

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = nn.functional.interpolate(crops, size=(160, 160), mode="bilinear", align_corners=False)
        return self.net((x * 255.0 - 127.5) / 128.0), None

    def config(self) -> dict[str, Any]:
        return {"kind": "facenet", "pretrained": self.pretrained}


def build_recognizer(spec: dict[str, Any], *, allow_download: bool = False) -> nn.Module:
    """A recognizer module from its spec (see the module docstring); frozen, in eval mode.

    Every returned module maps ``B,3,S,S float in [0,1]`` to ``(B,D unit vectors, feature map
    or None)`` and has ``dim`` and ``config()``. ``allow_download`` (or ``"allow_download": True``
    in the spec) lets facenet-pytorch fetch missing released weights; nothing is fetched otherwise.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    weights = spec.pop("weights", None)
    allow_download = bool(spec.pop("allow_download", False)) or allow_download
    if kind == "iresnet":
        module: nn.Module = IResNet(**spec)
        if weights is not None:
            module.load_arcface_torch(weights)
    elif kind == "facenet":
        pretrained = spec.pop("pretrained", None)
        # a local state dict replaces the released weights, so they are neither read nor fetched
        module = FaceNetRecognizer(pretrained=None if weights is not None else pretrained, allow_download=allow_download)
        module.pretrained = pretrained
        if weights is not None:
            try:
                module.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            except (RuntimeError, OSError) as exc:
                raise ModelLoadError(f"could not load FaceNet weights from {weights}: {exc}") from exc
    else:
        raise ConfigError(f"unknown recognizer kind {kind!r}; use 'iresnet' or 'facenet'")
    module.eval().requires_grad_(False)
    return module
