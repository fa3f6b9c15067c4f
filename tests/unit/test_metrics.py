"""Metrics: bounded labels, consumer lag from librdkafka statistics, the /metrics endpoint."""

from __future__ import annotations

import urllib.request

import orjson
from prometheus_client import CollectorRegistry

from service.metrics import Metrics, serve


def sample(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


def stats(parts: dict[str, int], topic: str = "cdr.raw") -> bytes:
    doc = {
        "name": "rdkafka#consumer-1",
        "type": "consumer",
        "topics": {
            topic: {
                "topic": topic,
                "partitions": {
                    **{p: {"partition": int(p), "consumer_lag": lag} for p, lag in parts.items()},
                    "-1": {"partition": -1, "consumer_lag": -1},
                },
            },
            "other": {"partitions": {"0": {"partition": 0, "consumer_lag": 999}}},
        },
    }
    return orjson.dumps(doc)


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.records_consumed.inc(3)
    assert sample(a, "cdranon_records_consumed_total") == 3
    assert sample(b, "cdranon_records_consumed_total") == 0


def test_counter_and_histogram_names_follow_prometheus_conventions() -> None:
    m = Metrics(CollectorRegistry())
    names = {metric.name for metric in m.registry.collect()}
    for expected in (
        "cdranon_records_consumed",
        "cdranon_records_produced",
        "cdranon_records_rejected",
        "cdranon_records_stripped",
        "cdranon_transactions",
        "cdranon_batch_duration_seconds",
        "cdranon_transform_duration_seconds",
        "cdranon_end_to_end_latency_seconds",
        "cdranon_consumer_lag",
        "cdranon_month_keys_cached",
        "cdranon_paused",
    ):
        assert expected in names
    # Known label values exist from the start, so rate() works before the first event.
    assert sample(m, "cdranon_transactions_total", {"outcome": "aborted"}) == 0
    assert sample(m, "cdranon_paused", {"reason": "keystore"}) == 0


def test_reason_labels_are_bounded() -> None:
    m = Metrics()
    m.count_rejected(["bad_json", "bad_json", "missing_field", "+447700900123", "Weird Reason"])
    assert sample(m, "cdranon_records_rejected_total", {"reason": "bad_json"}) == 2
    assert sample(m, "cdranon_records_rejected_total", {"reason": "missing_field"}) == 1
    # Anything that is not a short code (a value leaking into a reason) is "other".
    assert sample(m, "cdranon_records_rejected_total", {"reason": "other"}) == 2
    m.count_rejected(f"code_{i}" for i in range(200))
    reasons = {
        s.labels["reason"]
        for metric in m.registry.collect()
        if metric.name == "cdranon_records_rejected"
        for s in metric.samples
    }
    assert len(reasons) <= 65  # 64 codes + other


def test_consumer_lag_from_statistics() -> None:
    m = Metrics()
    m.update_from_stats(stats({"0": 10, "1": 0, "2": -1}), "cdr.raw")
    assert sample(m, "cdranon_consumer_lag", {"partition": "0"}) == 10
    assert sample(m, "cdranon_consumer_lag", {"partition": "1"}) == 0
    assert sample(m, "cdranon_consumer_lag", {"partition": "2"}) is None  # unknown lag
    assert sample(m, "cdranon_consumer_lag", {"partition": "-1"}) is None
    # Partition 0 revoked: its series goes.
    m.update_from_stats(stats({"1": 5}), "cdr.raw")
    assert sample(m, "cdranon_consumer_lag", {"partition": "0"}) is None
    assert sample(m, "cdranon_consumer_lag", {"partition": "1"}) == 5


def test_lag_from_position_when_offsets_travel_in_transactions() -> None:
    """A transactional consumer's committed_offset stays unknown; its position moves."""
    m = Metrics()
    doc = {
        "topics": {
            "cdr.raw": {
                "partitions": {
                    "0": {
                        "consumer_lag": -1,
                        "ls_offset": 150,
                        "app_offset": 100,
                        "committed_offset": -1001,
                    },
                    "1": {
                        "consumer_lag": -1,
                        "ls_offset": 80,
                        "app_offset": -1001,
                        "committed_offset": 70,
                    },
                    "2": {
                        "consumer_lag": -1,
                        "ls_offset": -1001,
                        "app_offset": -1001,
                        "committed_offset": -1001,
                    },
                }
            }
        }
    }
    m.update_from_stats(orjson.dumps(doc), "cdr.raw")
    assert sample(m, "cdranon_consumer_lag", {"partition": "0"}) == 50
    assert sample(m, "cdranon_consumer_lag", {"partition": "1"}) == 10
    assert sample(m, "cdranon_consumer_lag", {"partition": "2"}) is None


def _partition(**offsets: object) -> dict[str, object]:
    """A partition of a librdkafka statistics document (2.x), caught up by default."""
    p: dict[str, object] = {
        "fetch_state": "active",
        "fetchq_cnt": 0,
        "ls_offset": 200,
        "hi_offset": 200,
        "next_offset": 200,
        "app_offset": 200,
        "committed_offset": -1001,
        "consumer_lag": -1,
    }
    p.update(offsets)
    return p


def _lags(parts: dict[str, dict[str, object]]) -> dict[str, float | None]:
    m = Metrics()
    doc = {"topics": {"cdr.raw": {"partitions": parts}}}
    m.update_from_stats(orjson.dumps(doc), "cdr.raw")
    return {pid: sample(m, "cdranon_consumer_lag", {"partition": pid}) for pid in parts}


def test_lag_is_zero_where_nothing_reached_the_application_and_nothing_is_left() -> None:
    """app_offset stays unknown after an assignment or a seek until a record of the
    partition is handed over: an empty partition, one rewound to its end (its batch had
    committed after all), one assigned at its committed end. Nothing is left to read."""
    lags = _lags(
        {
            # Never written to (the sticky partitioner can leave a partition empty).
            "0": _partition(ls_offset=0, hi_offset=0, next_offset=0, app_offset=-1001),
            # Rewound to its end; the committed offset read at assignment is stale
            # (transactional commits do not update it): not 200 - 50 for ever.
            "1": _partition(app_offset=-1001, committed_offset=50),
            # Rewound to its end, no committed offset known at all.
            "2": _partition(app_offset=-1001),
        }
    )
    assert lags == {"0": 0, "1": 0, "2": 0}


def test_lag_counts_records_fetched_but_not_yet_handed_over() -> None:
    lags = _lags(
        {
            # A backlog: fetched up to 150, the application at 100, records queued.
            "0": _partition(ls_offset=300, next_offset=150, app_offset=100, fetchq_cnt=50),
            # Just assigned with a backlog: position unknown, the committed offset holds.
            "1": _partition(
                ls_offset=300,
                next_offset=150,
                app_offset=-1001,
                committed_offset=70,
                fetchq_cnt=80,
            ),
            # Still looking its start offset up: the committed offset holds.
            "2": _partition(
                fetch_state="offset-query",
                ls_offset=90,
                next_offset=-1001,
                app_offset=-1001,
                committed_offset=60,
            ),
        }
    )
    assert lags == {"0": 200, "1": 230, "2": 30}


def test_lag_past_records_never_handed_over() -> None:
    """An aborted transaction or a transaction marker at the end of the partition is
    skipped by a read_committed consumer: it is not lag."""
    assert _lags({"0": _partition(ls_offset=204, next_offset=204, app_offset=200)}) == {"0": 0}


def test_revoked_partition_does_not_come_back_with_a_stale_lag() -> None:
    """After a revocation librdkafka keeps reporting the partition (stopped), with its
    last offsets and consumer_lag from the committed offset of its assignment."""
    m = Metrics()

    def doc(p0: dict[str, object]) -> bytes:
        return orjson.dumps({"topics": {"cdr.raw": {"partitions": {"0": p0}}}})

    assigned = _partition(ls_offset=11, next_offset=11, app_offset=5, fetchq_cnt=6)
    m.update_from_stats(doc(assigned), "cdr.raw")
    assert sample(m, "cdranon_consumer_lag", {"partition": "0"}) == 6
    stopped = _partition(
        fetch_state="stopped",
        ls_offset=11,
        next_offset=11,
        app_offset=-1001,
        committed_offset=10,
        consumer_lag=1,
    )
    m.update_from_stats(doc(stopped), "cdr.raw")
    assert sample(m, "cdranon_consumer_lag", {"partition": "0"}) is None


def test_metrics_endpoint_serves_the_registry() -> None:
    m = Metrics()
    m.records_produced.labels("sealed").inc(7)
    server = serve(m.registry, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read().decode()
    finally:
        server.close()
    assert 'cdranon_records_produced_total{topic_kind="sealed"} 7.0' in body
    assert "cdranon_batch_duration_seconds_bucket" in body
