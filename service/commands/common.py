"""Flags and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path

from service.errors import ConfigError
from service.keystore import ENV_KEYSTORE, default_keystore_url
from service.months import now_utc, parse_rfc3339
from service.policy import Policy, load_policy

ENV_POLICY = "CDRANON_POLICY"


def add_keystore_flag(parser: argparse.ArgumentParser) -> None:
    """``--keystore URL`` with the documented default chain."""
    parser.add_argument(
        "--keystore",
        metavar="URL",
        default=None,
        help=f"keystore URL, e.g. file:///var/lib/cdranon/keys (default: ${ENV_KEYSTORE}, "
        "else file://${CDRANON_HOME:-~/.local/share/cdranon}/keys)",
    )


def keystore_url(args: argparse.Namespace) -> str:
    """The keystore URL from ``--keystore``, ``$CDRANON_KEYSTORE`` or the default."""
    url: str | None = args.keystore or os.environ.get(ENV_KEYSTORE, "").strip() or None
    return url or default_keystore_url(os.environ)


def add_policy_flag(parser: argparse.ArgumentParser) -> None:
    """``--policy FILE`` (default: $CDRANON_POLICY, else the packaged defaults)."""
    parser.add_argument(
        "--policy",
        metavar="FILE",
        type=Path,
        default=None,
        help=f"field and retention policy TOML (default: ${ENV_POLICY}, else packaged defaults)",
    )


def policy_from(args: argparse.Namespace) -> Policy:
    """Load the policy named by ``--policy`` or ``$CDRANON_POLICY``."""
    path: Path | None = args.policy
    if path is None and os.environ.get(ENV_POLICY, "").strip():
        path = Path(os.environ[ENV_POLICY].strip())
    return load_policy(path)


def add_now_flag(parser: argparse.ArgumentParser) -> None:
    """``--now RFC3339``: pretend it is this instant (deadlines are judged against it)."""
    parser.add_argument(
        "--now",
        metavar="RFC3339",
        default=None,
        help="judge deadlines as of this instant, e.g. 2026-12-01T00:00:00Z (default: the clock)",
    )


def now_from(args: argparse.Namespace) -> datetime:
    """The instant of ``--now``, or the clock."""
    if args.now is None:
        return now_utc()
    try:
        return parse_rfc3339(args.now)
    except ValueError:
        raise ConfigError(
            f"--now {args.now!r}: expected an RFC 3339 time such as 2026-12-01T00:00:00Z"
        ) from None
