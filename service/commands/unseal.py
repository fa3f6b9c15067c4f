"""``cdranon unseal``: restore the identifiers of sealed records (fraud, disputes).

Every read of sealed identifiers is an audit event (RETENTION-RULES.md). Until the audit
log lands (retention issue), each run logs who-why-what to the ``cdranon.audit`` logger
on stderr, without identifiers.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path
from typing import Any

import orjson

from service.commands.common import add_keystore_flag, keystore_url
from service.errors import ConfigError, KeystoreError, SealError
from service.keyring import Keyring
from service.keystore import open_keystore
from service.sealing import Unsealer, blob_key_id

log = logging.getLogger("cdranon.audit")


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
        "--reason", default=None, metavar="TEXT", help="why (recorded in the audit trail)"
    )
    p.add_argument("--by", default=None, metavar="WHO", help="who asks (default: the OS user)")
    add_keystore_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    keyring = Keyring(open_keystore(keystore_url(args)))
    unsealers: dict[str, Unsealer] = {}
    failed = ok = 0
    who = args.by or getpass.getuser()
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
        out.write(orjson.dumps(rec) + b"\n")
        ok += 1
    out.flush()
    log.warning(
        "unseal by=%s reason=%s input=%s records=%d failed=%d keys=%s",
        who,
        args.reason or "(none given)",
        args.input,
        ok,
        failed,
        ",".join(sorted(unsealers)) or "-",
    )
    if failed:
        print(f"cdranon: {failed} record(s) could not be unsealed", file=sys.stderr)
        return 1
    return 0
