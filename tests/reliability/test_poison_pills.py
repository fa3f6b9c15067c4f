"""Scenario 6: poison pills through the real ``cdranon run``.

Malformed JSON, invalid UTF-8, a 10^6-digit integer, deeply nested arrays, duplicate keys,
NaN, a 5 MB record and a wrong-typed value in every field, among valid records: each pill
goes to ``cdr.rejected`` once, byte for byte, with its reason; the valid records all come
through; one process start, no aborted transaction, time bounded.
"""

from __future__ import annotations

import time
from hashlib import sha256
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from service.fields import BILLING_CHECKS
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.policy import load_policy
from tests.integration.kafka_helpers import create_topics
from tests.integration.run_support import (
    Processor,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.support import find_needles, spellings

BIG = 8 * 1024 * 1024


def _valid(i: int, month: str) -> dict[str, Any]:
    return {
        "cdr_id": f"ok-{i}",
        "event_time": f"{month}-01T10:00:00Z",
        "account_id": f"acct-{i % 7}",
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
        "email": "someone@example.org",
    }


def _wrong(value: object) -> object:
    """A value of a JSON type the field does not take."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool | int | float):
        return {"n": value}
    return 12345


def pills(month: str) -> list[tuple[str, bytes, str]]:
    """(label, bytes, expected reason) for every poison pill."""
    base = _valid(0, month)

    def doc(label: str, **kw: object) -> bytes:
        return orjson.dumps({**base, "cdr_id": label, **kw})

    ok = doc("x")
    out = [
        ("malformed", ok[:-7], "invalid_json"),
        ("garbage", b"\x00\x01not json at all\xff", "invalid_json"),
        ("utf8", doc("utf8").replace(b'"ACME"', b'"AC\xff\xfeME"'), "invalid_json"),
        ("utf8-surrogate", doc("sur").replace(b'"ACME"', b'"AC\xed\xa0\x80ME"'), "invalid_json"),
        (
            "bigint",
            doc("bigint")[:-1] + b',"parts2":' + b"7" * 1_000_000 + b"}",
            "invalid_json",
        ),
        ("nested-top", b"[" * 200_000 + b"]" * 200_000, "invalid_json"),
        (
            "nested-field",
            doc("nest")[:-1] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
            "invalid_json",
        ),
        ("dup-price", doc("dup1")[:-1] + b',"price":99.5}', "invalid_json"),
        ("dup-msisdn", doc("dup2")[:-1] + b',"msisdn":null}', "invalid_json"),
        ("dup-spaced", doc("dup3")[:-1] + b',"price" :1}', "invalid_json"),
        ("dup-escaped", doc("dup4")[:-1] + b',"pric\\u0065":1}', "invalid_json"),
        ("nan", doc("nan").replace(b'"price":0.0425', b'"price":NaN'), "invalid_json"),
        ("inf", doc("inf").replace(b'"price":0.0425', b'"price":1e400'), "invalid_json"),
        ("5mb", doc("big")[:-1] + b',"text":"' + b"a" * (5 * 1024 * 1024) + b'"}', "too_large"),
        ("array", b"[1,2,3]", "not_an_object"),
        ("empty", b"", "invalid_json"),
    ]
    policy = load_policy(None)
    for f in [*BILLING_CHECKS, *policy.identifier_fields]:
        if f in base:
            out.append((f"type-{f}", doc(f"t-{f}", **{f: _wrong(base[f])}), "wrong_type"))
    # Labels double as cdr_ids of the JSON ones; the label of each pill is its position.
    return out


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "message.max.bytes": BIG,
            "linger.ms": 5,
        }
    )
    for v in values:
        p.produce(topic, v, partition=0)  # one partition: the pills arrive in this order
        p.poll(0)
    assert p.flush(60) == 0
    del p  # no client left reconnecting after the test


@pytest.mark.slow
def test_poison_pills_are_rejected_with_a_reason_and_the_stream_goes_on(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str
) -> None:
    prefix = f"poison-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=1, config={"max.message.bytes": str(BIG)})
    month = recent_months(1)[0]
    bad = pills(month)
    good = [orjson.dumps(_valid(i, month)) for i in range(300)]
    # Valid records before, between and after the pills.
    values: list[bytes] = [*good[:100]]
    for i, (_, raw, _) in enumerate(bad):
        values.append(raw)
        values.append(good[100 + i])
    values += good[100 + len(bad) :]
    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key()}
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=50,
    )
    proc = Processor(cfg, env, name="poison")
    try:
        proc.wait_for("partitions_assigned", timeout_s=90)
        t0 = time.monotonic()
        _produce(kafka_bootstrap, names.raw, values)
        try:
            wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; processor: {proc.raw[-6:]}") from None
        elapsed = time.monotonic() - t0
        assert proc.proc.poll() is None, proc.raw[-5:]
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()

    # No crash loop: one start, no transaction aborted, no error logged.
    assert proc.count("runner_starting") == 1
    assert proc.count("transaction_aborting") == 0, proc.events("transaction_aborting")[:2]
    assert [d for d in proc.lines if str(d.get("level", "")).lower() in ("error", "critical")] == []
    # Bounded: the whole stream, pills included, well within the deadline above.
    assert elapsed < 60, elapsed
    # The DEBUG log names reasons and fields, never the identifiers in the pills.
    needles = {
        s: f
        for f in ("msisdn", "imsi", "imei", "email")
        for s in spellings(str(_valid(0, month)[f]))
    }
    assert find_needles([("processor log", "\n".join(proc.raw).encode())], needles) == []

    out = read_outputs(kafka_bootstrap, prefix, len(values))
    # Copies are byte for byte; one too large to produce (over message.max.bytes) is
    # named by its size and SHA-256 instead (service/kafka/runner.py).
    by_digest: dict[str, list[dict[str, bytes | None]]] = {}
    for r in out.rejected:
        h = dict(r.headers)
        digest = (h.get("original_sha256") or b"").decode() or sha256(r.value or b"").hexdigest()
        by_digest.setdefault(digest, []).append(h)
    for label, raw, reason in bad:
        got = by_digest.get(sha256(raw).hexdigest(), [])
        assert len(got) == 1, f"pill {label}: rejected {len(got)} times"
        assert got[0]["reason"] == reason.encode(), (label, got[0]["reason"])
        assert got[0]["detail"], label
        if len(raw) > 900_000:
            assert got[0]["value_dropped"] == b"too_large_to_copy", label
            assert got[0]["original_bytes"] == str(len(raw)).encode(), label
    copied = [r for r in out.rejected if "value_dropped" not in dict(r.headers)]
    assert {r.value or b"" for r in copied} == {raw for _, raw, _ in bad if len(raw) < 900_000}
    assert len(out.rejected) == len(bad)
    ids = sorted(orjson.loads(r.value or b"{}")["cdr_id"] for r in out.sanitised)
    assert ids == sorted(f"ok-{i}" for i in range(300))
    assert len(out.sealed) == 300
