"""Broker mode of the retention controller: month topics, hold topics, the hold registry
topic, and leadership through the consumer-group protocol.

- Month data: ``cdr.sealed.YYYY-MM`` / ``cdr.sanitised.YYYY-MM`` (created ahead of time
  with the retention.ms of service/kafka/topics.py, deleted at their deadlines).
- Hold copies: ``cdr.hold.<ID>`` (no time-based retention: a hold lasts until released),
  written in one Kafka transaction per month key, so a copy is all there or not at all.
- The hold registry: the compacted topic ``cdr.holds``, one record per hold (key = id).
- Leadership (``retention watch``): every instance joins the consumer group
  ``cdranon-retention`` on the single-partition topic ``cdr.retention-lease``; the member
  the group coordinator assigns the partition to is the leader. A revoked or lost
  assignment ends leadership before the next action. No home-made lock: the broker's
  group protocol (session timeouts, fencing by generation) decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import tzinfo
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

from service.errors import ConfigError, KafkaFatalError
from service.holds import Hold, held_key_ids
from service.kafka.topics import TopicManager, TopicNames
from service.logs import log_event

_LOG = logging.getLogger("cdranon.retention")
_TIMEOUT_S = 30.0
_MONTH_LEN = 7


def _is_month(text: str) -> bool:
    return len(text) == _MONTH_LEN and text[4] == "-" and text[:4].isdigit() and text[5:].isdigit()


def create_topic(
    admin: AdminClient,
    name: str,
    *,
    partitions: int,
    replication_factor: int,
    config: dict[str, str],
    timeout_s: float = _TIMEOUT_S,
) -> bool:
    """Create one topic; False if it already existed. KafkaFatalError on other failures."""
    fut = admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                config=config,
            )
        ],
        request_timeout=timeout_s,
    )[name]
    try:
        fut.result()
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise KafkaFatalError(f"cannot create topic {name}: {err.str()}") from None
    return True


def delete_topic(admin: AdminClient, name: str, *, timeout_s: float = _TIMEOUT_S) -> bool:
    """Delete one topic; False if it did not exist. KafkaFatalError on other failures."""
    fut = admin.delete_topics([name], operation_timeout=timeout_s, request_timeout=timeout_s)[name]
    try:
        fut.result()
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return False
        raise KafkaFatalError(f"cannot delete topic {name}: {err.str()}") from None
    return True


def read_topic(
    conf: dict[str, Any], topic: str, *, timeout_s: float = 120.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Every committed (key, value) of ``topic``, from the beginning to the end as of now.

    Reads with ``isolation.level=read_committed`` up to each partition's last stable
    offset; raises KafkaFatalError if that takes longer than ``timeout_s``.
    """
    consumer = Consumer(
        {
            **conf,
            "group.id": "cdranon-retention-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        }
    )
    out: list[tuple[bytes | None, bytes | None]] = []
    try:
        md = consumer.list_topics(topic, timeout=_TIMEOUT_S)
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None:
            return out
        ends: dict[int, int] = {}
        for p in tmd.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=_TIMEOUT_S)
            if high > low:
                ends[p] = high
        if not ends:
            return out
        consumer.assign([TopicPartition(topic, p, offset=-2) for p in ends])
        deadline = time.monotonic() + timeout_s
        done: set[int] = set()
        while len(done) < len(ends):
            if time.monotonic() > deadline:
                raise KafkaFatalError(
                    f"reading {topic} did not reach its end within {timeout_s:.0f}s"
                )
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    raise KafkaFatalError(f"reading {topic}: {err.str()}")
                out.append((msg.key(), msg.value()))
            # The position passes aborted records and transaction markers too.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    done.add(tp.partition)
        return out
    finally:
        consumer.close()


class KafkaMonthStore:
    """Month topics and hold topics on the brokers (see the module docstring)."""

    kind = "topic"

    def __init__(
        self,
        conf: dict[str, Any],
        admin: AdminClient,
        topics: TopicManager,
        *,
        partitions: int,
        replication_factor: int,
    ) -> None:
        self._conf = conf
        self._admin = admin
        self._topics = topics
        self.names: TopicNames = topics.names
        self._partitions = partitions
        self._rf = replication_factor

    def _topic_names(self) -> set[str]:
        return set(self._admin.list_topics(timeout=_TIMEOUT_S).topics)

    def _months(self, view: str) -> set[str]:
        head = f"{self.names.prefix}.{view}."
        return {
            t[len(head) :]
            for t in self._topic_names()
            if t.startswith(head) and _is_month(t[len(head) :])
        }

    def sealed_months(self) -> set[str]:
        """Months with a ``cdr.sealed.YYYY-MM`` topic."""
        return self._months("sealed")

    def sanitised_months(self) -> set[str]:
        """Months with a ``cdr.sanitised.YYYY-MM`` topic."""
        return self._months("sanitised")

    def hold_topic(self, hold_id: str) -> str:
        """The topic of a hold's copies."""
        return f"{self.names.prefix}.hold.{hold_id}"

    def hold_stores(self) -> set[str]:
        """Hold ids with a ``cdr.hold.<ID>`` topic."""
        head = f"{self.names.prefix}.hold."
        return {t[len(head) :] for t in self._topic_names() if t.startswith(head)}

    def rejected_months(self, tz: tzinfo) -> dict[str, int] | None:
        """None: ``cdr.rejected`` is bounded by its own retention.ms (topics.py)."""
        return None

    def ensure_months(self, months: Sequence[str]) -> list[str]:
        """Create the sealed and sanitised topics of ``months`` if missing."""
        before = self._topic_names()
        self._topics.ensure_months(months, months)
        wanted = [self.names.sealed(m) for m in months] + [self.names.sanitised(m) for m in months]
        return [t for t in wanted if t not in before]

    def read_sealed(self, month: str) -> Iterable[bytes]:
        """Every committed record of ``cdr.sealed.YYYY-MM``."""
        return [v for _k, v in read_topic(self._conf, self.names.sealed(month)) if v is not None]

    def held_key_ids(self, hold_id: str) -> set[str]:
        """``held_from`` values in the hold topic (committed copies only)."""
        values = [v for _k, v in read_topic(self._conf, self.hold_topic(hold_id)) if v]
        return set(held_key_ids(values))

    def write_hold(self, hold_id: str, kid: str, records: Sequence[bytes]) -> None:
        """Produce the copies of ``kid`` to ``cdr.hold.<ID>`` in one transaction."""
        topic = self.hold_topic(hold_id)
        create_topic(
            self._admin,
            topic,
            partitions=1,
            replication_factor=self._rf,
            config={"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        )
        if not records:
            return
        # One transactional.id per hold: a crashed or zombie controller's half-written copy
        # is aborted (fenced) by the next one; readers use read_committed.
        producer = Producer(
            {
                **self._conf,
                "transactional.id": f"cdranon-retention-hold-{hold_id}",
                "enable.idempotence": True,
            }
        )
        try:
            producer.init_transactions(_TIMEOUT_S)
            producer.begin_transaction()
            for value in records:
                producer.produce(topic, value=value, key=kid.encode())
                producer.poll(0)
            producer.commit_transaction(_TIMEOUT_S)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.txn_requires_abort():
                producer.abort_transaction(_TIMEOUT_S)
            raise KafkaFatalError(f"copying into {topic} failed: {err.str()}") from None
        finally:
            producer.flush(_TIMEOUT_S)

    def delete_sealed(self, month: str) -> str | None:
        """Delete ``cdr.sealed.YYYY-MM``."""
        name = self.names.sealed(month)
        return name if delete_topic(self._admin, name) else None

    def delete_sanitised(self, month: str) -> str | None:
        """Delete ``cdr.sanitised.YYYY-MM``."""
        name = self.names.sanitised(month)
        return name if delete_topic(self._admin, name) else None

    def delete_hold(self, hold_id: str) -> str | None:
        """Delete ``cdr.hold.<ID>``."""
        name = self.hold_topic(hold_id)
        return name if delete_topic(self._admin, name) else None

    def prune_rejected(self, keep: Callable[[str], bool], tz: tzinfo) -> int:
        """Nothing to do: ``cdr.rejected`` is bounded by its retention.ms."""
        return 0


class KafkaHoldRegistry:
    """Holds in a compacted topic (key = hold id, value = the registry document)."""

    def __init__(
        self, conf: dict[str, Any], admin: AdminClient, topic: str, *, replication_factor: int
    ) -> None:
        self._conf = conf
        self.topic = topic
        create_topic(
            admin,
            topic,
            partitions=1,
            replication_factor=replication_factor,
            config={"cleanup.policy": "compact", "min.insync.replicas": "1"},
        )

    def list(self) -> list[Hold]:
        """Every hold (the last value per key), sorted by id."""
        latest: dict[str, bytes] = {}
        for key, value in read_topic(self._conf, self.topic):
            if key is not None and value is not None:
                latest[key.decode("utf-8", "replace")] = value
        holds = []
        for hid, value in latest.items():
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(
                    f"hold registry record {hid} in {self.topic} is not JSON"
                ) from exc
            holds.append(Hold.from_json(doc, f"{self.topic}/{hid}"))
        return sorted(holds, key=lambda h: h.hold_id)

    def put(self, hold: Hold) -> None:
        """Produce the hold's document and wait for the broker's acknowledgement."""
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                errors.append(err)

        producer = Producer({**self._conf, "enable.idempotence": True, "acks": "all"})
        producer.produce(
            self.topic,
            key=hold.hold_id.encode(),
            value=orjson.dumps(hold.to_json()),
            on_delivery=on_delivery,
        )
        left = producer.flush(_TIMEOUT_S)
        if left or errors:
            why = errors[0].str() if errors else "not acknowledged in time"
            raise KafkaFatalError(f"writing hold {hold.hold_id} to {self.topic} failed: {why}")


class Lease:
    """Leadership by the consumer-group protocol on a single-partition lease topic.

    Call :meth:`poll` regularly (it serves the group protocol's callbacks); ``leader`` is
    True while this member holds the partition. ``max.poll.interval.ms`` bounds how long a
    pass may go without polling; the controller polls between actions.
    """

    def __init__(
        self,
        conf: dict[str, Any],
        admin: AdminClient,
        topic: str,
        group_id: str,
        *,
        replication_factor: int,
        session_timeout_ms: int = 10_000,
    ) -> None:
        create_topic(
            admin,
            topic,
            partitions=1,
            replication_factor=replication_factor,
            config={"cleanup.policy": "delete"},
        )
        self.topic = topic
        self._closed = False
        self._leader = threading.Event()
        self._consumer = Consumer(
            {
                **conf,
                "group.id": group_id,
                "enable.auto.commit": False,
                "session.timeout.ms": session_timeout_ms,
                "heartbeat.interval.ms": max(500, session_timeout_ms // 5),
                "max.poll.interval.ms": 600_000,
            }
        )
        self._consumer.subscribe(
            [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    def _on_assign(self, _consumer: Consumer, parts: list[TopicPartition]) -> None:
        if any(p.topic == self.topic for p in parts):
            self._leader.set()
            log_event(_LOG, "retention_leadership_acquired", topic=self.topic)

    def _on_revoke(self, _consumer: Consumer, parts: list[TopicPartition]) -> None:
        if self._leader.is_set():
            log_event(_LOG, "retention_leadership_lost", topic=self.topic)
        self._leader.clear()

    @property
    def leader(self) -> bool:
        """Whether this member holds the lease now (as of the last poll)."""
        return self._leader.is_set()

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Serve the group protocol for up to ``timeout_s``; return ``leader``."""
        self._consumer.poll(timeout_s)  # the lease topic is empty: only callbacks happen
        return self.leader

    def close(self) -> None:
        """Leave the group (the partition moves to another instance at once); idempotent."""
        self._leader.clear()
        if not self._closed:
            self._closed = True
            self._consumer.close()
