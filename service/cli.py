"""The ``cdranon`` command line: one subcommand per module in ``service.commands``.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (``(argparse.Namespace) -> int``) as the parser's default. Errors that a user can
fix (CdranonError) are printed as one clear line and exit 2; nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from service.errors import CdranonError

# Command modules, in the order `cdranon --help` lists them.
COMMAND_MODULES = (
    "service.commands.process",
    "service.commands.unseal",
    "service.commands.deadlines",
    "service.commands.keys",
    "service.commands.verify",
    "service.commands.run",
    "service.commands.config_cmd",
    "service.commands.generate",
    "service.commands.audit",
    "service.commands.retention",
    "service.commands.hold",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 2, as for every other user error.
        self.exit(2, f"cdranon: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cdranon",
        description="Streaming anonymisation of communication detail records (CDRs).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except CdranonError as exc:
        print(f"cdranon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdranon: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
