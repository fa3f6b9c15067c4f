"""The transform: outcomes, rejection reasons, stripping, views, and its privacy properties."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import service.transform as transform_module
from service.commands.run import transform_path
from service.errors import KeystoreUnavailableError
from service.identifiers import luhn_ok
from service.keyring import Keyring
from service.keystore.base import key_id
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.months import zone
from service.policy import load_policy, parse_policy
from service.sealing import Unsealer
from service.transform import Transformer
from tests.unit.core_helpers import NOW, cdr, make_transformer, now_ms, raw

BILLING = [
    "cdr_id",
    "event_time",
    "account_id",
    "channel",
    "direction",
    "sender_id",
    "status",
    "parts",
    "duration_s",
    "price",
    "currency",
    "route_id",
    "mcc",
    "mnc",
    "country",
]


@pytest.fixture
def tf(tmp_path: Path) -> Transformer:
    return make_transformer(tmp_path)


def _one(tf: Transformer, rec: dict[str, Any] | bytes, now: str = "2026-11-23T12:00:00Z") -> Any:
    return tf.transform([rec if isinstance(rec, bytes) else raw(rec)], now_ms(now))


def test_identifiable_record_gets_both_views(tf: Transformer) -> None:
    rec = cdr(text="meet me at 5")
    r = _one(tf, rec)
    assert (len(r.sealed), len(r.sanitised), len(r.rejected), r.stripped) == (1, 1, 0, 0)
    sealed = orjson.loads(r.sealed[0].value)
    san = orjson.loads(r.sanitised[0].value)
    for f in BILLING:
        if f in rec:
            assert san[f] == rec[f]
            assert sealed[f] == rec[f]
    assert san["month"] == sealed["month"] == "2026-10"
    assert san["key_id"] == sealed["key_id"] == "2026-10/default"
    assert san["msisdn_cc"] == "+44"
    assert san["imsi_plmn"] == "234-15"
    assert san["imei_tac"] == "49015420"
    assert re.fullmatch(r"[0-9a-f]{32}", san["msisdn_pseudonym"])
    for f in ("msisdn", "imsi", "imei", "email", "text"):
        assert f not in san
        assert f not in sealed
    assert r.sealed[0].key == b"acct-1"
    assert (
        r.sealed[0].timestamp_ms == r.sanitised[0].timestamp_ms == 1792058400000
    )  # 2026-10-15T10:00:00Z
    assert r.months == {"2026-10/default"}


def test_unseal_round_trip_and_binding(tf: Transformer) -> None:
    rec = cdr(msisdn="+44 7700 900123", email="Jo@Example.org")
    r = _one(tf, rec)
    sealed = orjson.loads(r.sealed[0].value)
    u = Unsealer(tf.keyring.get(sealed["key_id"], create=False))
    got = u.unseal(sealed["sealed"], sealed["cdr_id"])
    assert got == {k: rec[k] for k in ("msisdn", "imsi", "imei", "email")}
    # Bound to the record: the same blob under another cdr_id does not open.
    with pytest.raises(Exception, match="does not authenticate"):
        u.unseal(sealed["sealed"], "c-2")


def test_pseudonyms_stable_within_a_month_and_normalised(tf: Transformer) -> None:
    a = _one(tf, cdr(cdr_id="a", msisdn="+447700900123"))
    b = _one(tf, cdr(cdr_id="b", msisdn="0044 7700-900 123", event_time="2026-10-01T00:00:00Z"))
    pa = orjson.loads(a.sanitised[0].value)["msisdn_pseudonym"]
    pb = orjson.loads(b.sanitised[0].value)["msisdn_pseudonym"]
    assert pa == pb


def test_pseudonyms_differ_across_months(tf: Transformer) -> None:
    a = _one(tf, cdr(event_time="2026-10-15T10:00:00Z"))
    b = _one(tf, cdr(event_time="2026-09-15T10:00:00Z"))
    sa, sb = (orjson.loads(x.sanitised[0].value) for x in (a, b))
    for f in ("msisdn_pseudonym", "imsi_pseudonym", "imei_pseudonym"):
        assert sa[f] != sb[f]


def test_kinds_are_domain_separated(tf: Transformer) -> None:
    r = _one(tf, cdr(msisdn="+234150000000001", imsi="234150000000001", imei=None))
    san = orjson.loads(r.sanitised[0].value)
    assert san["msisdn_pseudonym"] != san["imsi_pseudonym"]


def test_past_identifier_deadline_is_stripped_and_gets_no_key(tf: Transformer) -> None:
    # 2025-10's identifiers are gone from 2026-11-01.
    r = _one(tf, cdr(event_time="2025-10-31T23:59:59Z"))
    assert (len(r.sealed), len(r.sanitised), r.stripped) == (0, 1, 1)
    assert r.stripped_reasons == {"past_identifier_deadline": 1}
    san = orjson.loads(r.sanitised[0].value)
    assert san["key_id"] is None
    assert not any(k.endswith("_pseudonym") for k in san)
    assert san["msisdn_cc"] == "+44"
    assert tf.keyring.keystore.get(key_id("2025-10", "default")) is None


def test_deadline_instant_is_exclusive(tf: Transformer) -> None:
    rec = cdr(event_time="2025-11-30T23:59:59Z")
    assert _one(tf, rec, "2026-11-30T23:59:59.999Z").stripped == 0
    assert _one(tf, rec, "2026-12-01T00:00:00Z").stripped == 1


def test_destroyed_key_strips(tf: Transformer) -> None:
    tf.keyring.keystore.destroy(key_id("2026-10", "default"))
    r = _one(tf, cdr())
    assert r.stripped_reasons == {"key_destroyed": 1}
    assert not r.sealed


@pytest.mark.parametrize(
    ("rec", "reason", "field"),
    [
        (b"{not json", "invalid_json", None),
        (b"\xff\xfe{}", "invalid_json", None),
        (b"[1,2]", "not_an_object", None),
        (b'{"cdr_id": "x", "price": NaN}', "invalid_json", None),
        (cdr(cdr_id=...), "missing_field", "cdr_id"),
        (cdr(account_id=...), "missing_field", "account_id"),
        (cdr(event_time=...), "missing_field", "event_time"),
        (cdr(cdr_id=7), "wrong_type", "cdr_id"),
        (cdr(cdr_id=""), "invalid_value", "cdr_id"),
        (cdr(event_time="2026-10-15 10:00"), "invalid_value", "event_time"),
        (cdr(event_time="2026-10-15T10:00:00"), "invalid_value", "event_time"),
        (cdr(event_time="2026-02-30T10:00:00Z"), "invalid_value", "event_time"),
        (cdr(event_time=1.5), "wrong_type", "event_time"),
        (cdr(event_time=True), "wrong_type", "event_time"),
        (cdr(event_time=10**18), "invalid_value", "event_time"),
        (cdr(parts=-1), "invalid_value", "parts"),
        (cdr(parts="1"), "wrong_type", "parts"),
        (cdr(price="free"), "wrong_type", "price"),
        (cdr(currency="euro"), "invalid_value", "currency"),
        (cdr(mcc="23"), "invalid_value", "mcc"),
        (cdr(mnc="1"), "invalid_value", "mnc"),
        (cdr(country="UK"), "invalid_value", "country"),
        (cdr(msisdn="12345"), "invalid_value", "msisdn"),
        (cdr(msisdn="+99912345678"), "invalid_value", "msisdn"),
        (cdr(msisdn="+\uff14\uff147700900123"), "invalid_value", "msisdn"),  # fullwidth digits
        (cdr(msisdn=447700900123), "wrong_type", "msisdn"),
        (cdr(imsi="23415"), "invalid_value", "imsi"),
        (cdr(imei="490154203237519"), "invalid_value", "imei"),
        (cdr(imei="49015420323751x"), "invalid_value", "imei"),
        (cdr(email="not-an-address"), "invalid_value", "email"),
        (cdr(event_time="2026-12-25T00:00:00Z"), "too_far_in_future", "event_time"),
        (cdr(event_time="2015-12-31T23:59:59Z"), "past_billing_deadline", "event_time"),
    ],
)
def test_rejections(
    tf: Transformer, rec: dict[str, Any] | bytes, reason: str, field: str | None
) -> None:
    payload = rec if isinstance(rec, bytes) else raw(rec)
    r = _one(tf, payload)
    assert not r.sealed
    assert not r.sanitised
    assert len(r.rejected) == 1
    rej = r.rejected[0]
    assert (rej.reason, rej.field) == (reason, field)
    assert rej.original == payload
    assert rej.message
    # The reason never carries an identifier's value.
    if isinstance(rec, dict):
        for f in ("msisdn", "imsi", "imei", "email"):
            v = rec.get(f)
            if isinstance(v, str):
                assert v not in rej.message


def test_stripped_record_with_a_malformed_identifier_is_still_rejected(tf: Transformer) -> None:
    r = _one(tf, cdr(event_time="2025-01-01T00:00:00Z", imei="490154203237519"))
    assert [x.reason for x in r.rejected] == ["invalid_value"]


def test_nulls_and_absent_identifiers(tf: Transformer) -> None:
    r = _one(tf, cdr(msisdn=None, imsi=..., imei=..., channel=None))
    san = orjson.loads(r.sanitised[0].value)
    assert san["channel"] is None
    assert san["msisdn_cc"] is None
    assert "msisdn_pseudonym" not in san
    sealed = orjson.loads(r.sealed[0].value)
    assert (
        Unsealer(tf.keyring.get(sealed["key_id"], create=False)).unseal(sealed["sealed"], "c-1")
        == {}
    )


def test_epoch_millis_and_offsets(tf: Transformer) -> None:
    r = tf.transform(
        [
            raw(cdr(cdr_id="a", event_time=1764547199999)),  # 2025-11-30T23:59:59.999Z
            raw(cdr(cdr_id="b", event_time="2025-12-01T00:30:00+01:00")),
        ],
        now_ms("2026-11-01T00:00:00Z"),
    )
    assert [s.month for s in r.sanitised] == ["2025-11", "2025-11"]
    assert r.sanitised[0].timestamp_ms == 1764547199999
    assert r.sanitised[1].timestamp_ms == 1764545400000


def test_jurisdiction_override_gives_its_own_key_and_deadline(tmp_path: Path) -> None:
    base = load_policy()
    doc: dict[str, Any] = {
        "fields": {"billing": list(base.billing_fields), "identifiers": base.identifier_fields},
        "retention": {"jurisdictions": {"it": {"countries": ["IT"], "identifier_months": 24}}},
    }
    tf = make_transformer(tmp_path, parse_policy(doc, "test"))
    now = now_ms("2026-11-23T12:00:00Z")
    r = tf.transform(
        [
            raw(cdr(cdr_id="it", country="IT", event_time="2025-06-01T00:00:00Z")),
            raw(cdr(cdr_id="gb", country="GB", event_time="2025-06-01T00:00:00Z")),
        ],
        now,
    )
    assert [orjson.loads(s.value)["cdr_id"] for s in r.sealed] == ["it"]
    assert r.months == {"2025-06/it"}
    assert r.stripped == 1


def test_batch_accounting(tf: Transformer) -> None:
    batch = [raw(cdr(cdr_id=f"c{i}")) for i in range(50)]
    batch += [b"oops", raw(cdr(cdr_id="old", event_time="2024-01-01T00:00:00Z"))]
    r = tf.transform(batch, now_ms())
    assert len(r.sealed) + r.stripped + len(r.rejected) == len(batch)
    assert len(r.sanitised) == len(r.sealed) + r.stripped
    indices = sorted([o.source for o in r.sanitised] + [x.index for x in r.rejected])
    assert indices == list(range(len(batch)))


# --- properties over generated CDRs ------------------------------------------------------

_digits = st.text("0123456789", min_size=1, max_size=1)
_msisdn = st.builds(
    lambda cc, rest: f"+{cc}{rest}",
    st.sampled_from(["44", "33", "49", "1", "91", "55", "234"]),
    st.text("0123456789", min_size=9, max_size=10).filter(lambda s: s[0] != "0"),
)


def _luhn_complete(body: str) -> str:
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError


_imei = st.text("0123456789", min_size=14, max_size=14).map(_luhn_complete)
_imsi = st.text("0123456789", min_size=15, max_size=15)
_email = st.builds(
    lambda u, d: f"{u}@{d}.example",
    st.text("abcdefghij.XYZ_", min_size=1, max_size=12).filter(lambda s: s[0] != "."),
    st.text("abcdefghij", min_size=1, max_size=8),
)
_records = st.fixed_dictionaries(
    {
        "cdr_id": st.text(min_size=1, max_size=20),
        "event_time": st.sampled_from(
            ["2026-10-15T10:00:00Z", "2026-09-01T00:00:00+02:00", "2026-11-20T23:59:59.5Z"]
        ),
        "account_id": st.one_of(st.text(min_size=1, max_size=10), st.integers(0, 10**9)),
        "price": st.one_of(
            st.none(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(-(10**6), 10**6),
        ),
        "sender_id": st.one_of(st.none(), st.text(max_size=11)),
    },
    optional={
        "msisdn": _msisdn,
        "imsi": _imsi,
        "imei": _imei,
        "email": _email,
        "text": st.text(max_size=30),
    },
)


def _spellings(value: str) -> set[str]:
    digits = "".join(c for c in value if c.isdigit())
    out = {value, value.lower()}
    if len(digits) >= 8:
        out |= {digits, "+" + digits, "00" + digits, digits[-9:]}
    return out


@settings(
    max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(recs=st.lists(_records, min_size=1, max_size=8))
def test_property_no_plaintext_billing_equal_unseal_round_trips(
    tf: Transformer, recs: list[dict[str, Any]]
) -> None:
    for i, rec in enumerate(recs):
        rec["cdr_id"] = f"{rec['cdr_id']}-{i}"
    r = tf.transform([raw(x) for x in recs], now_ms())
    assert not r.rejected, [x.message for x in r.rejected]
    assert len(r.sealed) == len(recs)
    for out in r.sealed + r.sanitised:
        rec = recs[out.source]
        doc = orjson.loads(out.value)
        # Billing values are the input's own (a cdr_id may hold any digits); everything
        # the service added must not hold an identifier in any spelling.
        added = {k: v for k, v in doc.items() if k not in BILLING}
        text = orjson.dumps(added).decode()
        for f in ("msisdn", "imsi", "imei", "email"):
            if f in rec:
                for spelling in _spellings(rec[f]):
                    assert spelling not in text, f
        for f in ("cdr_id", "event_time", "account_id", "price", "sender_id"):
            assert doc[f] == rec[f]
        assert "text" not in doc
    for out in r.sealed:
        doc = orjson.loads(out.value)
        got = Unsealer(tf.keyring.get(doc["key_id"], create=False)).unseal(
            doc["sealed"], doc["cdr_id"]
        )
        rec = recs[out.source]
        assert got == {f: rec[f] for f in ("msisdn", "imsi", "imei", "email") if f in rec}


def test_pseudonym_caches_share_one_bound_across_months(
    tf: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transform_module, "PSEUDONYM_CACHE_ENTRIES", 50)
    tf = Transformer(tf.policy, tf.keyring)
    batch = [
        raw(
            cdr(
                cdr_id=f"{m}-{i}",
                event_time=f"2026-{m:02d}-15T10:00:00Z",
                msisdn=f"+4477009{i:05d}",
            )
        )
        for m in (8, 9, 10)
        for i in range(40)
    ]
    first = tf.transform(batch, now_ms())
    cached = sum(len(c) for per in tf._caches.values() for c in per.values())
    assert cached <= 50
    # Clearing loses nothing: the same records give the same pseudonyms again.
    again = tf.transform(batch, now_ms())
    assert [o.value for o in first.sanitised] == [o.value for o in again.sanitised]


def test_python_path_counts_what_the_native_path_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [
        raw(cdr(cdr_id="plain-1")),
        raw(cdr(cdr_id="plain-2", event_time="2026-10-15T12:00:00+02:00")),
        raw(cdr(cdr_id="caf\u00e9")),  # non-ASCII text: the Python path writes it
        raw(cdr(cdr_id="bad-imei", imei="490154203237519")),  # rejected: always Python
    ]
    native = make_transformer(tmp_path)
    assert native.native
    res = native.transform(batch, now_ms())
    assert (len(res.sanitised), len(res.rejected), res.python_path) == (3, 1, 2)
    monkeypatch.setenv("CDRANON_NATIVE", "0")
    python = make_transformer(tmp_path)
    assert not python.native
    again = python.transform(batch, now_ms())
    assert again.python_path == 4
    assert [r.value for r in again.sanitised] == [r.value for r in res.sanitised]


def test_the_start_up_line_says_which_path_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, detail = transform_path(make_transformer(tmp_path))
    assert path == "native"
    assert "OpenSSL" in detail
    monkeypatch.setenv("CDRANON_NATIVE", "0")
    assert transform_path(make_transformer(tmp_path)) == ("python", "CDRANON_NATIVE=0")
    monkeypatch.delenv("CDRANON_NATIVE")
    store = FileKeystore(tmp_path / "keys", MasterKey(b"\x07" * 32, source="test"))
    berlin = Transformer(load_policy(), Keyring(store), tz=zone("Europe/Berlin"))
    path, detail = transform_path(berlin)
    assert path == "python"
    assert "zone" in detail


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize(
    ("event_time", "now", "reason"),
    [
        # Found by the native path's differential tests: these raised out of transform()
        # (datetime's range ends in year 9999), so one record failed its whole batch.
        ("9990-01-01T00:00:00Z", NOW, "too_far_in_future"),
        (253402300799999, NOW, "too_far_in_future"),
        ("0001-01-01T00:00:00+01:00", NOW, "invalid_value"),
        ("9999-12-31T23:59:59-01:00", NOW, "invalid_value"),
        # A month whose billing deadline would be after year 9999: kept, not a crash.
        ("9990-01-01T00:00:00Z", "9995-06-01T00:00:00Z", None),
    ],
)
def test_event_times_at_the_ends_of_the_calendar(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    native: str,
    event_time: str | int,
    now: str,
    reason: str | None,
) -> None:
    monkeypatch.setenv("CDRANON_NATIVE", native)
    tf = make_transformer(tmp_path)
    batch = [raw(cdr(cdr_id="edge", event_time=event_time)), raw(cdr(cdr_id="ok"))]
    res = tf.transform(batch, now_ms(now))
    # The other record's outcome shows the batch went on (in 9995 its month, 2026-10, is
    # past the billing deadline).
    assert len(res.sanitised) + len(res.rejected) == 2
    if reason is None:
        assert [o.source for o in res.sanitised] == [0]
        assert res.stripped == 1  # 9990-01's identifiers are past their deadline in 9995
    else:
        assert [(r.index, r.reason, r.field) for r in res.rejected] == [(0, reason, "event_time")]


@pytest.mark.parametrize("native", ["1", "0"])
def test_keystore_unavailable_raises_out_of_either_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: str
) -> None:
    """The month context is made in Python, also for the native path (it calls back): a
    keystore that cannot create the month's key raises out of transform() (the runner
    pauses and retries the whole batch), and the next try goes through."""
    monkeypatch.setenv("CDRANON_NATIVE", native)
    tf = make_transformer(tmp_path)
    assert tf.native is (native == "1")

    def refuse(final: Path, data: bytes, *, mode: int = 0o600) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))

    batch = [raw(cdr(cdr_id=f"c{i}")) for i in range(3)]
    with monkeypatch.context() as m:
        m.setattr("service.keystore.file.create_exclusive", refuse)
        with pytest.raises(KeystoreUnavailableError, match=os.strerror(errno.ENOSPC)):
            tf.transform(batch, now_ms())
    res = tf.transform(batch, now_ms())
    assert [o.source for o in res.sanitised] == [0, 1, 2]
    assert res.python_path == (0 if native == "1" else 3)
