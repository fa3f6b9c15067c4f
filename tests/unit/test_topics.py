"""Month topic names and retention.ms: never early, at most a month (+ grace) late."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo

import pytest

from service.kafka.topics import (
    DAY_MS,
    HOUR_MS,
    TopicNames,
    months_ahead,
    rejected_retention_ms,
    sanitised_retention_ms,
    sealed_retention_ms,
    topic_config,
)
from service.months import (
    add_months,
    billing_until,
    identifiers_until,
    month_start,
    to_ms,
    zone,
)


def test_names() -> None:
    n = TopicNames("cdr")
    assert n.raw == "cdr.raw"
    assert n.rejected == "cdr.rejected"
    assert n.sealed("2025-11") == "cdr.sealed.2025-11"
    assert n.sanitised("2025-11") == "cdr.sanitised.2025-11"
    assert re.match(n.sealed_pattern(), "cdr.sealed.2025-11")
    assert not re.match(n.sealed_pattern(), "cdr.sanitised.2025-11")
    assert not re.match(n.sealed_pattern(), "cdrxsealed.2025-11")
    assert re.match(n.sanitised_pattern(), "cdr.sanitised.1999-01")


def test_sealed_retention_worked_example() -> None:
    # 2025-11: identifiers gone from 2026-12-01T00:00Z; the month starts 2025-11-01.
    expected = (datetime(2026, 12, 1, tzinfo=UTC) - datetime(2025, 11, 1, tzinfo=UTC)).days
    assert expected == 395
    assert sealed_retention_ms("2025-11", 12, grace_ms=HOUR_MS) == 395 * DAY_MS + HOUR_MS


def test_sanitised_retention_worked_example() -> None:
    # 2025-03: billing fields gone from 2036-01-01T00:00Z.
    days = (datetime(2036, 1, 1, tzinfo=UTC) - datetime(2025, 3, 1, tzinfo=UTC)).days
    assert sanitised_retention_ms("2025-03", 10, grace_ms=0) == days * DAY_MS


def _month_end(month: str, tz: tzinfo) -> datetime:
    y, m = (int(p) for p in month.split("-"))
    y2, m2 = add_months(y, m, 1)
    return month_start(f"{y2:04d}-{m2:02d}", tz)


MONTHS = ["2024-02", "2025-01", "2025-03", "2025-10", "2025-11", "2025-12", "2028-02"]


@pytest.mark.parametrize("tz_name", ["UTC", "Europe/Paris", "Pacific/Auckland"])
@pytest.mark.parametrize("month", MONTHS)
@pytest.mark.parametrize("kind", ["sealed", "sanitised"])
def test_broker_deletion_never_before_the_deadline_and_at_most_a_month_after(
    month: str, tz_name: str, kind: str
) -> None:
    """Model Kafka: a segment is deleted at (newest timestamp in it) + retention.ms.

    Every timestamp in a month topic is in [start, end) of the month, so the earliest
    deletion is start + retention and the latest (end - 1 ms) + retention.
    """
    tz = zone(tz_name)
    grace = HOUR_MS
    if kind == "sealed":
        retention = sealed_retention_ms(month, 12, grace, tz)
        deadline = to_ms(identifiers_until(month, 12, tz))
    else:
        retention = sanitised_retention_ms(month, 10, grace, tz)
        deadline = to_ms(billing_until(month, 10, tz))
    start = to_ms(month_start(month, tz))
    end = to_ms(_month_end(month, tz))
    earliest_deletion = start + retention
    latest_deletion = (end - 1) + retention
    assert earliest_deletion >= deadline, "a record would be deleted before its deadline"
    assert earliest_deletion - deadline == grace
    assert latest_deletion - deadline < (end - start) + grace
    # A local month lasts at most 31 days and the hour a DST change gives back.
    assert latest_deletion - deadline <= 31 * DAY_MS + HOUR_MS + grace


def test_longer_identifier_window_lengthens_retention() -> None:
    assert sealed_retention_ms("2025-11", 24) - sealed_retention_ms("2025-11", 12) == (
        to_ms(identifiers_until("2025-11", 24)) - to_ms(identifiers_until("2025-11", 12))
    )


def test_rejected_retention_bounded_by_identifier_window() -> None:
    assert rejected_retention_ms(12) == 360 * DAY_MS
    assert rejected_retention_ms(12) <= sealed_retention_ms("2025-11", 12)
    assert rejected_retention_ms(12, days=7) == 7 * DAY_MS


def test_topic_config_keeps_event_time_and_accepts_tolerated_future() -> None:
    cfg = topic_config(retention_ms=123, future_tolerance_ms=DAY_MS)
    assert cfg["retention.ms"] == "123"
    assert cfg["message.timestamp.type"] == "CreateTime"
    assert cfg["cleanup.policy"] == "delete"
    # The broker must not refuse a record the transform accepted as "not too far ahead".
    assert int(cfg["message.timestamp.after.max.ms"]) > DAY_MS
    assert int(cfg["message.timestamp.before.max.ms"]) == 2**63 - 1


def test_months_ahead_crosses_the_year() -> None:
    now = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert months_ahead(now, 2) == ["2025-12", "2026-01", "2026-02"]
    assert months_ahead(now, 0) == ["2025-12"]
    # In Paris it is already January.
    assert months_ahead(now + timedelta(minutes=1), 1, zone("Europe/Paris")) == [
        "2026-01",
        "2026-02",
    ]
