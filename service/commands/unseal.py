"""``cdranon unseal``: restore the identifiers of sealed records (fraud, disputes).

Every read of sealed identifiers is an audit event (RETENTION-RULES.md): each run records
one ``unseal`` event (who, why, which key ids and months, how many records opened and
failed; never an identifier) and prints nothing until that event is written.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

import orjson

from service.audit import Auditor, check_free_text
from service.commands.audit import add_audit_flag, auditor_from_args
from service.commands.common import add_keystore_flag, keystore_url
from service.errors import ConfigError, KeystoreError, SealError
from service.holds import hold_id_of_key
from service.keyring import Keyring
from service.keystore import open_keystore
from service.sealing import Unsealer, blob_key_id


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "unseal",
        help="print sealed records with their identifiers restored",
        description="Read sealed records (JSON Lines, as written by `process` or read from a "
        "cdr.sealed.YYYY-MM topic) and print each with its identifiers restored under their "
        "input names. A record whose month key is destroyed gives a per-record error and a "
        "non-zero exit: that is cryptographic erasure working.",
    )
    p.add_argument("--input", required=True, metavar="FILE|-", help="sealed JSON Lines, - = stdin")
    p.add_argument(
        "--reason",
        required=True,
        metavar="TEXT",
        help="why, e.g. a case number (recorded in the audit log; never an identifier)",
    )
    p.add_argument("--by", default=None, metavar="WHO", help="who asks (default: the OS user)")
    add_keystore_flag(p)
    add_audit_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_free_text(args.reason, what="--reason")
    who = args.by or getpass.getuser()
    # Opened first: without a working audit log nothing is unsealed.
    auditor = auditor_from_args(args)
    try:
        return _unseal(args, who, auditor)
    finally:
        auditor.close()


def _unseal(args: argparse.Namespace, who: str, auditor: Auditor) -> int:
    keyring = Keyring(open_keystore(keystore_url(args)))
    unsealers: dict[str, Unsealer] = {}
    failed = ok = 0
    opened: list[bytes] = []
    tried: set[str] = set()  # key ids asked for, opened or not: both are reads to account for
    if args.input == "-":
        lines = sys.stdin.buffer.read().splitlines()
    else:
        try:
            lines = Path(args.input).read_bytes().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read --input {args.input}: {exc.strerror}") from exc
    out = sys.stdout.buffer
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
            if not isinstance(rec, dict) or "sealed" not in rec or "cdr_id" not in rec:
                raise SealError("not a sealed record (needs cdr_id and sealed)")
            kid = blob_key_id(rec["sealed"])
            held = hold_id_of_key(kid)
            if held is not None:
                # A legal hold's copy: its key lives with the hold, and reading it is the
                # hold's own audited command.
                raise SealError(
                    f"sealed under legal hold {held[0]}: use `cdranon hold unseal --id {held[0]}`"
                )
            tried.add(kid)
            u = unsealers.get(kid)
            if u is None:
                u = unsealers[kid] = Unsealer(keyring.get(kid, create=False))
            idents = u.unseal(rec.pop("sealed"), str(rec["cdr_id"]))
        except (SealError, KeystoreError) as exc:
            failed += 1
            print(f"cdranon: line {n}: {exc}", file=sys.stderr)
            continue
        except orjson.JSONDecodeError:
            failed += 1
            print(f"cdranon: line {n}: not valid JSON", file=sys.stderr)
            continue
        rec.update(idents)
        opened.append(orjson.dumps(rec) + b"\n")
        ok += 1
    kids = sorted(tried)
    # Written (and durable) before any identifier is shown: AuditWriteError stops here.
    auditor.record(
        "unseal",
        actor=who,
        reason=args.reason,
        key_ids=kids,
        months=sorted({k.partition("/")[0] for k in kids}),
        records=ok,
        failed=failed,
        input="stdin" if args.input == "-" else "file",
    )
    out.writelines(opened)
    out.flush()
    if failed:
        print(f"cdranon: {failed} record(s) could not be unsealed", file=sys.stderr)
        return 1
    return 0
