"""Scenario 7: fuzzing parse-and-transform with Hypothesis (no broker).

Three harnesses, each asserting the transform's contract on every generated input:
- bytes: arbitrary bytes and mutations of a valid CDR (bit flips, insertions, deletions,
  truncations, splices);
- structure: CDR objects whose every field may hold any JSON value (wrong types, huge
  integers, unicode, nesting, nulls), plus unknown fields;
- duplicate keys: JSON texts with repeated keys, odd whitespace and escapes, against the
  transform's fast duplicate test (it may only say "unique" when the text is).

Contract: ``transform`` never raises (KeystoreUnavailableError aside, impossible here);
every input index is in exactly one of sanitised or rejected; rejections carry only the
declared reasons of docs/policy.md and never an identifier's value; no identifier value of
the input appears in any output outside the sealed blob; billing fields of accepted
records equal the input's; sealed identifiers unseal to exactly the input's.

``--soak`` runs 10x the examples. The atheris harness (coverage-guided) is
tests/reliability/fuzz_atheris.py, run by test_atheris_transform below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.identifiers import luhn_ok
from service.jsonkeys import surely_unique
from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.months import parse_rfc3339, to_ms
from service.policy import load_policy
from service.sealing import Unsealer
from service.transform import Transformer
from tests.reliability.support import Scale

DECLARED_REASONS = frozenset(
    {
        "too_large",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "invalid_value",
        "too_far_in_future",
        "past_billing_deadline",
    }
)
NOW_MS = to_ms(parse_rfc3339("2026-11-23T12:00:00Z"))
POLICY = load_policy(None)
IDENTS = tuple(POLICY.identifier_fields)
BILLING = tuple(POLICY.billing_fields)


def fuzz_settings(scale: Scale, ci: int) -> settings:
    """``ci`` examples (10x with --soak), no deadline, no example database."""
    return settings(
        max_examples=scale.pick(ci, ci * 10),
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
        deadline=None,
        database=None,
    )


@pytest.fixture(scope="module")
def tf(tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    store = FileKeystore(
        tmp_path_factory.mktemp("fuzzkeys"), MasterKey(b"\x05" * 32, source="test")
    )
    return Transformer(POLICY, Keyring(store))


def _luhn(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


_msisdn = st.builds(
    lambda cc, rest: f"+{cc}{rest}",
    st.sampled_from(["44", "33", "49", "1", "39"]),
    st.text("0123456789", min_size=9, max_size=10).filter(lambda s: s[0] != "0"),
)
_imsi = st.text("0123456789", min_size=15, max_size=15)
_imei = st.text("0123456789", min_size=14, max_size=14).map(_luhn)
_email = st.builds(
    lambda u, d: f"{u}@{d}.example",
    st.text("abcdefgh_", min_size=2),
    st.text("abcdefgh", min_size=2),
)
_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_json_any = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_event_time = st.one_of(
    st.sampled_from(
        [
            "2026-10-15T10:00:00Z",
            "2026-11-23T11:59:59.999Z",
            "2026-09-01T00:00:00+02:00",
            "2025-10-31T23:59:59Z",  # past its identifier deadline: stripped
            "2015-01-01T00:00:00Z",  # past its billing deadline: rejected
            "2027-01-01T00:00:00Z",  # too far ahead
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63),
    _json_any,
)


def _valid_base(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "cdr_id": draw(st.text(min_size=1, max_size=30)),
        "event_time": "2026-10-15T10:00:00Z",
        "account_id": draw(st.one_of(st.text(min_size=1, max_size=20), st.integers(0, 2**40))),
        "channel": "sms",
        "direction": "mo",
        "sender_id": "ACME",
        "status": "delivered",
        "parts": 1,
        "price": 0.0425,
        "currency": "EUR",
        "route_id": "r-7",
        "mcc": "234",
        "mnc": "15",
        "country": "GB",
        "msisdn": draw(_msisdn),
        "imsi": draw(_imsi),
        "imei": draw(_imei),
        "email": draw(_email),
    }


@st.composite
def structured(draw: st.DrawFn) -> dict[str, Any]:
    """A CDR whose fields are each kept, dropped or replaced by any JSON value."""
    rec = _valid_base(draw)
    for f in list(rec):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            del rec[f]
        elif choice == 1:
            rec[f] = draw(_event_time if f == "event_time" else _json_any)
    if draw(st.booleans()):
        rec["event_time"] = draw(_event_time)
    extra = draw(st.dictionaries(st.text(max_size=8), _json_any, max_size=3))
    for k, v in extra.items():
        rec.setdefault(k, v)
    return rec


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A valid CDR and a byte-level mutation of it."""
    rec = _valid_base(draw)
    data = bytearray(orjson.dumps(rec))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
        else:
            j = draw(st.integers(0, len(data) - 1))
            data[i:i] = data[j : j + draw(st.integers(1, 16))]
    return rec, bytes(data)


def _identifier_values(rec: object) -> list[str]:
    if not isinstance(rec, dict):
        return []
    return [v for f in IDENTS if isinstance(v := rec.get(f), str) and len(v) >= 6]


def check_contract(tf: Transformer, raws: list[bytes], sources: list[object]) -> None:
    """The transform's contract over one batch (see the module docstring)."""
    result = tf.transform(raws, NOW_MS)
    seen = [r.source for r in result.sanitised] + [r.index for r in result.rejected]
    assert sorted(seen) == list(range(len(raws))), "an input is missing or appears twice"
    assert len(result.sealed) + result.stripped == len(result.sanitised)
    for rej in result.rejected:
        assert rej.reason in DECLARED_REASONS, rej.reason
        assert rej.original == raws[rej.index]
        for v in _identifier_values(sources[rej.index]):
            assert v not in rej.message, f"rejection message of {rej.reason} holds an identifier"
            assert v != rej.field
    for out in result.sanitised + result.sealed:
        src = sources[out.source]
        parsed = orjson.loads(raws[out.source])
        assert isinstance(parsed, dict)
        doc = orjson.loads(out.value)
        for f in BILLING:
            assert doc.get(f) == parsed.get(f), f"billing field {f} changed"
        added = orjson.dumps({k: v for k, v in doc.items() if k not in BILLING and k != "sealed"})
        for v in _identifier_values(parsed) + _identifier_values(src):
            assert v.encode() not in added, "an identifier value reached an output"
            assert v.lstrip("+").encode() not in added
        for f in IDENTS:
            assert f not in doc or f in BILLING
    for out in result.sealed:
        doc = orjson.loads(out.value)
        parsed = orjson.loads(raws[out.source])
        got = Unsealer(tf.keyring.get(doc["key_id"], create=False)).unseal(
            doc["sealed"], doc["cdr_id"]
        )
        assert got == {f: parsed[f] for f in IDENTS if parsed.get(f) is not None}


def test_fuzz_structured_records(tf: Transformer, scale: Scale) -> None:
    @fuzz_settings(scale, 400)
    @given(recs=st.lists(structured(), min_size=1, max_size=6))
    def run(recs: list[dict[str, Any]]) -> None:
        # The stdlib writes integers past 64 bits too (orjson refuses to).
        check_contract(tf, [json.dumps(r, ensure_ascii=False).encode() for r in recs], list(recs))

    run()


def test_fuzz_mutated_bytes(tf: Transformer, scale: Scale) -> None:
    @fuzz_settings(scale, 400)
    @given(items=st.lists(mutated(), min_size=1, max_size=6))
    def run(items: list[tuple[dict[str, Any], bytes]]) -> None:
        check_contract(tf, [raw for _, raw in items], [rec for rec, _ in items])

    run()


def test_fuzz_arbitrary_bytes(tf: Transformer, scale: Scale) -> None:
    @fuzz_settings(scale, 300)
    @given(raws=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
    def run(raws: list[bytes]) -> None:
        check_contract(tf, raws, [None] * len(raws))

    run()


_KEYS = st.sampled_from(["a", "price", "cdr_id", "msisdn", "b:c", 'q"', "pr\u00efce"])
_WS = st.sampled_from(["", " ", "\t", "\n", "\r\n", "  "])


@st.composite
def json_with_keys(draw: st.DrawFn) -> str:
    """A JSON object text with possibly repeated keys, odd spacing and escaped keys."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        key = draw(_KEYS)
        text = json.dumps(key, ensure_ascii=draw(st.booleans()))
        if draw(st.booleans()) and key.isalpha():
            text = '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'  # escaped spelling
        value = draw(
            st.one_of(
                st.sampled_from(['":x"', '"a\\":"', "1", "[1]", "null"]),
                st.builds(json.dumps, st.dictionaries(_KEYS, st.integers(0, 3))),
            )
        )
        parts.append(f"{draw(_WS)}{text}{draw(_WS)}:{draw(_WS)}{value}{draw(_WS)}")
    return "{" + ",".join(parts) + "}"


def _has_duplicates(text: str) -> bool:
    dup = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal dup
        if len({k for k, _ in pairs}) != len(pairs):
            dup = True
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return dup


def test_fuzz_duplicate_key_fast_test_is_never_wrong(scale: Scale) -> None:
    @fuzz_settings(scale, 600)
    @given(text=json_with_keys())
    def run(text: str) -> None:
        raw = text.encode()
        doc = orjson.loads(raw)
        if surely_unique(raw, len(doc)):
            assert not _has_duplicates(text), text

    run()


def test_duplicate_keys_are_rejected_at_every_level(tf: Transformer) -> None:
    base = orjson.dumps(
        {
            "cdr_id": "d",
            "event_time": "2026-10-15T10:00:00Z",
            "account_id": "a",
            "msisdn": "+447700900123",
        }
    )
    for extra in (b',"price":1,"price":2', b',"x":{"k":1,"k":2}', b',"cdr_id" : "e"'):
        r = tf.transform([base[:-1] + extra + b"}"], NOW_MS)
        assert [x.reason for x in r.rejected] == ["invalid_json"], extra
    ok = tf.transform([base[:-1] + b',"x":{"k":1,"j":{"k":2}}}'], NOW_MS)
    assert not ok.rejected


def test_atheris_transform(tmp_path: Path, scale: Scale) -> None:
    """Coverage-guided fuzzing with atheris (libFuzzer) in a subprocess (its own
    process: libFuzzer owns the interpreter and exits at the end)."""
    runs = scale.pick(100_000, 2_000_000)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.fuzz_atheris",
            f"-atheris_runs={runs}",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=scale.pick(240, 3600),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr, proc.stderr[-1000:]
