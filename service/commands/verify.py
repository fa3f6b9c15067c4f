"""``cdranon verify``: prove that retained records are unaltered ("original form").

Checks the audit log's chain and signatures, then the month's sanitised records against
the signed ``integrity.root`` events: altered, missing, extra, replaced or reordered
records, and records in no signed range, are reported. ``--record`` prints an inclusion
proof a third party can check with the published public key (docs/integrity.md).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from service.audit import read_file_events, read_partition, verify
from service.checkpoints import check_checkpoints, month_of_stream
from service.commands.audit import _kafka_conf, trusted_keys
from service.commands.common import add_policy_flag, policy_from
from service.commands.run import add_config_flag
from service.config import load_settings
from service.errors import ConfigError
from service.integrity import added_fields, canonical, leaf_of
from service.verify import (
    Finding,
    NoProofError,
    Report,
    RootEvent,
    TaggedRecord,
    proof_for,
    proof_for_batch,
    verify_batches,
    verify_stream,
)

_SANITISED_TOPIC = re.compile(r"^[A-Za-z0-9._-]*sanitised\.\d{4}-\d{2}$")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="prove a month's sanitised records unaltered against the signed audit log",
        description="Exit 0: every record proven. Exit 1: something was altered, missing, "
        "extra, out of place or unproven (each finding is listed). Exit 2: usage error.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--file", type=Path, metavar="PATH", help="a month file DIR/sanitised/YYYY-MM.jsonl"
    )
    src.add_argument("--topic", metavar="NAME", help="a month topic, cdr.sanitised.YYYY-MM")
    p.add_argument(
        "--bootstrap", metavar="HOST:PORT", default=None, help="the broker (with --topic)"
    )
    p.add_argument(
        "--audit",
        metavar="TARGET",
        default=None,
        help="the audit log: a file path, or a topic name on the same broker "
        "(default: DIR/audit.jsonl beside a month file; cdr.audit for a topic)",
    )
    p.add_argument(
        "--public-key",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="trusted Ed25519 public key (PEM); default: the configured and dev-mode keys",
    )
    p.add_argument(
        "--record", metavar="CDR_ID", default=None, help="print this record's inclusion proof"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        # Default 1: on the 2-vCPU benchmark machine 2 jobs only matched 1 (the processes
        # contend for memory bandwidth; docs/integrity.md).
        help="processes that parse and hash records (default 1; each extra one gets a "
        "share of the month: use with idle cores)",
    )
    add_policy_flag(p)
    add_config_flag(p)
    p.set_defaults(func=run)


def _file_source(path: Path, audit: str | None) -> tuple[dict[str, list[tuple[int, bytes]]], Path]:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read --file {path}: {exc.strerror}") from None
    stream = f"{path.parent.name}/{path.name}"
    audit_path = Path(audit) if audit else path.parent.parent / "audit.jsonl"
    return {stream: list(enumerate(lines))}, audit_path


def _topic_records(conf: dict[str, str], topic: str, timeout_s: float = 60.0) -> list[TaggedRecord]:
    """Every committed record of every partition of ``topic``, with its leaf tag."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415  # CLI start-up time

    c = Consumer(
        {
            **conf,
            "group.id": "cdranon-verify",
            "enable.auto.commit": "false",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=timeout_s)
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None:
            raise ConfigError(f"topic {topic} not found on the broker")
        out: list[TaggedRecord] = []
        ends: dict[int, int] = {}
        for p in tmd.partitions:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > 0:
                ends[p] = high
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise ConfigError(f"timed out reading {topic}")
            for m in c.consume(1000, 0.5):
                p, off = m.partition(), m.offset()
                if m.error() is not None or p is None or off is None:
                    continue
                value = m.value() or b""
                out.append((str(p), off, value, leaf_of(value)))
            for tp in c.position([TopicPartition(topic, p) for p in list(ends)]):
                # read_committed stops at the last stable offset; transaction markers leave
                # gaps, so wait on the position, not on a count.
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return out
    finally:
        c.close()


def run(args: argparse.Namespace) -> int:
    policy = policy_from(args)
    added = added_fields(policy)
    settings = load_settings(args.config)
    if args.topic is not None:
        return _run_topic(args, settings, added)
    streams, audit_path = _file_source(args.file, args.audit)
    target = f"file://{audit_path}"
    events, _clean = read_file_events(audit_path)
    if not _chain_ok(settings, args, target, events):
        return 1
    roots = _roots(events, set(streams))
    if args.record is not None:
        return _print_proof(args.record, streams, roots, added, events)
    reports = {
        s: verify_stream(s, recs, roots.get(s, []), added, jobs=args.jobs)
        for s, recs in streams.items()
    }
    _add_checkpoint_findings(reports, events)
    _print(reports, args.json)
    return 0 if all(r.ok for r in reports.values()) else 1


def _run_topic(args: argparse.Namespace, settings: Any, added: frozenset[str]) -> int:
    if not _SANITISED_TOPIC.match(args.topic):
        raise ConfigError(
            f"--topic {args.topic!r}: expected a month topic such as cdr.sanitised.2026-10"
        )
    conf = _kafka_conf(settings)
    if args.bootstrap:
        conf["bootstrap.servers"] = args.bootstrap
    if not conf.get("bootstrap.servers"):
        raise ConfigError("--topic needs --bootstrap HOST:PORT (or kafka settings in --config)")
    prefix = args.topic.rsplit(".sanitised.", 1)[0]
    audit_topic = args.audit or f"{prefix}.audit"
    target = f"kafka://{conf['bootstrap.servers']}/{audit_topic}"
    events = [v or b"" for _, v in read_partition(conf, audit_topic, 0, None)]
    if not _chain_ok(settings, args, target, events):
        return 1
    tagged = _topic_records(conf, args.topic)
    roots = _roots(events, {args.topic}).get(args.topic, [])
    if args.record is not None:
        try:
            proof = proof_for_batch(args.record, args.topic, tagged, roots, added)
        except NoProofError as exc:
            return _refused(exc)
        return _emit_proof(proof, args.record, events)
    reports = {args.topic: verify_batches(args.topic, tagged, roots, added)}
    _add_checkpoint_findings(reports, events)
    _print(reports, args.json)
    return 0 if all(r.ok for r in reports.values()) else 1


def _add_checkpoint_findings(reports: dict[str, Report], events: list[bytes]) -> None:
    """A month checkpoint that does not match the roots logged before it is a finding."""
    problems = check_checkpoints(events)
    for stream, rep in reports.items():
        month = month_of_stream(stream)
        why = problems.get(month) if month is not None else None
        if why is not None:
            rep.findings.append(Finding("checkpoint", stream, None, None, why))


def _chain_ok(settings: Any, args: argparse.Namespace, target: str, events: list[bytes]) -> bool:
    keys = trusted_keys(settings, args.public_key, target)
    chain = verify(events, keys)
    if not chain.ok:
        print(f"cdranon: the audit log is not intact: {chain.problem}", file=sys.stderr)
        return False
    return True


def _roots(events: Iterable[bytes], streams: set[str]) -> dict[str, list[RootEvent]]:
    out: dict[str, list[RootEvent]] = {}
    for raw in events:
        ev = orjson.loads(raw)
        if ev.get("event") != "integrity.root":
            continue
        root = RootEvent.from_event(ev)
        if root.stream in streams:
            out.setdefault(root.stream, []).append(root)
    return out


def _print(reports: dict[str, Report], as_json: bool) -> None:
    if as_json:
        doc = {
            s: {
                "records": r.records,
                "proven": r.proven,
                "ranges": r.ranges,
                "ok": r.ok,
                "findings": [_finding(f) for f in r.findings],
            }
            for s, r in reports.items()
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for s, r in sorted(reports.items()):
        verdict = "OK" if r.ok else "FAILED"
        print(f"{s}: {verdict}: {r.proven}/{r.records} records proven by {r.ranges} signed root(s)")
        for f in r.findings:
            where = f" position {f.position}" if f.position is not None else ""
            rec = f" cdr_id {f.cdr_id}" if f.cdr_id else ""
            print(f"  {f.kind}:{where}{rec}: {f.detail}")


def _finding(f: Any) -> dict[str, Any]:
    return {k: getattr(f, k) for k in ("kind", "stream", "position", "cdr_id", "detail")}


def _print_proof(
    cdr_id: str,
    streams: dict[str, list[tuple[int, bytes]]],
    roots: dict[str, list[RootEvent]],
    added: frozenset[str],
    events: list[bytes],
) -> int:
    for s, recs in streams.items():
        try:
            proof = proof_for(cdr_id, s, recs, roots.get(s, []), added)
        except NoProofError as exc:
            return _refused(exc)
        if proof is not None:
            return _emit_proof(proof, cdr_id, events)
    return _emit_proof(None, cdr_id, events)


def _refused(exc: NoProofError) -> int:
    """No proof printed: why, on stderr; exit 1."""
    print(f"cdranon: {exc}; `cdranon verify` without --record says more", file=sys.stderr)
    return 1


def _emit_proof(proof: dict[str, Any] | None, cdr_id: str, events: list[bytes]) -> int:
    if proof is None:
        print(f"cdranon: record {cdr_id} is in no signed range of the given month", file=sys.stderr)
        return 1
    proof["canonical"] = canonical(proof["billing"]).decode()
    want = proof["audit_event"]
    for raw in events:
        ev = orjson.loads(raw)
        if ev.get("writer") == want["writer"] and ev.get("seq") == want["seq"]:
            proof["audit_event"] = ev  # the whole signed event, for the third party
    sys.stdout.write(orjson.dumps(proof, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
