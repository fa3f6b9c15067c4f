"""The native transform path (service/_native.c) against the Python path, byte for byte.

Every test here builds two Transformers over one keyring and one policy, one with
CDRANON_NATIVE=0 (the reference Python path) and one with the engine, runs the same
batch through both at the same instant and asserts the outcomes are identical: the
rejections, the stripped counts, the month keys and every output record, byte for byte,
the sealed blob aside (random salt): both blobs must open to the same identifiers.

The engine's own record of what it declined (a wrapper around ``Engine.run``) shows which
path wrote a record, so the tests also check that the common records do take the native
path and that the unusual ones listed in service/_native.c's header are declined.
"""

from __future__ import annotations

import binascii
import importlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import native as native_module
from service.identifiers import luhn_ok
from service.integrity import leaf_of
from service.keyring import Keyring
from service.keystore.base import key_id
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.merkle import leaf_hash
from service.outputs import BatchResult
from service.policy import Policy, load_policy
from service.sealing import Unsealer, blob_key_id
from service.transform import Transformer
from tests.unit.core_helpers import NOW, cdr, now_ms, raw

# --- the two paths, and the comparison ---------------------------------------------------


class _Recorder:
    """Stands in for the Transformer's engine: runs it and keeps what it declined."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls = 0
        self.records = 0
        self.declined_total = 0
        self.last_declined: list[int] = []

    def run(self, values: Sequence[bytes], *args: Any) -> list[int]:
        declined: list[int] = self.engine.run(values, *args)
        self.calls += 1
        self.records += len(values)
        self.declined_total += len(declined)
        self.last_declined = list(declined)
        return declined

    @property
    def native_total(self) -> int:
        return self.records - self.declined_total


@dataclass
class _Pair:
    py: Transformer
    nat: Transformer
    keyring: Keyring
    engine: _Recorder
    unsealers: dict[str, Unsealer] = field(default_factory=dict)

    def unsealer(self, kid: str) -> Unsealer:
        u = self.unsealers.get(kid)
        if u is None:
            u = self.unsealers[kid] = Unsealer(self.keyring.get(kid))
        return u


def _keyring(tmp_path: Path) -> Keyring:
    store = FileKeystore(tmp_path / "keys", MasterKey(b"\x07" * 32, source="test"))
    return Keyring(store)


def _pair(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    policy: Policy | None = None,
    **kwargs: Any,
) -> _Pair:
    """A Python-path and a native-path Transformer over the same keyring and policy."""
    policy = policy or load_policy()
    keyring = _keyring(tmp_path)
    monkeypatch.setenv("CDRANON_NATIVE", "0")
    py = Transformer(policy, keyring, **kwargs)
    monkeypatch.setenv("CDRANON_NATIVE", "1")
    nat = Transformer(policy, keyring, **kwargs)
    assert py.native is False
    assert nat.native is True
    recorder = _Recorder(nat._engine)
    nat._engine = recorder
    return _Pair(py, nat, keyring, recorder)


# The sealed view ends with the blob: ',"sealed":"<base64>"}'.
_BLOB = re.compile(rb',"sealed":"([A-Za-z0-9+/=]*)"\}\Z')


def _rejected(r: BatchResult) -> list[tuple[int, str, str | None, str, bytes]]:
    return [(x.index, x.reason, x.field, x.message, x.original) for x in r.rejected]


def _increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


def _check_leaves(r: BatchResult, tag: bytes) -> None:
    """Per month, the records' integrity_leaf indexes are 0..n-1 and each names the leaf
    hash of its own digest in ``r.leaves``."""
    by_month: dict[str, list[tuple[int, str]]] = {}
    for o in r.sanitised:
        leaf = leaf_of(o.value)
        assert leaf is not None, o.value
        assert leaf[0] == tag.decode()
        assert o.digest is not None
        by_month.setdefault(o.month, []).append((leaf[1], o.digest))
    assert set(r.leaves) == set(by_month)
    for month, pairs in by_month.items():
        buf = r.leaves[month]
        assert sorted(i for i, _ in pairs) == list(range(len(pairs)))
        assert len(buf) == 32 * len(pairs)
        for i, digest in pairs:
            assert buf[32 * i : 32 * i + 32] == leaf_hash(bytes.fromhex(digest))


def _compare(p: _Pair, values: Sequence[bytes], now: int) -> tuple[BatchResult, BatchResult]:
    """Transform ``values`` on both paths at ``now``; assert the outcomes are the same.
    With integrity on, as ``cdranon run`` does: with a leaf tag (the same leaves too)."""
    tag = b"b0a1b2c3d4e5fn7" if p.py.integrity else None
    a = p.py.transform(values, now, tag)
    b = p.nat.transform(values, now, tag)

    assert _rejected(b) == _rejected(a)
    assert b.stripped == a.stripped
    assert b.stripped_reasons == a.stripped_reasons
    assert b.months == a.months
    # Sanitised records: every field, the value's bytes and the digest included.
    assert b.sanitised == a.sanitised
    assert b.leaves == a.leaves
    if tag is not None:
        _check_leaves(b, tag)

    for r in (a, b):
        assert _increasing([o.source for o in r.sanitised])
        assert _increasing([o.source for o in r.sealed])
        assert _increasing([x.index for x in r.rejected])
        every = sorted([o.source for o in r.sanitised] + [x.index for x in r.rejected])
        assert every == list(range(len(values)))

    assert len(b.sealed) == len(a.sealed)
    nonces: set[bytes] = set()
    for x, y in zip(a.sealed, b.sealed, strict=True):
        assert (y.source, y.month, y.key, y.timestamp_ms, y.digest) == (
            x.source,
            x.month,
            x.key,
            x.timestamp_ms,
            x.digest,
        )
        mx, my = _BLOB.search(x.value), _BLOB.search(y.value)
        assert mx is not None, x.value
        assert my is not None, y.value
        # Everything but the blob's text, byte for byte.
        assert y.value[: my.start(1)] == x.value[: mx.start(1)]
        assert y.value[my.end(1) :] == x.value[mx.end(1) :]
        bx, by = mx.group(1).decode(), my.group(1).decode()
        assert len(by) == len(bx)  # same header, same plaintext length
        kid = blob_key_id(bx)
        assert blob_key_id(by) == kid
        # No (subkey, nonce) twice in a batch: the salt and nonce follow the key id.
        for blob in (bx, by):
            head = binascii.a2b_base64(blob)
            nonce = head[: 2 + head[1] + 16 + 12]
            assert nonce not in nonces
            nonces.add(nonce)
        doc = orjson.loads(x.value)
        assert doc["key_id"] == kid
        cdr_id = doc["cdr_id"]
        u = p.unsealer(kid)
        ux, uy = u.unseal(bx, cdr_id), u.unseal(by, cdr_id)
        assert list(uy.items()) == list(ux.items())
        # ... and they are the record's identifiers, in input order.
        rec = orjson.loads(values[x.source])
        idents = p.py.policy.identifier_fields
        assert list(ux.items()) == [(k, v) for k, v in rec.items() if k in idents and v is not None]
    return a, b


# --- the extension is there --------------------------------------------------------------


def test_native_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails (not skips) on an install without the extension: CI must build it.
    monkeypatch.delenv("CDRANON_NATIVE", raising=False)
    mod = importlib.import_module("service._native")
    assert native_module.available()
    assert isinstance(mod.OPENSSL_VERSION, str)
    assert mod.OPENSSL_VERSION.startswith("OpenSSL")
    assert native_module.openssl_version() == mod.OPENSSL_VERSION
    tf = Transformer(load_policy(), _keyring(tmp_path))
    assert tf.native is True


@pytest.mark.parametrize(("value", "native"), [("0", False), ("off", False), ("1", True)])
def test_env_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, native: bool
) -> None:
    monkeypatch.setenv("CDRANON_NATIVE", value)
    assert Transformer(load_policy(), _keyring(tmp_path)).native is native


def test_non_utc_policy_keeps_the_engine_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDRANON_NATIVE", "1")
    policy = _write_policy(tmp_path, timezone="Europe/Paris")
    assert Transformer(policy, _keyring(tmp_path)).native is False


# --- policies ----------------------------------------------------------------------------


def _write_policy(tmp_path: Path, *, timezone: str = "UTC") -> Policy:
    """A policy file with e-mail domains kept, a custom billing field (no check), an
    opaque identifier and jurisdictions with retention periods of their own (one whose
    billing fields go before its identifiers)."""
    billing = ", ".join(f'"{f}"' for f in [*load_policy().billing_fields, "note"])
    text = f"""
[fields]
billing = [{billing}]

[fields.identifiers]
msisdn = "msisdn"
imsi = "imsi"
imei = "imei"
email = "email"
subscriber_ref = "opaque"

[generalise]
email_domain = true
imsi_three_digit_mnc_mccs = ["310", "311", "722"]

[retention]
identifier_months = 12
billing_years = 10
timezone = "{timezone}"
future_tolerance_seconds = 86400

[retention.jurisdictions.it]
countries = ["IT", "SM", "VA"]
identifier_months = 24

[retention.jurisdictions.short]
countries = ["DE"]
billing_years = 0

[retention.jurisdictions.us]
countries = ["US"]
identifier_months = 6
billing_years = 3
"""
    path = tmp_path / f"policy-{timezone.replace('/', '-')}.toml"
    path.write_text(text, "utf-8")
    return load_policy(path)


# --- record text -------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A value written as this exact JSON text (a number's spelling)."""

    token: str


class _Missing:
    """The field is left out of the record."""


MISSING = _Missing()

_WS = ["", " ", "  ", "\n", "\t", "\r\n ", " \n\t"]


def _enc(value: Any, style: int) -> str:
    """JSON text of a value: orjson's, json's (\\u escapes), or with '\\/' for '/'."""
    if isinstance(value, Raw):
        return value.token
    if style == 0:
        return orjson.dumps(value).decode()
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    if style == 2:
        text = text.replace("/", "\\/")
    return text


def _key_text(name: str, style: int) -> str:
    if style == 3 and name[:1].isascii() and name[:1].isalpha():
        # The same key with its first character escaped: "\u0063dr_id" is "cdr_id".
        return '"' + f"\\u{ord(name[0]):04x}" + json.dumps(name)[2:]
    return _enc(name, style)


def _plain(value: Any) -> Any:
    return orjson.loads(value.token) if isinstance(value, Raw) else value


@dataclass(frozen=True)
class Written:
    """How a record is serialised: by orjson, or by hand with whitespace and escapes."""

    by_hand: bool = False
    ws: tuple[str, ...] = ("",)
    style: int = 0
    key_style: int = 0


def _serialise(pairs: list[tuple[str, Any]], how: Written) -> bytes:
    if not how.by_hand:
        return orjson.dumps({k: _plain(v) for k, v in pairs})
    ws = how.ws
    parts = []
    for i, (k, v) in enumerate(pairs):
        w = ws[i % len(ws)]
        parts.append(f"{w}{_key_text(k, how.key_style if i % 2 else 0)}{w}:{w}{_enc(v, how.style)}")
    return ("{" + ",".join(parts) + ws[-1] + "}").encode()


# --- strategies --------------------------------------------------------------------------

_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_ODD_TEXT = st.sampled_from(
    ["é", "naïve", "a\nb", "a/b", 'say "hi"', "back\\slash", "\u2028", "\x7f", "\x00", "😀", "\t"]
)
_SHORT = st.one_of(st.text(_PRINTABLE, min_size=1, max_size=12), _ODD_TEXT)


def _luhn_complete(body: str) -> str:
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError(body)


def _luhn_broken(body: str) -> str:
    good = _luhn_complete(body)
    return good[:-1] + str((int(good[-1]) + 1) % 10)


_MSISDN_SPELLINGS = [
    "+{cc}{rest}",
    "00{cc}{rest}",
    "+{cc} {rest:.4} {tail4}",
    "00{cc}-{rest:.3}-{tail3}",
    "(+{cc}) {rest:.4} {tail4}",
    "+{cc}.{rest:.3}/{tail3}",
    "00 {cc} ({rest:.2}) {tail2}",
    "{cc}{rest}",  # no prefix: still an international number
    "+{cc}-{rest}",
]


@st.composite
def _msisdn(draw: st.DrawFn) -> str:
    cc = draw(st.sampled_from(["44", "33", "49", "1", "91", "234", "39", "7", "380"]))
    n = draw(st.integers(7, 11))
    rest = draw(st.text("0123456789", min_size=n, max_size=n).filter(lambda s: s[0] != "0"))
    spelling = draw(st.sampled_from(_MSISDN_SPELLINGS))
    return spelling.format(cc=cc, rest=rest, tail2=rest[2:], tail3=rest[3:], tail4=rest[4:])


_BAD_MSISDN = st.one_of(
    st.sampled_from(
        [
            "",
            "12345",
            "+99912345678",
            "+0447700900123",
            "07700900123",
            "+44 7700 90012x",
            "+4477009",
            "+4477009001234567",
            "++447700900123",
            "+447700900123456789",
            "+\uff14\uff147700900123",
            "+44\t7700900123",
            "0044 7700 900123 ",
            " +447700900123",
            "+44\u00a07700900123",
        ]
    ),
    st.integers(0, 10**12),
    st.text(max_size=16),
)


@st.composite
def _imsi(draw: st.DrawFn) -> str:
    mcc = draw(st.sampled_from(["234", "310", "722", "208", "001"]))
    n = draw(st.sampled_from([11, 12]))
    return mcc + draw(st.text("0123456789", min_size=n, max_size=n))


_BAD_IMSI = st.one_of(
    st.text("0123456789", min_size=0, max_size=13),
    st.text("0123456789", min_size=16, max_size=18),
    st.sampled_from(["23415000000000a", "23415 000000001", "\uff1234150000000001"]),
    st.integers(0, 10**15),
)

_IMEI_BODY = st.text("0123456789", min_size=14, max_size=14)


@st.composite
def _imei(draw: st.DrawFn) -> str:
    body = draw(_IMEI_BODY)
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return _luhn_complete(body)
    if kind == 1:
        return body  # 14 digits: no check digit
    return body + draw(st.text("0123456789", min_size=2, max_size=2))  # IMEISV


_BAD_IMEI = st.one_of(
    _IMEI_BODY.map(_luhn_broken),
    st.text("0123456789", min_size=0, max_size=13),
    st.text("0123456789", min_size=17, max_size=18),
    st.sampled_from(["49015420323751x", "4901542032375-18"]),
)


@st.composite
def _email(draw: st.DrawFn) -> str:
    local = draw(st.text("abcxyzABCXYZ019._+-", min_size=1, max_size=12))
    domain = draw(
        st.sampled_from(["example.org", "Example.ORG", "mail.example.co.uk", "x.io", "EX.COM"])
    )
    return f"{local}@{domain}"


_BAD_EMAIL = st.sampled_from(
    [
        "not-an-address",
        "@example.org",
        "jo@example",
        "jo@.example.org",
        "jo@example.org.",
        "jo smith@example.org",
        "a" * 65 + "@example.org",
        "jo@" + "d" * 250 + ".org",
        "jö@example.org",
        "jo@exämple.org",
        "jo\n@example.org",
        "",
    ]
)

_BAD_OPAQUE = st.sampled_from(["", "x" * 257])

# Prices: many spellings, as raw tokens and as floats orjson spells.
_PRICE_TOKENS = [
    "0.0",
    "1.0",
    "1.50",
    "-0.0",
    "1e-7",
    "0.00001",
    "0.000001",
    "0.0001234",
    "123456789012345.6",
    "12345678901234.5",
    "999999999999999.9",
    "1234567890123456.0",
    "0.1234567890123456",
    "0.30000000000000004",
    "1E2",
    "2.5e+3",
    "4.25E-2",
    "-0",
    "0",
    "-1",
    "17",
    "123456789012345678",
    "1234567890123456789",
    "18446744073709551615",
    "99999999999999999999",
    "-12.25",
    "0.0425",
    "100.0",
    "0.10",
]


@st.composite
def _decimal_token(draw: st.DrawFn) -> Raw:
    ip = draw(st.sampled_from(["0", "1", "12", "120", "99999", "123456789012345"]))
    lead = draw(st.integers(0, 6)) if ip == "0" else 0
    frac = draw(st.text("0123456789", min_size=1, max_size=16))
    sign = draw(st.sampled_from(["", "-"]))
    return Raw(f"{sign}{ip}.{'0' * lead}{frac}")


_PRICE = st.one_of(
    st.sampled_from([Raw(t) for t in _PRICE_TOKENS]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**6), 10**18),
    _decimal_token(),
    st.none(),
)
_NONNEG_NUM = st.one_of(
    st.integers(0, 10**6),
    st.floats(min_value=0, max_value=1e7),
    st.sampled_from([Raw("0.5"), Raw("12.25"), Raw("3600.0"), Raw("1e3")]),
    st.none(),
)

_NOW_CHOICES = [
    NOW,
    "2026-12-01T00:00:00Z",  # 2025-11's identifiers go at this instant
    "2026-11-30T23:59:59.999Z",
    "2026-01-01T00:00:00Z",  # 2015's billing fields go at this instant
]


def _z(dt: datetime, millis: bool) -> str:
    if millis:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@st.composite
def _instant(draw: st.DrawFn, lo: datetime, hi: datetime) -> datetime:
    """Naive UTC datetimes in [lo, hi], often near a month's first instant."""
    if draw(st.booleans()):
        months = (hi.year - lo.year) * 12 + hi.month - lo.month
        k = draw(st.integers(0, months))
        y, m = divmod(lo.month - 1 + k, 12)
        minutes = draw(st.integers(-26 * 60, 26 * 60))
        start = datetime(lo.year + y, m + 1, 1)
        return start + timedelta(minutes=minutes, seconds=draw(st.integers(0, 59)))
    return draw(st.datetimes(min_value=lo, max_value=hi)).replace(
        microsecond=draw(st.sampled_from([0, 5000, 123000, 999000]))
    )


# Months with identifiers at the test instants (from 2025-11) and around them; and years
# back to past the billing deadline.
_RECENT = _instant(datetime(2025, 9, 1), datetime(2026, 12, 31))
_ANY_TIME = st.one_of(_RECENT, _instant(datetime(2014, 6, 1), datetime(2027, 1, 31)))

_OFFSETS = ["+00:00", "-00:00", "+01:00", "-01:00", "+05:30", "-09:45", "+14:00", "-12:00"]


@st.composite
def _event_time(draw: st.DrawFn, instants: st.SearchStrategy[datetime] = _ANY_TIME) -> Any:
    dt = draw(instants)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return _z(dt, millis=False)
    if kind == 1:
        return _z(dt, millis=True)
    if kind == 2:
        off = draw(st.sampled_from(_OFFSETS))
        sign = -1 if off[0] == "-" else 1
        delta = timedelta(hours=int(off[1:3]), minutes=int(off[4:6])) * sign
        local = dt + delta
        text = local.strftime("%Y-%m-%dT%H:%M:%S")
        if draw(st.booleans()):
            text += f".{local.microsecond // 1000:03d}"
        return text + off
    return int(dt.replace(tzinfo=UTC).timestamp() * 1000)


@st.composite
def _odd_event_time(draw: st.DrawFn) -> Any:
    dt = draw(_ANY_TIME)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return draw(
        st.sampled_from(
            [
                base.replace("T", "t") + "Z",
                base.replace("T", " ") + "Z",
                base,  # no zone
                base + "z",
                base + f".{dt.microsecond:06d}Z",
                base + ".5Z",
                base + "+0100",
                base + "+24:00",
                "2026-02-30T10:00:00Z",
                "2026-02-29T10:00:00Z",
                "2024-02-29T10:00:00Z",
                "2026-10-15T24:00:00Z",
                "2026-10-15T10:00:60Z",
                "0000-10-15T10:00:00Z",
                "2126-10-15T10:00:00Z",
                "2026-10-15T10:00:00.1234+01:00",
                -1,
                10**18,
                1.5,
                True,
                None,
                Raw("1792058400000.0"),
                Raw("1.7920584e12"),
                MISSING,
            ]
        )
    )


def _good_odd(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> tuple[Any, Any]:
    return good, odd


_JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _SHORT,
)
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=5,
)
_STR_OR_NULL = st.one_of(_SHORT, st.none())

# field -> (good values, odd values); good ones pass every check (the engine may still
# decline some spellings), odd ones fail one, or are left out.
_FIELDS: dict[str, tuple[Any, Any]] = {
    "cdr_id": _good_odd(
        st.text(_PRINTABLE, min_size=1, max_size=20),
        st.one_of(
            st.sampled_from(["", "x" * 129, "é-1", "a\\b", 7, None, MISSING]),
            st.just("y" * 128),
        ),
    ),
    "event_time": _good_odd(_event_time(), _odd_event_time()),
    "account_id": _good_odd(
        st.one_of(st.text(_PRINTABLE, min_size=1, max_size=10), st.integers(-(2**63), 2**64 - 1)),
        st.sampled_from(["", "a" * 257, "a" * 256, 1.5, None, True, MISSING, Raw("-0"), "é"]),
    ),
    "channel": _good_odd(_STR_OR_NULL, st.sampled_from([1, True, MISSING])),
    "direction": _good_odd(_STR_OR_NULL, st.sampled_from([0.5, MISSING, [1]])),
    "sender_id": _good_odd(_STR_OR_NULL, st.sampled_from([{"a": 1}, MISSING, 3])),
    "status": _good_odd(_STR_OR_NULL, st.sampled_from([False, MISSING])),
    "route_id": _good_odd(_STR_OR_NULL, st.sampled_from([7, MISSING, "r\\/7"])),
    "parts": _good_odd(
        st.one_of(st.integers(0, 10**18), st.none()),
        st.sampled_from([-1, "1", 1.0, Raw("-0"), Raw("1e2"), 10**19, MISSING]),
    ),
    "duration_s": _good_odd(
        _NONNEG_NUM, st.sampled_from([-0.5, -3, Raw("-0.0"), Raw("-0"), "60", MISSING])
    ),
    "price": _good_odd(_PRICE, st.sampled_from(["free", True, [1], MISSING])),
    "currency": _good_odd(
        st.sampled_from(["EUR", "USD", "GBP", None]),
        st.sampled_from(["eur", "EU", "EURO", "€UR", 1, MISSING]),
    ),
    "mcc": _good_odd(
        st.sampled_from(["234", "310", "001", None]),
        st.sampled_from(["23", "2345", "abc", 234, MISSING]),
    ),
    "mnc": _good_odd(
        st.sampled_from(["15", "150", "01", None]),
        st.sampled_from(["1", "1234", "ab", 15, MISSING]),
    ),
    "country": _good_odd(
        st.sampled_from(["GB", "IT", "SM", "FR", "US", "DE", None]),
        st.sampled_from(["UK", "gb", "XX", "ZZ", "G", 5, MISSING]),
    ),
    "msisdn": _good_odd(st.one_of(_msisdn(), st.none()), _BAD_MSISDN),
    "imsi": _good_odd(st.one_of(_imsi(), st.none()), _BAD_IMSI),
    "imei": _good_odd(st.one_of(_imei(), st.none()), _BAD_IMEI),
    "email": _good_odd(st.one_of(_email(), st.none()), _BAD_EMAIL),
}
_VARIANT_FIELDS: dict[str, tuple[Any, Any]] = {
    "note": _good_odd(_JSON_SCALAR, _JSON),
    "subscriber_ref": _good_odd(
        st.one_of(st.text(_PRINTABLE, min_size=1, max_size=20), st.none()), _BAD_OPAQUE
    ),
}
# The common records: values the engine takes as they are (printable ASCII without quotes
# or backslashes, canonical numbers, recent months), so that most of them take its path.
_SAFE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\')
_SAFE = st.text(_SAFE_CHARS, min_size=1, max_size=12)
_SAFE_OR_NULL = st.one_of(_SAFE, st.none())
_MONEY = st.one_of(
    st.integers(0, 10**7).map(lambda c: c / 100),
    st.integers(0, 10**6).map(lambda c: c / 10**4),
    st.integers(-(10**6), 10**15),
    st.sampled_from([Raw("0.0"), Raw("-0.0"), Raw("1.0"), Raw("0.00001"), Raw("0.0425")]),
    st.none(),
)
_PLAIN: dict[str, Any] = {
    "cdr_id": _SAFE,
    "event_time": _event_time(_RECENT),
    "account_id": st.one_of(_SAFE, st.integers(-(10**18), 10**18)),
    "channel": _SAFE_OR_NULL,
    "direction": _SAFE_OR_NULL,
    "sender_id": _SAFE_OR_NULL,
    "status": _SAFE_OR_NULL,
    "route_id": _SAFE_OR_NULL,
    "parts": st.one_of(st.integers(0, 10**18), st.none()),
    "duration_s": st.one_of(st.integers(0, 10**6), st.integers(0, 10**6).map(lambda c: c / 10)),
    "price": _MONEY,
    "currency": _FIELDS["currency"][0],
    "mcc": _FIELDS["mcc"][0],
    "mnc": _FIELDS["mnc"][0],
    "country": _FIELDS["country"][0],
    "msisdn": _FIELDS["msisdn"][0],
    "imsi": _FIELDS["imsi"][0],
    "imei": _FIELDS["imei"][0],
    "email": _FIELDS["email"][0],
    "note": st.one_of(_SAFE_OR_NULL, st.booleans(), st.integers(-(10**9), 10**9), _MONEY),
    "subscriber_ref": st.one_of(st.text(_SAFE_CHARS, min_size=1, max_size=40), st.none()),
}
_FLAT = st.one_of(_SAFE_OR_NULL, st.booleans(), st.integers(-(10**9), 10**9))
# Optional fields a record often leaves out.
_OPTIONAL = {
    "channel",
    "direction",
    "sender_id",
    "status",
    "route_id",
    "parts",
    "duration_s",
    "mcc",
    "mnc",
    "msisdn",
    "imsi",
    "imei",
    "email",
    "note",
    "subscriber_ref",
}
_EXTRA_KEYS = [
    "text",
    "meta",
    "month",
    "key_id",
    "sealed",
    "msisdn_cc",
    "imsi_plmn",
    "billing_digest",
    "msisdn_pseudonym",
    "Msisdn",
    "",
    "é",
    "a/b",
]


@st.composite
def _record(draw: st.DrawFn, variant: bool) -> bytes:
    fields = dict(_FIELDS)
    if variant:
        fields |= _VARIANT_FIELDS
    names = list(fields)
    # Half the records are common ones (with the odd failed check); the rest mix in every
    # unusual spelling and value.
    plain = draw(st.booleans())
    odd = draw(st.sets(st.sampled_from(names), max_size=1 if plain else 2))
    if plain and draw(st.integers(0, 3)):
        odd = set()
    left_out = draw(st.sets(st.sampled_from(sorted(_OPTIONAL & set(names)))))
    pairs: list[tuple[str, Any]] = []
    for name in names:
        if name in left_out and name not in odd:
            continue
        good, bad = fields[name]
        value = draw(bad) if name in odd else draw(_PLAIN[name] if plain else good)
        if value is not MISSING:
            pairs.append((name, value))
    extras = st.lists(st.sampled_from(_EXTRA_KEYS[:10] if plain else _EXTRA_KEYS), max_size=2)
    for k in draw(extras.map(lambda ks: list(dict.fromkeys(ks)))):
        pairs.append((k, draw(_FLAT if plain else _JSON)))
    pairs = list(draw(st.permutations(pairs)))
    by_hand = draw(st.booleans())
    if by_hand and not plain and pairs and draw(st.integers(0, 4)) == 0:
        # A repeated key (the same value or another one): orjson would keep the last.
        k, v = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (k, draw(st.sampled_from([v, None, "x"]))))
    how = Written(
        by_hand=by_hand,
        ws=tuple(draw(st.lists(st.sampled_from(_WS), min_size=1, max_size=3))),
        style=0 if plain else draw(st.sampled_from([0, 1, 2])),
        key_style=0 if plain else draw(st.sampled_from([0, 0, 3])),
    )
    return _serialise(pairs, how)


_JUNK = st.sampled_from(
    [b"{}", b"[]", b"{not json", b"\xef\xbb\xbf{}", b"null", b'"x"', b"", b"  ", b'{"a":1}x']
)


def _batches(variant: bool) -> st.SearchStrategy[list[bytes]]:
    one = st.one_of(_record(variant), _record(variant), _record(variant), _record(variant), _JUNK)
    return st.lists(one, min_size=1, max_size=10)


_PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _run_property(p: _Pair, variant: bool) -> None:
    @_PROPERTY_SETTINGS
    @given(batch=_batches(variant), now=st.sampled_from(_NOW_CHOICES))
    def check(batch: list[bytes], now: str) -> None:
        _compare(p, batch, now_ms(now))

    check()
    # The property was about the engine: a good share of the records took its path.
    assert p.engine.calls > 0
    assert p.engine.native_total >= p.engine.records // 10, (
        p.engine.native_total,
        p.engine.records,
    )


@pytest.mark.parametrize("integrity", [True, False])
def test_property_default_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, integrity: bool
) -> None:
    _run_property(_pair(monkeypatch, tmp_path, integrity=integrity), variant=False)


@pytest.mark.parametrize("integrity", [True, False])
def test_property_policy_with_domains_opaque_ids_and_jurisdictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, integrity: bool
) -> None:
    policy = _write_policy(tmp_path)
    assert policy.email_domain
    assert policy.class_by_country["IT"].name == "it"
    _run_property(_pair(monkeypatch, tmp_path, policy, integrity=integrity), variant=True)


# --- the common records take the native path ----------------------------------------------


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Pair:
    return _pair(monkeypatch, tmp_path)


def test_common_records_are_written_natively_and_equal(pair: _Pair) -> None:
    batch = [
        raw(cdr(cdr_id="a")),
        raw(cdr(cdr_id="b", msisdn="+44 7700 900123", email="Jo.Smith@Example.ORG")),
        raw(cdr(cdr_id="c", event_time=1792058400000, account_id=123456789)),
        raw(cdr(cdr_id="d", event_time="2026-10-15T10:00:00.250Z", msisdn=None, imei=...)),
        raw(cdr(cdr_id="e", imsi="310150123456789", imei="35209900176148")),
        raw(cdr(cdr_id="f", price=None, parts=None, channel=None, text="hello", meta=7)),
        b' {\n "cdr_id" : "g", "event_time":"2026-10-01T00:00:00Z",\t"account_id":"x" }\n',
    ]
    _, b = _compare(pair, batch, now_ms())
    assert pair.engine.last_declined == []
    assert len(b.sealed) == len(batch)
    assert b.months == {"2026-10/default"}


def test_jurisdiction_and_email_domain_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _pair(monkeypatch, tmp_path, _write_policy(tmp_path))
    batch = [
        raw(cdr(cdr_id="it", country="IT", event_time="2025-06-01T00:00:00Z")),
        raw(cdr(cdr_id="gb", country="GB", event_time="2025-06-01T00:00:00Z")),
        raw(cdr(cdr_id="us", country="US", event_time="2026-05-31T23:00:00Z")),
        raw(cdr(cdr_id="us-old", country="US", event_time="2026-03-01T00:00:00Z")),
        raw(cdr(cdr_id="sm", country="SM", email="A@B.Example.COM", subscriber_ref="s-1")),
        raw(cdr(cdr_id="none", country=None, note=True, subscriber_ref="ref 9")),
        raw(cdr(cdr_id="n2", note="free text", email="x@y.org")),
        raw(cdr(cdr_id="n3", note={"nested": [1]})),
    ]
    _, b = _compare(p, batch, now_ms())
    assert b.months == {"2025-06/it", "2026-05/us", "2026-10/it", "2026-10/default"}
    assert b.stripped == 2  # gb (12 months) and us-old (6 months)
    # it, us, sm, none and n2 natively; the stripped ones and the nested note are not.
    assert p.engine.last_declined == [1, 3, 7]
    san = orjson.loads(b.sanitised[[o.source for o in b.sanitised].index(4)].value)
    assert san["email_domain"] == "b.example.com"
    assert "subscriber_ref_pseudonym" in san


# --- what the engine declines (service/_native.c's header), each equal to the Python path --

_BASE = raw(cdr())


def _with(old: bytes, new: bytes) -> bytes:
    assert old in _BASE, old
    return _BASE.replace(old, new, 1)


_DECLINED: dict[str, bytes] = {
    # not a flat object of strings, numbers, true/false/null
    "nested_object": raw(cdr(meta={"a": 1})),
    "nested_array": raw(cdr(tags=[1, 2])),
    "nested_empty": raw(cdr(meta={})),
    "top_level_array": b"[1,2]",
    "empty_object": b"{}",
    "not_json": b"{not json",
    "trailing_garbage": _BASE + b"x",
    "two_objects": _BASE + _BASE,
    "utf8_bom": b"\xef\xbb\xbf" + _BASE,
    "truncated": _BASE[:-1],
    "nan": _with(b'"price":0.0425', b'"price":NaN'),
    "bare_word": _with(b'"price":0.0425', b'"price":nul'),
    # bytes outside printable ASCII, backslashes
    "non_ascii_value": raw(cdr(sender_id="Café")),
    "non_ascii_key": raw(cdr(**{"é": 1})),
    "escaped_newline": raw(cdr(sender_id="a\nb")),
    "escaped_quote": raw(cdr(sender_id='say "hi"')),
    "escaped_slash": _with(b'"route_id":"r-7"', b'"route_id":"r\\/7"'),
    "unicode_escape": _with(b'"sender_id":"ACME"', b'"sender_id":"\\u0041CME"'),
    "escaped_key": _with(b'"channel":', b'"\\u0063hannel":'),
    "escaped_cdr_id_key": _with(b'"cdr_id":', b'"\\u0063dr_id":'),
    "del_byte": raw(cdr(sender_id="a\x7fb")),
    "control_byte_raw": _with(b'"sender_id":"ACME"', b'"sender_id":"AC\tME"'),
    "non_ascii_identifier": raw(cdr(email="jö@example.org")),
    # numbers whose orjson spelling may differ
    "exponent": _with(b'"price":0.0425', b'"price":4.25e-2'),
    "exponent_upper": _with(b'"price":0.0425', b'"price":1E2'),
    "exponent_small": _with(b'"price":0.0425', b'"price":1e-7'),
    "minus_zero": _with(b'"price":0.0425', b'"price":-0'),
    "trailing_zero": _with(b'"price":0.0425', b'"price":1.50'),
    "sixteen_significant": _with(b'"price":0.0425', b'"price":123456789012345.6'),
    "seventeen_significant": _with(b'"price":0.0425', b'"price":0.30000000000000004'),
    "five_leading_zeros": _with(b'"price":0.0425', b'"price":0.000001'),
    "sixteen_integer_digits": _with(b'"price":0.0425', b'"price":1234567890123456.0'),
    "nineteen_digit_int": _with(b'"parts":1', b'"parts":1234567890123456789'),
    "twenty_digit_int": _with(b'"price":0.0425', b'"price":99999999999999999999'),
    "u64_max": _with(b'"price":0.0425', b'"price":18446744073709551615'),
    "minus_zero_float_nonneg": _with(b'"parts":1', b'"duration_s":-0.0,"parts":1'),
    "leading_zero": _with(b'"parts":1', b'"parts":01'),
    "dot_no_fraction": _with(b'"price":0.0425', b'"price":1.'),
    # repeated keys
    "duplicate_billing_key": _with(b'"channel":"sms"', b'"channel":"sms","channel":"sms"'),
    "duplicate_changed_value": _with(b'"channel":"sms"', b'"channel":"sms","channel":"voice"'),
    "duplicate_identifier": _with(
        b'"msisdn":"+447700900123"', b'"msisdn":"+447700900123","msisdn":"+447700900123"'
    ),
    "duplicate_unknown_key": raw(cdr(text="a"))[:-1] + b',"text":"a"}',
    "duplicate_after_whitespace": _with(b'"channel":"sms"', b'"channel" : "sms", "channel":"x"'),
    # failed checks (the Python path words every rejection)
    "missing_cdr_id": raw(cdr(cdr_id=...)),
    "missing_account": raw(cdr(account_id=...)),
    "null_event_time": raw(cdr(event_time=None)),
    "cdr_id_int": raw(cdr(cdr_id=7)),
    "cdr_id_empty": raw(cdr(cdr_id="")),
    "cdr_id_too_long": raw(cdr(cdr_id="x" * 129)),
    "account_too_long": raw(cdr(account_id="a" * 257)),
    "account_float": raw(cdr(account_id=1.5)),
    "parts_negative": raw(cdr(parts=-1)),
    "parts_string": raw(cdr(parts="1")),
    "parts_float": raw(cdr(parts=1.0)),
    "channel_bool": raw(cdr(channel=True)),
    "price_string": raw(cdr(price="free")),
    "currency_lower": raw(cdr(currency="eur")),
    "mcc_short": raw(cdr(mcc="23")),
    "mnc_long": raw(cdr(mnc="1234")),
    "country_unknown": raw(cdr(country="UK")),
    "country_int": raw(cdr(country=44)),
    "msisdn_short": raw(cdr(msisdn="12345")),
    "msisdn_bad_cc": raw(cdr(msisdn="+99912345678")),
    "msisdn_int": raw(cdr(msisdn=447700900123)),
    "imsi_short": raw(cdr(imsi="23415")),
    "imei_luhn": raw(cdr(imei="490154203237519")),
    "imei_letter": raw(cdr(imei="49015420323751x")),
    "email_no_at": raw(cdr(email="not-an-address")),
    "email_long_local": raw(cdr(email="a" * 65 + "@example.org")),
    # event times outside the engine's forms
    "time_lower_t": raw(cdr(event_time="2026-10-15t10:00:00Z")),
    "time_no_zone": raw(cdr(event_time="2026-10-15T10:00:00")),
    "time_micros": raw(cdr(event_time="2026-10-15T10:00:00.123456Z")),
    "time_one_fraction_digit": raw(cdr(event_time="2026-10-15T10:00:00.5Z")),
    "time_invalid_day": raw(cdr(event_time="2026-02-30T10:00:00Z")),
    "time_float": raw(cdr(event_time=1792058400000.0)),
    "time_bool": raw(cdr(event_time=True)),
    "time_negative_epoch": raw(cdr(event_time=-1)),
    "time_epoch_too_big": raw(cdr(event_time=10**18)),
    # months the engine leaves to the Python path
    "stripped_month": raw(cdr(event_time="2025-10-31T23:59:59Z")),
    "stripped_month_epoch": raw(cdr(event_time=1761955199999)),  # 2025-10-31T23:59:59.999Z
    "stripped_bad_identifier": raw(cdr(event_time="2025-01-01T00:00:00Z", imei="4901")),
    "past_billing_deadline": raw(cdr(event_time="2015-12-31T23:59:59Z")),
    "too_far_in_future": raw(cdr(event_time="2026-12-25T00:00:00Z")),
}


@pytest.mark.parametrize("name", list(_DECLINED))
def test_declined_record_equals_python_path(pair: _Pair, name: str) -> None:
    record = _DECLINED[name]
    _compare(pair, [record], now_ms())
    assert pair.engine.last_declined == [0], name


def test_destroyed_key_is_declined_and_equal(pair: _Pair) -> None:
    kid = key_id("2026-10", "default")
    pair.keyring.keystore.create_if_absent(kid)
    assert pair.keyring.keystore.destroy(kid)
    _, b = _compare(pair, [_BASE, raw(cdr(event_time="2026-09-01T00:00:00Z"))], now_ms())
    assert b.stripped_reasons == {"key_destroyed": 1}
    assert pair.engine.last_declined == [0]


def test_record_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _pair(monkeypatch, tmp_path, max_record_bytes=len(_BASE))
    _, b = _compare(p, [_BASE, raw(cdr(text="x"))], now_ms())
    assert [x.reason for x in b.rejected] == ["too_large"]
    assert p.engine.last_declined == [1]


def test_more_fields_than_the_engine_takes(pair: _Pair) -> None:
    many = raw(cdr(**{f"x{i}": i for i in range(60)}))
    few = raw(cdr(**{f"x{i}": i for i in range(40)}))
    _compare(pair, [many, few], now_ms())
    assert pair.engine.last_declined == [0]


def test_a_large_record(pair: _Pair) -> None:
    big = raw(cdr(text="x" * 600_000, sender_id="s" * 5000, cdr_id="c" * 128))
    _compare(pair, [big, big, _BASE], now_ms())
    assert pair.engine.last_declined == []


def test_offsets_and_epoch_millis_equal(pair: _Pair) -> None:
    # The engine takes +HH:MM / -HH:MM offsets (their month is the UTC one) and epoch ms.
    times: list[Any] = [
        "2025-12-01T00:30:00+01:00",  # 2025-11-30T23:30Z: November
        "2026-09-30T23:30:00-01:00",  # 2026-10-01T00:30Z: October
        "2026-10-01T00:00:00+00:00",
        "2026-10-01T00:00:00-00:00",
        "2026-10-15T10:00:00.999+05:30",
        "2026-10-31T20:00:00-09:45",
        "2026-11-01T13:59:00+14:00",
        "2026-11-01T00:00:00+23:59",
        "2026-10-31T23:59:59.999Z",
        1764547199999,
        1764547200000,
        0,
    ]
    batch = [raw(cdr(cdr_id=f"t{i}", event_time=t)) for i, t in enumerate(times)]
    for t in ("2026-11-30T23:59:59.999Z", "2026-12-01T00:00:00Z"):
        _compare(pair, batch, now_ms(t))


def test_mixed_batch_keeps_input_order(pair: _Pair) -> None:
    names = list(_DECLINED)
    batch: list[bytes] = []
    native_idx: list[int] = []
    for i in range(60):
        if i % 3 == 0:
            batch.append(_DECLINED[names[(i * 7) % len(names)]])
        else:
            native_idx.append(i)
            batch.append(raw(cdr(cdr_id=f"n{i}", msisdn=f"+4477009{i:05d}")))
    _, b = _compare(pair, batch, now_ms())
    assert pair.engine.last_declined == list(range(0, 60, 3))
    sources = [o.source for o in b.sanitised]
    assert sources == sorted(sources)
    assert set(native_idx) <= set(sources)
    assert set(native_idx) <= {o.source for o in b.sealed}


def _email_of(local: int, total: int) -> str:
    domain = "d" * (total - local - 5) + ".org"
    return "a" * local + "@" + domain


# Values either side of each limit the engine checks itself: a record it writes must be
# one the Python path writes too, and the other way round.
_BOUNDARIES: dict[str, dict[str, Any]] = {
    "msisdn_7_digits": {"msisdn": "+4477009"},
    "msisdn_8_digits": {"msisdn": "+44770090"},
    "msisdn_00_7_digits": {"msisdn": "00 44 77009"},
    "msisdn_15_digits": {"msisdn": "+447700900123456"},
    "msisdn_16_digits": {"msisdn": "+4477009001234567"},
    "msisdn_three_digit_cc": {"msisdn": "+380 44 123 4567"},
    "msisdn_cc_1": {"msisdn": "+1 (202) 555-0123"},
    "msisdn_cc_7": {"msisdn": "+7 495 123-45-67"},
    "msisdn_unknown_cc": {"msisdn": "+80012345678"},
    "msisdn_leading_zero": {"msisdn": "+04477009001"},
    "msisdn_double_plus": {"msisdn": "++447700900123"},
    "msisdn_plus_after_00": {"msisdn": "00+447700900123"},
    "msisdn_only_separators": {"msisdn": "-- ..//()"},
    "imsi_13_digits": {"imsi": "2341500000000"},
    "imsi_14_digits": {"imsi": "23415000000000"},
    "imsi_16_digits": {"imsi": "2341500000000012"},
    "imsi_three_digit_mnc": {"imsi": "310150123456789"},
    "imei_13_digits": {"imei": "4901542032375"},
    "imei_14_digits": {"imei": "49015420323751"},
    "imei_16_digits": {"imei": "4901542032375123"},
    "imei_17_digits": {"imei": "49015420323751234"},
    "email_local_64": {"email": _email_of(64, 100)},
    "email_local_65": {"email": _email_of(65, 100)},
    "email_total_254": {"email": _email_of(10, 254)},
    "email_total_255": {"email": _email_of(10, 255)},
    "email_two_ats": {"email": "a@b@example.org"},
    "email_dot_domain_edges": {"email": "a@.example.org."},
    "email_upper": {"email": "JO.SMITH+TAG@EXAMPLE.ORG"},
    "cdr_id_128": {"cdr_id": "c" * 128},
    "cdr_id_129": {"cdr_id": "c" * 129},
    "account_256": {"account_id": "a" * 256},
    "account_257": {"account_id": "a" * 257},
    "account_negative_int": {"account_id": -42},
    "account_int_18_digits": {"account_id": 999999999999999999},
    "mcc_000": {"mcc": "000"},
    "mnc_000": {"mnc": "000"},
    "mnc_00": {"mnc": "00"},
    "currency_AAA": {"currency": "AAA"},
    "currency_at": {"currency": "@AA"},
    "currency_bracket": {"currency": "AA["},
    "country_not_a_region": {"country": "AA"},
    "country_null": {"country": None},
    "parts_zero": {"parts": 0},
    "duration_zero_float": {"duration_s": 0.0},
    "second_59": {"event_time": "2026-10-15T10:00:59Z"},
    "second_60": {"event_time": "2026-10-15T10:00:60Z"},
    "minute_60": {"event_time": "2026-10-15T10:60:00Z"},
    "hour_24": {"event_time": "2026-10-15T24:00:00Z"},
    "day_31_of_30": {"event_time": "2026-09-31T10:00:00Z"},
    "day_00": {"event_time": "2026-10-00T10:00:00Z"},
    "month_13": {"event_time": "2026-13-01T10:00:00Z"},
    "month_00": {"event_time": "2026-00-01T10:00:00Z"},
    "fraction_000": {"event_time": "2026-10-15T10:00:00.000Z"},
    "fraction_999": {"event_time": "2026-10-15T10:00:00.999Z"},
    "fraction_letters": {"event_time": "2026-10-15T10:00:00.12aZ"},
    "offset_23_59": {"event_time": "2026-10-15T10:00:00+23:59"},
    "offset_24_00": {"event_time": "2026-10-15T10:00:00+24:00"},
    "offset_minutes_60": {"event_time": "2026-10-15T10:00:00+01:60"},
    "offset_no_colon": {"event_time": "2026-10-15T10:00:00+0100"},
    "offset_fraction": {"event_time": "2026-10-15T10:00:00.500-03:30"},
    "offset_into_next_month": {"event_time": "2026-10-31T23:30:00-01:00"},
    "offset_into_previous_month": {"event_time": "2026-11-01T00:30:00+01:00"},
    "epoch_15_digits": {"event_time": 999999999999999},
    "epoch_past_9999": {"event_time": 253402300800000},
    "epoch_zero": {"event_time": 0},
    "epoch_minus_one": {"event_time": -1},
    "year_0000": {"event_time": "0000-10-15T10:00:00Z"},
    "pre_epoch_z": {"event_time": "1969-12-31T23:59:59Z"},
    "pre_epoch_offset": {"event_time": "1970-01-01T00:30:00+01:00"},
    "identifier_deadline_eve": {"event_time": "2025-11-30T23:59:59.999Z"},
    "identifier_deadline": {"event_time": "2025-10-31T23:59:59.999Z"},
    "future_tolerance_edge": {"event_time": "2026-11-24T12:00:00Z"},
    "future_tolerance_past": {"event_time": "2026-11-24T12:00:00.001Z"},
}


@pytest.mark.parametrize("name", list(_BOUNDARIES))
def test_boundaries_equal_python_path(pair: _Pair, name: str) -> None:
    _compare(pair, [raw(cdr(**_BOUNDARIES[name]))], now_ms())


def test_boundaries_in_one_batch(pair: _Pair) -> None:
    batch = [raw(cdr(**{"cdr_id": name, **over})) for name, over in _BOUNDARIES.items()]
    for now in _NOW_CHOICES:
        _compare(pair, batch, now_ms(now))
    assert pair.engine.native_total > 0


def test_billing_deadline_before_identifier_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Germany's class keeps billing fields to the end of the year only, identifiers for
    # 12 months: a 2025-12 record has identifiers but is past its billing deadline.
    p = _pair(monkeypatch, tmp_path, _write_policy(tmp_path))
    batch = [
        raw(cdr(cdr_id="old", country="DE", event_time="2025-12-15T00:00:00Z")),
        raw(cdr(cdr_id="new", country="DE", event_time="2026-01-15T00:00:00Z")),
        raw(cdr(cdr_id="gb", country="GB", event_time="2025-12-15T00:00:00Z")),
    ]
    _, b = _compare(p, batch, now_ms())
    assert [(x.index, x.reason) for x in b.rejected] == [(0, "past_billing_deadline")]
    assert [o.source for o in b.sealed] == [1, 2]
    assert p.engine.last_declined == [0]


def test_more_month_contexts_than_the_engine_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 48 months x 2 classes: past the engine's 32 contexts per batch it declines.
    p = _pair(monkeypatch, tmp_path, _write_policy(tmp_path))
    batch = [
        raw(
            cdr(
                cdr_id=f"{y}-{m}-{c}",
                event_time=f"{y}-{m:02d}-10T00:00:00Z",
                country=c,
            )
        )
        for y in (2023, 2024, 2025, 2026)
        for m in range(1, 13)
        for c in ("GB", "IT")
    ]
    batch = batch[::-1] + batch
    _compare(p, batch, now_ms())
    assert p.engine.native_total > 0
    assert len(p.engine.last_declined) > 0


def test_pseudonyms_and_seals_across_batches(pair: _Pair) -> None:
    # The same identifiers in a later batch: the Python path's caches and the engine's
    # fresh contexts must agree.
    batch = [raw(cdr(cdr_id=f"c{i}", msisdn=f"+4477009{i % 7:05d}")) for i in range(30)]
    for _ in range(3):
        _compare(pair, batch, now_ms())
        _compare(pair, [*batch[::-1], _DECLINED["stripped_month"]], now_ms())


# --- number spellings --------------------------------------------------------------------


def _engine_takes(token: str) -> bool:
    """service/_native.c's scan_number, restated: the number tokens it copies as they are."""
    m = re.fullmatch(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?", token)
    if m is None:
        return False
    neg, ip, fp = m.groups()
    if fp is None:
        return len(ip) <= 18 and not (neg and ip == "0")
    if fp != "0" and fp.endswith("0"):
        return False
    if ip == "0":
        lead = len(fp) - len(fp.lstrip("0"))
        if fp != "0" and lead > 4:
            return False
        sig = 0 if fp == "0" else len(fp) - lead
    else:
        sig = len(ip) + (0 if fp == "0" else len(fp))
    return sig <= 15 and len(ip) <= 15


def _number_tokens() -> list[str]:
    rnd = random.Random(20261202)
    tokens = set(_PRICE_TOKENS) | {
        "0.00001",
        "0.0001",
        "0.000012345678901",
        "100000000000000.0",
        "999999999999999.9",
        "123456789012345.0",
        "12345678901234.5",
        "0.1",
        "0.5",
        "2.2250738585072014",
        "5e-324",
        "1.7976931348623157",
        "9007199254740993",
        "-9223372036854775808",
        "999999999999999999",
        "-999999999999999999",
    }
    digits = "0123456789"
    while len(tokens) < 3000:
        il = rnd.randint(0, 16)
        ip = "0" if il == 0 else rnd.choice("123456789") + "".join(rnd.choices(digits, k=il - 1))
        sign = rnd.choice(["", "-"])
        kind = rnd.random()
        if kind < 0.15:
            tokens.add(sign + ip)
        elif kind < 0.25:
            tokens.add(f"{sign}{ip}.0")
        else:
            lead = rnd.randint(0, 6) if ip == "0" else 0
            frac = "0" * lead + "".join(rnd.choices(digits, k=rnd.randint(1, 16)))
            tokens.add(f"{sign}{ip}.{frac}")
    return sorted(tokens)


def test_orjson_spells_the_engines_numbers_as_written() -> None:
    # The rule the engine relies on, for the installed orjson: a number it copies as
    # received is exactly what orjson.dumps(orjson.loads(...)) writes.
    taken = [t for t in _number_tokens() if _engine_takes(t)]
    assert len(taken) > 1500
    wrong = [t for t in taken if orjson.dumps(orjson.loads(t)).decode() != t]
    assert wrong == []


def test_number_spellings_batch(pair: _Pair) -> None:
    tokens = _number_tokens()
    batch = [_with(b'"price":0.0425', b'"price":' + t.encode()) for t in tokens]
    _compare(pair, batch, now_ms())
    declined = set(pair.engine.last_declined)
    taken = {i for i in range(len(tokens)) if i not in declined}
    # The engine takes exactly the tokens scan_number's rule names ...
    assert taken == {i for i, t in enumerate(tokens) if _engine_takes(t)}
    # ... and each of them is orjson's own spelling.
    for i in taken:
        assert orjson.dumps(orjson.loads(tokens[i])).decode() == tokens[i]
    # The same numbers in a field the engine does not check, and in integers.
    ints = [t for t in tokens if t.isdigit()]
    batch = [_with(b'"parts":1', b'"parts":' + t.encode()) for t in ints]
    _compare(pair, batch, now_ms())
    assert set(pair.engine.last_declined) == {i for i, t in enumerate(ints) if len(t) > 18}
