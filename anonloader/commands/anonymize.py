"""``anonloader anonymize SRC DST``: anonymize a folder of images, a video, or an HF dataset.

- a folder of images -> DST holds the same relative paths, same formats, every face replaced;
- a video file (``.mp4``, ``.mkv``, ...; needs PyAV) -> DST video (or ``DST/<name>.mp4`` when DST
  is a folder); faces are tracked across frames, one synthetic identity per track;
- a Hugging Face dataset (a ``save_to_disk`` folder, or ``hf:NAME``) -> DST ``save_to_disk`` folder.

Shows a progress bar with rate and ETA, prints a summary table, and with ``--report DIR`` writes
a self-contained HTML page of before/after thumbnails. Exit codes: 0 every image anonymized (or
had no face), 1 some images failed and were obscured or dropped, 2 bad arguments or input
(a message says what to fix), 130 interrupted.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from anonloader.errors import ConfigError

__all__ = ["EXIT_FAILURES", "EXIT_INTERRUPTED", "EXIT_OK", "register", "run_anonymize"]

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")


# ------------------------------------------------------------------------------- sources
def source_kind(src: str) -> str:
    """``"images"``, ``"video"`` or ``"hf"`` for a SRC argument."""
    path = Path(src).expanduser()
    if src.startswith("hf:"):
        return "hf"
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        return "images"
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    if path.is_file():
        raise ConfigError(f"{path} is not a folder of images, a video ({', '.join(VIDEO_SUFFIXES)}) or a saved dataset")
    raise ConfigError(f"{src} does not exist (give a folder of images, a video file, a saved HF dataset or hf:NAME)")


class ImageFiles(torch.utils.data.Dataset):
    """The images under a folder, each anonymized and re-encoded in its own format (run in
    DataLoader workers): ``{"name", "data" (bytes or None), "records", "error", "status", "thumbs"}``."""

    def __init__(self, root: Path, stage: Any, *, thumbnails: bool, originals: bool = False) -> None:
        self.root, self.stage, self.thumbnails, self.originals = root, stage, thumbnails, originals
        self.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        from anonloader.data.adapters import join_sample, split_sample
        from anonloader.errors import InputError

        name = self.files[index]
        try:
            with Image.open(self.root / name) as opened:
                fmt = opened.format or "PNG"
                opened.load()
                picture = opened.copy()
            images, skeleton = split_sample(picture, None, index=index)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, InputError) as error:
            # a file that cannot be read as an image is a failure of that file, never a raw copy
            return {"name": name, "data": None, "records": [], "error": f"cannot read: {error}", "status": "unreadable", "thumbs": None}
        processed = self.stage.process(index, images, None)[0]
        statuses = [r.status for r in processed.records]
        data = None
        if processed.image is not None:
            restored = join_sample(skeleton, [processed.image], [images[0].alpha])
            buffer = io.BytesIO()
            options = {"quality": 95} if fmt.upper() in ("JPEG", "WEBP") else {}
            restored.save(buffer, format=fmt, **options)
            data = buffer.getvalue()
        status = _status(processed.image is not None, processed.error, len(processed.records))
        thumbs = None
        if self.thumbnails:
            from anonloader.commands.report import thumbnail

            boxes = [r.box for r in processed.records]
            after = None if processed.image is None else thumbnail(processed.image, boxes, statuses)
            thumbs = (thumbnail(images[0].tensor, boxes, statuses, hide_faces=not self.originals), after)
        records = [r.to_dict() for r in processed.records]
        return {"name": name, "data": data, "records": records, "error": processed.error, "status": status, "thumbs": thumbs}


def _status(kept: bool, error: str | None, faces: int) -> str:
    if error is not None:
        return "obscured" if kept else "dropped"
    if not kept:
        return "dropped"
    return "anonymized" if faces else "no face"


def _first(batch: list[Any]) -> Any:
    return batch[0]


# ------------------------------------------------------------------------------- running
def _secret(args: argparse.Namespace) -> bytes | None:
    if args.secret_file is not None:
        try:
            return Path(args.secret_file).expanduser().read_bytes().strip()
        except OSError as error:
            raise ConfigError(f"cannot read the secret file {args.secret_file} ({error.strerror})") from error
    value = os.environ.get("ANONLOADER_SECRET")
    return value.encode() if value else None


def _build_anonymizer(args: argparse.Namespace, kind: str) -> Any:
    from anonloader.pipeline import Anonymizer

    secret = _secret(args)
    identity = args.identity
    if identity == "auto":
        identity = ("track" if kind == "video" else "online") if secret is not None else "none"
    options = {"detector": args.detector, "on_error": args.on_error, "on_no_face": args.on_no_face, "device": args.device}
    if identity == "none":
        return Anonymizer(args.method, **options)
    if secret is None:
        raise ConfigError(f"--identity {identity} needs a secret: --secret-file FILE or $ANONLOADER_SECRET")
    if identity == "track":
        if kind != "video":
            raise ConfigError("--identity track is for videos; use online for images")
        from anonloader.integrations.video import tracking_anonymizer

        return tracking_anonymizer(args.method, secret=secret, **options)
    from anonloader.identity.assigner import KeyedIdentityAssigner
    from anonloader.methods import get_method

    method = get_method(args.method)
    assigner = KeyedIdentityAssigner("online", secret=secret, bank=1_000_000, template=method.template, margin=float(getattr(method, "margin", 0.0)))
    return Anonymizer(method, identity=assigner, **options)


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, dynamic_ncols=True, file=sys.stderr)


def _run_images(args: argparse.Namespace, anonymizer: Any, rows: list[Any]) -> dict[str, int]:
    from anonloader.commands.report import ReportRow
    from anonloader.data.stage import PipelineStage

    dataset = ImageFiles(
        Path(args.src).expanduser(),
        PipelineStage(anonymizer),
        thumbnails=args.report is not None,
        originals=args.report_originals,
    )
    if args.limit is not None:
        dataset.files = dataset.files[: args.limit]
    dst = Path(args.dst).expanduser()
    counts = {"images": 0, "faces": 0, "anonymized": 0, "failures": 0, "dropped": 0}
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=args.workers, collate_fn=_first)
    with _progress(len(dataset), "anonymize", args.quiet) as bar:
        for item in loader:
            counts["images"] += 1
            counts["faces"] += len(item["records"])
            counts["anonymized"] += sum(r["status"] == "anonymized" for r in item["records"])
            if item["status"] in ("obscured", "dropped", "unreadable"):
                counts["failures"] += 1
            if item["data"] is None:
                counts["dropped"] += 1
            else:
                target = dst / item["name"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(item["data"])
            if item["thumbs"] is not None:
                rows.append(ReportRow(item["name"], len(item["records"]), item["status"], item["thumbs"][0], item["thumbs"][1], item["error"]))
            elif args.report is not None:  # unreadable: nothing to show
                rows.append(ReportRow(item["name"], 0, item["status"], _blank_thumb(), None, item["error"]))
            bar.update(1)
    return counts


def _blank_thumb() -> bytes:
    from anonloader.commands.report import thumbnail

    return thumbnail(torch.zeros(3, 8, 8), [], [])


def _run_video(args: argparse.Namespace, anonymizer: Any, rows: list[Any]) -> dict[str, int]:
    from anonloader.commands.report import ReportRow, thumbnail
    from anonloader.integrations.video import TrackingIdentityAssigner, anonymize_clip, read_video, write_video
    from anonloader.pipeline import obscure_image

    src = Path(args.src).expanduser()
    frames, fps = read_video(src)
    if args.limit is not None:
        frames = frames[: args.limit]
    dst = Path(args.dst).expanduser()
    if dst.suffix.lower() not in VIDEO_SUFFIXES:
        dst = dst / f"{src.stem}.mp4"
    counts = {"images": 0, "faces": 0, "anonymized": 0, "failures": 0, "dropped": 0}
    out_frames = []
    chunk = 8
    with _progress(len(frames), "anonymize frames", args.quiet) as bar:
        for start in range(0, len(frames), chunk):
            part = [f.float() / 255 for f in frames[start : start + chunk]]
            if isinstance(anonymizer.identity, TrackingIdentityAssigner):
                result = anonymize_clip(part, anonymizer, clip=src.name, batch_size=chunk) if start == 0 else _continue_clip(part, anonymizer, src.name)
                images, records, errors = result.frames, result.records, result.errors
            else:
                out = anonymizer(part)
                images, records, errors = out.images, out.records, out.errors
            for offset, (original, image, recs, error) in enumerate(zip(part, images, records, errors)):
                counts["images"] += 1
                counts["faces"] += len(recs)
                counts["anonymized"] += sum(r.status == "anonymized" for r in recs)
                status = _status(image is not None, error, len(recs))
                if status in ("obscured", "dropped"):
                    counts["failures"] += 1
                shown = image if image is not None else obscure_image(original)  # a video keeps its timing
                out_frames.append(shown.mul(255).round().clamp(0, 255).to(torch.uint8))
                if args.report is not None:
                    boxes, statuses = [r.box for r in recs], [r.status for r in recs]
                    before = thumbnail(original, boxes, statuses, hide_faces=not args.report_originals)
                    rows.append(ReportRow(f"frame {start + offset:06d}", len(recs), status, before, thumbnail(shown, boxes, statuses), error))
            bar.update(len(part))
    write_video(dst, out_frames, fps)
    return counts


def _continue_clip(part: list[torch.Tensor], anonymizer: Any, clip: str) -> Any:
    """The next frames of a clip whose tracks are already open (no reset)."""
    from anonloader.integrations.video import ClipResult, FrameLabel

    detections = anonymizer.detector(part)
    out = anonymizer(part, detections=detections, labels=[FrameLabel(clip, d.boxes.detach().cpu()) for d in detections])
    return ClipResult(out.images, out.records, [], out.errors)


def _run_hf(args: argparse.Namespace, anonymizer: Any, rows: list[Any]) -> dict[str, int]:
    from anonloader.cache.precompute import load_source
    from anonloader.integrations.huggingface import anonymize_hf

    dataset = load_source(args.src, split=args.split)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    if not args.quiet:
        print(f"anonymizing {len(dataset)} rows of column {args.image_column!r}", file=sys.stderr)
    mapped = anonymize_hf(dataset, args.image_column, mode="map", anonymizer=anonymizer, num_proc=args.workers if args.workers > 1 else None)
    mapped.save_to_disk(str(Path(args.dst).expanduser()))
    counters = anonymizer.counters  # in this process (num_proc=1); workers count their own
    return {
        "images": len(dataset),
        "faces": int(counters["faces"]),
        "anonymized": int(counters["anonymized"]),
        "failures": int(counters["failed"]),
        "dropped": len(dataset) - len(mapped),
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table, one figure per line."""
    width = max(len(k) for k in summary)
    lines = ["-" * (width + 40)]
    lines += [f"{key:<{width}}  {value}" for key, value in summary.items()]
    lines.append("-" * (width + 40))
    return "\n".join(lines)


def run_anonymize(args: argparse.Namespace) -> int:
    """Runs the command; returns the exit code."""
    kind = source_kind(args.src)
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    anonymizer = _build_anonymizer(args, kind)
    rows: list[Any] = []
    start = time.perf_counter()
    try:
        runner = {"images": _run_images, "video": _run_video, "hf": _run_hf}[kind]
        counts = runner(args, anonymizer, rows)
    except KeyboardInterrupt:
        print("anonloader anonymize: interrupted; files written so far are complete", file=sys.stderr)
        return EXIT_INTERRUPTED
    seconds = time.perf_counter() - start
    summary = {
        "source": f"{args.src} ({kind})",
        **counts,
        "method": anonymizer.method.name,
        "fingerprint": anonymizer.fingerprint(),
        "seconds": f"{seconds:.1f}",
        "images/s": f"{counts['images'] / max(seconds, 1e-9):.2f}",
    }
    print(summary_table(summary))
    if args.report is not None:
        from anonloader.commands.report import write_report

        page = write_report(args.report, rows, summary, title=f"anonloader anonymize {args.src}", originals=args.report_originals)
        print(f"report: {page}")
    return EXIT_FAILURES if counts["failures"] else EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``anonymize`` to the ``anonloader`` command."""
    parser = subparsers.add_parser(
        "anonymize",
        help="anonymize a folder of images, a video or a Hugging Face dataset",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="folder of images, video file, saved HF dataset folder, or hf:NAME")
    parser.add_argument("dst", help="output folder (or video file / saved dataset folder)")
    parser.add_argument("--method", default="blur", help="blur | pixelate | mask | fams | iddiffuse (default blur)")
    parser.add_argument("--detector", default="default", help="default (CenterFace stage with recall passes) | fast | strong | mtcnn | centerface | ensemble | scrfd")
    parser.add_argument("--identity", choices=("auto", "none", "online", "track"), default="auto",
                        help="how real people map to synthetic ones (auto: track for videos, online for images when a secret is given)")
    parser.add_argument("--secret-file", default=None, help="file holding the identity-mapping secret (else $ANONLOADER_SECRET)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (images) / map processes (HF)")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR", help="write DIR/index.html with before/after thumbnails")
    parser.add_argument("--report-originals", action="store_true",
                        help="embed unmodified originals in the report (default: original face regions blurred)")
    parser.add_argument("--on-error", choices=("obscure", "drop", "raise"), default="obscure")
    parser.add_argument("--on-no-face", choices=("keep", "drop", "obscure"), default="keep")
    parser.add_argument("--image-column", default="image", help="image column of an HF dataset")
    parser.add_argument("--split", default=None, help="split of an HF dataset (default train)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images / frames / rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_anonymize)
