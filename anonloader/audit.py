"""``anonloader audit``: look for faces left in anonymized output — the evidence a review asks for.

The strongest detector combination (the ``"strong"`` preset: CenterFace + MTCNN, every recall
pass always on, see :mod:`anonloader.detect`) runs over every image of the anonymized output
and reports every face it finds: image, box, score. Anonymized faces (blurred, pixelated,
masked or replaced by a synthetic person) are *expected* to be found by a detector when the
method draws a new face (FAMS, IDDiffuse); for those, audit the pipeline's own records instead,
or pass ``ignore`` boxes. For classical methods (blur, pixelate, mask) any face found is a
residual face.

Sources: a folder of images (searched recursively), a video file, a dataset saved with Hugging
Face ``datasets.save_to_disk``, an anonymized cache folder (``data.mdb`` or ``manifest.json``),
or in Python any dataset / iterable whose samples hold images (tensors, arrays, PIL images, in
dicts, tuples or lists), or an :class:`~anonloader.cache.store.AnonCache`.

The HTML report shows each image with a residual face as a thumbnail in which every found face
is blurred beyond recognition (the box still drawn): the report never carries a face.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anonloader.detect.base import Detector
from anonloader.errors import ConfigError, UnsupportedImageError

__all__ = ["AuditReport", "ResidualFace", "audit", "register"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class ResidualFace:
    """A face found in anonymized output: ``box`` x1, y1, x2, y2 pixels, ``score`` in [0,1]."""

    image: str
    box: tuple[float, float, float, float]
    score: float


@dataclass
class AuditReport:
    """What :func:`audit` found.

    Attributes:
        images: how many images were checked.
        faces: every residual face, in source order.
        thumbnails: per image name with a residual face, a JPEG thumbnail with every found face
            blurred and boxed.
    """

    images: int = 0
    faces: list[ResidualFace] = field(default_factory=list)
    thumbnails: dict[str, bytes] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """True when no face was found."""
        return not self.faces

    def write_html(self, path: str | os.PathLike[str], *, title: str = "anonloader audit") -> Path:
        """Writes a self-contained HTML page (inline thumbnails, no external loads) to ``path``."""
        from anonloader.commands.report import data_url

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        by_image: dict[str, list[ResidualFace]] = {}
        for face in self.faces:
            by_image.setdefault(face.image, []).append(face)
        rows = []
        for name, faces in by_image.items():
            url = data_url(self.thumbnails.get(name, b""))
            listing = "<br>".join(
                f"box {[round(v) for v in f.box]} score {f.score:.2f}" for f in faces
            )
            rows.append(
                f'<tr class="residual"><td class="mono">{html.escape(name)}</td><td>{len(faces)}</td>'
                f'<td><img alt="faces blurred" src="{url}"></td><td class="mono">{listing}</td></tr>'
            )
        verdict = "no residual face found" if self.clean else f"{len(self.faces)} residual face(s) found"
        page = f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{html.escape(title)}</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:24px}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ddd;padding:6px;vertical-align:top}} .mono{{font-family:monospace;font-size:12px}}
.bad{{color:#c00}} .ok{{color:#070}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p id="verdict" class="{'ok' if self.clean else 'bad'}"><b>{verdict}</b> in {self.images} image(s).
Faces in the thumbnails are blurred; the boxes show where they are.</p>
<table><tr><th>image</th><th>faces</th><th>thumbnail (faces blurred)</th><th>boxes</th></tr>
{''.join(rows)}</table></body></html>
"""
        path.write_text(page, encoding="utf-8")
        return path


# -- reading sources ------------------------------------------------------------------------
def _as_image(value: Any) -> torch.Tensor | None:
    """``value`` as ``3,H,W float32 in [0,1]``, or None when it is not an image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("RGB"))
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value))
    if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3):
        return None
    if value.ndim == 2:
        value = value[None]
    if value.shape[0] not in (1, 3, 4) and value.shape[-1] in (1, 3, 4):
        value = value.permute(2, 0, 1)
    if value.shape[0] not in (1, 3, 4) or min(value.shape[-2:]) < 16:
        return None
    value = value[:3] if value.shape[0] != 1 else value.expand(3, -1, -1)
    if value.is_floating_point():
        return value.float().clamp(0, 1)
    return value.float().div(255.0 if value.dtype == torch.uint8 else 65535.0)


def _images_in(sample: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    image = _as_image(sample)
    if image is not None:
        yield name, image
        return
    if isinstance(sample, dict):
        for key, value in sample.items():
            yield from _images_in(value, f"{name}/{key}")
    elif isinstance(sample, (list, tuple)):
        for index, value in enumerate(sample):
            yield from _images_in(value, f"{name}/{index}")


def _iter_dataset(dataset: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        items: Iterable[Any] = (dataset[i] for i in range(len(dataset)))
    else:
        items = dataset
    for index, sample in enumerate(items):
        if sample is None:  # a dropped sample
            continue
        yield from _images_in(sample, f"{prefix}{index}")


def _iter_path(path: Path, secret: Any) -> Iterator[tuple[str, torch.Tensor]]:
    from PIL import Image

    if not path.exists():
        raise ConfigError(f"audit: {path} does not exist; pass a folder, a video, a saved dataset or a cache")
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        from anonloader.integrations.video import read_video

        frames, _ = read_video(path)
        for index, frame in enumerate(frames):
            image = _as_image(frame)
            if image is not None:
                yield f"{path.name}#{index}", image
        return
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(path) as picture:
            yield path.name, _as_image(picture.convert("RGB"))  # type: ignore[misc]
        return
    if (path / "data.mdb").is_file() or (path / "manifest.json").is_file() or path.suffix == ".json":
        from anonloader.cache.store import AnonCache

        yield from _iter_dataset(AnonCache(path, secret=secret).as_dataset())
        return
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            for split, part in loaded.items():
                yield from _iter_dataset(part, f"{split}/")
        else:
            yield from _iter_dataset(loaded)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                with Image.open(file) as picture:
                    image = _as_image(picture.convert("RGB"))
            except OSError as error:
                raise UnsupportedImageError(f"audit: cannot read {file} ({error}); remove or fix it") from error
            if image is not None:
                yield str(file.relative_to(path)), image
        return
    raise ConfigError(f"audit: {path} is neither an image folder, a video, a saved dataset nor a cache")


def _iter_source(source: Any, secret: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(source, (str, os.PathLike)):
        yield from _iter_path(Path(source).expanduser(), secret)
    elif hasattr(source, "as_dataset"):
        yield from _iter_dataset(source.as_dataset())
    else:
        yield from _iter_dataset(source)


# -- the audit ------------------------------------------------------------------------------
def audit(
    source: Any,
    *,
    detector: str | Detector = "strong",
    batch_size: int = 8,
    secret: Any = None,
    thumbnail_side: int = 240,
) -> AuditReport:
    """Finds faces left in anonymized output.

    Args:
        source: a path (image folder, video, saved HF dataset, cache) or a dataset / iterable
            whose samples hold images (``3,H,W`` or ``H,W,3`` tensors or arrays, uint8 or
            float in [0,1], PIL images), or an :class:`~anonloader.cache.store.AnonCache`.
        detector: a detector name or object; the default ``"strong"`` preset is the most
            thorough (and slowest) combination.
        batch_size: images per detector call.
        secret: the cache's secret, when auditing a cache written with one.
        thumbnail_side: longer side of the report's thumbnails, in pixels.

    Returns:
        An :class:`AuditReport`; ``report.clean`` is False when any face was found.
    """
    from anonloader.commands.report import thumbnail
    from anonloader.detect import load_detector

    if batch_size < 1:
        raise ConfigError(f"audit: batch_size must be >= 1, got {batch_size}")
    finder = load_detector(detector)
    assert finder is not None
    report = AuditReport()
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        found = finder([image for _, image in batch])
        for (name, image), faces in zip(batch, found, strict=True):
            report.images += 1
            if not len(faces):
                continue
            boxes = [tuple(float(v) for v in box) for box in faces.boxes.cpu()]
            for box, score in zip(boxes, faces.scores.cpu().tolist()):
                report.faces.append(ResidualFace(name, box, float(score)))  # type: ignore[arg-type]
            report.thumbnails[name] = thumbnail(image, boxes, ["residual"] * len(boxes), side=thumbnail_side, hide_faces=True)
        batch.clear()

    for item in _iter_source(source, secret):
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return report


# -- the command ----------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Adds ``anonloader audit`` to the command line."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="look for faces left in anonymized output (exit 1 when any is found)",
        description="Runs the strongest detector combination over anonymized output and reports every "
        "residual face (image, box, score); exits 1 when any is found, 0 when none is.",
    )
    parser.add_argument("path", help="an image folder, a video, a saved HF dataset or an anonymized cache")
    parser.add_argument("--detector", default="strong", help="strong (default) | default | fast | centerface | mtcnn | ensemble")
    parser.add_argument("--report", default=None, help="write an HTML report (faces blurred) to this file")
    parser.add_argument("--secret", default=None, help="the cache's secret, for a cache written with one")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    report = audit(args.path, detector=args.detector, batch_size=args.batch_size, secret=args.secret)
    for face in report.faces:
        print(f"residual face: {face.image} box {[round(v) for v in face.box]} score {face.score:.2f}")
    if args.report:
        print(f"report: {report.write_html(args.report)}")
    print(f"{len(report.faces)} residual face(s) in {report.images} image(s)")
    return 0 if report.clean else 1


class _CallableModule(types.ModuleType):
    """``anonloader.audit(...)`` works even after this submodule was imported (which binds the
    name ``audit`` on the package to the module): calling the module calls :func:`audit`."""

    def __call__(self, source: Any, **kwargs: Any) -> AuditReport:
        return audit(source, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
