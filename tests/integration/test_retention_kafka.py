"""The retention controller against the real broker: month topics, a hold topic, leadership.

Small on purpose (3 months, 3000 records): months are chosen around the real clock so the
broker's own retention.ms (defence in depth) does not race the controller's --now. The pass
runs with each keystore backend: ``file`` (hold secrets beside the keys, the default) and
``pkcs11`` on SoftHSM2 with a cdr.keys topic (hold secrets in ``retention.hold_dir``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from service import cli
from service.audit import generate_signing_key
from service.generator import generate_cdrs
from service.holds import HoldSecrets
from service.kafka.retention_store import Lease
from service.kafka.topics import HOUR_MS, TopicManager, TopicNames
from service.keyring import Keyring
from service.keystore import KeyState, Keystore, MasterKey, open_keystore
from service.keystore.pkcs11 import Pkcs11Wrapper, parse_pkcs11_url
from service.months import add_months, month_of, now_utc, parse_month, to_ms
from service.policy import load_policy
from service.transform import Transformer
from tests.integration.hsm_fixtures import (  # noqa: F401  # fixtures
    KeystoreUnderTest,
    keystore_backend,
    softhsm_token,
)
from tests.integration.kafka_helpers import consume_until, unique_name

MASTER_B64 = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="
MASTER = MasterKey(b"\x2a" * 32, source="test")


def _month(base: str, n: int) -> str:
    y, m = add_months(*parse_month(base), n)
    return f"{y:04d}-{m:02d}"


def _close(keystore: Keystore) -> None:
    # A pkcs11 keystore holds an HSM session and a cdr.keys consumer; the file one nothing.
    close = getattr(keystore, "close", None)
    if callable(close):
        close()


@pytest.fixture
def setup(
    kafka_bootstrap: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    keystore_backend: KeystoreUnderTest,  # noqa: F811  # the imported fixture
) -> dict[str, str]:
    prefix = unique_name("rt").replace("-", "")
    for name in (
        "CDRANON_CONFIG",
        "CDRANON_POLICY",
        "CDRANON_MASTER_KEY_FILE",
        "CDRANON_RETENTION__HOLD_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    # File: hold secrets beside the keys (the default). Any other keystore has no directory
    # of its own, so retention.hold_dir is set, as an operator must.
    holds = tmp_path / "keys" / "holds" if keystore_backend.backend == "file" else tmp_path / "h"
    env = {
        **keystore_backend.env,
        "CDRANON_HOME": str(tmp_path / "home"),
        # Wraps hold secrets with either backend (and month secrets with the file one).
        "CDRANON_MASTER_KEY": MASTER_B64,
        "CDRANON_KEYSTORE": keystore_backend.url,
        "CDRANON_AUDIT_SIGNING_KEY": generate_signing_key(),
        "CDRANON_AUDIT__TARGET": f"file://{tmp_path / 'audit.jsonl'}",
        "CDRANON_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CDRANON_KAFKA__TOPIC_PREFIX": prefix,
        "CDRANON_TOPICS__PARTITIONS": "1",
        "CDRANON_TOPICS__REPLICATION_FACTOR": "1",
        "CDRANON_METRICS__ENABLED": "false",
    }
    if keystore_backend.backend != "file":
        env["CDRANON_RETENTION__HOLD_DIR"] = str(holds)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = tmp_path / "cdranon.toml"
    config.write_text("")
    return {
        "prefix": prefix,
        "config": str(config),
        "tmp": str(tmp_path),
        "url": keystore_backend.url,
        "backend": keystore_backend.backend,
        "holds": str(holds),
    }


def _fill(
    bootstrap: str, prefix: str, keystore_url: str, months: list[str]
) -> dict[str, list[dict[str, object]]]:
    """Transform 3000 generated CDRs and write the month topics, as the processor does."""
    policy = load_policy()
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = TopicManager(
        admin,
        TopicNames(prefix),
        identifier_months=12,
        billing_years=10,
        partitions=1,
        replication_factor=1,
        grace_ms=HOUR_MS,
        future_tolerance_ms=86_400_000,
    )
    topics.ensure_months(months, months)
    keystore = open_keystore(keystore_url)
    try:
        transformer = Transformer(policy, Keyring(keystore))
        values = list(
            generate_cdrs(3000, months=months, seed=4, accounts=5, subscribers=50, now=now_utc())
        )
        result = transformer.transform(values, to_ms(now_utc()))
    finally:
        _close(keystore)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    sealed: dict[str, list[dict[str, object]]] = {}
    for rec in result.sealed:
        producer.produce(
            f"{prefix}.sealed.{rec.month}", rec.value, rec.key, timestamp=rec.timestamp_ms
        )
        sealed.setdefault(rec.month, []).append(orjson.loads(rec.value))
    for rec in result.sanitised:
        producer.produce(
            f"{prefix}.sanitised.{rec.month}", rec.value, rec.key, timestamp=rec.timestamp_ms
        )
    assert producer.flush(60) == 0
    return sealed


def _topics(bootstrap: str, prefix: str) -> set[str]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {t for t in md.topics if t.startswith(prefix + ".")}


def _wait_gone(bootstrap: str, names: set[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = names & _topics(bootstrap, next(iter(names)).split(".")[0])
        if not left:
            return
        time.sleep(0.2)  # topic deletion propagates through metadata; bounded by the deadline
    raise AssertionError(f"topics still listed after {timeout_s}s: {sorted(left)}")


def _run(capsys: pytest.CaptureFixture[str], argv: list[str], rc: int = 0) -> dict[str, Any]:
    got = cli.main(argv)
    captured = capsys.readouterr()
    assert got == rc, captured.err
    doc: dict[str, Any] = json.loads(captured.out) if "--json" in argv else {}
    return doc


def test_retention_over_topics_with_a_hold(
    kafka_bootstrap: str, setup: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    prefix, config = setup["prefix"], setup["config"]
    current = month_of(now_utc())
    months = [_month(current, -2), _month(current, -1), current]
    sealed = _fill(kafka_bootstrap, prefix, setup["url"], months)
    first = months[0]
    account = str(sealed[first][0]["account_id"])
    held_ids = {str(r["cdr_id"]) for r in sealed[first] if r["account_id"] == account}
    assert 0 < len(held_ids) < len(sealed[first])

    cfg = ["--config", config]
    _run(capsys, ["hold", "place", "--id", "h1", "--reason", "case 1", "--by", "alice",
                  "--month", first, "--account", account, *cfg])  # fmt: skip
    deadline = f"{_month(first, 13)}-01T00:00:00Z"
    before = _run(
        capsys, ["retention", "run", *cfg, "--now", f"{_month(first, 12)}-28T00:00:00Z", "--json"]
    )
    assert not [a for a in before["actions"] if a["action"] in ("destroy_key", "delete_sealed")]

    doc = _run(capsys, ["retention", "run", *cfg, "--now", deadline, "--json"])
    done = {(a["action"], a["target"]) for a in doc["actions"] if a["status"] == "done"}
    assert ("copy_hold", f"{first}/default") in done
    assert ("destroy_key", f"{first}/default") in done
    assert ("delete_sealed", first) in done
    _wait_gone(kafka_bootstrap, {f"{prefix}.sealed.{first}"})
    left = _topics(kafka_bootstrap, prefix)
    for m in months[1:]:
        assert f"{prefix}.sealed.{m}" in left
    for m in months:
        assert f"{prefix}.sanitised.{m}" in left
    ahead = _month(first, 13)
    assert {f"{prefix}.sealed.{ahead}", f"{prefix}.sanitised.{ahead}"} <= left
    store = open_keystore(setup["url"], need_secrets=False)
    try:
        states = {i.key_id: i.state for i in store.list()}
    finally:
        _close(store)
    assert states[f"{first}/default"] is KeyState.DESTROYED
    assert states[f"{months[1]}/default"] is KeyState.ACTIVE
    if setup["backend"] == "pkcs11":
        # Destroyed in the token itself, seen from a session of its own.
        token = Pkcs11Wrapper(parse_pkcs11_url(setup["url"]))
        try:
            labels = token.kek_labels()
        finally:
            token.close()
        assert f"{first}/default" not in labels
        assert f"{months[1]}/default" in labels

    held = consume_until(kafka_bootstrap, [f"{prefix}.hold.h1"], count=len(held_ids), to_end=True)
    assert {str(orjson.loads(r.value or b"{}")["cdr_id"]) for r in held} == held_ids
    dump = Path(setup["tmp"]) / "held.jsonl"
    dump.write_bytes(b"".join((r.value or b"") + b"\n" for r in held))
    got = cli.main(
        ["hold", "unseal", "--id", "h1", "--input", str(dump), "--reason", "case 1", *cfg]
    )
    out = capsys.readouterr().out.splitlines()
    assert got == 0
    assert len(out) == len(held_ids)

    again = _run(capsys, ["retention", "run", *cfg, "--now", deadline, "--json"])
    assert again["counts"]["done"] == 0

    _run(capsys, ["hold", "release", "--id", "h1", "--by", "bob", *cfg])
    _wait_gone(kafka_bootstrap, {f"{prefix}.hold.h1"})
    assert HoldSecrets(Path(setup["holds"]), MASTER).state("h1") == "destroyed"
    got = cli.main(
        ["hold", "unseal", "--id", "h1", "--input", str(dump), "--reason", "case 1", *cfg]
    )
    captured = capsys.readouterr()
    assert got == 1
    assert captured.out == ""
    _run(capsys, ["hold", "list", "--json", *cfg])

    nxt = _run(
        capsys,
        ["retention", "run", *cfg, "--now", f"{_month(months[1], 13)}-01T00:00:00Z", "--json"],
    )
    assert ("delete_sealed", months[1]) in {(a["action"], a["target"]) for a in nxt["actions"]}
    _wait_gone(kafka_bootstrap, {f"{prefix}.sealed.{months[1]}"})
    assert f"{prefix}.sealed.{current}" in _topics(kafka_bootstrap, prefix)


def test_one_leader_among_instances(kafka_bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topic = unique_name("lease")
    group = unique_name("retention")
    conf = {"bootstrap.servers": kafka_bootstrap}
    a = Lease(conf, admin, topic, group, replication_factor=1, session_timeout_ms=6000)
    b = Lease(conf, admin, topic, group, replication_factor=1, session_timeout_ms=6000)
    try:
        # Leadership may move once while the second instance joins (the group rebalances
        # when it arrives): wait until exactly one leads for 5 s in a row.
        deadline = time.monotonic() + 60
        one_since: float | None = None
        while time.monotonic() < deadline:
            la, lb = a.poll(0.2), b.poll(0.2)
            if la == lb:
                one_since = None
            elif one_since is None:
                one_since = time.monotonic()
            elif time.monotonic() - one_since >= 5.0:
                break
        assert a.leader != b.leader, "exactly one instance leads"
        leader, other = (a, b) if a.leader else (b, a)
        # Stable: a few more rounds, still one leader.
        for _ in range(5):
            leader.poll(0.2)
            other.poll(0.2)
        assert leader.leader
        assert not other.leader
        leader.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not other.poll(0.2):
            pass
        assert other.leader, "the other instance takes over when the leader leaves"
    finally:
        a.close()
        b.close()
