"""Similarity alignment of faces to canonical crops, from 5 landmarks.

Templates are the 5 landmark positions (left eye, right eye, nose, left mouth corner, right
mouth corner) in normalised crop coordinates (x, y in [0,1] of the crop side):

- ``"arcface"``: the 112x112 layout recognition models are trained on (InsightFace's
  template divided by 112), tight around the inner face;
- ``"ffhq"``: a face-centred, looser layout like FFHQ-aligned images, for 256/512 generative
  models that want hair, chin and some background.

``margin`` adds context: the template shrinks towards the crop centre by ``1 / (1 + margin)``,
so ``margin=0.5`` shows 50 % more around the face.

Convention: an ``affine`` is ``2,3`` in pixel units and maps image pixel coordinates
``(x, y, 1)`` to crop pixel coordinates (pixel centres at integer coordinates).
"""

from __future__ import annotations

import torch

from anonloader.errors import AlignmentError, ConfigError
from anonloader.types import AlignedFaces, Detections

__all__ = ["TEMPLATES", "align_faces", "estimate_affine", "template_points"]

TEMPLATES: dict[str, tuple[tuple[float, float], ...]] = {
    "arcface": (
        (38.2946 / 112, 51.6963 / 112),
        (73.5318 / 112, 51.5014 / 112),
        (56.0252 / 112, 71.7366 / 112),
        (41.5493 / 112, 92.3655 / 112),
        (70.7299 / 112, 92.2041 / 112),
    ),
    "ffhq": (
        (0.3785, 0.4640),
        (0.6215, 0.4640),
        (0.5000, 0.5840),
        (0.4030, 0.6930),
        (0.5970, 0.6930),
    ),
}


def template_points(crop_size: int, template: str = "arcface", margin: float = 0.0) -> torch.Tensor:
    """The template's 5 points in crop pixels, ``5,2 float32``.

    Args:
        crop_size: side of the square crop in pixels (112, 256, 512, ...).
        template: a key of :data:`TEMPLATES`.
        margin: extra context as a fraction of the template's extent, ``>= 0``.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"unknown alignment template {template!r}; choose one of {sorted(TEMPLATES)}")
    if crop_size < 8:
        raise ConfigError(f"crop_size must be at least 8 pixels, got {crop_size}")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    unit = torch.tensor(TEMPLATES[template], dtype=torch.float32)
    unit = 0.5 + (unit - 0.5) / (1.0 + margin)
    # Pixel centres sit at integer coordinates: the crop spans [-0.5, S - 0.5].
    return unit * crop_size - 0.5


def estimate_affine(
    landmarks: torch.Tensor, crop_size: int, template: str = "arcface", margin: float = 0.0
) -> torch.Tensor:
    """Least-squares similarity transforms (rotation, uniform scale, translation) from landmarks
    to the template.

    Args:
        landmarks: ``N,5,2 float`` in image pixels.
        crop_size, template, margin: see :func:`template_points`.

    Returns:
        ``N,2,3 float32`` affines mapping image pixels to crop pixels.

    Treating points as complex numbers ``z``, the best similarity ``z -> a z + t`` has the
    closed form ``a = sum(conj(p) q) / sum(|p|^2)`` on centred points (Umeyama without
    reflection), which batches without an SVD.
    """
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
        raise AlignmentError(f"landmarks must be N,5,2, got {tuple(landmarks.shape)}")
    src = landmarks.to(torch.float64)
    dst = template_points(crop_size, template, margin).to(torch.float64, copy=True)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=0, keepdim=True)
    p = torch.view_as_complex((src - src_mean).contiguous())
    q = torch.view_as_complex((dst - dst_mean).contiguous()).expand_as(p)
    power = (p.abs() ** 2).sum(dim=1)
    if bool((power <= 1e-12).any()):
        raise AlignmentError("landmarks collapse to a single point; cannot estimate the face's scale")
    a = (p.conj() * q).sum(dim=1) / power
    rotation = torch.stack(
        [torch.stack([a.real, -a.imag], -1), torch.stack([a.imag, a.real], -1)], dim=1
    )  # N,2,2
    translation = dst_mean.squeeze(0) - (rotation @ src_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([rotation, translation.unsqueeze(-1)], dim=2).to(torch.float32)


def align_faces(
    images: list[torch.Tensor],
    detections: list[Detections],
    *,
    crop_size: int = 112,
    template: str = "arcface",
    margin: float = 0.0,
    padding_mode: str = "reflection",
) -> AlignedFaces:
    """Warps every detected face of a batch of images to a canonical square crop.

    Args:
        images: list of ``3,H,W float in [0,1]`` tensors; sizes may differ.
        detections: one :class:`Detections` per image (landmarks in that image's pixels).
        crop_size, template, margin: see :func:`template_points`.
        padding_mode: how the crop is filled where it leaves the image (kornia's modes).

    Returns:
        :class:`AlignedFaces` with ``F,3,S,S`` crops, ``F,2,3`` affines and ``F`` image indices,
        faces in image order then detection order.

    Example:
        >>> import torch
        >>> from anonloader.types import Detections
        >>> lm = template_points(112).unsqueeze(0) * 2
        >>> faces = align_faces([torch.rand(3, 240, 240)], [Detections(torch.zeros(1, 4), lm, torch.ones(1))])
        >>> tuple(faces.crops.shape)
        (1, 3, 112, 112)
    """
    from kornia.geometry.transform import warp_affine

    if len(images) != len(detections):
        raise AlignmentError(f"got {len(images)} images but {len(detections)} detection lists")
    crops, affines, index = [], [], []
    for i, (image, faces) in enumerate(zip(images, detections, strict=True)):
        if len(faces) == 0:
            continue
        affine = estimate_affine(faces.landmarks, crop_size, template, margin).to(image.device)
        batch = image.unsqueeze(0).expand(len(faces), -1, -1, -1)
        crops.append(
            warp_affine(batch, affine, (crop_size, crop_size), mode="bilinear", padding_mode=padding_mode, align_corners=True)
        )
        affines.append(affine)
        index.append(torch.full((len(faces),), i, dtype=torch.int64))
    if not crops:
        device = images[0].device if images else torch.device("cpu")
        return AlignedFaces(
            torch.zeros(0, 3, crop_size, crop_size, device=device),
            torch.zeros(0, 2, 3, device=device),
            torch.zeros(0, dtype=torch.int64),
        )
    return AlignedFaces(torch.cat(crops).clamp_(0, 1), torch.cat(affines), torch.cat(index))
