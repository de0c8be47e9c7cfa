"""``anonloader bank build --method M OUT ...``: synthetic identity banks.

Each method that can render its own synthetic people keeps its bank builder beside its code
(``anonloader.methods.<method>.bank``); this command only dispatches to it, passing the rest of
the command line through (``anonloader bank build --method fams OUT --help`` lists its options).
``--method folder`` builds a bank from a folder of generated faces for any method
(``anonloader bank build --method folder OUT --from-folder DIR``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from anonloader.errors import ConfigError

__all__ = ["BANK_BUILDERS", "build_folder", "register"]

#: builders, and the ``module:function`` whose ``function(argv)`` builds the bank and returns its folder
BANK_BUILDERS = {
    "fams": "anonloader.methods.fams.bank:main",
    "iddiffuse": "anonloader.methods.iddiffuse.bank:main",
    "folder": "anonloader.commands.bank:build_folder",
}


def add_folder_options(parser: argparse.ArgumentParser) -> None:
    """The options of a bank built from a folder of faces (shared by the builders that take one)."""
    parser.add_argument("--from-folder", default=None, metavar="DIR", help="folder of generated face images, one identity per image")
    parser.add_argument(
        "--aligned", action="store_true",
        help="the images are crops aligned in the recognizer's template already (DCFace-style); default: detect and align each face",
    )
    parser.add_argument("--detector", default="default", help="detector that finds and aligns the faces (the pipeline's default)")
    parser.add_argument("--crop-size", type=int, default=112, help="side of the stored images")
    parser.add_argument("--deny", default=None, metavar="DIR", help="folder of photos of real people no identity may resemble")
    parser.add_argument("--recognizer", default="dlib")


def folder_bank(args: argparse.Namespace, n: int | None = None) -> object:
    """The bank of ``args.from_folder`` (see :func:`add_folder_options`), deny list applied."""
    from anonloader.identity.bank import IdentityBank, embed_photos
    from anonloader.identity.embedders import load_embedder

    embedder = load_embedder(args.recognizer)
    deny = None if args.deny is None else embed_photos(args.deny, embedder, detector=args.detector)
    return IdentityBank.from_folder(
        args.from_folder, embedder, args.crop_size, aligned=args.aligned, detector=args.detector, avoid=deny, n=n,
    )


def build_folder(argv: Sequence[str] | None = None) -> Path:
    """``anonloader bank build --method folder OUT --from-folder DIR [...]``: writes the bank."""
    parser = argparse.ArgumentParser(
        prog="anonloader bank build --method folder",
        description="A bank from a folder of generated faces: one identity per image, near-duplicates and "
        "faces close to a --deny folder of real people left out.",
    )
    parser.add_argument("out", help="bank folder to write")
    parser.add_argument("--n", type=int, default=None, help="keep at most this many identities")
    add_folder_options(parser)
    args = parser.parse_args(argv)
    if args.from_folder is None:
        parser.error("--from-folder DIR is required")
    return folder_bank(args, args.n).save(args.out)  # type: ignore[attr-defined]


def _build(args: argparse.Namespace) -> int:
    target = BANK_BUILDERS.get(args.method)
    if target is None:
        raise ConfigError(f"no bank builder for method {args.method!r}; methods with one: {', '.join(BANK_BUILDERS)}")
    module, function = target.split(":")
    path = getattr(importlib.import_module(module), function)([args.out, *args.options])
    print(f"bank: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``bank build`` to the ``anonloader`` command."""
    bank = subparsers.add_parser("bank", help="synthetic identity banks")
    actions = bank.add_subparsers(dest="bank_command", required=True)
    build = actions.add_parser(
        "build",
        help="render a bank of synthetic identities with a method, or build one from a folder of faces",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    build.add_argument("--method", required=True, choices=sorted(BANK_BUILDERS))
    build.add_argument("out", help="bank folder to write")
    build.add_argument("options", nargs=argparse.REMAINDER, help="the builder's options (e.g. --n 1000 --weights DIR)")
    build.set_defaults(run=_build)
