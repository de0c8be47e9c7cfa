"""``anonloader bank build --method M OUT ...``: synthetic identity banks rendered by a method.

Each method that can render its own synthetic people keeps its bank builder beside its code
(``anonloader.methods.<method>.bank``); this command only dispatches to it, passing the rest of
the command line through (``anonloader bank build --method fams OUT --help`` lists its options).
"""

from __future__ import annotations

import argparse
import importlib

from anonloader.errors import ConfigError

__all__ = ["BANK_BUILDERS", "register"]

#: methods with a bank builder, and the module whose ``main(argv)`` builds it
BANK_BUILDERS = {"fams": "anonloader.methods.fams.bank"}


def _build(args: argparse.Namespace) -> int:
    module = BANK_BUILDERS.get(args.method)
    if module is None:
        raise ConfigError(f"no bank builder for method {args.method!r}; methods with one: {', '.join(BANK_BUILDERS)}")
    path = importlib.import_module(module).main([args.out, *args.options])
    print(f"bank: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``bank build`` to the ``anonloader`` command."""
    bank = subparsers.add_parser("bank", help="synthetic identity banks")
    actions = bank.add_subparsers(dest="bank_command", required=True)
    build = actions.add_parser(
        "build",
        help="render a bank of synthetic identities with a method",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    build.add_argument("--method", required=True, choices=sorted(BANK_BUILDERS))
    build.add_argument("out", help="bank folder to write")
    build.add_argument("options", nargs=argparse.REMAINDER, help="the method's builder options (e.g. --n 1000 --weights DIR)")
    build.set_defaults(run=_build)
