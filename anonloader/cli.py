"""The ``anonloader`` command. Each subcommand lives beside the code it drives and adds itself
through a ``register(subparsers)`` function; this module only assembles them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from anonloader import __version__
from anonloader.errors import AnonloaderError

__all__ = ["main"]

#: modules with a ``register(subparsers)`` function, in the order ``--help`` lists them
COMMAND_MODULES = (
    "anonloader.demo",
    "anonloader.commands.anonymize",
    "anonloader.cache.commands",
    "anonloader.eval.commands",
    "anonloader.identity.commands",
    "anonloader.commands.bank",
    "anonloader.audit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anonloader", description="Privacy-preserving data loading for PyTorch.")
    parser.add_argument("--version", action="version", version=f"anonloader {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (0 ok, 1 some samples failed, 2 usage or
    input error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except AnonloaderError as error:
        print(f"anonloader {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
