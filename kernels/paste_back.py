"""Paste generated face crops back into their images.

For every face: sample the generated crop at each image pixel through the face's affine (image
pixels -> crop pixels, pixel centres at integer coordinates, like ``align_faces``), weight it
with a feathered mask defined in crop space and warped along, optionally match its per-channel
colour statistics to the original face region, and blend it over the image. Colour and mask
are interpolated premultiplied (``rgb * mask`` and ``mask``), so the zero padding outside the
crop never darkens the edge. Faces of one image
are composited in their order in the batch.

Mask (crop space, ``S,S``), with ``u, v`` the pixel position relative to the crop centre in
units of ``(S - 1) / 2`` (so the outermost pixel centres lie at ``|u| = 1`` or ``|v| = 1``):

- ``"ellipse"``: ``clamp((1 - sqrt(u^2 + v^2)) / feather, 0, 1)``, the inscribed disc faded
  over the outer ``feather`` fraction of its radius;
- ``"border"``: ``clamp((1 - max(|u|, |v|)) / feather, 0, 1)``, the whole crop faded over a
  border ``feather`` of the half side wide.

Colour matching: per face and channel, the mask-weighted mean and standard deviation of the
generated crop are mapped onto those of the original face region (the original image aligned
into crop space with the same affine), ``crop' = clamp((crop - mu_gen) * std_orig / std_gen +
mu_orig, 0, 1)``.

Dispatch: :func:`paste_back` runs the Triton kernel (one pass per output pixel: affine to crop
coordinates, bilinear sample, mask, colour transform, blend, every face of the image in one
launch) for CUDA tensors, or with ``backend="triton"`` under ``TRITON_INTERPRET=1``;
:func:`paste_back_reference` (kornia ``warp_affine``) otherwise.
"""

from __future__ import annotations

import os

import torch

__all__ = ["crop_mask", "paste_back", "paste_back_reference"]

MASKS = ("ellipse", "border")
_STD_FLOOR = 1e-3  # a flat generated crop is shifted to the original mean, not blown up


def _check_inputs(
    images: list[torch.Tensor], crops: torch.Tensor, affines: torch.Tensor, image_index: torch.Tensor, feather: float, mask: str
) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if not feather >= 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must be F,3,S,S, got {tuple(crops.shape)}")
    n = crops.shape[0]
    if affines.shape != (n, 2, 3) or image_index.shape != (n,):
        raise ValueError(
            f"affines must be F,2,3 and image_index F for F={n} crops, got {tuple(affines.shape)} and {tuple(image_index.shape)}"
        )
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i} must be 3,H,W, got {tuple(image.shape)}")
    if n and (int(image_index.min()) < 0 or int(image_index.max()) >= len(images)):
        raise ValueError(f"image_index must lie in [0, {len(images)}), got values in [{int(image_index.min())}, {int(image_index.max())}]")


def crop_mask(size: int, feather: float = 0.1, mask: str = "ellipse", *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The blending mask in crop space, ``size,size float32 in [0,1]`` (see the module doc)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    half = max((size - 1) / 2, 0.5)
    coords = (torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2) / half
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    if mask == "ellipse":
        inside = 1 - torch.sqrt(u * u + v * v)
    else:
        inside = 1 - torch.maximum(u.abs(), v.abs())
    return (inside / max(feather, 1e-6)).clamp(0, 1)


def color_transfer(
    images: list[torch.Tensor], crops: torch.Tensor, affines: torch.Tensor, image_index: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per face and channel ``scale, shift`` (each ``F,3``) such that ``crop * scale + shift`` has
    the mask-weighted mean/std of the original face region.

    Args:
        images: list of ``3,H,W float in [0,1]``.
        crops: ``F,3,S,S float in [0,1]`` generated crops.
        affines: ``F,2,3`` image pixels -> crop pixels.
        image_index: ``F int64``.
        weights: ``S,S float in [0,1]`` the crop-space mask.
    """
    from kornia.geometry.transform import warp_affine

    size = crops.shape[-1]
    originals = torch.empty_like(crops)
    for i in image_index.unique().tolist():
        sel = (image_index == i).nonzero().squeeze(1)
        image = images[i].to(crops.dtype).unsqueeze(0).expand(len(sel), -1, -1, -1)
        originals[sel] = warp_affine(image, affines[sel].to(crops.dtype), (size, size), mode="bilinear", padding_mode="reflection", align_corners=True)
    w = weights / weights.sum().clamp_min(1e-12)

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (x * w).sum(dim=(-2, -1))
        var = ((x - mean[..., None, None]) ** 2 * w).sum(dim=(-2, -1))
        return mean, var.sqrt()

    mean_orig, std_orig = stats(originals)
    mean_gen, std_gen = stats(crops)
    scale = std_orig / std_gen.clamp_min(_STD_FLOOR)
    return scale, mean_orig - mean_gen * scale


def paste_back_reference(
    images: list[torch.Tensor],
    crops: torch.Tensor,
    affines: torch.Tensor,
    image_index: torch.Tensor,
    *,
    feather: float = 0.1,
    color_match: bool = True,
    mask: str = "ellipse",
) -> list[torch.Tensor]:
    """Pastes crops back with kornia's ``warp_affine`` (see the module doc for the semantics).

    Args:
        images: list of ``3,H,W float in [0,1]``; sizes may differ. Not modified.
        crops: ``F,3,S,S float in [0,1]``, one generated crop per face.
        affines: ``F,2,3 float``, image pixels -> crop pixels (as from ``align_faces``).
        image_index: ``F int64``, the image each face belongs to.
        feather: width of the mask's fade, a fraction of the half crop side (0 = hard edge).
        color_match: match each crop's per-channel mean/std to the original face region.
        mask: ``"ellipse"`` or ``"border"``.

    Returns:
        A new list of ``3,H,W`` tensors, one per image (images without faces are copies).
    """
    from kornia.geometry.transform import warp_affine
    from kornia.geometry.transform.imgwarp import invert_affine_transform

    _check_inputs(images, crops, affines, image_index, feather, mask)
    crops = crops.float()
    affines = affines.float().to(crops.device)
    image_index = image_index.to(crops.device)
    size = crops.shape[-1]
    weights = crop_mask(size, feather, mask, device=crops.device)
    if color_match and len(crops):
        scale, shift = color_transfer(images, crops, affines, image_index, weights)
        crops = (crops * scale[..., None, None] + shift[..., None, None]).clamp(0, 1)
    outputs = []
    for i, image in enumerate(images):
        out = image.clone()
        faces = (image_index == i).nonzero().squeeze(1).tolist()
        if not faces:
            outputs.append(out)
            continue
        h, w = image.shape[-2:]
        sel = torch.tensor(faces, device=crops.device)
        alpha = weights.expand(len(faces), 1, size, size)
        rgba = torch.cat([crops[sel] * alpha, alpha], dim=1)  # premultiplied
        inverse = invert_affine_transform(affines[sel])
        warped = warp_affine(rgba, inverse, (h, w), mode="bilinear", padding_mode="zeros", align_corners=True)
        blended = out.float()
        for j in range(len(faces)):
            alpha = warped[j, 3:]
            blended = blended * (1 - alpha) + warped[j, :3]
        outputs.append(blended.to(image.dtype))
    return outputs


def _use_triton(device: torch.device, backend: str | None) -> bool:
    if backend is None or backend == "auto":
        return device.type == "cuda"
    if backend == "reference":
        return False
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment to run "
                "Triton's CPU interpreter; pass backend=None to use the kornia reference"
            )
        return True
    raise ValueError(f"backend must be None, 'auto', 'triton' or 'reference', got {backend!r}")


def paste_back(
    images: list[torch.Tensor],
    crops: torch.Tensor,
    affines: torch.Tensor,
    image_index: torch.Tensor,
    *,
    feather: float = 0.1,
    color_match: bool = True,
    mask: str = "ellipse",
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Pastes generated crops back into their images; arguments as :func:`paste_back_reference`.

    Args:
        backend: ``None``/``"auto"`` (Triton for CUDA crops, the reference otherwise),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"reference"``.

    Returns:
        A new list of ``3,H,W`` tensors; the inputs are not modified.
    """
    if not _use_triton(crops.device, backend):
        return paste_back_reference(images, crops, affines, image_index, feather=feather, color_match=color_match, mask=mask)
    _check_inputs(images, crops, affines, image_index, feather, mask)
    from ._triton_paste_back import paste_back_triton

    return paste_back_triton(images, crops, affines, image_index, feather=feather, color_match=color_match, mask=mask)
