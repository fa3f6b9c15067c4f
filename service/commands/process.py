"""``cdranon process``: the batch mode over JSON Lines files (backfills, trying it out)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
from tqdm import tqdm

from service.audit import open_auditor
from service.batch_mode import DEFAULT_BATCH, MonthFiles, Summary, process_lines
from service.commands.common import (
    add_keystore_flag,
    add_now_flag,
    add_policy_flag,
    keystore_url,
    now_from,
    policy_from,
)
from service.errors import ConfigError
from service.keyring import Keyring
from service.keystore import open_keystore
from service.months import rfc3339, to_ms
from service.runtime import tune_gc
from service.transform import Transformer


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "process",
        help="anonymise a JSON Lines file into month files",
        description="Read CDRs (one JSON object per line), write DIR/sealed/YYYY-MM.jsonl, "
        "DIR/sanitised/YYYY-MM.jsonl and DIR/rejected.jsonl (appending), print a summary.",
    )
    p.add_argument("--input", required=True, metavar="FILE|-", help="JSON Lines input, - = stdin")
    p.add_argument("--out", required=True, metavar="DIR", type=Path, help="output directory")
    add_now_flag(p)
    add_keystore_flag(p)
    add_policy_flag(p)
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH, metavar="N", help="records per batch"
    )
    p.add_argument(
        "--no-integrity",
        action="store_true",
        help="no billing digests and no signed Merkle roots (DIR/audit.jsonl); "
        "see `cdranon verify`",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _open_input(name: str) -> Iterator[tuple[IO[bytes], int | None]]:
    if name == "-":
        yield sys.stdin.buffer, None
        return
    try:
        f = Path(name).open("rb")  # noqa: SIM115  # closed below; the error must name the flag
    except OSError as exc:
        raise ConfigError(f"cannot read --input {name}: {exc.strerror}") from exc
    with f:
        yield f, os.fstat(f.fileno()).st_size


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    policy = policy_from(args)
    now = now_from(args)
    integrity = not args.no_integrity
    transformer = Transformer(
        policy, Keyring(open_keystore(keystore_url(args))), integrity=integrity
    )
    files = MonthFiles(args.out)
    # The signed integrity roots go to DIR/audit.jsonl (signing key: the environment,
    # else dev mode beside it).
    auditor = (
        open_auditor(f"file://{args.out.absolute()}/audit.jsonl", writer="process")
        if integrity
        else None
    )
    tune_gc()
    with _open_input(args.input) as (stream, size):
        bar: Any = None
        if not args.no_progress and sys.stderr.isatty():
            bar = tqdm(total=size, unit="B", unit_scale=True, desc="process", file=sys.stderr)
        try:
            summary = process_lines(
                stream,
                transformer,
                files,
                to_ms(now),
                batch_size=args.batch_size,
                on_batch=bar.update if bar is not None else None,
                auditor=auditor,
            )
        finally:
            if bar is not None:
                bar.close()
            files.close()
            if auditor is not None:
                auditor.close()
    _print_summary(summary, args, rfc3339(now))
    return 0


def _print_summary(s: Summary, args: argparse.Namespace, now: str) -> None:
    if args.json:
        doc = {"now": now, "out": str(args.out), **s.as_dict()}
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        return
    stripped = sum(s.stripped.values())
    rejected = sum(s.rejected.values())
    lines = [
        f"processed {s.records} records as of {now} into {args.out}",
        f"  sealed      {s.sealed:>10}  (identifiers sealed under their month key)",
        f"  stripped    {stripped:>10}  (past the identifier deadline: no identifiers kept)",
        f"  rejected    {rejected:>10}  (see {args.out / 'rejected.jsonl'})",
        f"  sanitised   {s.sanitised:>10}  (= sealed + stripped)",
    ]
    for reason, n in sorted(s.rejected.items()):
        lines.append(f"    rejected/{reason}: {n}")
    for reason, n in sorted(s.stripped.items()):
        lines.append(f"    stripped/{reason}: {n}")
    if s.months:
        lines.append(f"  months: {', '.join(sorted(s.months))}")
    sys.stdout.write("\n".join(lines) + "\n")
