"""``anonloader identity embed SRC OUT``: every face's embedding and content hash, stored once
(sensitive: raw biometric data; see :mod:`anonloader.identity.store`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["register"]


def _run_embed(args: argparse.Namespace) -> int:
    from anonloader.identity.store import embed_source

    image_key = int(args.image_key) if args.image_key is not None and args.image_key.isdigit() else args.image_key
    store = embed_source(
        args.source,
        args.out,
        embedder=args.recognizer,
        detector=args.detector,
        part_size=args.part_size,
        limit=args.limit,
        image_key=image_key,
        on_error=args.on_error,
        engine=args.engine,
        workers=args.workers,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"{store.path}: {len(store)} face embeddings ({store.dim}-d, {store.meta['recognizer'].get('name', 'recognizer')}) "
        f"of {store.meta['samples_total']} samples. SENSITIVE: raw biometric data of real people; keep it with the "
        "original images and delete it after clustering."
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``identity embed`` to the ``anonloader`` command."""
    identity = subparsers.add_parser("identity", help="real-identity tools (embeddings store for dataset-wide clustering)")
    actions = identity.add_subparsers(dest="action", required=True)
    embed = actions.add_parser(
        "embed",
        help="store every face's recognizer embedding + content hash (SENSITIVE output)",
        description="Detects and embeds every face of SOURCE into the store OUT (resumable: run again after an "
        "interruption). OUT holds raw face embeddings of real people: write it only where the original images "
        "may live, never next to an anonymized cache. Use it with `anonloader precompute SOURCE CACHE --identity "
        "cluster --embeddings OUT`, or EmbeddingStore(OUT).fit(KeyedIdentityAssigner('cluster', ...)).",
    )
    embed.add_argument("source", help="a folder of images, pkg.module:factory, a saved HF dataset folder, or an HF dataset name")
    embed.add_argument("out", type=Path, help="the embeddings store folder (sensitive)")
    embed.add_argument("--recognizer", default="dlib", help="recognizer (default dlib, offline)")
    embed.add_argument(
        "--detector",
        default="default",
        help="the detector precompute will use (default: the pipeline's 'default'; anonloader.detect.DETECTORS)",
    )
    embed.add_argument("--part-size", type=int, default=256, help="samples per part (the unit of resume)")
    embed.add_argument("--limit", type=int, default=None, help="only the first N samples")
    embed.add_argument("--image-key", default=None, help="dict key or tuple position of the image")
    embed.add_argument("--on-error", choices=("drop", "raise"), default="drop", help="a sample that cannot be read: skip it (warning) or stop")
    embed.add_argument(
        "--engine",
        choices=("local", "ray", "torchrun"),
        default="local",
        help="torchrun: run as `torchrun --nproc_per_node N --no-python anonloader identity embed ... --engine torchrun`",
    )
    embed.add_argument("--workers", type=int, default=1, help="Ray tasks at a time (engine ray)")
    embed.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=_run_embed)
