"""Support for the ``cdranon run`` integration tests: input, processes, read-back, invariants.

The processor runs as a real ``cdranon run`` subprocess (so it can be killed with SIGKILL);
its JSON log lines on stderr are collected by a thread and waited on with deadlines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports OffsetSpec without declaring it.
from confluent_kafka.admin._listoffsets import OffsetSpec

from service.audit import generate_signing_key
from service.config import Settings, load_settings
from service.kafka.topics import TopicNames
from service.keyring import Keyring
from service.keystore import generate_master_key, open_keystore
from service.months import add_months, month_of, now_utc, parse_rfc3339, to_ms
from service.policy import load_policy
from service.sealing import Unsealer
from tests.integration.kafka_helpers import Record, consume_until

REPO = Path(__file__).resolve().parents[2]


def recent_months(n: int = 3, now: datetime | None = None) -> list[str]:
    """The ``n`` months ending with the current one (all within the identifier window)."""
    y, m = (int(p) for p in month_of(now or now_utc()).split("-"))
    out = []
    for back in range(n - 1, -1, -1):
        y2, m2 = add_months(y, m, -back)
        out.append(f"{y2:04d}-{m2:02d}")
    return out


def redate(value: bytes, when: datetime) -> bytes:
    """The same CDR with another event_time (to make records past a deadline)."""
    doc = orjson.loads(value)
    doc["event_time"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return orjson.dumps(doc)


@dataclass(frozen=True, slots=True)
class Sent:
    """The input as written: values in order and where each landed."""

    values: list[bytes]
    position: dict[tuple[int, int], int]  # (partition, offset) -> index in values


def produce_input(
    bootstrap: str, topic: str, values: Sequence[bytes], partitions: int | None = None
) -> Sent:
    """Write ``values`` to ``topic`` (idempotent producer, keyless); wait for every ack.

    Keyless records go through librdkafka's sticky partitioner, which sends a burst to one
    partition (9,995 of a chunk of 10,000 in one run). ``partitions``: write round-robin
    over ``0..partitions-1`` instead (value i to partition i % partitions), for a scenario
    in which every member of a group must get work from a chunk.
    """
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20}
    )
    position: dict[tuple[int, int], int] = {}
    errors: list[str] = []

    def make_cb(i: int) -> Callable[[KafkaError | None, Message], None]:
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                position[(msg.partition() or 0, msg.offset() or 0)] = i

        return cb

    for i, v in enumerate(values):
        while True:
            try:
                if partitions is None:
                    producer.produce(topic, v, on_delivery=make_cb(i))
                else:
                    producer.produce(topic, v, partition=i % partitions, on_delivery=make_cb(i))
                break
            except BufferError:
                producer.poll(0.1)  # the queue is full: serve delivery reports
        producer.poll(0)
    assert producer.flush(60) == 0, "input not fully acknowledged"
    assert not errors, errors[:3]
    assert len(position) == len(values)
    return Sent(list(values), position)


def join_sent(a: Sent, b: Sent) -> Sent:
    """Two produce_input results on one topic as one."""
    shift = len(a.values)
    return Sent(
        a.values + b.values, {**a.position, **{k: v + shift for k, v in b.position.items()}}
    )


def write_config(
    path: Path,
    *,
    bootstrap: str,
    prefix: str,
    group: str,
    keystore: Path,
    max_records: int = 10_000,
    instance_id: str | None = None,
    metrics_port: int | None = None,
    extra: str = "",
    keystore_url: str | None = None,
) -> Path:
    """A settings TOML for one test's processors (``keystore_url`` overrides ``keystore``)."""
    lines = [
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'topic_prefix = "{prefix}"',
        f'group_id = "{group}"',
        "session_timeout_ms = 6000",
        "transaction_timeout_ms = 10000",
        "statistics_interval_ms = 1000",
    ]
    if instance_id is not None:
        lines.append(f'instance_id = "{instance_id}"')
    lines += [
        "[batch]",
        f"max_records = {max_records}",
        "max_wait_ms = 100",
        "[topics]",
        "partitions = 3",
        "replication_factor = 1",
        "[keystore]",
        f'url = "{keystore_url or f"file://{keystore}"}"',
        "[metrics]",
        f"enabled = {'true' if metrics_port is not None else 'false'}",
        f"port = {metrics_port or 0}",
        "[logging]",
        'level = "DEBUG"',
    ]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class Processor:
    """One ``cdranon run`` subprocess (or another ``command`` of the CLI taking
    ``--config``) with its log lines collected."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str],
        name: str = "p",
        *,
        prefix_cmd: Sequence[str] = (),
        command: Sequence[str] = ("run",),
    ) -> None:
        """``prefix_cmd``: a command the processor runs under, e.g. ``setpriv --reuid=...``
        to run it as an unprivileged user (root ignores file modes). ``command``: the CLI
        command and its flags, e.g. ``("retention", "watch", "--max-passes", "1")``."""
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*prefix_cmd, sys.executable, "-m", "service.cli", *command, "--config", str(config)],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError:
                doc = {"event": "non_json", "text": text}
            with self._cond:
                self.raw.append(text)
                self.lines.append(doc if isinstance(doc, dict) else {"event": "non_json"})
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def count(self, event: str) -> int:
        with self._cond:
            return sum(1 for d in self.lines if d.get("event") == event)

    def events(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [d for d in self.lines if d.get("event") == event]

    def owned(self) -> int:
        """How many partitions the processor owns after its last rebalance event.

        With cooperative-sticky assignment the events are increments (an assignment of 3
        while already owning 3 is logged ``assigned=6``), and a revoke or a loss can come
        between: the last assigned/revoked/lost line says what it owns now.
        """
        kinds = ("partitions_assigned", "partitions_revoked", "partitions_lost")
        with self._cond:
            for d in reversed(self.lines):
                if d.get("event") in kinds:
                    return int(d["assigned"])
        return 0

    def owned_partitions(self) -> set[int]:
        """The partitions it owns after its rebalance events so far (cooperative-sticky:
        ``partitions_assigned`` adds, ``partitions_revoked`` / ``partitions_lost`` remove)."""
        owned: set[int] = set()
        with self._cond:
            for d in self.lines:
                ev = d.get("event")
                if ev == "partitions_assigned":
                    owned |= set(d["partitions"])
                elif ev in ("partitions_revoked", "partitions_lost"):
                    owned -= set(d["partitions"])
        return owned

    def summary(self) -> str:
        """A short state line for assertion messages: alive, commits, ownership, last lines."""
        return (
            f"{self.name}: rc={self.proc.poll()} committed={self.count('batch_committed')} "
            f"owned={self.owned()} last={self.raw[-12:]}"
        )

    # What a duplicate or a stall is explained by: the runner's transaction and group
    # decisions (kafka_error and batch_committed lines would drown them).
    _STORY = frozenset(
        {
            "runner_starting",
            "partitions_assigned",
            "partitions_revoked",
            "partitions_lost",
            "transaction_aborting",
            "rewound",
            "producer_stuck",
            "kafka_clients_restarting",
            "send_offsets_retry",
            "commit_retry",
            "committed_unavailable",
            "broker_unavailable",
            "stop_requested",
            "stop_grace_expired",
            "fatal",
        }
    )

    def story(self, last: int = 60) -> str:
        """The runner's decisions in order (repeats folded, ``batch_committed`` counted
        between them), for the message of a failed exactly-once or progress check."""
        out: list[str] = []
        committed = 0
        prev = ""
        with self._cond:
            lines = list(self.lines)
        for d in lines:
            ev = str(d.get("event", ""))
            if ev == "batch_committed":
                committed += 1
                continue
            if ev not in self._STORY:
                continue
            if committed:
                out.append(f"  ({committed} batches committed)")
                committed = 0
            detail = {k: v for k, v in d.items() if k not in ("event", "level", "logger", "ts")}
            line = f"  {d.get('ts', '')} {ev} {detail}"
            if ev == prev and out and out[-1].endswith("(repeated)"):
                continue
            out.append(line if ev != prev else f"  {ev} (repeated)")
            prev = ev
        if committed:
            out.append(f"  ({committed} batches committed)")
        return f"{self.name}:\n" + "\n".join(out[-last:])

    def wait_for(self, event: str, n: int = 1, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait for the ``n``-th line with this event; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = [d for d in self.lines if d.get("event") == event]
                if len(found) >= n:
                    return found[n - 1]
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"{self.name} exited ({self.proc.returncode}) before {event!r} x{n}; "
                        f"last lines: {self.raw[-8:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name}: no {event!r} x{n} within {timeout_s}s; "
                        f"last lines: {self.raw[-8:]}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._finish()

    def _finish(self) -> None:
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self._finish()
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill9()
        else:
            self._finish()


def runner_settings(
    bootstrap: str,
    tmp_path: Path,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    signing_key: bool = False,
) -> Settings:
    """Settings of an in-process runner of the test's own (prefix, group and instance id
    from ``name``): master key and home in the test's environment, and an audit signing
    key when ``signing_key``."""
    monkeypatch.setenv("CDRANON_MASTER_KEY", generate_master_key())
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    if signing_key:
        monkeypatch.setenv("CDRANON_AUDIT__SIGNING_KEY", generate_signing_key())
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=bootstrap,
        prefix=name,
        group=f"g-{name}",
        keystore=tmp_path / "keys",
        instance_id=name,
    )
    return load_settings(cfg)


def committed_total(
    bootstrap: str, group: str, topic: str, timeout_s: float = 30.0
) -> tuple[int, int]:
    """(sum of the group's committed offsets, sum of the high watermarks) on ``topic``.

    Retries the transient answers of a young broker (coordinator not ready) or of one
    just thawed or restarted (metadata not yet refreshed: unknown partition, no leader)
    until ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _committed_total(bootstrap, group, topic)
        except KafkaException as exc:
            err = exc.args[0]
            transient = isinstance(err, KafkaError) and (
                err.retriable()
                or err.code()
                in (
                    KafkaError.NOT_COORDINATOR,
                    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                    KafkaError.COORDINATOR_NOT_AVAILABLE,
                    KafkaError._TIMED_OUT,
                    KafkaError._UNKNOWN_PARTITION,
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    KafkaError.LEADER_NOT_AVAILABLE,
                    KafkaError.NOT_LEADER_FOR_PARTITION,
                )
            )
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the coordinator is loading; deadline-bounded


def _committed_total(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    parts = admin.list_topics(topic=topic, timeout=10).topics[topic].partitions
    progress = group_progress(bootstrap, group, topic, parts)
    return sum(done for done, _ in progress.values()), sum(high for _, high in progress.values())


def group_progress(
    bootstrap: str, group: str, topic: str, partitions: Iterable[int]
) -> dict[int, tuple[int, int]]:
    """``{partition: (committed offset of the group, high watermark)}``; a partition with
    no committed offset counts 0."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            # read_uncommitted: do not wait for a killed processor's open transaction to
            # time out (read_committed asks for stable offsets); only committed offsets
            # are returned either way.
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        committed = c.committed(tps, timeout=15)
        return {
            tp.partition: (max(0, tp.offset), c.get_watermark_offsets(tp, timeout=10)[1])
            for tp in committed
        }
    finally:
        c.close()


def wait_all_committed(bootstrap: str, group: str, topic: str, timeout_s: float = 120.0) -> None:
    """Wait until the group has committed the end of every input partition."""
    deadline = time.monotonic() + timeout_s
    done, high = committed_total(bootstrap, group, topic)
    while done < high:
        if time.monotonic() > deadline:
            raise AssertionError(f"group {group} committed {done}/{high} within {timeout_s}s")
        time.sleep(0.25)  # polling the broker's committed offsets, deadline-bounded
        done, high = committed_total(bootstrap, group, topic)


def lso_and_high(
    admin: AdminClient, prefix: str
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """(last stable offsets, high watermarks) of every output partition of ``prefix``:
    where they differ, a transaction is open."""
    names = TopicNames(prefix)
    md = admin.list_topics(timeout=10)
    tps = [
        TopicPartition(t, p)
        for t, tm in md.topics.items()
        if t == names.rejected or t.startswith((prefix + ".sealed.", prefix + ".sanitised."))
        for p in tm.partitions
    ]
    if not tps:
        return {}, {}

    def latest(level: IsolationLevel) -> dict[TopicPartition, int]:
        # A young month topic may not have its leader known yet: retry, deadline-bounded.
        deadline = time.monotonic() + 30
        while True:
            try:
                futs = admin.list_offsets(
                    {tp: OffsetSpec.latest() for tp in tps},  # type: ignore[no-untyped-call]
                    isolation_level=level,
                    request_timeout=15,
                )
                return {
                    TopicPartition(tp.topic, tp.partition): f.result().offset
                    for tp, f in futs.items()
                }
            except KafkaException as exc:
                err = exc.args[0]
                retriable = isinstance(err, KafkaError) and (
                    err.retriable()
                    or err.code()
                    in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
                )
                if not retriable or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # leader election of a new topic; deadline-bounded

    return latest(IsolationLevel.READ_COMMITTED), latest(IsolationLevel.READ_UNCOMMITTED)


def wait_no_open_transactions(bootstrap: str, prefix: str, timeout_s: float = 120.0) -> None:
    """Wait until no output partition of ``prefix`` has an open transaction.

    A processor that exited without committing (SIGKILL, or a stop past its grace) leaves
    its transaction for the broker to abort after transaction.timeout.ms; until then a
    read_committed reader stops at it and would miss every record after it.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while True:
        lso, high = lso_and_high(admin, prefix)
        open_tps = [f"{tp.topic}/{tp.partition}" for tp, o in lso.items() if o < high[tp]]
        if not open_tps:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"transactions still open after {timeout_s}s: {open_tps[:5]}")
        time.sleep(0.5)  # the broker aborts timed-out transactions on its own schedule


@dataclass
class Outputs:
    """Everything the processors committed, read with read_committed."""

    sealed: list[Record] = field(default_factory=list)
    sanitised: list[Record] = field(default_factory=list)
    rejected: list[Record] = field(default_factory=list)


def read_outputs(bootstrap: str, prefix: str, expected_inputs: int) -> Outputs:
    """Read every output topic of ``prefix`` to its end (after sanitised + rejected arrived)."""
    names = TopicNames(prefix)
    wait_no_open_transactions(bootstrap, prefix)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = sorted(
        t
        for t in admin.list_topics(timeout=10).topics
        if t == names.rejected or t.startswith((prefix + ".sealed.", prefix + ".sanitised."))
    )
    records = consume_until(
        bootstrap,
        topics,
        until=lambda rs: sum(1 for r in rs if ".sealed." not in r.topic) >= expected_inputs,
        to_end=True,
        timeout_s=120,
    )
    out = Outputs()
    for r in records:
        if r.topic == names.rejected:
            out.rejected.append(r)
        elif r.topic.startswith(prefix + ".sealed."):
            out.sealed.append(r)
        else:
            out.sanitised.append(r)
    return out


def _event_ms(et: object) -> int:
    if isinstance(et, int):
        return et
    assert isinstance(et, str)
    return to_ms(parse_rfc3339(et))


@dataclass(frozen=True, slots=True)
class Verdict:
    sealed: int
    sanitised: int
    rejected: int
    stripped: int


def check_invariants(
    sent: Sent, out: Outputs, prefix: str, keystore_url: str, env: Mapping[str, str]
) -> Verdict:
    """Every input accounted for exactly once; billing fields kept; sealed identifiers exact.

    Raises AssertionError naming the first difference (cdr ids and offsets, never values).
    """
    policy = load_policy(None)
    identifier_fields = set(policy.identifier_fields)
    billing_fields = set(policy.billing_fields)
    names = TopicNames(prefix)
    n = len(sent.values)

    # Rejected: by source position, the original bytes unchanged, reason headers present.
    rejected_idx: list[int] = []
    for r in out.rejected:
        h = dict(r.headers)
        pos = (int(h["source_partition"] or b"-1"), int(h["source_offset"] or b"-1"))
        assert pos in sent.position, f"rejected record names an unknown source {pos}"
        i = sent.position[pos]
        assert r.value == sent.values[i], f"rejected record at {pos} is not the input byte for byte"
        assert h["reason"], f"rejected record at {pos} has no reason"
        assert "field" in h
        assert h["source_topic"] == names.raw.encode()
        rejected_idx.append(i)
    dup_rej = [i for i, c in Counter(rejected_idx).items() if c > 1]
    assert not dup_rej, f"{len(dup_rej)} inputs rejected more than once, e.g. index {dup_rej[:3]}"

    # Inputs by cdr_id (the ones not rejected must have a unique one).
    rejected_set = set(rejected_idx)
    by_id: dict[str, dict[str, Any]] = {}
    for i, v in enumerate(sent.values):
        if i in rejected_set:
            continue
        doc = orjson.loads(v)
        cid = doc["cdr_id"]
        assert cid not in by_id, f"test input has a duplicate cdr_id {cid}"
        by_id[cid] = doc

    # Sanitised: exactly the non-rejected inputs, once each, billing fields as received.
    san_ids: Counter[str] = Counter()
    stripped = 0
    for r in out.sanitised:
        doc = orjson.loads(r.value or b"null")
        cid = doc["cdr_id"]
        san_ids[cid] += 1
        src = by_id.get(cid)
        assert src is not None, f"sanitised record {cid} matches no accepted input"
        for f in billing_fields:
            assert doc.get(f) == src.get(f), f"sanitised {cid}: billing field {f} differs"
        for f in identifier_fields:
            assert f not in doc, f"sanitised {cid} carries identifier field {f}"
            value = src.get(f)
            if isinstance(value, str) and len(value) >= 6:
                assert value.encode() not in (r.value or b""), f"sanitised {cid} leaks {f}"
        assert r.topic == names.sanitised(doc["month"])
        assert r.key == str(src["account_id"]).encode()
        assert r.timestamp_ms == _event_ms(src["event_time"]), f"{cid}: timestamp != event time"
        if doc.get("key_id") is None:
            stripped += 1
    dups = [c for c, k in san_ids.items() if k > 1]
    assert not dups, f"{len(dups)} duplicated sanitised records, e.g. {dups[:3]}"
    missing = set(by_id) - set(san_ids)
    assert not missing, f"{len(missing)} accepted inputs never written, e.g. {sorted(missing)[:3]}"
    assert len(out.sanitised) + len(out.rejected) == n

    # Sealed: one per identifiable record, identifiers unseal to exactly the input's.
    store = open_keystore(keystore_url, env=env)
    try:
        sealed_ids = _check_sealed(out, store, by_id, names, identifier_fields, billing_fields)
    finally:
        # A shared (kafka://) store follows its topic with a consumer: close it.
        close = getattr(store, "close", None)
        if close is not None:
            close()
    dups = [c for c, k in sealed_ids.items() if k > 1]
    assert not dups, f"{len(dups)} duplicated sealed records, e.g. {dups[:3]}"
    assert len(out.sealed) + stripped == len(out.sanitised), (
        f"sealed {len(out.sealed)} + stripped {stripped} != sanitised {len(out.sanitised)}"
    )
    return Verdict(len(out.sealed), len(out.sanitised), len(out.rejected), stripped)


def _check_sealed(
    out: Outputs,
    store: Any,
    by_id: dict[str, dict[str, Any]],
    names: TopicNames,
    identifier_fields: Iterable[str],
    billing_fields: Iterable[str],
) -> Counter[str]:
    """Sealed: one per identifiable record, identifiers unseal to exactly the input's."""
    keyring = Keyring(store)
    unsealers: dict[str, Unsealer] = {}
    sealed_ids: Counter[str] = Counter()
    for r in out.sealed:
        doc = orjson.loads(r.value or b"null")
        cid = doc["cdr_id"]
        sealed_ids[cid] += 1
        src = by_id[cid]
        kid = doc["key_id"]
        u = unsealers.get(kid)
        if u is None:
            u = unsealers[kid] = Unsealer(keyring.get(kid, create=False))
        idents = u.unseal(doc["sealed"], cid)
        expected = {f: src[f] for f in identifier_fields if src.get(f) is not None}
        assert idents == expected, f"sealed {cid}: identifiers do not unseal to the input's"
        for f in billing_fields:
            assert doc.get(f) == src.get(f), f"sealed {cid}: billing field {f} differs"
        assert r.topic == names.sealed(doc["month"])
    return sealed_ids


def month_ago(months: int) -> datetime:
    """An instant ``months`` months (of 31 days) before now."""
    return now_utc() - timedelta(days=31 * months)
