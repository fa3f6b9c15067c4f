"""``cdranon audit verify|show``, and the helpers other commands use to open the audit log.

``verify`` exits 0 when every event and chain checks out, 1 when the log was tampered
with (the first bad event is named), 2 for usage errors (bad flags, no trusted key,
unreadable log). docs/audit.md explains the checks and their limits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from service.audit import (
    DEFAULT_TOPIC,
    DEV_PUBLIC_KEY_NAME,
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_FILE,
    Auditor,
    Problem,
    VerifyReport,
    anchors_from_json,
    anchors_to_json,
    default_audit_dir,
    default_audit_target,
    format_time,
    load_public_key,
    load_signing_key,
    open_auditor,
    parse_target,
    public_key_id,
    read_file_events,
    read_partition,
    verify,
)
from service.commands.run import add_config_flag
from service.config import Settings, load_settings, plain_conf
from service.errors import ConfigError
from service.months import parse_rfc3339

EXIT_OK = 0
EXIT_TAMPERED = 1


# ----------------------------------------------------------- helpers for other commands


def add_audit_flag(parser: argparse.ArgumentParser) -> None:
    """``--audit TARGET`` (default: the ``audit.target`` setting) and ``--config FILE``."""
    parser.add_argument(
        "--audit",
        metavar="TARGET",
        default=None,
        help="audit log: file:///PATH, kafka://HOST:PORT/TOPIC or kafka:TOPIC "
        "(default: audit.target in the config, else "
        "file://${CDRANON_HOME:-~/.local/share/cdranon}/audit/audit.jsonl)",
    )
    if not any("--config" in a.option_strings for a in parser._actions):
        add_config_flag(parser)


def configured_target(settings: Settings, override: str | None = None) -> str:
    """The audit target: ``override``, else ``audit.target``, else the default file."""
    return override or settings.audit.target or default_audit_target(os.environ)


def _kafka_conf(settings: Settings) -> dict[str, str]:
    conf = {"bootstrap.servers": settings.kafka.bootstrap_servers}
    conf.update(plain_conf(settings.kafka.librdkafka))
    return conf


def _dev_dir(target: str) -> Path:
    kind, where, _ = parse_target(target)
    return Path(where).expanduser().parent if kind == "file" else default_audit_dir(os.environ)


def open_configured_auditor(
    settings: Settings, *, target: str | None = None, writer: str | None = None
) -> Auditor:
    """Open the audit log as configured (target, signing key, writer, Kafka security)."""
    tgt = configured_target(settings, target)
    a = settings.audit
    key = load_signing_key(
        env=os.environ,
        text=a.signing_key.get_secret_value() if a.signing_key else None,
        key_file=a.signing_key_file,
        dev_dir=_dev_dir(tgt),
    )
    return open_auditor(
        tgt, signing_key=key, writer=writer or a.writer, kafka_conf=_kafka_conf(settings)
    )


def auditor_from_args(args: argparse.Namespace, *, writer: str | None = None) -> Auditor:
    """The auditor named by ``--audit`` / ``--config`` (see :func:`add_audit_flag`)."""
    return open_configured_auditor(
        load_settings(getattr(args, "config", None)), target=args.audit, writer=writer
    )


def trusted_keys(
    settings: Settings, files: Iterable[Path], target: str
) -> dict[str, Ed25519PublicKey]:
    """Public keys to verify with: ``files`` if given; else the configured ones.

    Configured: ``audit.public_key_files``, the public half of the configured signing key,
    and the dev-mode public key beside the log if there is one.
    """
    given = list(files)
    keys = [load_public_key(p) for p in given]
    if not given:
        keys.extend(load_public_key(p) for p in settings.audit.public_key_files)
        a = settings.audit
        configured = (
            os.environ.get(ENV_SIGNING_KEY, "").strip()
            or os.environ.get(ENV_SIGNING_KEY_FILE, "").strip()
            or a.signing_key is not None
            or a.signing_key_file is not None
        )
        if configured:  # a verifier needs only public keys; a signer's own key is one
            keys.append(
                load_signing_key(
                    env=os.environ,
                    text=a.signing_key.get_secret_value() if a.signing_key else None,
                    key_file=a.signing_key_file,
                ).public_key
            )
        dev_pub = _dev_dir(target) / DEV_PUBLIC_KEY_NAME
        if dev_pub.exists():
            keys.append(load_public_key(dev_pub))
    if not keys:
        raise ConfigError(
            "no public key to verify with: pass --public-key FILE (the PEM the signer "
            "published) or configure audit.signing_key_file / audit.public_key_files"
        )
    return {public_key_id(k): k for k in keys}


# ------------------------------------------------------------------------- commands


def register(subparsers: Any) -> None:
    """Add ``audit verify`` and ``audit show``."""
    p = subparsers.add_parser(
        "audit",
        help="verify or show the tamper-evident audit log",
        description="The audit log records key creation and destruction, deletions, legal "
        "holds, unseal runs and retention passes as signed, hash-chained events.",
    )
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    sub.required = True

    v = sub.add_parser(
        "verify",
        help="check every signature and chain; name the first bad event",
        description="Exit 0: intact. Exit 1: tampered (the first bad event is named). "
        "Exit 2: usage error. A hash chain cannot see its newest events cut off: keep the "
        "heads printed by --save-anchors somewhere else and pass them back with --anchors.",
    )
    _source_flags(v)
    v.add_argument(
        "--public-key",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="trusted Ed25519 public key (PEM); repeat for rotated keys "
        "(default: the configured keys)",
    )
    v.add_argument(
        "--anchors",
        type=Path,
        default=None,
        metavar="FILE",
        help="heads saved by an earlier verify: detects truncation and rewriting since",
    )
    v.add_argument(
        "--save-anchors",
        type=Path,
        default=None,
        metavar="FILE",
        help="write each writer's head (seq, hash) here after a successful verify",
    )
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=run_verify)

    s = sub.add_parser("show", help="print audit events readably")
    _source_flags(s)
    s.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="NAME",
        help="only these events; a name ending in '.' is a prefix (hold.); repeatable",
    )
    s.add_argument("--since", default=None, metavar="RFC3339", help="only events at or after")
    s.add_argument("--json", action="store_true", help="print JSON Lines (the stored events)")
    s.set_defaults(func=run_show)


def _source_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", type=Path, default=None, metavar="PATH", help="an audit file")
    src.add_argument(
        "--bootstrap", default=None, metavar="HOST:PORT", help="read the audit topic there"
    )
    p.add_argument(
        "--topic",
        default=None,
        metavar="NAME",
        help=f"audit topic (with --bootstrap; default: {DEFAULT_TOPIC})",
    )
    add_config_flag(p)


def _load(args: argparse.Namespace, settings: Settings) -> tuple[str, list[bytes], bool, list[int]]:
    """(target, events, ends cleanly, positions) from --file, --bootstrap or the config."""
    if args.topic and not args.bootstrap:
        raise ConfigError("--topic needs --bootstrap HOST:PORT")
    if args.file is not None:
        target = f"file://{args.file}"
    elif args.bootstrap:
        target = f"kafka://{args.bootstrap}/{args.topic or DEFAULT_TOPIC}"
    else:
        target = configured_target(settings)
    kind, where, bootstrap = parse_target(target)
    if kind == "file":
        lines, clean = read_file_events(Path(where).expanduser())
        return target, lines, clean, list(range(1, len(lines) + 1))
    conf = _kafka_conf(settings)
    if bootstrap:
        conf["bootstrap.servers"] = bootstrap
    records = read_partition(conf, where, 0, None)
    # A record with no value cannot be an event; b"" makes verify name it.
    return target, [v or b"" for _, v in records], True, [o for o, _ in records]


def _where(target: str, positions: list[int], index: int) -> str:
    if not positions:
        return ""
    pos = positions[min(index, len(positions) - 1)]
    return f"line {pos}" if target.startswith("file:") else f"offset {pos}"


def run_verify(args: argparse.Namespace) -> int:
    """Verify the log; exit 0 intact, 1 tampered."""
    settings = load_settings(args.config)
    target, events, clean, positions = _load(args, settings)
    keys = trusted_keys(settings, args.public_key, target)
    anchors = None
    if args.anchors is not None:
        try:
            data = args.anchors.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --anchors {args.anchors}: {exc.strerror}") from None
        anchors = anchors_from_json(data, source=str(args.anchors))
    report = verify(events, keys, anchors=anchors)
    if report.ok and not clean:
        report.problem = Problem(
            len(events) - 1, "no newline after the last event (torn write or truncated file)"
        )
    _print_report(args, target, report, positions, sorted(keys))
    if report.ok and args.save_anchors is not None:
        try:
            args.save_anchors.write_bytes(anchors_to_json(report.heads) + b"\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot write --save-anchors {args.save_anchors}: {exc.strerror}"
            ) from None
    return EXIT_OK if report.ok else EXIT_TAMPERED


def _print_report(
    args: argparse.Namespace,
    target: str,
    report: VerifyReport,
    positions: list[int],
    key_ids: list[str],
) -> None:
    p = report.problem
    if args.json:
        out: dict[str, Any] = {
            "target": target,
            "ok": report.ok,
            "events": report.events,
            "writers": {w: {"seq": h.seq, "time": h.time} for w, h in report.heads.items()},
            "keys": key_ids,
            "problem": None
            if p is None
            else {
                "index": p.index,
                "position": _where(target, positions, p.index),
                "writer": p.writer,
                "seq": p.seq,
                "reason": p.reason,
            },
        }
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if p is None:
        print(
            f"audit log {target}: OK, {report.events} events, {len(report.heads)} writer "
            f"chain(s), signatures under {', '.join(key_ids)}"
        )
        for w, h in sorted(report.heads.items()):
            print(f"  {w}: seq {h.seq}, last at {h.time}")
    else:
        print(
            f"audit log {target}: TAMPERED at {_where(target, positions, p.index)}, {p.describe()}",
            file=sys.stderr,
        )


def _matches(name: str, wanted: list[str]) -> bool:
    return not wanted or any(name == w or (w.endswith(".") and name.startswith(w)) for w in wanted)


def run_show(args: argparse.Namespace) -> int:
    """Print events (filtered) as a table or JSON Lines. Does not verify: see `verify`."""
    settings = load_settings(args.config)
    _, events, _, positions = _load(args, settings)
    since = None
    if args.since is not None:
        try:
            since = format_time(parse_rfc3339(args.since))
        except ValueError:
            raise ConfigError(
                f"--since {args.since!r}: expected an RFC 3339 time such as 2026-01-01T00:00:00Z"
            ) from None
    rows: list[tuple[str, ...]] = []
    out = sys.stdout
    for pos, raw in zip(positions, events, strict=True):
        try:
            ev = orjson.loads(raw)
            name, when = str(ev["event"]), str(ev["time"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            rows.append((str(pos), "?", "?", "?", "(unreadable event: run audit verify)", "", ""))
            continue
        if not _matches(name, args.event) or (since is not None and when < since):
            continue
        if args.json:
            out.write(raw.decode("utf-8", "replace") + "\n")
            continue
        details = orjson.dumps(ev.get("details"), option=orjson.OPT_SORT_KEYS).decode()
        rows.append(
            (
                when,
                str(ev.get("writer")),
                str(ev.get("seq")),
                name,
                str(ev.get("actor")),
                str(ev.get("reason") or "-"),
                details,
            )
        )
    if not args.json:
        _table(("TIME", "WRITER", "SEQ", "EVENT", "ACTOR", "REASON", "DETAILS"), rows)
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    if not rows:
        print("no audit events match")
        return
    # The last column (details) is not padded: it can be long.
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
