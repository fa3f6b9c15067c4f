"""Months and deadlines at every edge of time."""

from __future__ import annotations

from datetime import UTC

import pytest

from service.errors import ConfigError
from service.months import (
    billing_until,
    identifiers_until,
    month_of,
    month_of_ms,
    parse_month,
    parse_rfc3339,
    rfc3339,
    zone,
)


@pytest.mark.parametrize(
    ("ts", "month"),
    [
        ("2025-11-30T23:59:59Z", "2025-11"),
        ("2025-12-01T00:00:00Z", "2025-12"),
        # An offset east of UTC: local midnight of 1 December is still November in UTC.
        ("2025-12-01T00:30:00+01:00", "2025-11"),
        # West of UTC: local 30 November evening is already December in UTC.
        ("2025-11-30T23:30:00-02:00", "2025-12"),
        ("2024-02-29T12:00:00Z", "2024-02"),
        ("2025-12-31T23:59:59.999Z", "2025-12"),
        ("2026-01-01T00:00:00+00:00", "2026-01"),
        ("2025-12-31T23:00:00-01:00", "2026-01"),
    ],
)
def test_month_of_timestamp_honours_the_offset(ts: str, month: str) -> None:
    assert month_of(parse_rfc3339(ts)) == month


def test_month_in_a_configured_zone() -> None:
    paris = zone("Europe/Paris")
    assert month_of(parse_rfc3339("2025-11-30T23:30:00Z"), paris) == "2025-12"
    assert month_of(parse_rfc3339("2025-11-30T23:30:00Z"), UTC) == "2025-11"


def test_epoch_millis() -> None:
    assert month_of_ms(1764547199999) == "2025-11"  # 2025-11-30T23:59:59.999Z
    assert month_of_ms(1764547200000) == "2025-12"
    with pytest.raises(ValueError, match="out of range"):
        month_of_ms(10**20)


@pytest.mark.parametrize(
    ("month", "ids", "billing"),
    [
        ("2025-11", "2026-12-01T00:00:00Z", "2036-01-01T00:00:00Z"),
        ("2025-12", "2027-01-01T00:00:00Z", "2036-01-01T00:00:00Z"),
        ("2026-01", "2027-02-01T00:00:00Z", "2037-01-01T00:00:00Z"),
        ("2024-02", "2025-03-01T00:00:00Z", "2035-01-01T00:00:00Z"),
    ],
)
def test_default_deadlines(month: str, ids: str, billing: str) -> None:
    assert rfc3339(identifiers_until(month)) == ids
    assert rfc3339(billing_until(month)) == billing


def test_overridden_periods() -> None:
    assert rfc3339(identifiers_until("2025-11", 24)) == "2027-12-01T00:00:00Z"
    assert rfc3339(identifiers_until("2025-11", 6)) == "2026-06-01T00:00:00Z"
    assert rfc3339(billing_until("2025-11", 5)) == "2031-01-01T00:00:00Z"


def test_deadline_in_a_zone_is_reported_in_utc() -> None:
    assert rfc3339(identifiers_until("2025-11", 12, zone("Europe/Paris"))) == "2026-11-30T23:00:00Z"


@pytest.mark.parametrize("bad", ["2025-13", "2025-1", "25-11", "2025-00", "x"])
def test_bad_month(bad: str) -> None:
    with pytest.raises(ConfigError, match="YYYY-MM"):
        parse_month(bad)


@pytest.mark.parametrize(
    "bad", ["2025-11-30", "2025-11-30T23:59:59", "yesterday", "2025-11-30T25:00:00Z"]
)
def test_not_rfc3339(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # any ValueError: the callers reword it
        parse_rfc3339(bad)


def test_unknown_zone() -> None:
    with pytest.raises(ConfigError, match="unknown time zone"):
        zone("Mars/Olympus")
