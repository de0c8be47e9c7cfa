"""Recall passes around any detector: large images, small faces, low light, rotation.

:class:`DetectorStage` wraps a :class:`~anonloader.detect.base.Detector` and runs it on extra
*views* of each image, then maps every view's boxes and landmarks back to the image's pixels
and merges them with non-maximum suppression. The views only feed the detector; the image the
pipeline anonymizes is never changed.

- **large images**: an image whose longer side exceeds ``max_side`` is detected on a
  downscaled copy; one at least ``tile_zoom`` times ``max_side`` also in overlapping tiles at
  ``tile_zoom`` times the copy's scale, so faces too small for the copy are still found. Time
  and memory are bounded by ``max_side``: no full-resolution copy of the image is made.
- **coarse level** (``coarse_side``): a second, smaller copy of images longer than
  ``coarse_side``; heavy JPEG, blur or noise ruin faces at full detail that the detector still
  finds at a coarser scale (a two-level pyramid).
- **small faces** (``upscale``): images whose longer side is below ``upscale_below`` are also
  detected at ``upscale_factor`` times their size.
- **low light / low contrast** (``low_light``): an equalised copy (percentile stretch of the
  luminance, then a gamma that brings the mean to mid-grey) is detected as well.
- **rotation** (``rotation``): copies rotated by ``angles`` degrees (on an expanded canvas, so
  no corner is cut) are detected; ``"fallback"`` does so only for images where the other passes
  found nothing or found a face turned by more than ``roll_above`` degrees (its eye line, from
  the landmarks: a sideways or upside-down photo, where the upright pass tends to miss some of
  the faces), ``"always"`` for every image.

Each pass is ``"auto"`` (only where the image needs it, as described), ``"always"`` or
``"off"``; rotation takes ``"fallback"``, ``"always"`` or ``"off"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from anonloader.detect.base import Detector
from anonloader.detect.centerface import batched_nms
from anonloader.detect.image_checks import check_images, empty_detections
from anonloader.errors import ConfigError
from anonloader.types import Detections

__all__ = ["DetectorStage", "EnsembleDetector", "equalize_for_detection", "merge_detections"]

#: views (downscaled copies, tiles, rotated or equalised copies) per detector call: batches
#: stay large enough to amortise a call while the activations of a huge image's tiles stay bounded
VIEWS_PER_CALL = 4

PassMode = Literal["auto", "always", "off"]
RotationMode = Literal["fallback", "always", "off"]


def merge_detections(parts: list[Detections], iou: float, device: torch.device | str = "cpu") -> Detections:
    """One face per location: the union of ``parts`` after NMS at ``iou``, by descending score.

    Args:
        parts: detections of one image in that image's pixels (boxes ``N,4``, landmarks
            ``N,5,2``, scores ``N``).
        iou: the lower-scoring of two boxes overlapping by more than this IoU is dropped.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_detections(device)
    boxes = torch.cat([p.boxes.float().cpu() for p in parts])
    landmarks = torch.cat([p.landmarks.float().cpu() for p in parts])
    scores = torch.cat([p.scores.float().cpu() for p in parts])
    keep = batched_nms(boxes, scores, iou)
    return Detections(boxes[keep].to(device), landmarks[keep].to(device), scores[keep].to(device))


def equalize_for_detection(image: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """A brightened, contrast-stretched copy of ``image`` for the detector only.

    The luminance's ``low`` and ``high`` quantiles are stretched to 0 and 1 (the same gain on
    every channel, so hues stay), then a gamma maps the mean luminance to 0.5.

    Args:
        image: ``3,H,W float in [0,1]`` RGB.

    Returns:
        ``3,H,W float in [0,1]``.
    """
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    flat = luma.flatten()
    if flat.numel() > 65536:  # quantiles of a strided subsample: same answer, bounded cost
        flat = flat[:: flat.numel() // 65536]
    lo, hi = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype)).tolist()
    span = max(hi - lo, 1.0 / 255.0)
    stretched = ((image - lo) / span).clamp(0.0, 1.0)
    mean = float((0.299 * stretched[0] + 0.587 * stretched[1] + 0.114 * stretched[2]).mean())
    mean = min(max(mean, 1e-3), 1 - 1e-3)
    gamma = math.log(0.5) / math.log(mean)
    return stretched.pow(gamma)


def _luma_stats(image: torch.Tensor) -> tuple[float, float]:
    """Mean luminance and the spread between its 1st and 99th percentile (``image`` 3,H,W)."""
    small = image
    if image.shape[-1] * image.shape[-2] > 256 * 256:
        small = F.interpolate(image[None], size=(128, 128), mode="area")[0]
    luma = (0.299 * small[0] + 0.587 * small[1] + 0.114 * small[2]).flatten()
    lo, hi = torch.quantile(luma, torch.tensor([0.01, 0.99], dtype=luma.dtype)).tolist()
    return float(luma.mean()), hi - lo


def _rotate(image: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` rotated counter-clockwise (as displayed) on an expanded canvas.

    Returns the rotated ``3,H',W'`` image and the ``2,3`` affine mapping its pixels back to the
    input's pixels.
    """
    _, height, width = image.shape
    quarter = round(degrees / 90.0)
    if abs(degrees - 90.0 * quarter) < 1e-9:  # exact quarter turns: no resampling
        k = quarter % 4
        rotated = torch.rot90(image, k, dims=(1, 2))
    else:
        theta = math.radians(degrees)
        cos, sin = math.cos(theta), math.sin(theta)
        new_w = math.ceil(abs(width * cos) + abs(height * sin))
        new_h = math.ceil(abs(width * sin) + abs(height * cos))
        # sampling grid: output pixel (u, v) -> input pixel, both about their centres
        # (image y points down, so a counter-clockwise turn as displayed is this matrix)
        ys, xs = torch.meshgrid(
            torch.arange(new_h, dtype=torch.float32) - (new_h - 1) / 2,
            torch.arange(new_w, dtype=torch.float32) - (new_w - 1) / 2,
            indexing="ij",
        )
        src_x = cos * xs - sin * ys + (width - 1) / 2
        src_y = sin * xs + cos * ys + (height - 1) / 2
        grid = torch.stack([src_x / max(width - 1, 1) * 2 - 1, src_y / max(height - 1, 1) * 2 - 1], dim=-1)
        rotated = F.grid_sample(image[None].float(), grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        back = torch.tensor(
            [
                [cos, -sin, (width - 1) / 2 - cos * (new_w - 1) / 2 + sin * (new_h - 1) / 2],
                [sin, cos, (height - 1) / 2 - sin * (new_w - 1) / 2 - cos * (new_h - 1) / 2],
            ]
        )
        return rotated, back
    # quarter turns: derive the inverse map from the same formula on integer pixel centres
    theta = math.radians(90.0 * k)
    cos, sin = round(math.cos(theta)), round(math.sin(theta))
    new_h, new_w = rotated.shape[-2:]
    back = torch.tensor(
        [
            [cos, -sin, (width - 1) / 2 - cos * (new_w - 1) / 2 + sin * (new_h - 1) / 2],
            [sin, cos, (height - 1) / 2 - sin * (new_w - 1) / 2 - cos * (new_h - 1) / 2],
        ],
        dtype=torch.float32,
    )
    return rotated, back


@dataclass
class _View:
    """One detector input made from image ``index``; ``back`` maps its pixels to the image's."""

    index: int
    image: torch.Tensor
    back: torch.Tensor  # 2,3
    rotated: float = 0.0


def _resized(image: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return image
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]


def _scale_back(scale_x: float, scale_y: float, dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    return torch.tensor([[scale_x, 0.0, dx], [0.0, scale_y, dy]])


def _compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The ``2,3`` affine of ``outer`` after ``inner`` (apply ``inner`` first)."""
    row = torch.tensor([[0.0, 0.0, 1.0]])
    return (torch.cat([outer.float(), row]) @ torch.cat([inner.float(), row]))[:2]


def _map_back(found: Detections, view: _View) -> Detections:
    """The view's detections in the pixels of the image it came from."""
    if len(found) == 0:
        return empty_detections("cpu")
    back = view.back.float()
    linear, shift = back[:, :2], back[:, 2]
    boxes = found.boxes.float().cpu()
    landmarks = found.landmarks.float().cpu() @ linear.T + shift
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2) @ linear.T + shift
    size = (boxes[:, 2:] - boxes[:, :2]) * torch.tensor([linear[0].norm(), linear[1].norm()])
    if 45.0 < abs(view.rotated) % 180.0 <= 135.0:  # the box's sides swap under a quarter turn
        size = size.flip(1)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    return Detections(boxes, landmarks, found.scores.float().cpu())


class DetectorStage:
    """A detector plus recall passes (see the module docstring), batch-first.

    Args:
        detector: the detector every pass runs (any :class:`Detector`).
        max_side: images with a longer side above this are detected on a downscaled copy
            (``None``: always at native size).
        tile_zoom: images at least ``tile_zoom`` times ``max_side`` are also detected in
            overlapping tiles at ``tile_zoom`` times the downscaled copy's scale (>= 1; 1 turns
            tiles off).
        coarse_side: images longer than this are also detected on a copy at most this long (a
            coarser level of the scale pyramid: faces that compression, blur or noise ruin at
            full detail are often found smaller; ``None``: no coarse level).
        upscale: the small-face pass mode.
        upscale_below: images whose longer side is below this many pixels need the upscaled
            pass in ``"auto"`` mode.
        upscale_factor: the upscaled pass's zoom (> 1).
        low_light: the equalised-copy pass mode; ``"auto"`` runs it on images whose mean
            luminance is below ``dark_below`` or whose 1-99 % luminance spread is below
            ``flat_below``.
        rotation: the rotated-copies pass mode.
        roll_above: in ``"fallback"`` mode, a face whose eye line is turned by more than this
            many degrees triggers the rotated pass for its image, with the one angle of
            ``angles`` that turns it closest to upright (every angle when nothing was found).
        rotate_max_side: the rotated copies are made from a copy at most this long (faces in a
            sideways photo are rarely tiny; ``None``: the upright view's size).
        angles: rotations in degrees (counter-clockwise as displayed) of the rotated pass.
        nms_iou: IoU above which two passes' boxes are one face.
    """

    name = "stage"

    def __init__(
        self,
        detector: Detector,
        *,
        max_side: int | None = 1280,
        tile_zoom: float = 2.0,
        coarse_side: int | None = None,
        upscale: PassMode = "auto",
        upscale_below: int = 480,
        upscale_factor: float = 2.0,
        low_light: PassMode = "auto",
        dark_below: float = 0.25,
        flat_below: float = 0.35,
        rotation: RotationMode = "fallback",
        roll_above: float = 45.0,
        rotate_max_side: int | None = 640,
        angles: tuple[float, ...] = (-90.0, 90.0, 180.0),
        nms_iou: float = 0.3,
    ) -> None:
        if not isinstance(detector, Detector):
            raise ConfigError(f"DetectorStage wraps a Detector (name, __call__, config), got {type(detector).__name__}")
        for label, value, allowed in (
            ("upscale", upscale, ("auto", "always", "off")),
            ("low_light", low_light, ("auto", "always", "off")),
            ("rotation", rotation, ("fallback", "always", "off")),
        ):
            if value not in allowed:
                raise ConfigError(f"DetectorStage: {label} must be one of {', '.join(allowed)}, got {value!r}")
        if max_side is not None and int(max_side) < 64:
            raise ConfigError(f"DetectorStage: max_side must be None or >= 64 pixels, got {max_side!r}")
        if coarse_side is not None and int(coarse_side) < 64:
            raise ConfigError(f"DetectorStage: coarse_side must be None or >= 64 pixels, got {coarse_side!r}")
        if float(tile_zoom) < 1.0:
            raise ConfigError(f"DetectorStage: tile_zoom must be >= 1 (1 turns tiles off), got {tile_zoom!r}")
        if float(upscale_factor) <= 1.0:
            raise ConfigError(f"DetectorStage: upscale_factor must be > 1, got {upscale_factor!r}")
        if not 0.0 < float(nms_iou) <= 1.0:
            raise ConfigError(f"DetectorStage: nms_iou must be in (0,1], got {nms_iou!r}")
        self.detector = detector
        self.max_side = None if max_side is None else int(max_side)
        self.tile_zoom = float(tile_zoom)
        self.coarse_side = None if coarse_side is None else int(coarse_side)
        self.upscale: PassMode = upscale
        self.upscale_below = int(upscale_below)
        self.upscale_factor = float(upscale_factor)
        self.low_light: PassMode = low_light
        self.dark_below = float(dark_below)
        self.flat_below = float(flat_below)
        self.rotation: RotationMode = rotation
        self.roll_above = float(roll_above)
        self.rotate_max_side = None if rotate_max_side is None else int(rotate_max_side)
        self.angles = tuple(float(a) for a in angles)
        self.nms_iou = float(nms_iou)

    def __repr__(self) -> str:
        return f"DetectorStage({self.detector!r}, {self._settings()})"

    def _settings(self) -> dict[str, Any]:
        return {
            "max_side": self.max_side,
            "tile_zoom": self.tile_zoom,
            "coarse_side": self.coarse_side,
            "upscale": self.upscale,
            "upscale_below": self.upscale_below,
            "upscale_factor": self.upscale_factor,
            "low_light": self.low_light,
            "dark_below": self.dark_below,
            "flat_below": self.flat_below,
            "rotation": self.rotation,
            "roll_above": self.roll_above,
            "rotate_max_side": self.rotate_max_side,
            "angles": list(self.angles),
            "nms_iou": self.nms_iou,
        }

    def config(self) -> dict[str, Any]:
        """The wrapped detector's config plus every pass setting."""
        return {"backend": self.name, "detector": {"name": self.detector.name, **self.detector.config()}, **self._settings()}

    # -- views ------------------------------------------------------------------------------
    def _base_views(self, index: int, image: torch.Tensor) -> list[_View]:
        height, width = image.shape[-2:]
        longer = max(height, width)
        views: list[_View] = []
        if self.max_side is not None and longer > self.max_side:
            scale = self.max_side / longer
            small = _resized(image, scale)
            views.append(_View(index, small, _scale_back(width / small.shape[-1], height / small.shape[-2])))
            zoom = scale * self.tile_zoom
            if self.tile_zoom > 1.0 and zoom <= 1.0:  # only images at least tile_zoom x max_side
                views.extend(self._tiles(index, image, zoom))
        else:
            views.append(_View(index, image, _scale_back(1.0, 1.0)))
            if self.upscale == "always" or (self.upscale == "auto" and longer < self.upscale_below):
                big = _resized(image, self.upscale_factor)
                views.append(_View(index, big, _scale_back(width / big.shape[-1], height / big.shape[-2])))
        detail = min(longer, self.max_side or longer)  # the longer side of the main view
        if self.coarse_side is not None and detail > self.coarse_side:
            scale = self.coarse_side / longer
            coarse = _resized(image, scale)
            views.append(_View(index, coarse, _scale_back(width / coarse.shape[-1], height / coarse.shape[-2])))
        if self.low_light == "always" or (self.low_light == "auto" and self._needs_light(views[0].image)):
            first = views[0]
            views.append(_View(index, equalize_for_detection(first.image), first.back))
        return views

    def _tiles(self, index: int, image: torch.Tensor, zoom: float) -> list[_View]:
        """Overlapping tiles of ``image`` at ``zoom``, each at most ``max_side`` after zooming."""
        assert self.max_side is not None
        height, width = image.shape[-2:]
        side = int(self.max_side / zoom)  # tile side in image pixels
        overlap = side // 4
        step = max(1, side - overlap)

        def starts(length: int) -> list[int]:
            if length <= side:
                return [0]
            count = math.ceil((length - side) / step) + 1
            return [round(i * (length - side) / (count - 1)) for i in range(count)]

        views = []
        for top in starts(height):
            for left in starts(width):
                crop = image[:, top : top + side, left : left + side]
                tile = _resized(crop, zoom)
                back = _scale_back(crop.shape[-1] / tile.shape[-1], crop.shape[-2] / tile.shape[-2], left, top)
                views.append(_View(index, tile, back))
        return views

    def _angles_for(self, found: Detections) -> tuple[float, ...]:
        """Every angle when nothing was found (or in ``"always"`` mode); otherwise the one angle
        of ``angles`` that best turns the most-turned face upright."""
        if self.rotation == "always" or len(found) == 0:
            return self.angles
        eyes = found.landmarks[:, 1].float() - found.landmarks[:, 0].float()
        roll = torch.rad2deg(torch.atan2(eyes[:, 1], eyes[:, 0]))
        worst = float(roll[roll.abs().argmax()])
        # turning the copy by ``angle`` (counter-clockwise) changes a face's roll by -angle
        return (min(self.angles, key=lambda a: abs(((worst - a) + 180.0) % 360.0 - 180.0)),)

    def _turned(self, found: Detections) -> bool:
        """Nothing found, or a face whose eye line is turned by more than ``roll_above``."""
        if len(found) == 0:
            return True
        eyes = found.landmarks[:, 1].float() - found.landmarks[:, 0].float()
        roll = torch.rad2deg(torch.atan2(eyes[:, 1], eyes[:, 0])).abs()
        return bool((roll > self.roll_above).any())

    def _needs_light(self, image: torch.Tensor) -> bool:
        mean, spread = _luma_stats(image)
        return mean < self.dark_below or spread < self.flat_below

    def _run(self, views: list[_View], n: int) -> list[list[Detections]]:
        per_image: list[list[Detections]] = [[] for _ in range(n)]
        if not views:
            return per_image
        found: list[Detections] = []
        for start in range(0, len(views), VIEWS_PER_CALL):  # bounded memory: a 24 MP image has many tiles
            found += self.detector([view.image for view in views[start : start + VIEWS_PER_CALL]])
        for view, detections in zip(views, found, strict=True):
            per_image[view.index].append(_map_back(detections, view))
        return per_image

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        """Detect faces in a batch with every enabled pass.

        Args:
            images: list of ``3,H,W float in [0,1]`` RGB tensors; sizes may differ.

        Returns:
            One :class:`Detections` per image, in that image's pixels, on its device.

        Raises:
            UnsupportedImageError: an entry is not a ``3,H,W`` floating-point tensor.
            DetectionError: the wrapped detector failed.
        """
        check_images(images, detector=self.name)
        views = [view for index, image in enumerate(images) for view in self._base_views(index, image.detach().float().cpu())]
        parts = self._run(views, len(images))
        merged = [merge_detections(p, self.nms_iou) for p in parts]
        if self.rotation != "off" and self.angles:
            todo = [i for i, found in enumerate(merged) if self.rotation == "always" or self._turned(found)]
            rotated: list[_View] = []
            for i in todo:
                source = next(v for v in views if v.index == i)  # the upright (or downscaled) copy
                if self.rotate_max_side is not None and max(source.image.shape[-2:]) > self.rotate_max_side:
                    factor = self.rotate_max_side / max(source.image.shape[-2:])
                    smaller = _resized(source.image, factor)
                    shrink = _scale_back(
                        source.image.shape[-1] / smaller.shape[-1], source.image.shape[-2] / smaller.shape[-2]
                    )
                    source = _View(i, smaller, _compose(source.back, shrink))
                for angle in self._angles_for(merged[i]):
                    turned, back = _rotate(source.image, angle)
                    # rotated pixels -> view pixels -> image pixels
                    rotated.append(_View(i, turned, _compose(source.back, back), rotated=angle))
            extra = self._run(rotated, len(images))
            for i in todo:
                merged[i] = merge_detections([merged[i], *extra[i]], self.nms_iou)
        return [_on(found, image.device) for found, image in zip(merged, images)]


def _on(found: Detections, device: torch.device) -> Detections:
    return Detections(found.boxes.to(device), found.landmarks.to(device), found.scores.to(device))


class EnsembleDetector:
    """Several detectors' faces merged, one box per face after NMS.

    Args:
        detectors: two or more :class:`Detector` objects (e.g. CenterFace and MTCNN).
        nms_iou: IoU above which two boxes are one face (the higher score is kept).
        agree: ``False`` (default): the union — one family's blind spot is covered by the
            other (recall). ``True``: only faces that at least two members find (IoU >= 0.3) —
            fewer false positives, e.g. for an audit whose exit code gates a release.
    """

    name = "ensemble"

    def __init__(
        self, detectors: list[Detector] | tuple[Detector, ...], nms_iou: float = 0.3, agree: bool = False
    ) -> None:
        detectors = list(detectors)
        if len(detectors) < 2 or not all(isinstance(d, Detector) for d in detectors):
            raise ConfigError("EnsembleDetector needs two or more Detector objects (name, __call__, config)")
        if not 0.0 < float(nms_iou) <= 1.0:
            raise ConfigError(f"EnsembleDetector: nms_iou must be in (0,1], got {nms_iou!r}")
        self.detectors = detectors
        self.nms_iou = float(nms_iou)
        self.agree = bool(agree)

    def __repr__(self) -> str:
        return f"EnsembleDetector({self.detectors!r}, nms_iou={self.nms_iou}, agree={self.agree})"

    def config(self) -> dict[str, Any]:
        """Every member's config and the NMS threshold."""
        return {
            "backend": self.name,
            "members": [{"name": d.name, **d.config()} for d in self.detectors],
            "nms_iou": self.nms_iou,
            "agree": self.agree,
        }

    def __call__(self, images: list[torch.Tensor]) -> list[Detections]:
        """Detect with every member and merge.

        Args:
            images: list of ``3,H,W float in [0,1]`` RGB tensors; sizes may differ.

        Returns:
            One :class:`Detections` per image, in that image's pixels, on its device.
        """
        check_images(images, detector=self.name)
        results = [detector(images) for detector in self.detectors]
        merged = []
        for i, image in enumerate(images):
            parts = [r[i] for r in results]
            if self.agree:
                parts = [_confirmed(part, [other for k, other in enumerate(parts) if k != m]) for m, part in enumerate(parts)]
            merged.append(_on(merge_detections(parts, self.nms_iou), image.device))
        return merged


def _confirmed(part: Detections, others: list[Detections], iou: float = 0.3) -> Detections:
    """The detections of ``part`` that one of ``others`` also found (IoU >= ``iou``)."""
    from torchvision.ops import box_iou

    if len(part) == 0:
        return part
    keep = torch.zeros(len(part), dtype=torch.bool)
    for other in others:
        if len(other):
            keep |= box_iou(part.boxes.float().cpu(), other.boxes.float().cpu()).max(dim=1).values >= iou
    return Detections(part.boxes[keep.to(part.boxes.device)], part.landmarks[keep.to(part.boxes.device)], part.scores[keep.to(part.boxes.device)])
