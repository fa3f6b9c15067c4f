"""Digests of the billing fields as received ("original form")."""

from __future__ import annotations

from pathlib import Path

import orjson

from service.integrity import DIGEST_FIELD, added_fields, billing_part, canonical, digest
from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
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
