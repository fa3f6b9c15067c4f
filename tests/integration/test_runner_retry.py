"""Which Kafka errors the processor waits out and which end the run.

Admin calls (topic creation) fail with errors built from a bare code: librdkafka never
marks them retriable, so "the controller did not answer in time" looked the same as "not
allowed" and ended the run. The periodic pre-creation of next months' topics, or the
first record of a new month, during a broker outage then stopped the processor. The
errors below are librdkafka's own, from real calls: one to a port where nothing listens,
one that the session broker refuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

from service.commands.run import build_runner
from service.errors import KafkaFatalError
from service.kafka.clients import passes
from service.metrics import Metrics
from tests.integration.run_support import runner_settings

pytestmark = pytest.mark.integration


def _create(bootstrap: str, topic: NewTopic, timeout_s: float) -> Callable[[], None]:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})

    def create() -> None:
        admin.create_topics([topic], request_timeout=timeout_s)[topic.topic].result()

    return create


def _unreachable() -> KafkaException:
    """What creating a topic meets while the broker is away (nothing listens on port 1)."""
    with pytest.raises(KafkaException) as exc:
        _create("127.0.0.1:1", NewTopic("cdranon-x", 1, 1), 2.0)()
    return exc.value


def test_an_unanswered_admin_call_passes_and_a_refused_one_does_not(kafka_bootstrap: str) -> None:
    away = _unreachable().args[0]
    assert not away.retriable()  # why the codes are named in service.kafka.clients
    assert passes(away), away.name()
    with pytest.raises(KafkaException) as refused:
        _create(kafka_bootstrap, NewTopic("cdranon-bad", 1, 1, config={"retention.ms": "x"}), 10)()
    err = refused.value.args[0]
    assert err.code() == KafkaError.INVALID_CONFIG
    assert not passes(err)


def test_the_processor_waits_out_an_unanswered_topic_creation(
    kafka_bootstrap: str,
    tmp_path: Path,
    unique_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """_retry_kafka (around topic creation, at start-up, every 10 minutes and for a new
    month) retries an admin call that timed out and gives up at once on a refused one."""
    metrics = Metrics()
    settings = runner_settings(kafka_bootstrap, tmp_path, f"retry-{unique_id}", monkeypatch)
    runner = build_runner(settings, metrics)
    caplog.set_level(logging.WARNING, logger="cdranon.runner")
    attempts: list[str] = []
    unanswered = _create("127.0.0.1:1", NewTopic(f"retry-{unique_id}-a", 1, 1), 2.0)
    answered = _create(kafka_bootstrap, NewTopic(f"retry-{unique_id}-a", 1, 1), 30.0)

    def broker_back_on_the_third_try() -> None:
        attempts.append("try")
        (unanswered if len(attempts) < 3 else answered)()

    try:
        runner._retry_kafka("create_topics", broker_back_on_the_third_try)
        assert len(attempts) == 3
        retries = metrics.registry.get_sample_value("cdranon_retries_total", {"reason": "broker"})
        assert retries == 2
        waits = [
            r.__dict__["cdranon_fields"]
            for r in caplog.records
            if r.getMessage() == "broker_unavailable"
        ]
        assert [(w["during"], w["code"]) for w in waits] == [("create_topics", "_TIMED_OUT")] * 2

        refused = _create(
            kafka_bootstrap,
            NewTopic(f"retry-{unique_id}-b", 1, 1, config={"retention.ms": "x"}),
            10,
        )
        with pytest.raises(KafkaFatalError):
            runner._retry_kafka("create_topics", refused)
        assert metrics.registry.get_sample_value("cdranon_retries_total", {"reason": "broker"}) == 2

        # Stopping: no wait for the broker, and one clear error, not a KafkaException's
        # traceback.
        runner.request_stop()
        with pytest.raises(
            KafkaFatalError, match="stopped while the broker was unavailable"
        ) as stop:
            runner._retry_kafka("create_topics", unanswered)
        assert not stop.value.restartable
        assert "_TIMED_OUT" in str(stop.value)
    finally:
        runner._close()


def test_the_periodic_precreation_does_not_wait_for_the_broker(
    tmp_path: Path,
    unique_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every 10 minutes the processor creates the coming months' topics. With the broker
    away that is one try and another in 30 s, not a wait: the loop must go on polling
    the consumer (the group drops a member that does not poll), and a record of a new
    month creates its topics anyway. Nothing listens on port 1."""
    settings = runner_settings("127.0.0.1:1", tmp_path, f"pre-{unique_id}", monkeypatch)
    runner = build_runner(settings, Metrics())
    runner.topics._timeout_s = 2.0  # each try gives up after 2 s instead of 30
    caplog.set_level(logging.WARNING, logger="cdranon.runner")
    try:
        started = time.monotonic()
        runner._precreate_in_passing()
        assert time.monotonic() - started < 20  # one try, no back-off loop
        waits = [
            r.__dict__["cdranon_fields"]
            for r in caplog.records
            if r.getMessage() == "broker_unavailable"
        ]
        assert [(w["during"], w["code"]) for w in waits] == [("precreate", "_TIMED_OUT")]
        # The next try is due in 30 s, not in 10 minutes.
        due_in = runner._last_precreate + 600 - time.monotonic()
        assert 20 < due_in <= 30
    finally:
        runner.request_stop()
        runner._close()
