"""Helpers for integration tests against the real broker: topics, and reading them back.

Import from here (``from tests.integration.kafka_helpers import consume_until``); the
fixtures in ``tests/integration/conftest.py`` build on the same functions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

IsolationLevel = str  # "read_committed" | "read_uncommitted"


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record, detached from librdkafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int


class ConsumeTimeoutError(AssertionError):
    """The condition was not met before the deadline; carries what was read."""

    def __init__(self, message: str, records: list[Record]) -> None:
        super().__init__(message)
        self.records = records


def unique_name(prefix: str = "t") -> str:
    """A topic or group name no other test (or earlier run) uses. A letter in the middle:
    12 hex digits can all be decimal (1 in 280), and a topic prefix with 10+ digits in a
    row is refused (the audit log takes it for a phone number: service/config.py)."""
    h = uuid.uuid4().hex
    return f"{prefix}-{h[:6]}x{h[6:12]}"


def create_topics(
    admin: AdminClient,
    names: Iterable[str],
    *,
    partitions: int = 1,
    config: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create topics and wait until the broker has them (raises on any failure)."""
    new = [
        NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        for name in names
    ]
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    for future in futures.values():
        future.result(timeout=timeout_s)
    wait_for_topics(admin, [t.topic for t in new], timeout_s=timeout_s)


def wait_for_topics(admin: AdminClient, names: Sequence[str], *, timeout_s: float = 30.0) -> None:
    """Wait until metadata shows every topic with all its partitions led."""
    deadline = time.monotonic() + timeout_s
    missing: list[str] = list(names)
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
        missing = [
            n
            for n in names
            if n not in md.topics
            or md.topics[n].error is not None
            or any(p.leader < 0 for p in md.topics[n].partitions.values())
        ]
        if not missing:
            return
        time.sleep(0.05)  # metadata propagation; bounded by the deadline above
    raise AssertionError(f"topics not ready within {timeout_s}s: {missing}")


def partitions_of(admin: AdminClient, topic: str) -> int:
    """Number of partitions of an existing topic."""
    md = admin.list_topics(topic=topic, timeout=10)
    t = md.topics[topic]
    if t.error is not None:
        raise KafkaException(t.error)
    return len(t.partitions)


def consume_until(
    bootstrap: str,
    topics: Sequence[str],
    *,
    count: int | None = None,
    until: Callable[[list[Record]], bool] | None = None,
    to_end: bool = False,
    timeout_s: float = 60.0,
    isolation_level: IsolationLevel = "read_committed",
    extra_config: dict[str, str | int | bool] | None = None,
) -> list[Record]:
    """Read ``topics`` from the beginning until the stop condition holds; return records.

    Stops when all the given conditions hold at once: at least ``count`` records read,
    ``until(records)`` is true, and (``to_end``) every partition has been read to its end
    (for read_committed: to the last stable offset, so an open transaction hides what
    follows it). Raises :class:`ConsumeTimeoutError` at the deadline. Topics that do not
    exist yet are waited for (within the deadline); no offsets are committed.

    To check that nothing more than expected was written, wait for the expected records
    (``count`` or ``until``) and ``to_end`` in the same call: records already committed
    past the expected ones are then included.
    """
    if count is None and until is None and not to_end:
        raise ValueError("consume_until needs count, until or to_end")
    deadline = time.monotonic() + timeout_s
    config: dict[str, str | int | bool] = {
        "bootstrap.servers": bootstrap,
        "group.id": unique_name("consume-until"),
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "isolation.level": isolation_level,
    }
    config.update(extra_config or {})
    admin = AdminClient({"bootstrap.servers": bootstrap})
    consumer = Consumer(config)
    records: list[Record] = []
    try:
        assignment = _await_partitions(admin, topics, deadline)
        consumer.assign(
            [TopicPartition(t, p, offset=-2) for t, p in assignment]  # -2: beginning
        )
        at_end = dict.fromkeys(assignment, False)

        def done() -> bool:
            return (
                (count is None or len(records) >= count)
                and (until is None or until(records))
                and (not to_end or all(at_end.values()))
            )

        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConsumeTimeoutError(
                    f"consume_until({list(topics)}, count={count}, to_end={to_end}, "
                    f"{isolation_level}): condition not met within {timeout_s}s after "
                    f"{len(records)} records; partitions at end: "
                    f"{sum(at_end.values())}/{len(at_end)}",
                    records,
                )
            for msg in consumer.consume(num_messages=1000, timeout=min(0.2, remaining)):
                err = msg.error()
                tp = (msg.topic() or "", msg.partition() or 0)
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end[tp] = True
                        continue
                    raise KafkaException(err)
                at_end[tp] = False
                _, ts = msg.timestamp()
                records.append(
                    Record(
                        topic=tp[0],
                        partition=tp[1],
                        offset=msg.offset() or 0,
                        key=msg.key(),
                        value=msg.value(),
                        headers=_headers(msg.headers()),
                        timestamp_ms=ts,
                    )
                )
        return records
    finally:
        consumer.close()


def _await_partitions(
    admin: AdminClient, topics: Sequence[str], deadline: float
) -> list[tuple[str, int]]:
    """All (topic, partition) pairs once every topic exists; waits up to ``deadline``."""
    while True:
        md = admin.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        pairs: list[tuple[str, int]] = []
        missing = []
        for t in topics:
            tm = md.topics.get(t)
            if tm is None or tm.error is not None or not tm.partitions:
                missing.append(t)
            else:
                pairs.extend((t, p) for p in sorted(tm.partitions))
        if not missing:
            return pairs
        if time.monotonic() >= deadline:
            raise ConsumeTimeoutError(f"topics never appeared: {missing}", [])
        time.sleep(0.1)  # waiting for another component to create them; deadline-bounded


def _headers(
    raw: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | tuple[()] | None,
) -> tuple[tuple[str, bytes | None], ...]:
    """librdkafka headers as (name, bytes-or-None) pairs, in order."""
    if not raw:
        return ()
    pairs = raw.items() if isinstance(raw, dict) else raw
    return tuple((name, v.encode() if isinstance(v, str) else v) for name, v in pairs)
