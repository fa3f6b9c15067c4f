"""Month keys shared by replicas through ``cdr.keys`` on the real broker, KEKs in SoftHSM2.

Processes here are real subprocesses with empty caches, sharing one SoftHSM2 token
directory (as replicas share one HSM) and one ``cdr.keys`` topic.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from service.errors import KeyDestroyedError, KeystoreError
from service.keyring import Keyring
from service.keystore import KeyState, WrappedKeystore, generate_master_key, open_keystore
from service.keystore.shared import DESTROYED_PREFIX, WrappedRecord
from service.months import month_of, now_utc
from tests.integration.hsm_fixtures import REPO, SoftHsmToken, softhsm_token

__all__ = ["softhsm_token"]  # the fixture, imported to be used here

MSISDN = "+447700900123"

# A replica: opens the keystore with an empty cache, waits at the gate, transforms one
# record of the month, prints the sealed and sanitised records (or the error) as JSON.
CHILD = r"""
import json, os, sys, time
import orjson
from service.keyring import Keyring
from service.keystore import open_keystore
from service.months import now_utc, to_ms
from service.policy import load_policy
from service.transform import Transformer

url, policy_path, gate, event_time, cdr_id = sys.argv[1:6]
from pathlib import Path
transformer = Transformer(load_policy(Path(policy_path)), Keyring(open_keystore(url)))
Path(gate + "." + cdr_id).touch()  # ready: keystore open, cdr.keys read, cache empty
deadline = time.monotonic() + 60
while not os.path.exists(gate):
    if time.monotonic() > deadline:
        sys.exit("gate never opened")
    time.sleep(0.005)
rec = {"cdr_id": cdr_id, "event_time": event_time, "account_id": "acct-1", "channel": "sms",
       "direction": "mo", "status": "delivered", "parts": 1, "price": 0.04, "currency": "EUR",
       "country": "GB", "msisdn": "+447700900123", "imsi": "234150000000001"}
result = transformer.transform([orjson.dumps(rec)], to_ms(now_utc()))
print(json.dumps({
    "sealed": [orjson.loads(r.value) for r in result.sealed],
    "sanitised": [orjson.loads(r.value) for r in result.sanitised],
    "rejected": [r.message for r in result.rejected],
}))
"""

# A fresh process: tries to unseal a blob; prints "ok", or the error's class name.
UNSEAL = r"""
import sys
from service.keyring import Keyring
from service.keystore import open_keystore
from service.sealing import Unsealer
from service.errors import CdranonError
url, kid, blob, cdr_id = sys.argv[1:5]
try:
    keys = Keyring(open_keystore(url)).get(kid, create=False)
    Unsealer(keys).unseal(blob, cdr_id)
    print("ok")
except CdranonError as exc:
    print(type(exc).__name__)
"""


def _policy(tmp_path: Path) -> tuple[Path, str]:
    """A policy whose GB records get a retention class of this test alone (its own KEK label)."""
    cls = "t" + secrets.token_hex(5)
    text = (REPO / "service" / "data" / "policy.toml").read_text()
    text += f'\n[retention.jurisdictions.{cls}]\nidentifier_months = 12\ncountries = ["GB"]\n'
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path, cls


def _run(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str], timeout_s: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-2000:]
    return out.strip().splitlines()[-1]


def _topic(kafka_bootstrap: str) -> str:
    return f"cdr.keys.k{secrets.token_hex(5)}"


def _raw_records(bootstrap: str, topic: str) -> list[tuple[str, bytes | None]]:
    """Every committed record of the topic, in order (what a copy of the log holds)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "t-" + secrets.token_hex(4),
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    out: list[tuple[str, bytes | None]] = []
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                if err.code() == err._PARTITION_EOF:
                    return out
                raise AssertionError(err.str())
            out.append(((m.key() or b"").decode(), m.value()))
        raise AssertionError(f"{topic} not read to its end within 30 s")
    finally:
        c.close()


def test_two_replicas_racing_on_a_new_month_seal_with_one_key_then_destruction_is_final(
    kafka_bootstrap: str, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    topic = _topic(kafka_bootstrap)
    url = softhsm_token.url(f"kafka://{kafka_bootstrap}/{topic}")
    policy, cls = _policy(tmp_path)
    month = month_of(now_utc())
    kid = f"{month}/{cls}"
    event_time = f"{month}-01T10:00:00Z"
    gate = tmp_path / "go"
    procs = [
        _run(CHILD, url, str(policy), str(gate), event_time, f"c-{i}", env=softhsm_token.env)
        for i in range(2)
    ]
    try:
        # Both open their keystore (and read cdr.keys) first; then they create at once.
        deadline = time.monotonic() + 60
        while not all(Path(f"{gate}.c-{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), "a replica died before the gate"
            assert time.monotonic() < deadline, "replicas not ready within 60 s"
            time.sleep(0.01)
        gate.touch()
        outs = [json.loads(_result(p)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    sealed = [o["sealed"][0] for o in outs]
    sanitised = [o["sanitised"][0] for o in outs]
    assert [s["key_id"] for s in sealed] == [kid, kid]
    # Same month key: the same subscriber gets the same pseudonym in both replicas...
    assert sanitised[0]["msisdn_pseudonym"] == sanitised[1]["msisdn_pseudonym"]
    # ...and each replica's blob opens with the other's key (checked by a third process).
    for s in sealed:
        assert _result(_run(UNSEAL, url, kid, s["sealed"], s["cdr_id"], env={})) == "ok"
    records = [(k, v) for k, v in _raw_records(kafka_bootstrap, topic) if k == kid]
    assert len(records) == 1, "exactly one committed wrapped record for the month"
    assert records[0][1] is not None
    assert MSISDN.encode() not in records[0][1]

    # Destroy it (as `cdranon keys destroy` does), then a fresh process with the token and
    # cdr.keys cannot unseal any record of that month.
    admin_store = open_keystore(url, need_secrets=False)
    try:
        assert admin_store.destroy(kid) is True
    finally:
        close = getattr(admin_store, "close", None)
        if close is not None:
            close()  # its follower consumer must not outlive the broker
    for s in sealed:
        got = _result(_run(UNSEAL, url, kid, s["sealed"], s["cdr_id"], env={}))
        assert got == "KeyDestroyedError"
    # The log still holds the wrapped record until compaction runs: with the KEK gone from
    # the token it unwraps to nothing, even for code that ignores the destroyed marker.
    log = _raw_records(kafka_bootstrap, topic)
    assert [k for k, _ in log] == [kid, DESTROYED_PREFIX + kid, kid]
    assert log[2][1] is None  # the null tombstone
    old = log[0][1]
    assert old is not None
    assert isinstance(admin_store, WrappedKeystore)
    with pytest.raises(KeystoreError, match="missing from token"):
        admin_store.wrapper.unwrap(WrappedRecord.from_json(old, where="log copy"))
    [info] = [i for i in admin_store.list() if i.key_id == kid]
    assert (info.state, info.backend) == (KeyState.DESTROYED, "pkcs11")


def test_master_key_records_on_cdr_keys_and_a_replica_drops_a_destroyed_key(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The file backend's wrapping (master key) on the shared topic; the drop bound."""
    topic = _topic(kafka_bootstrap)
    url = f"kafka://{kafka_bootstrap}/{topic}"
    env = {"CDRANON_MASTER_KEY": generate_master_key()}
    a = open_keystore(url, env=env)
    b = open_keystore(url, env=env)
    kid = f"{month_of(now_utc())}/default"
    secret = a.create_if_absent(kid)
    assert b.create_if_absent(kid) == secret  # b adopts a's record
    ring = Keyring(b, recheck_s=0.5)
    ring.get(kid)
    assert a.destroy(kid) is True
    # b's view and its keyring drop the key within recheck_s + the follower's lag.
    deadline = time.monotonic() + 15
    while True:
        try:
            ring.get(kid, create=False)
        except KeyDestroyedError:
            break
        assert time.monotonic() < deadline, "replica b still serves a destroyed key"
        time.sleep(0.05)
    with pytest.raises(KeyDestroyedError):
        b.create_if_absent(kid)
    # A wrong master key is told apart from a damaged record.
    c = open_keystore(url, env={"CDRANON_MASTER_KEY": generate_master_key()})
    other = f"{month_of(now_utc())}/other"
    a.create_if_absent(other)
    with pytest.raises(KeystoreError, match="wrong CDRANON_MASTER_KEY"):
        c.get(other)
    for s in (a, b, c):
        assert isinstance(s, WrappedKeystore)
        s.close()


def test_records_hold_no_secret_and_unknown_records_are_ignored(
    kafka_bootstrap: str, softhsm_token: SoftHsmToken
) -> None:
    topic = _topic(kafka_bootstrap)
    url = softhsm_token.url(f"kafka://{kafka_bootstrap}/{topic}")
    ks = open_keystore(url)
    kid = f"{month_of(now_utc())}/t{secrets.token_hex(5)}"
    secret = ks.create_if_absent(kid)
    [(k, v)] = _raw_records(kafka_bootstrap, topic)
    assert k == kid
    assert v is not None
    doc = orjson.loads(v)
    assert sorted(doc) == [
        "backend", "created_at", "format", "kek_id", "key_id", "nonce", "wrapped",
    ]  # fmt: skip
    assert doc["backend"] == "pkcs11"
    assert secret.hex() not in v.decode()
    assert secret not in v
    assert isinstance(ks, WrappedKeystore)
    ks.destroy(kid)
    ks.close()
