"""Month checkpoints of "original form": one signed root over a closed month's roots.

When a month closes (its end plus ``close_after``: late records have mostly arrived), the
retention controller appends an ``integrity.checkpoint`` event: the RFC 6962 root over the
month's ``integrity.root`` roots in log order, with their count. A root inserted into the
log for that month later, or one removed, no longer matches the checkpoint; records that
arrive after the checkpoint are still covered by their own batch roots.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timedelta, tzinfo
from typing import Any

import orjson

from service.merkle import root
from service.months import add_months, month_start, parse_month

# "sanitised/2026-10.jsonl" (batch mode) or "<prefix>.sanitised.2026-10" (a topic).
_STREAM_MONTH = re.compile(r"(?:^|[./])sanitised[./](\d{4}-\d{2})(?:\.jsonl)?$")
DEFAULT_CLOSE_AFTER = timedelta(days=7)


def month_of_stream(stream: str) -> str | None:
    """The month a root's stream belongs to, or None."""
    m = _STREAM_MONTH.search(stream)
    return m.group(1) if m else None


def _events(raw_events: Iterable[bytes]) -> list[dict[str, Any]]:
    out = []
    for raw in raw_events:
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # `audit verify` reports damage; here only well-formed events count
        if isinstance(ev, dict):
            out.append(ev)
    return out


def checkpoint_details(month: str, roots: list[str]) -> dict[str, Any]:
    """The details of a month's ``integrity.checkpoint`` event."""
    return {
        "month": month,
        "roots": len(roots),
        "root": root([bytes.fromhex(r) for r in roots]).hex(),
    }


def due_checkpoints(
    raw_events: Iterable[bytes],
    now: datetime,
    *,
    close_after: timedelta = DEFAULT_CLOSE_AFTER,
    tz: tzinfo | None = None,
) -> dict[str, dict[str, Any]]:
    """Checkpoints to write now: months closed by ``now`` that have roots and no checkpoint."""
    roots: dict[str, list[str]] = {}
    done: set[str] = set()
    for ev in _events(raw_events):
        d = ev.get("details") or {}
        if ev.get("event") == "integrity.checkpoint":
            done.add(str(d.get("month")))
        elif ev.get("event") == "integrity.root":
            month = month_of_stream(str(d.get("stream", "")))
            if month is not None:
                roots.setdefault(month, []).append(str(d.get("root")))
    out = {}
    for month, rs in sorted(roots.items()):
        y, m = parse_month(month)
        y2, m2 = add_months(y, m, 1)
        nxt = f"{y2:04d}-{m2:02d}"
        closes = (month_start(nxt, tz) if tz is not None else month_start(nxt)) + close_after
        if month not in done and now >= closes:
            out[month] = checkpoint_details(month, rs)
    return out


def check_checkpoints(raw_events: Iterable[bytes]) -> dict[str, str | None]:
    """Each checkpointed month -> None if its checkpoint matches the roots logged before
    it, else what is wrong."""
    seen: dict[str, list[str]] = {}
    result: dict[str, str | None] = {}
    for ev in _events(raw_events):
        d = ev.get("details") or {}
        if ev.get("event") == "integrity.root":
            month = month_of_stream(str(d.get("stream", "")))
            if month is not None:
                seen.setdefault(month, []).append(str(d.get("root")))
        elif ev.get("event") == "integrity.checkpoint":
            month = str(d.get("month"))
            want = checkpoint_details(month, seen.get(month, []))
            if (d.get("roots"), d.get("root")) != (want["roots"], want["root"]):
                result[month] = (
                    f"checkpoint of {month} covers {d.get('roots')} roots, the log has "
                    f"{want['roots']} before it, and their root differs"
                    if d.get("roots") != want["roots"]
                    else f"checkpoint of {month} does not match the roots logged before it"
                )
            else:
                result[month] = None
    return result
