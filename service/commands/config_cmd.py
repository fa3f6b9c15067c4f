"""``cdranon config show``: the effective settings (file + environment), secrets masked."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from service.commands.run import add_config_flag
from service.config import load_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "config",
        help="show the effective settings",
        description="Settings come from the TOML file (--config or $CDRANON_CONFIG), "
        "overridden by CDRANON_* environment variables (sections joined with __).",
    )
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser(
        "show",
        help="print the effective settings, secrets masked",
        description="Print the effective settings as TOML (or JSON), secrets masked.",
    )
    add_config_flag(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    shown = load_settings(args.config).shown()
    if args.json:
        sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(to_toml(shown))
    return 0


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return orjson.dumps(str(v)).decode()


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else orjson.dumps(k).decode()


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Settings as TOML a config file can start from; unset (None) values commented out."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is None:
            lines.append(f"# {_key(k)} = (unset)")
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{_key(k)}"
        out += f"\n[{name}]\n" + to_toml(v, prefix=name + ".").lstrip("\n")
    return out
