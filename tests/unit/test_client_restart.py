"""Which fatal Kafka errors the processor survives with new clients, and how often."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from service.commands.run import RestartBudget
from service.kafka.runner import _fatal_error


@pytest.mark.parametrize(
    ("code", "fatal", "restartable"),
    [
        # Fenced: after a pause (zombie) or by the static consumer's own rejoin across a
        # broker restart. New clients fence what is left and resume from committed offsets.
        (KafkaError.FENCED_INSTANCE_ID, False, True),
        (KafkaError.PRODUCER_FENCED, False, True),
        (KafkaError._FENCED, True, True),
        (KafkaError.INVALID_PRODUCER_EPOCH, False, True),
        # librdkafka's "a fatal error was raised" code, seen on consume() messages whose
        # fatal() is False.
        (KafkaError._FATAL, False, True),
        (KafkaError.INVALID_TXN_STATE, True, True),
        # New clients would meet these again: fail closed, exit.
        (KafkaError._AUTHENTICATION, True, False),
        (KafkaError._SSL, True, False),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, False, False),
        (KafkaError.INVALID_CONFIG, False, False),
    ],
)
def test_restartable_errors(code: int, fatal: bool, restartable: bool) -> None:
    err = KafkaError(code, "reason", fatal=fatal)
    exc = _fatal_error(err, "consumer")
    assert exc.restartable is restartable
    assert "fatal Kafka error in consumer" in str(exc)


def test_restart_budget_limits_restarts_within_the_window() -> None:
    budget = RestartBudget(limit=3, window_s=600)
    assert [budget.take(t) for t in (0.0, 10.0, 20.0, 30.0)] == [True, True, True, False]
    assert budget.left(30.0) == 0
    # The first restart leaves the window at 600 s: one more is allowed, not two.
    assert budget.take(600.5)
    assert not budget.take(601.0)
    assert budget.left(1300.0) == 3
