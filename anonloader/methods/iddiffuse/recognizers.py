"""The frozen, differentiable recognizers whose concatenated embeddings feed E_I.

The paper concatenates ArcFace, FaRL and FaceNet (3 x 512-d). Eq. 7 needs gradients of E_I with
respect to the predicted image, so every recognizer inside E_I is a torch module here:

- ``{"kind": "iresnet", ...IResNet args}``: ArcFace IResNet (:mod:`.backbone`), weights from an
  insightface ``arcface_torch`` checkpoint (``weights=<path>``) or from an IDDiffuse checkpoint.
- ``{"kind": "facenet", "pretrained": None | "vggface2" | "casia-webface"}``: facenet-pytorch's
  InceptionResnetV1 (512-d). facenet-pytorch downloads its weights when ``pretrained`` is set;
  with ``weights=<path>`` a local state dict is loaded instead.

FaRL is not available offline and has no torch package here; it is left out (see the module
docstring of :mod:`anonloader.methods.iddiffuse`). The non-differentiable embedders of
``anonloader.identity.embedders`` (dlib, ONNX ArcFace) serve the keyed mapping and the
recognizer-space threshold, not E_I.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anonloader.errors import ConfigError, ModelLoadError
from anonloader.methods.iddiffuse.backbone import IResNet

__all__ = ["FaceNetRecognizer", "build_recognizer"]


class FaceNetRecognizer(nn.Module):
    """facenet-pytorch InceptionResnetV1 on ``B,3,S,S float in [0,1]`` crops -> ``B,512`` unit vectors.

    Crops are resized to 160 px (its training size) and normalised to ``(x*255 - 127.5) / 128``.
    """

    def __init__(self, pretrained: str | None = None) -> None:
        super().__init__()
        from facenet_pytorch import InceptionResnetV1

        self.pretrained = pretrained
        self.net = InceptionResnetV1(pretrained=pretrained, classify=False)
        self.dim = 512

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = nn.functional.interpolate(crops, size=(160, 160), mode="bilinear", align_corners=False)
        return self.net((x * 255.0 - 127.5) / 128.0), None

    def config(self) -> dict[str, Any]:
        return {"kind": "facenet", "pretrained": self.pretrained}


def build_recognizer(spec: dict[str, Any]) -> nn.Module:
    """A recognizer module from its spec (see the module docstring); frozen, in eval mode.

    Every returned module maps ``B,3,S,S float in [0,1]`` to ``(B,D unit vectors, feature map
    or None)`` and has ``dim`` and ``config()``.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    weights = spec.pop("weights", None)
    if kind == "iresnet":
        module: nn.Module = IResNet(**spec)
        if weights is not None:
            module.load_arcface_torch(weights)
    elif kind == "facenet":
        module = FaceNetRecognizer(pretrained=spec.pop("pretrained", None))
        if weights is not None:
            try:
                module.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            except (RuntimeError, OSError) as exc:
                raise ModelLoadError(f"could not load FaceNet weights from {weights}: {exc}") from exc
    else:
        raise ConfigError(f"unknown recognizer kind {kind!r}; use 'iresnet' or 'facenet'")
    module.eval().requires_grad_(False)
    return module
