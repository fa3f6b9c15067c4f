"""``cdranon keys``: list the month keys of a keystore, destroy one.

Neither command needs the master key: listing reads only metadata, and destruction must
work even when the master key is lost (that is when an operator most wants it to).
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from service.audit import check_free_text
from service.commands.audit import add_audit_flag, auditor_from_args
from service.commands.common import add_keystore_flag, keystore_url
from service.errors import AuditWriteError, ConfigError
from service.keystore import (
    KeyInfo,
    KeyState,
    Keystore,
    key_id,
    open_keystore,
)
from service.months import parse_month

_COLUMNS = ("KEY ID", "STATE", "CREATED", "DESTROYED", "BACKEND")


def register(subparsers: Any) -> None:
    """Add ``keys list`` and ``keys destroy`` to the ``cdranon`` parser."""
    keys = subparsers.add_parser(
        "keys",
        help="list or destroy month keys",
        description="List the month keys of a keystore, or destroy one (cryptographic erasure).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    keys_sub.required = True

    ls = keys_sub.add_parser("list", help="list every key, active or destroyed")
    add_keystore_flag(ls)
    ls.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    ls.set_defaults(func=run_list)

    de = keys_sub.add_parser(
        "destroy",
        help="destroy a month key for good",
        description=(
            "Destroy the key of one month and retention class. The identifiers sealed "
            "under it become unrecoverable in every copy of the sealed data, and the "
            "month can never get a key again. There is no undo. Copies of the key file "
            "made earlier (backups) defeat this while the master key lives: see "
            "docs/keystore.md."
        ),
    )
    de.add_argument("--month", required=True, metavar="YYYY-MM", help="the month, e.g. 2025-11")
    de.add_argument(
        "--class",
        dest="retention_class",
        default="default",
        metavar="C",
        help="retention class of the key (default: %(default)s)",
    )
    add_keystore_flag(de)
    de.add_argument("--yes", action="store_true", help="confirm: destruction cannot be undone")
    de.add_argument(
        "--reason",
        default="manual destruction",
        metavar="TEXT",
        help="why (recorded in the audit log; default: %(default)s)",
    )
    de.add_argument("--by", default=None, metavar="WHO", help="who (default: the OS user)")
    add_audit_flag(de)
    de.set_defaults(func=run_destroy)


def _open(args: argparse.Namespace) -> Keystore:
    return open_keystore(keystore_url(args), need_secrets=False)


def _info_dict(info: KeyInfo) -> dict[str, str | None]:
    return {
        "key_id": info.key_id,
        "state": info.state.value,
        "created_at": info.created_at,
        "destroyed_at": info.destroyed_at,
        "backend": info.backend,
    }


def run_list(args: argparse.Namespace) -> int:
    """Print every key of the keystore as a table, or as JSON with ``--json``."""
    infos = _open(args).list()
    if args.json:
        print(json.dumps([_info_dict(i) for i in infos], indent=2))
        return 0
    if not infos:
        print(f"no keys in {keystore_url(args)}")
        return 0
    rows = [
        (i.key_id, i.state.value, i.created_at or "-", i.destroyed_at or "-", i.backend)
        for i in infos
    ]
    widths = [max(len(r[c]) for r in [_COLUMNS, *rows]) for c in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_destroy(args: argparse.Namespace) -> int:
    """Destroy one month key after ``--yes``; print what was destroyed."""
    parse_month(args.month)  # a clear "expected YYYY-MM" before anything else
    kid = key_id(args.month, args.retention_class)
    if not args.yes:
        raise ConfigError(
            f"refusing to destroy key {kid} without --yes: destruction cannot be undone "
            "and makes every identifier sealed under it unrecoverable"
        )
    check_free_text(args.reason, what="--reason")
    store = _open(args)
    # Opened before destroying: a misconfigured audit log stops us while nothing happened.
    with auditor_from_args(args) as auditor:
        before = next((i for i in store.list() if i.key_id == kid), None)
        existed = store.destroy(kid)
        if existed or before is None or before.state is not KeyState.DESTROYED:
            # Destroyed now (or tombstoned so it can never be created). If this write
            # fails the error says so and no success line is printed.
            try:
                auditor.record(
                    "key.destroyed",
                    actor=args.by or getpass.getuser(),
                    reason=args.reason,
                    key_id=kid,
                    existed=existed,
                    via="cdranon keys destroy",
                )
            except AuditWriteError as exc:
                raise AuditWriteError(
                    f"key {kid} was destroyed, but its audit event was not written ({exc}); "
                    "record it by hand and fix the audit log"
                ) from None
    if before is not None and before.state is KeyState.DESTROYED and not existed:
        print(f"key {kid} was already destroyed at {before.destroyed_at or 'an unknown time'}")
    elif existed:
        print(f"destroyed key {kid}: identifiers sealed under it can no longer be recovered")
    else:
        print(f"key {kid} did not exist; recorded it as destroyed so it can never be created")
    return 0
