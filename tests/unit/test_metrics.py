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
