"""Digests of the billing fields as received ("original form")."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from service.integrity import (
    DIGEST_FIELD,
    LEAF_FIELD,
    added_fields,
    billing_part,
    canonical,
    digest,
    leaf_of,
    parse_leaf,
)
from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.merkle import leaf_hash
from service.policy import load_policy
from service.transform import Transformer
from tests.unit.core_helpers import cdr, make_transformer, now_ms, raw


def test_sanitised_record_carries_the_digest_of_its_billing_fields(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path)
    rec = cdr(text="dropped", price=0.0425, sender_id="Zoë")
    r = tf.transform(
        [raw(rec), raw(cdr(cdr_id="old", event_time="2025-01-01T00:00:00Z"))], now_ms()
    )
    added = added_fields(load_policy())
    for out in r.sanitised:
        doc = orjson.loads(out.value)
        billing = billing_part(doc, added)
        assert doc[DIGEST_FIELD] == digest(billing)
        assert "msisdn" not in billing
        assert "msisdn_pseudonym" not in billing
    doc = orjson.loads(r.sanitised[0].value)
    expected = {k: v for k, v in rec.items() if k not in ("msisdn", "imsi", "imei", "text")}
    assert billing_part(doc, added) == expected


def test_canonical_form_is_independent_of_input_key_order() -> None:
    a = {"cdr_id": "x", "price": 0.1, "account_id": "é"}
    b = {"account_id": "é", "price": 0.1, "cdr_id": "x"}
    assert canonical(a) == canonical(b) == '{"account_id":"é","cdr_id":"x","price":0.1}'.encode()


def test_any_change_to_a_billing_value_changes_the_digest() -> None:
    base = cdr()
    d0 = digest(base)
    for field in ("cdr_id", "event_time", "account_id", "price", "parts", "currency", "country"):
        changed = dict(base)
        v = changed[field]
        changed[field] = v + 1 if isinstance(v, int | float) else str(v) + "x"
        assert digest(changed) != d0, field
    # Unicode normalisation is not applied: NFC and NFD spellings differ.
    assert digest({"sender_id": "Zo\u00eb"}) != digest({"sender_id": "Zoe\u0308"})


def test_integrity_off_omits_the_digest(tmp_path: Path) -> None:
    store = FileKeystore(tmp_path / "k", MasterKey(b"\x03" * 32, source="test"))
    tf = Transformer(load_policy(), Keyring(store), integrity=False)
    r = tf.transform([raw(cdr())], now_ms())
    assert DIGEST_FIELD not in orjson.loads(r.sanitised[0].value)


@pytest.mark.parametrize("native", ["1", "0"])
def test_leaf_tags_number_each_months_records_in_input_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: str
) -> None:
    monkeypatch.setenv("CDRANON_NATIVE", native)
    tf = make_transformer(tmp_path)
    assert tf.native is (native == "1")
    batch = [
        raw(cdr(cdr_id="a", event_time="2026-10-01T00:00:00Z")),
        raw(cdr(cdr_id="b", event_time="2026-09-30T23:59:59Z")),
        b"not json",
        raw(
            cdr(cdr_id="c", event_time="2026-10-02T00:00:00Z", sender_id="Zo\u00eb")
        ),  # Python path
        raw(cdr(cdr_id="d", event_time="2025-02-01T00:00:00Z")),  # stripped: Python path
        raw(cdr(cdr_id="e", event_time="2026-10-03T00:00:00Z")),
        raw(cdr(cdr_id="f", event_time="2025-02-02T00:00:00Z")),
    ]
    r = tf.transform(batch, now_ms(), b"bfeedn3")
    assert r.leaf_tag == b"bfeedn3"
    assert r.stripped == 2
    got = {orjson.loads(o.value)["cdr_id"]: leaf_of(o.value) for o in r.sanitised}
    assert got == {
        "a": ("bfeedn3", 0),
        "b": ("bfeedn3", 0),
        "c": ("bfeedn3", 1),
        "d": ("bfeedn3", 0),
        "e": ("bfeedn3", 2),
        "f": ("bfeedn3", 1),
    }
    for o in r.sanitised:
        doc = orjson.loads(o.value)
        assert list(doc)[-1] == LEAF_FIELD  # the last field, after the digest
        assert doc[DIGEST_FIELD] == digest(billing_part(doc, added_fields(load_policy())))
        i = doc[LEAF_FIELD].rsplit("/", 1)[1]
        assert r.leaves[o.month][32 * int(i) : 32 * int(i) + 32] == leaf_hash(
            bytes.fromhex(doc[DIGEST_FIELD])
        )
    assert {m: len(b) // 32 for m, b in r.leaves.items()} == {
        "2026-10": 3,
        "2026-09": 1,
        "2025-02": 2,
    }
    # Without a tag (batch mode, or integrity off): no leaves.
    plain = tf.transform(batch, now_ms())
    assert plain.leaves == {}
    assert all(leaf_of(o.value) is None for o in plain.sanitised)


def test_a_leaf_tag_needs_integrity_and_a_plain_spelling(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path)
    for bad in (b"", b'b"1', b"b/1", b"b\\1", b"x" * 65, "bé".encode()):
        with pytest.raises(ValueError, match="leaf tag"):
            tf.transform([raw(cdr())], now_ms(), bad)
    store = FileKeystore(tmp_path / "k", MasterKey(b"\x03" * 32, source="test"))
    off = Transformer(load_policy(), Keyring(store), integrity=False)
    with pytest.raises(ValueError, match="leaf tag"):
        off.transform([raw(cdr())], now_ms(), b"b1n1")


def test_leaf_of_reads_the_tag_from_the_bytes() -> None:
    assert leaf_of(b'{"a":1,"integrity_leaf":"bxn1/7"}') == ("bxn1", 7)
    assert leaf_of(b'{"a":1}') is None
    assert leaf_of(b'{"a":1,"integrity_leaf":"bxn1/x"}') is None  # no index
    assert leaf_of(b'{"a":1,"integrity_leaf":"bxn1/7') is None  # cut short
    assert leaf_of(b'{"a":1,"integrity_leaf":7}') is None
    # Inside a string the key's quotes are escaped: never taken for the field.
    assert leaf_of(b'{"a":"x\\",\\"integrity_leaf\\":\\"b/1"}') is None
    assert parse_leaf(b"a/b/3") == ("a/b", 3)
    assert parse_leaf("/3") is None
    assert parse_leaf(None) is None
