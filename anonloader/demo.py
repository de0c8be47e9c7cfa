"""``anonloader demo OUT``: anonymize the packaged sample photos and draw a contact sheet."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from anonloader.assets import SAMPLE_PHOTOS, sample_photo
from anonloader.types import FaceRecord

__all__ = ["contact_sheet", "register", "run_demo"]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def contact_sheet(
    pairs: Sequence[tuple[Image.Image, Image.Image, list[FaceRecord]]], *, row_height: int = 320
) -> Image.Image:
    """Before | after rows, detected boxes drawn on both sides (green: anonymized, red: not)."""
    rows = []
    for before, after, records in pairs:
        scale = row_height / before.height
        size = (max(1, round(before.width * scale)), row_height)
        halves = []
        for picture in (before, after):
            canvas = picture.convert("RGB").resize(size, Image.Resampling.BILINEAR)
            draw = ImageDraw.Draw(canvas)
            for record in records:
                color = (0, 200, 0) if record.status == "anonymized" else (220, 0, 0)
                draw.rectangle([v * scale for v in record.box], outline=color, width=2)
            halves.append(canvas)
        row = Image.new("RGB", (size[0] * 2 + 8, row_height), "white")
        row.paste(halves[0], (0, 0))
        row.paste(halves[1], (size[0] + 8, 0))
        rows.append(row)
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + 8 * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + 8
    return sheet


def run_demo(out: str | Path, *, method: str = "blur", photos: Sequence[str] = SAMPLE_PHOTOS, **options: Any) -> dict[str, Any]:
    """Anonymizes the packaged photos into ``out``: ``<name>.png`` per photo, ``contact_sheet.png``
    and ``summary.json``. Returns the summary."""
    from anonloader.pipeline import Anonymizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    anonymizer = Anonymizer(method, **options)
    pairs, per_photo = [], {}
    for name in photos:
        original = sample_photo(name)
        result = anonymizer([_to_tensor(original)])
        image, records = result.images[0], result.records[0]
        if image is None:
            per_photo[name] = {"faces": len(records), "dropped": True, "error": result.errors[0]}
            continue
        anonymized = _to_pil(image)
        anonymized.save(out / f"{name}.png")
        pairs.append((original, anonymized, records))
        per_photo[name] = {"faces": len(records), "records": [r.to_dict() for r in records], "error": result.errors[0]}
    if pairs:
        contact_sheet(pairs).save(out / "contact_sheet.png")
    summary = {
        "method": anonymizer.method.name,
        "fingerprint": anonymizer.fingerprint(),
        "counters": dict(anonymizer.counters),
        "photos": per_photo,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="anonymize the sample photos shipped with installed packages",
        description="Anonymizes real photos shipped inside installed packages (insightface's t1.jpg, "
        "scikit-image's astronaut) and writes the results plus a before/after contact sheet.",
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--method", default="blur", help="blur | pixelate | mask | fams | iddiffuse")
    parser.add_argument("--detector", default="default")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, method=args.method, detector=args.detector, device=args.device)
    counters = summary["counters"]
    for name, info in summary["photos"].items():
        print(f"{name:12s} faces={info['faces']}")
    print(
        f"images={counters.get('images', 0)} faces={counters.get('faces', 0)} "
        f"anonymized={counters.get('anonymized', 0)} failed={counters.get('failed', 0)}"
    )
    print(f"wrote {args.out / 'contact_sheet.png'}")
    return 0 if counters.get("failed", 0) == 0 else 1
