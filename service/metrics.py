"""Prometheus metrics of the stream processor, on an injected registry.

Conventions: ``cdranon_`` prefix, ``_total`` counters, ``_seconds`` histograms, and label
values from small closed sets only (topic kind, reason code, outcome, partition number,
pause reason). A label value that does not look like a code is counted as ``other``, and
each label is capped in cardinality, so nothing a record carries can become a label.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

_CODE = re.compile(r"^[a-z0-9_]{1,48}$")
_MAX_REASONS = 64
_MAX_PARTITIONS = 4096

TOPIC_KINDS = ("sealed", "sanitised", "rejected")
PAUSE_REASONS = ("keystore", "broker", "producer_queue")
TXN_OUTCOMES = ("committed", "aborted")
TRANSFORM_PATHS = ("native", "python")

# Latency buckets in seconds: from a fast batch (ms) to a backlog of minutes.
_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class Metrics:
    """Every metric the processor updates, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes... (dashboard row "Process")
        ProcessCollector(registry=r)
        self.records_consumed = Counter(
            "cdranon_records_consumed", "Input records read from the input topic.", registry=r
        )
        self.records_produced = Counter(
            "cdranon_records_produced",
            "Output records in committed transactions, by topic kind.",
            ["topic_kind"],
            registry=r,
        )
        self.records_rejected = Counter(
            "cdranon_records_rejected",
            "Input records written to the rejected topic (committed), by reason code.",
            ["reason"],
            registry=r,
        )
        self.records_stripped = Counter(
            "cdranon_records_stripped",
            "Records written without identifiers (committed), by reason "
            "(past_identifier_deadline, key_destroyed).",
            ["reason"],
            registry=r,
        )
        self.transform_path = Counter(
            "cdranon_transform_path_records",
            "Input records by the transform path that handled them: native "
            "(service/_native.c) or python (all of them when the native path is off; else "
            "the records it declines: unusual spellings, and every rejection).",
            ["path"],
            registry=r,
        )
        self.batch_duration = Histogram(
            "cdranon_batch_duration_seconds",
            "One batch from the first record consumed to the transaction committed.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.transform_duration = Histogram(
            "cdranon_transform_duration_seconds",
            "The pure transform of one batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = Histogram(
            "cdranon_end_to_end_latency_seconds",
            "Input record timestamp (ingest) to its transaction committed; a sample per batch.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.batch_records = Histogram(
            "cdranon_batch_records",
            "Input records per batch (one transaction).",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 100000),
            registry=r,
        )
        self.transactions = Counter(
            "cdranon_transactions",
            "Kafka transactions by outcome (committed, aborted).",
            ["outcome"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "cdranon_consumer_lag",
            "Records behind the last stable offset, per input partition (librdkafka statistics).",
            ["partition"],
            registry=r,
        )
        self.month_keys_cached = Gauge(
            "cdranon_month_keys_cached", "Month keys held in this process's memory.", registry=r
        )
        self.paused = Gauge(
            "cdranon_paused",
            "1 while consumption is paused, by reason (keystore, broker, producer_queue).",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "cdranon_retries",
            "Batches retried after a back-off, by pause reason.",
            ["reason"],
            registry=r,
        )
        self.client_restarts = Counter(
            "cdranon_kafka_client_restarts",
            "Kafka clients replaced in-process after a restartable fatal error (fenced).",
            registry=r,
        )
        self.rebalances = Counter(
            "cdranon_rebalances",
            "Partition assignment changes seen, by kind (assigned, revoked, lost).",
            ["kind"],
            registry=r,
        )
        self.topics_created = Counter(
            "cdranon_topics_created",
            "Output topics this process created, by topic kind.",
            ["topic_kind"],
            registry=r,
        )
        for kind in TOPIC_KINDS:
            self.records_produced.labels(kind)
            self.topics_created.labels(kind)
        for outcome in TXN_OUTCOMES:
            self.transactions.labels(outcome)
        for path in TRANSFORM_PATHS:
            self.transform_path.labels(path)
        for reason in PAUSE_REASONS:
            self.paused.labels(reason).set(0)
            self.retries.labels(reason)
        self._reasons: set[str] = set()
        self._lag_partitions: set[str] = set()
        self._lock = threading.Lock()

    def reason_label(self, reason: str) -> str:
        """``reason`` if it is a code and the label is not yet full, else ``other``."""
        if reason in self._reasons:
            return reason
        if not _CODE.match(reason) or len(self._reasons) >= _MAX_REASONS:
            return "other"
        self._reasons.add(reason)
        return reason

    def count_transform_paths(self, records: int, python_path: int) -> None:
        """Count a committed batch's input records by the transform path that took them."""
        self.transform_path.labels("python").inc(python_path)
        self.transform_path.labels("native").inc(records - python_path)

    def count_rejected(self, reasons: Iterable[str]) -> None:
        """Count committed rejections by reason."""
        counts: dict[str, int] = {}
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
        for reason, n in counts.items():
            self.records_rejected.labels(self.reason_label(reason)).inc(n)

    def update_from_stats(self, stats_json: str | bytes, topic: str) -> None:
        """Set consumer lag per partition of ``topic`` from a librdkafka statistics document.

        Partitions absent from the document, or whose lag is unknown (-1: not assigned, or
        no offsets yet), lose their series, so a revoked partition does not linger.
        """
        stats = orjson.loads(stats_json)
        parts = stats.get("topics", {}).get(topic, {}).get("partitions", {})
        seen: set[str] = set()
        for pid, p in parts.items():
            if pid == "-1" or not pid.isdigit():
                continue
            lag = _lag(p)
            if lag is None:
                continue
            if pid not in self._lag_partitions and len(self._lag_partitions) >= _MAX_PARTITIONS:
                continue
            self.consumer_lag.labels(pid).set(lag)
            seen.add(pid)
        with self._lock:
            for gone in self._lag_partitions - seen:
                self.consumer_lag.remove(gone)
            self._lag_partitions = seen


# librdkafka fetch states of a partition this consumer does not fetch: not assigned to it,
# or revoked. Its offsets in the statistics are the last ones it saw.
_NOT_FETCHING = frozenset({"none", "stopping", "stopped"})


def _offset(p: dict[str, object], key: str) -> int | None:
    """An offset of a partition's statistics; None when unknown (-1001) or absent."""
    v = p.get(key)
    return v if isinstance(v, int) and v >= 0 else None


def _lag(p: dict[str, object]) -> int | None:
    """Records between the consumer's position and the last stable offset; None when
    unknown, or when this consumer does not fetch the partition (not assigned, revoked:
    its offsets, committed_offset among them, are stale, and a revoked partition's series
    would come back after the rebalance callback removed it).

    librdkafka's own ``consumer_lag`` is measured from the *committed* offset, which a
    transactional processor never commits through the consumer (offsets travel in the
    producer's transaction), so it stays -1; the position (``app_offset``) is what moves.

    ``app_offset`` (the last record handed to the application + 1) is unknown from an
    assignment or a seek until the partition's next record reaches the application: an
    empty partition, or one rewound to its end, would have no series though nothing is
    left to read, and the consumer's ``committed_offset`` is the one read at assignment
    (never updated by transactional commits): stale after a rewind. So while nothing
    fetched waits for the application (``fetchq_cnt`` 0: the consumer's queue, shared by
    its partitions, is empty), the position is the fetch position ``next_offset``: every
    record before it was handed over, or skipped (transaction markers, aborted records).
    """
    state = p.get("fetch_state")
    if state in _NOT_FETCHING:
        return None
    end = _offset(p, "ls_offset")
    pos = _offset(p, "app_offset")
    fetch_pos = _offset(p, "next_offset")
    if fetch_pos is not None and state == "active" and p.get("fetchq_cnt") == 0:
        pos = fetch_pos if pos is None else max(pos, fetch_pos)
    if pos is None:
        pos = _offset(p, "committed_offset")
    if end is not None and pos is not None:
        return max(0, end - pos)
    lag = p.get("consumer_lag")
    return lag if isinstance(lag, int) and lag >= 0 else None


@dataclass
class MetricsServer:
    """The running ``/metrics`` HTTP endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0: any free port)."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


RETENTION_ACTIONS = (
    "create_key",
    "create_topics",
    "copy_hold",
    "destroy_key",
    "delete_sealed",
    "delete_sanitised",
    "prune_rejected",
    "destroy_hold",
)
RETENTION_OUTCOMES = ("done", "skipped", "failed", "blocked")


class RetentionMetrics:
    """The retention controller's metrics, including the compliance gauges an SRE pages on."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.month_keys = Gauge(
            "cdranon_month_keys", "Month keys in the keystore, by state.", ["state"], registry=r
        )
        self.holds_active = Gauge(
            "cdranon_legal_holds_active", "Legal holds placed and not released.", registry=r
        )
        self.overdue = Gauge(
            "cdranon_retention_overdue_seconds",
            "Seconds past the oldest deadline whose action is not done (0 when all is well).",
            registry=r,
        )
        self.oldest_identifiable_age = Gauge(
            "cdranon_oldest_identifiable_month_age_seconds",
            "Age of the oldest month whose key still exists (start of month to now).",
            registry=r,
        )
        self.last_success = Gauge(
            "cdranon_retention_last_success_timestamp_seconds",
            "When the last retention pass with no failure ran (its 'now').",
            registry=r,
        )
        self.actions = Counter(
            "cdranon_retention_actions",
            "Retention actions by kind and outcome (done, skipped, failed, blocked).",
            ["action", "outcome"],
            registry=r,
        )
        for state in ("active", "destroyed"):
            self.month_keys.labels(state).set(0)
        for action in RETENTION_ACTIONS:
            for outcome in RETENTION_OUTCOMES:
                self.actions.labels(action, outcome)
