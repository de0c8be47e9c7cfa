"""Triton kernel of :func:`anonloader.kernels.paste_back.paste_back` (imported lazily: this
module imports triton).

One launch per image that has faces; one program per ``BLOCK_Y x BLOCK_X`` tile of output
pixels reads the image tile once, composites every face of that image in order and writes the
tile once. Per pixel and face: the affine gives the crop position, the four bilinear taps are
loaded (zero outside the crop), colour-transformed (``clamp(c * scale + shift, 0, 1)``), weighted
by the analytic crop-space mask at each tap (premultiplied, exactly what the kornia reference
interpolates) and blended. Faces whose image-space bounding box misses the tile are skipped.
The per-face colour statistics (``F x 3`` numbers) come from the same torch helper as the
reference.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

__all__ = ["paste_back_triton"]


@triton.jit
def _tap(Crop, tx, ty, wgt, S, centre, inv_half, inv_feather, scale_r, scale_g, scale_b, shift_r, shift_g, shift_b,
         ELLIPSE: tl.constexpr, COLOR: tl.constexpr):
    """One bilinear tap: (weight * mask, weight * mask * colour per channel)."""
    inside = (tx >= 0) & (tx < S) & (ty >= 0) & (ty < S)
    u = (tx.to(tl.float32) - centre) * inv_half
    v = (ty.to(tl.float32) - centre) * inv_half
    if ELLIPSE:
        edge = 1.0 - tl.sqrt(u * u + v * v)
    else:
        edge = 1.0 - tl.maximum(tl.abs(u), tl.abs(v))
    m = tl.minimum(tl.maximum(edge * inv_feather, 0.0), 1.0)
    m = tl.where(inside, m, 0.0) * wgt
    offs = ty * S + tx
    plane = S * S
    r = tl.load(Crop + offs, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(Crop + plane + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(Crop + 2 * plane + offs, mask=inside, other=0.0).to(tl.float32)
    if COLOR:
        r = tl.minimum(tl.maximum(r * scale_r + shift_r, 0.0), 1.0)
        g = tl.minimum(tl.maximum(g * scale_g + shift_g, 0.0), 1.0)
        b = tl.minimum(tl.maximum(b * scale_b + shift_b, 0.0), 1.0)
    return m, m * r, m * g, m * b


@triton.jit
def _paste_back_kernel(
    Img, Out, Crops, Affines, Faces, Boxes, ColorCoef,
    n_faces, H, W, S,
    s_c, s_h, s_w,
    centre, inv_half, inv_feather,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, ELLIPSE: tl.constexpr, COLOR: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    x0 = pid_x * BLOCK_X
    y0 = pid_y * BLOCK_Y
    xs = x0 + tl.arange(0, BLOCK_X)
    ys = y0 + tl.arange(0, BLOCK_Y)
    valid = (ys[:, None] < H) & (xs[None, :] < W)
    pix = ys[:, None].to(tl.int64) * s_h + xs[None, :].to(tl.int64) * s_w
    red = tl.load(Img + pix, mask=valid, other=0.0).to(tl.float32)
    green = tl.load(Img + s_c + pix, mask=valid, other=0.0).to(tl.float32)
    blue = tl.load(Img + 2 * s_c + pix, mask=valid, other=0.0).to(tl.float32)
    xf = xs[None, :].to(tl.float32)
    yf = ys[:, None].to(tl.float32)
    for j in range(n_faces):
        f = tl.load(Faces + j).to(tl.int64)
        bx0 = tl.load(Boxes + 4 * j)
        by0 = tl.load(Boxes + 4 * j + 1)
        bx1 = tl.load(Boxes + 4 * j + 2)
        by1 = tl.load(Boxes + 4 * j + 3)
        if (x0 < bx1) & (x0 + BLOCK_X > bx0) & (y0 < by1) & (y0 + BLOCK_Y > by0):
            a00 = tl.load(Affines + 6 * f)
            a01 = tl.load(Affines + 6 * f + 1)
            a02 = tl.load(Affines + 6 * f + 2)
            a10 = tl.load(Affines + 6 * f + 3)
            a11 = tl.load(Affines + 6 * f + 4)
            a12 = tl.load(Affines + 6 * f + 5)
            scale_r = tl.load(ColorCoef + 6 * f)
            scale_g = tl.load(ColorCoef + 6 * f + 1)
            scale_b = tl.load(ColorCoef + 6 * f + 2)
            shift_r = tl.load(ColorCoef + 6 * f + 3)
            shift_g = tl.load(ColorCoef + 6 * f + 4)
            shift_b = tl.load(ColorCoef + 6 * f + 5)
            cx = a00 * xf + a01 * yf + a02
            cy = a10 * xf + a11 * yf + a12
            fx0 = tl.floor(cx)
            fy0 = tl.floor(cy)
            wx = cx - fx0
            wy = cy - fy0
            tx = fx0.to(tl.int32)
            ty = fy0.to(tl.int32)
            crop = Crops + f * 3 * S * S
            m00, r00, g00, b00 = _tap(crop, tx, ty, (1.0 - wx) * (1.0 - wy), S, centre, inv_half, inv_feather,
                                      scale_r, scale_g, scale_b, shift_r, shift_g, shift_b, ELLIPSE, COLOR)
            m01, r01, g01, b01 = _tap(crop, tx + 1, ty, wx * (1.0 - wy), S, centre, inv_half, inv_feather,
                                      scale_r, scale_g, scale_b, shift_r, shift_g, shift_b, ELLIPSE, COLOR)
            m10, r10, g10, b10 = _tap(crop, tx, ty + 1, (1.0 - wx) * wy, S, centre, inv_half, inv_feather,
                                      scale_r, scale_g, scale_b, shift_r, shift_g, shift_b, ELLIPSE, COLOR)
            m11, r11, g11, b11 = _tap(crop, tx + 1, ty + 1, wx * wy, S, centre, inv_half, inv_feather,
                                      scale_r, scale_g, scale_b, shift_r, shift_g, shift_b, ELLIPSE, COLOR)
            alpha = m00 + m01 + m10 + m11
            red = red * (1.0 - alpha) + (r00 + r01 + r10 + r11)
            green = green * (1.0 - alpha) + (g00 + g01 + g10 + g11)
            blue = blue * (1.0 - alpha) + (b00 + b01 + b10 + b11)
    out_pix = ys[:, None].to(tl.int64) * W + xs[None, :].to(tl.int64)
    tl.store(Out + out_pix, red, mask=valid)
    tl.store(Out + (out_pix + H * W), green, mask=valid)
    tl.store(Out + (out_pix + 2 * H * W), blue, mask=valid)


def _image_boxes(affines: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """``N,4 int32`` image-space boxes ``x0, y0, x1, y1`` (end exclusive) that contain every pixel
    whose crop position lies within one pixel of the crop."""
    rotation, translation = affines[:, :, :2].double(), affines[:, :, 2:].double()
    inverse = torch.linalg.inv(rotation)
    corners = torch.tensor([[-1.0, -1.0], [size, -1.0], [-1.0, size], [size, size]], dtype=torch.float64, device=affines.device)
    points = (inverse @ (corners.T.unsqueeze(0) - translation))  # N,2,4
    low = points.amin(dim=2).floor() - 1
    high = points.amax(dim=2).ceil() + 2
    boxes = torch.cat([low, high], dim=1)
    limits = torch.tensor([width, height, width, height], dtype=torch.float64, device=affines.device)
    return boxes.clamp(min=torch.zeros_like(limits), max=limits).to(torch.int32)


def paste_back_triton(
    images: list[torch.Tensor],
    crops: torch.Tensor,
    affines: torch.Tensor,
    image_index: torch.Tensor,
    *,
    feather: float,
    color_match: bool,
    mask: str,
) -> list[torch.Tensor]:
    """See :func:`anonloader.kernels.paste_back.paste_back` (inputs already validated)."""
    from .paste_back import color_transfer, crop_mask

    device = crops.device
    crops = crops.float().contiguous()
    affines = affines.float().to(device).contiguous()
    image_index = image_index.to(device)
    size = crops.shape[-1]
    if color_match and len(crops):
        scale, shift = color_transfer(images, crops, affines, image_index, crop_mask(size, feather, mask, device=device))
        coef = torch.cat([scale, shift], dim=1).float().contiguous()
    else:
        coef = torch.zeros(len(crops), 6, device=device)
    half = max((size - 1) / 2, 0.5)
    block_y, block_x, warps = (8, 64, 4) if device.type == "cuda" else (16, 32, 1)
    outputs = []
    for i, image in enumerate(images):
        faces = (image_index == i).nonzero().squeeze(1)
        if len(faces) == 0:
            outputs.append(image.clone())
            continue
        h, w = image.shape[-2:]
        src = image.to(device)
        out = torch.empty(3, h, w, device=device, dtype=torch.float32)
        boxes = _image_boxes(affines[faces], size, h, w).contiguous()
        grid = (triton.cdiv(w, block_x), triton.cdiv(h, block_y))
        _paste_back_kernel[grid](
            src, out, crops, affines, faces.to(torch.int32).contiguous(), boxes, coef,
            len(faces), h, w, size, *src.stride(),
            (size - 1) / 2, 1.0 / half, 1.0 / max(feather, 1e-6),
            BLOCK_Y=block_y, BLOCK_X=block_x, ELLIPSE=mask == "ellipse", COLOR=bool(color_match),
            num_warps=warps,
        )
        outputs.append(out.to(image.dtype))
    return outputs


