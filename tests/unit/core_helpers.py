"""Shared builders for the core's unit tests: a real file keystore in tmp, a transformer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.months import parse_rfc3339, to_ms
from service.policy import Policy, load_policy
from service.transform import Transformer

NOW = "2026-11-23T12:00:00Z"


def now_ms(text: str = NOW) -> int:
    return to_ms(parse_rfc3339(text))


def make_transformer(tmp_path: Path, policy: Policy | None = None) -> Transformer:
    store = FileKeystore(tmp_path / "keys", MasterKey(b"\x07" * 32, source="test"))
    return Transformer(policy or load_policy(), Keyring(store))


def cdr(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cdr_id": "c-1",
        "event_time": "2026-10-15T10:00:00Z",
        "account_id": "acct-1",
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
        "msisdn": "+447700900123",
        "imsi": "234150000000001",
        "imei": "490154203237518",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def raw(rec: dict[str, Any]) -> bytes:
    return orjson.dumps(rec)
