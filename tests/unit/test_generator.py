"""The synthetic CDR generator: deterministic, schema-correct, valid identifiers, honest ratios.

Validity is judged independently of the generator: libphonenumber's ``is_valid_number``
for MSISDNs, a Luhn check written here for IMEIs, ``datetime.fromisoformat`` for times.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import phonenumbers
import pytest

from service.cli import main
from service.errors import ConfigError
from service.generator import MALFORMED_KINDS, generate_cdrs, iter_generated, luhn_check_digit

MONTHS = ["2026-09", "2026-10", "2026-11"]
REQUIRED = ("cdr_id", "event_time", "account_id")
BILLING = (
    "channel",
    "direction",
    "sender_id",
    "status",
    "price",
    "currency",
    "route_id",
    "mcc",
    "mnc",
    "country",
)
ALLOWED = {
    *REQUIRED,
    *BILLING,
    "parts",
    "duration_s",
    "msisdn",
    "imsi",
    "imei",
    "email",
    "text",
}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def event_instant(value: object) -> datetime:
    """The instant an event_time denotes; ValueError if it is not a valid one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=value)
    if not isinstance(value, str) or len(value) < 20 or value[10] != "T":
        raise ValueError("not RFC 3339")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("no offset")
    return dt


def utc_month(dt: datetime) -> str:
    u = dt.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}"


def problems(raw: bytes) -> list[str]:
    """Why a record is invalid, judged without the generator's help; [] if valid."""
    try:
        rec: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ["bad_json"]
    found = []
    if "cdr_id" not in rec:
        found.append("missing_cdr_id")
    if "msisdn" in rec:
        try:
            num = phonenumbers.parse(rec["msisdn"], None)
            ok = phonenumbers.is_valid_number(num)
        except phonenumbers.NumberParseException:
            ok = False
        if not ok:
            found.append("invalid_msisdn")
    if "imei" in rec and not (re.fullmatch(r"\d{15}", rec["imei"]) and luhn_valid(rec["imei"])):
        found.append("bad_imei_luhn")
    try:
        event_instant(rec.get("event_time"))
    except ValueError:
        found.append("bad_event_time")
    return found


@pytest.fixture(scope="module")
def sample() -> list[bytes]:
    return list(generate_cdrs(4000, months=MONTHS, seed=11, subscribers=3000))


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = list(generate_cdrs(500, months=MONTHS, seed=3, malformed_ratio=0.1, late_ratio=0.1))
    b = list(generate_cdrs(500, months=MONTHS, seed=3, malformed_ratio=0.1, late_ratio=0.1))
    c = list(generate_cdrs(500, months=MONTHS, seed=4, malformed_ratio=0.1, late_ratio=0.1))
    assert a == b
    assert len(a) == 500
    assert not set(a) & set(c)


def test_schema_of_valid_records(sample: list[bytes]) -> None:
    channels: Counter[str] = Counter()
    for raw in sample:
        rec = orjson.loads(raw)
        assert set(REQUIRED) | set(BILLING) <= rec.keys()
        assert rec.keys() <= ALLOWED
        ch = rec["channel"]
        channels[ch] += 1
        assert ch in {"sms", "voice", "chat", "email"}
        assert rec["direction"] in {"mo", "mt"}
        assert isinstance(rec["price"], float)
        assert rec["price"] >= 0
        assert round(rec["price"], 4) == rec["price"]
        assert re.fullmatch(r"[A-Z]{3}", rec["currency"])
        assert re.fullmatch(r"[A-Z]{2}", rec["country"])
        assert re.fullmatch(r"\d{3}", rec["mcc"])
        assert re.fullmatch(r"\d{2,3}", rec["mnc"])
        assert ("parts" in rec) == (ch == "sms")
        assert ("duration_s" in rec) == (ch == "voice")
        assert ("email" in rec) == (ch == "email")
        assert ("msisdn" in rec) == (ch != "email")
        if "imsi" in rec:
            assert re.fullmatch(r"\d{15}", rec["imsi"])
            assert rec["imsi"].startswith(rec["mcc"] + rec["mnc"])
    assert all(channels[c] > 0 for c in ("sms", "voice", "chat", "email"))
    assert 200 <= sum(len(r) for r in sample) / len(sample) <= 600
    ids = [orjson.loads(r)["cdr_id"] for r in sample]
    assert len(set(ids)) == len(ids)


def test_identifiers_are_valid_and_repeat(sample: list[bytes]) -> None:
    msisdns: Counter[str] = Counter()
    spaced = 0
    for raw in sample:
        assert problems(raw) == []
        rec = orjson.loads(raw)
        if "msisdn" in rec:
            num = phonenumbers.parse(rec["msisdn"], None)
            assert phonenumbers.region_code_for_number(num) == rec["country"]
            msisdns[phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)] += 1
            spaced += " " in rec["msisdn"]
        if "imei" in rec:
            assert luhn_valid(rec["imei"])
    assert 0 < spaced < len(sample) * 0.2
    # A subscriber pool: the same numbers come back, as in real traffic.
    assert msisdns.most_common(1)[0][1] >= 5


def test_event_times_in_listed_months_in_all_forms(sample: list[bytes]) -> None:
    forms: Counter[str] = Counter()
    months: Counter[str] = Counter()
    for raw in sample:
        et = orjson.loads(raw)["event_time"]
        if isinstance(et, int):
            forms["millis"] += 1
        elif et.endswith("Z"):
            forms["z"] += 1
        else:
            assert re.search(r"[+-]\d\d:\d\d$", et)
            forms["offset"] += 1
        months[utc_month(event_instant(et))] += 1
    assert set(months) == set(MONTHS)
    n = len(sample)
    assert forms["z"] > 0.8 * n
    assert 0.05 * n < forms["offset"] < 0.15 * n
    assert 0.005 * n < forms["millis"] < 0.04 * n


def test_malformed_ratio_roughly_honoured_and_detectable() -> None:
    cdrs = list(iter_generated(5000, months=MONTHS, seed=5, malformed_ratio=0.1))
    labelled = [c for c in cdrs if c.malformed]
    assert 400 <= len(labelled) <= 600
    assert {c.malformed for c in labelled} == set(MALFORMED_KINDS)
    for c in cdrs:
        found = problems(c.value)
        if c.malformed is None:
            assert found == []
        else:
            assert c.malformed in found


def test_late_records_come_from_older_months() -> None:
    cdrs = list(iter_generated(3000, months=MONTHS, seed=8, late_ratio=0.2))
    late = [c for c in cdrs if c.late]
    assert 450 <= len(late) <= 750
    newest_on_time = MONTHS[0]
    older = 0
    for c in cdrs:
        at = event_instant(orjson.loads(c.value)["event_time"])
        assert abs(at.timestamp() * 1000 - c.event_ms) < 1
        month = utc_month(at)
        assert month in MONTHS
        if c.late:
            older += month < newest_on_time
        else:
            # On-time records move forward through the months, in order.
            assert month >= newest_on_time
            newest_on_time = month
    assert newest_on_time == MONTHS[-1]
    # Late records in the first month have no older month to come from; the rest do.
    assert older > len(late) * 0.5


def test_now_bounds_event_times() -> None:
    now = datetime(2026, 10, 15, 12, 0, tzinfo=UTC)
    for raw in generate_cdrs(1000, months=["2026-09", "2026-10"], seed=1, now=now):
        assert event_instant(orjson.loads(raw)["event_time"]) <= now


@pytest.mark.parametrize(
    "kwargs",
    [
        {"months": []},
        {"months": ["2026-13"]},
        {"months": ["2026-10", "2026-09"]},
        {"months": MONTHS, "malformed_ratio": 1.5},
        {"months": MONTHS, "late_ratio": -0.1},
        {"months": ["2027-01"], "now": datetime(2026, 12, 1, tzinfo=UTC)},
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        iter_generated(10, **kwargs)


def test_luhn_check_digit_matches_an_independent_check() -> None:
    for payload in ("35332811000000", "49015420323751", "86891603123456", "00000000000000"):
        assert luhn_valid(payload + luhn_check_digit(payload))
        wrong = str((int(luhn_check_digit(payload)) + 1) % 10)
        assert not luhn_valid(payload + wrong)


def test_cli_writes_json_lines_equal_to_the_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cdrs.jsonl"
    rc = main(
        [
            "generate",
            "--count",
            "300",
            "--months",
            ",".join(MONTHS),
            "--seed",
            "9",
            "--malformed-ratio",
            "0.05",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""
    expected = list(generate_cdrs(300, months=MONTHS, seed=9, malformed_ratio=0.05))
    assert lines[:-1] == expected
    summary = capsys.readouterr().out
    assert "generated 300 CDRs" in summary


def test_cli_months_back_ends_at_now(tmp_path: Path) -> None:
    out = tmp_path / "cdrs.jsonl"
    now = "2026-11-10T08:00:00Z"
    args = ["--count", "500", "--months-back", "2", "--now", now, "--output", str(out)]
    rc = main(["generate", *args])
    assert rc == 0
    months: Counter[str] = Counter()
    limit = event_instant(now)
    for line in out.read_bytes().splitlines():
        at = event_instant(orjson.loads(line)["event_time"])
        assert at <= limit
        months[utc_month(at)] += 1
    assert set(months) == {"2026-10", "2026-11"}


def test_cli_rejects_conflicting_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--count", "1", "--output", "x", "--bootstrap", "h:1"]) == 2
    assert main(["generate", "--count", "1", "--rate", "10"]) == 2
    assert main(["generate", "--count", "1", "--bootstrap", "h:1", "-X", "sasl.password"]) == 2
    err = capsys.readouterr().err
    assert "not both" in err
    assert "needs --bootstrap" in err
    assert "KEY=VALUE" in err
