"""The visual report of ``anonloader anonymize --report DIR``: one self-contained HTML page.

Everything is inline (styles, a few lines of script, thumbnails as base64 JPEG data URLs) and a
Content-Security-Policy forbids any other load, so the page opens offline, from an e-mail or an
archive, and shows exactly what was run: summary figures, then one row per image with the
original and the anonymized thumbnail side by side (detected boxes drawn: green anonymized,
red failed), its face count and status, and the list of failures.

A report is a file that gets mailed and archived, so by default it carries no original face:
the "original" thumbnail shows each detected face region heavily blurred (the box still drawn),
and only ``anonloader anonymize --report-originals`` embeds unmodified originals.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["FAILED_STATUSES", "ReportRow", "data_url", "thumbnail", "write_report"]

THUMB_SIDE = 240
#: how far a hidden face region reaches beyond its box, as a fraction of the box side (hair, ears)
HIDE_MARGIN = 0.25
#: statuses listed as failures (the image did not come out anonymized as it was)
FAILED_STATUSES = ("obscured", "dropped", "failed", "unreadable")


@dataclass
class ReportRow:
    """One image of the report.

    Attributes:
        name: the image's name (relative path, frame number, row index).
        faces: detected faces.
        status: ``"anonymized"``, ``"no face"``, ``"obscured"``, ``"dropped"``.
        before, after: JPEG thumbnails (bytes) with boxes drawn; ``after`` is None when dropped.
        error: why it failed.
    """

    name: str
    faces: int
    status: str
    before: bytes
    after: bytes | None
    error: str | None = None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def thumbnail(
    image: torch.Tensor,
    boxes: Sequence[Sequence[float]],
    statuses: Sequence[str],
    *,
    side: int = THUMB_SIDE,
    hide_faces: bool = False,
) -> bytes:
    """A JPEG thumbnail (longer side ``side``) of ``image`` with ``boxes`` drawn: green
    anonymized, red otherwise.

    Args:
        image: ``3,H,W`` uint8, or float in [0,1].
        boxes: ``x1, y1, x2, y2`` in pixels of ``image``.
        statuses: one face status per box.
        hide_faces: blur each box (grown by :data:`HIDE_MARGIN`) beyond recognition first — for
            thumbnails of originals, so that a report never carries a real face by default.
    """
    if image.is_floating_point():
        image = image.mul(255).round().clamp(0, 255).to(torch.uint8)
    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.BILINEAR)
    if hide_faces:
        for box in boxes:
            _blur_region(picture, [v * scale for v in box])
    draw = ImageDraw.Draw(picture)
    for box, status in zip(boxes, statuses):
        color = (0, 200, 0) if status == "anonymized" else (230, 0, 0)
        draw.rectangle([v * scale for v in box], outline=color, width=2)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _blur_region(picture: Image.Image, box: Sequence[float]) -> None:
    """Blurs ``box`` (thumbnail pixels, grown by :data:`HIDE_MARGIN`) in place, radius ~ box side."""
    x1, y1, x2, y2 = box
    grow_x, grow_y = (x2 - x1) * HIDE_MARGIN, (y2 - y1) * HIDE_MARGIN
    region = (
        max(0, int(x1 - grow_x)),
        max(0, int(y1 - grow_y)),
        min(picture.width, int(x2 + grow_x) + 1),
        min(picture.height, int(y2 + grow_y) + 1),
    )
    if region[2] <= region[0] or region[3] <= region[1]:
        return
    patch = picture.crop(region)
    cells = (max(1, patch.width // 8), max(1, patch.height // 8))  # a few cells, then smoothed
    patch = patch.resize(cells, Image.Resampling.BOX).resize(patch.size, Image.Resampling.BILINEAR)
    radius = max(2.0, max(patch.size) / 6)
    picture.paste(patch.filter(ImageFilter.GaussianBlur(radius)), region[:2])


def data_url(jpeg: bytes) -> str:
    """A ``data:image/jpeg;base64,...`` URL of JPEG bytes (the report inlines every image)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 12px}
.figures{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 18px}
.figure{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.figure b{display:block;font-size:20px}
.figure.bad b{color:#c00}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
td img{display:block;max-width:240px}
tr.failed td{background:#fff1f1}
.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
#failures li{margin:2px 0}
"""

_SCRIPT = """
(function () {
  var rows = document.querySelectorAll("tr.image-row");
  var box = document.getElementById("only-failures");
  var shown = document.getElementById("rows-shown");
  function update() {
    var n = 0;
    rows.forEach(function (row) {
      var hide = box.checked && !row.classList.contains("failed");
      row.style.display = hide ? "none" : "";
      if (!hide) { n += 1; }
    });
    shown.textContent = String(n);
  }
  box.addEventListener("change", update);
  update();
  document.body.setAttribute("data-ready", "1");
})();
"""


def write_report(
    directory: str | Path,
    rows: Sequence[ReportRow],
    summary: dict[str, Any],
    *,
    title: str = "anonloader report",
    originals: bool = False,
) -> Path:
    """Writes ``index.html`` into ``directory`` and returns its path.

    Args:
        directory: the report folder (created).
        rows: one :class:`ReportRow` per image.
        summary: figures shown at the top (``images``, ``faces``, ``failures``, ``method``,
            ``fingerprint``, ...); values are shown as text.
        originals: the rows' ``before`` thumbnails are unmodified originals (only with the
            user's explicit ``--report-originals``); the column header says which.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    figures = []
    for key, value in summary.items():
        bad = key in ("failures", "dropped") and isinstance(value, int) and value > 0
        cls = "figure bad" if bad else "figure"
        mono = " class='mono'" if key == "fingerprint" else ""
        figures.append(f"<div class='{cls}' data-key='{esc(str(key))}'><span>{esc(str(key))}</span><b{mono}>{esc(str(value))}</b></div>")
    body_rows = []
    for row in rows:
        failed = row.status in FAILED_STATUSES
        after = f"<img alt='anonymized {esc(row.name)}' src='{data_url(row.after)}'>" if row.after else "<em>dropped</em>"
        body_rows.append(
            f"<tr class='image-row{' failed' if failed else ''}'>"
            f"<td class='mono'>{esc(row.name)}</td>"
            f"<td><img alt='original {esc(row.name)}' src='{data_url(row.before)}'></td>"
            f"<td>{after}</td>"
            f"<td class='faces'>{row.faces}</td>"
            f"<td class='status'>{esc(row.status)}</td></tr>"
        )
    failures = [f"<li><span class='mono'>{esc(r.name)}</span>: {esc(r.error or r.status)}</li>" for r in rows if r.status in FAILED_STATUSES]
    original_header = "original (detected faces)" if originals else "original (detected faces blurred)"
    failure_list = f"<ul id='failures'>{''.join(failures)}</ul>" if failures else "<p id='failures'>none</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<div class="figures">{''.join(figures)}</div>
<h2>Failures</h2>
{failure_list}
<h2>Images</h2>
<p><label><input type="checkbox" id="only-failures"> show failures only</label> — <span id="rows-shown">{len(rows)}</span> of {len(rows)} rows shown</p>
<table id="images"><thead><tr><th>image</th><th>{original_header}</th><th>anonymized</th><th>faces</th><th>status</th></tr></thead>
<tbody>{''.join(body_rows)}</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
    path = directory / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
