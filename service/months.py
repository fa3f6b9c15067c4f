"""Months and deadlines: which calendar month a record belongs to, and when its data must go.

All pure functions. A record's month is the calendar month of its own ``event_time`` in
the reference zone (UTC unless configured), honouring the offset written in the
timestamp: ``2025-12-01T00:30:00+01:00`` is 2025-11-30T23:30Z, so November.

Deadlines (RETENTION-RULES.md), both exclusive instants, "kept until" meaning "gone from":
- identifiers: the first instant of the 13th month after the month (12 months after the
  end of the month): 2025-11 -> 2026-12-01T00:00:00Z;
- billing fields: 1 January of the year after the 10 years following the year:
  2025 -> 2036-01-01T00:00:00Z.
Deadline instants are computed in the reference zone and reported in UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from service.errors import ConfigError

_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
# Epoch milliseconds of 0001-01-01 and 9999-12-31: anything outside is not a time.
_MIN_MS = -62135596800000
_MAX_MS = 253402300799999


def zone(name: str) -> tzinfo:
    """The reference zone by IANA name ("UTC", "Europe/Paris"); ConfigError if unknown."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a directory of the tz database ("Europe") is not a zone.
        raise ConfigError(f"unknown time zone {name!r}: expected an IANA name such as UTC") from exc


def parse_month(month: str) -> tuple[int, int]:
    """``"2025-11"`` -> ``(2025, 11)``; ConfigError if not YYYY-MM."""
    m = _MONTH.match(month)
    if not m:
        raise ConfigError(f"invalid month {month!r}: expected YYYY-MM")
    return int(m.group(1)), int(m.group(2))


def add_months(year: int, month: int, n: int) -> tuple[int, int]:
    """Calendar arithmetic on (year, month)."""
    total = year * 12 + (month - 1) + n
    return total // 12, total % 12 + 1


def month_start(month: str, tz: tzinfo = UTC) -> datetime:
    """The first instant of the month in the zone, as an aware datetime in UTC."""
    y, m = parse_month(month)
    return datetime(y, m, 1, tzinfo=tz).astimezone(UTC)


@lru_cache(maxsize=4096)
def identifiers_until(month: str, identifier_months: int = 12, tz: tzinfo = UTC) -> datetime:
    """First instant at which the month's identifiers must be gone (UTC)."""
    y, m = parse_month(month)
    # End of the month is the start of the next; plus identifier_months.
    y2, m2 = add_months(y, m, 1 + identifier_months)
    return datetime(y2, m2, 1, tzinfo=tz).astimezone(UTC)


@lru_cache(maxsize=4096)
def billing_until(month: str, billing_years: int = 10, tz: tzinfo = UTC) -> datetime:
    """First instant at which the month's billing fields must be gone (UTC)."""
    y, _ = parse_month(month)
    return datetime(y + billing_years + 1, 1, 1, tzinfo=tz).astimezone(UTC)


def to_ms(dt: datetime) -> int:
    """Aware datetime -> epoch milliseconds."""
    return int(dt.timestamp() * 1000)


def rfc3339(dt: datetime) -> str:
    """UTC RFC 3339 with a Z, second precision unless there are sub-seconds."""
    u = dt.astimezone(UTC)
    if u.microsecond:
        return u.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    return u.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with Z or an offset; ValueError if it is not one."""
    if not isinstance(text, str) or len(text) < 20 or text[10] not in "Tt ":
        raise ValueError("not an RFC 3339 timestamp")
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError("RFC 3339 timestamp without Z or an offset")
    return dt


def month_of(dt: datetime, tz: tzinfo = UTC) -> str:
    """The calendar month (YYYY-MM) of an aware datetime in the zone."""
    local = dt.astimezone(tz)
    return f"{local.year:04d}-{local.month:02d}"


def month_of_ms(ms: int, tz: tzinfo = UTC) -> str:
    """The calendar month (YYYY-MM) of epoch milliseconds in the zone."""
    if not _MIN_MS <= ms <= _MAX_MS:
        raise ValueError("epoch milliseconds out of range")
    return month_of(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms), tz)


def now_utc() -> datetime:
    """The clock; the one place cdranon reads it, so tests and --now can replace it."""
    return datetime.now(UTC)
