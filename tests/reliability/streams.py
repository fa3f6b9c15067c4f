"""Stream-level checks shared by the reliability scenarios: a concurrent read_committed
reader, open-transaction probes, and the exactly-once / order invariants over outputs."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
)
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports OffsetSpec without declaring it.
from service.integrity import LEAF_FIELD
from service.kafka.topics import TopicNames
from tests.integration.kafka_helpers import Record, _headers, unique_name
from tests.integration.run_support import Outputs, Sent, lso_and_high


class LiveReader:
    """A read_committed consumer of every output topic of ``prefix`` (by pattern, so month
    topics created later are picked up), running on a thread while processors work."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.records: list[Record] = []
        self._seen: set[tuple[str, int, int]] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        esc = prefix.replace(".", r"\.")
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique_name("live-reader"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        self._consumer.subscribe([f"^{esc}\\.(sealed|sanitised)\\..*", f"^{esc}\\.rejected$"])
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in self._consumer.consume(500, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() not in (
                        KafkaError._PARTITION_EOF,
                        KafkaError.UNKNOWN_TOPIC_OR_PART,
                    ):
                        self.errors.append(err.name())
                    continue
                rec = Record(
                    topic=m.topic() or "",
                    partition=m.partition() or 0,
                    offset=m.offset() or 0,
                    key=m.key(),
                    value=m.value(),
                    headers=_headers(m.headers()),
                    timestamp_ms=m.timestamp()[1],
                )
                where = (rec.topic, rec.partition, rec.offset)
                with self._lock:
                    # A rebalance (a new month topic matched the pattern) may re-deliver
                    # from the start: the same coordinates are the same record, not a copy.
                    if where not in self._seen:
                        self._seen.add(where)
                        self.records.append(rec)
        self._consumer.close()

    def count(self) -> int:
        """How many records were read so far."""
        with self._lock:
            return len(self.records)

    def stop(self) -> list[Record]:
        """Stop the reader; what it read."""
        self._stop.set()
        self._thread.join(30)
        return list(self.records)


def open_transactions(bootstrap: str, prefix: str) -> int:
    """Partitions of ``prefix``'s output topics whose last stable offset is behind the
    high watermark: an open (neither committed nor aborted) transaction is in them."""
    lso, high = lso_and_high(AdminClient({"bootstrap.servers": bootstrap}), prefix)
    return sum(1 for tp, o in lso.items() if o < high[tp])


def split_outputs(prefix: str, records: Sequence[Record]) -> Outputs:
    """Records of the output topics, by kind."""
    names = TopicNames(prefix)
    out = Outputs()
    for r in records:
        if r.topic == names.rejected:
            out.rejected.append(r)
        elif r.topic.startswith(prefix + ".sealed."):
            out.sealed.append(r)
        else:
            out.sanitised.append(r)
    return out


def exactly_once(sent: Sent, out: Outputs) -> tuple[int, int]:
    """(lost, duplicated) inputs over sanitised + rejected outputs."""
    ids: Counter[tuple[int, int]] = Counter()
    pos_of = _positions(sent)
    for r in out.sanitised:
        ids[pos_of[orjson.loads(r.value or b"{}")["cdr_id"]]] += 1
    for r in out.rejected:
        h = dict(r.headers)
        ids[(int(h["source_partition"] or b"-1"), int(h["source_offset"] or b"-1"))] += 1
    lost = sum(1 for p in sent.position if ids[p] == 0)
    dup = sum(n - 1 for n in ids.values() if n > 1)
    return lost, dup


def explain_duplicates(sent: Sent, out: Outputs, limit: int = 12) -> str:
    """Where the duplicated inputs were written: per input position, each output copy's
    topic, partition, offset and leaf (the writing batch), so a failure names the batches
    and process runs involved instead of only a count. Empty when nothing is duplicated."""
    copies: dict[tuple[int, int], list[str]] = {}
    pos_of = _positions(sent)
    for r in out.sanitised:
        doc = orjson.loads(r.value or b"{}")
        where = f"{r.topic}[{r.partition}]@{r.offset} leaf={doc.get(LEAF_FIELD, '-')}"
        copies.setdefault(pos_of[doc["cdr_id"]], []).append(where)
    for r in out.rejected:
        h = dict(r.headers)
        pos = (int(h["source_partition"] or b"-1"), int(h["source_offset"] or b"-1"))
        copies.setdefault(pos, []).append(f"{r.topic}[{r.partition}]@{r.offset}")
    dups = sorted((p, c) for p, c in copies.items() if len(c) > 1)
    if not dups:
        return ""
    lines = [f"{len(dups)} input(s) written more than once (input partition, offset: copies):"]
    lines += [f"  {p}: {'; '.join(c)}" for p, c in dups[:limit]]
    if len(dups) > limit:
        lines.append(f"  ... and {len(dups) - limit} more")
    return "\n".join(lines)


def _positions(sent: Sent) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for pos, i in sent.position.items():
        try:
            doc = orjson.loads(sent.values[i])
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("cdr_id"), str):
            out[doc["cdr_id"]] = pos
    return out


def order_violations(sent: Sent, records: Sequence[Record]) -> int:
    """Pairs of records from one input partition, in one output partition, whose output
    order differs from their input order (per-partition order must be preserved)."""
    pos_of = _positions(sent)
    last: dict[tuple[str, int, int], int] = {}
    bad = 0
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        if r.value is None:
            continue
        if ".rejected" in r.topic:
            h = dict(r.headers)
            src = (int(h["source_partition"] or b"-1"), int(h["source_offset"] or b"-1"))
        else:
            src = pos_of[orjson.loads(r.value)["cdr_id"]]
        k = (r.topic, r.partition, src[0])
        if src[1] <= last.get(k, -1):
            bad += 1
        last[k] = src[1]
    return bad
