"""The audit log on a real ``cdr.audit``-style topic: write, reopen, verify, tamper.

Each test uses a fresh single-partition topic on the session broker.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from service import cli
from service.audit import (
    ENV_SIGNING_KEY,
    SigningKey,
    ensure_audit_topic,
    event_hash,
    find_topic_head,
    load_signing_key,
    open_auditor,
    public_key_pem,
    read_partition,
    verify,
)
from service.errors import AuditError, AuditUnavailableError
from tests.integration.kafka_helpers import consume_until, unique_name

KEY_B64 = base64.b64encode(bytes(range(1, 33))).decode()
KEY: SigningKey = load_signing_key(env={ENV_SIGNING_KEY: KEY_B64})


def _values(bootstrap: str, topic: str) -> list[bytes]:
    return [v or b"" for _, v in read_partition({"bootstrap.servers": bootstrap}, topic, 0, None)]


def test_write_reopen_and_verify_a_topic_log(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=1)
    target = f"kafka://{kafka_bootstrap}/{topic}"
    with open_auditor(target, signing_key=KEY, writer="retention") as r:
        r.record("retention.pass", actor="retention", destroyed=0)
        p = open_auditor(target, signing_key=KEY, writer="processor-0")
        p.record("key.created", actor="processor-0", key_id="2026-11/default")
        for i in range(5):
            p.record("integrity.root", actor="processor-0", sync=False, batch=i, root="ab" * 32)
        p.flush()
        last_r = r.record("key.destroyed", actor="retention", key_id="2025-10/default")
        p.close()
    # Reopen: each writer finds its newest event on the topic and continues from it.
    with open_auditor(target, signing_key=KEY, writer="retention") as r2:
        again = r2.record("retention.pass", actor="retention", destroyed=1)
    assert again["seq"] == 3
    assert again["prev"] == event_hash(orjson.dumps(last_r, option=orjson.OPT_SORT_KEYS))
    with open_auditor(target, signing_key=KEY, writer="processor-0") as p2:
        assert p2.record("retention.pass", actor="p")["seq"] == 7

    values = _values(kafka_bootstrap, topic)
    assert len(values) == 10
    report = verify(values, [KEY.public_key])
    assert report.ok, report.problem
    assert {w: h.seq for w, h in report.heads.items()} == {"retention": 3, "processor-0": 7}
    # Keyed by writer, on the one partition.
    recs = consume_until(kafka_bootstrap, [topic], count=10, to_end=True)
    assert {r.key for r in recs} == {b"retention", b"processor-0"}
    assert {r.partition for r in recs} == {0}


def test_cli_verify_a_topic_and_detect_a_forged_event(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = new_topic(partitions=1)
    with open_auditor(f"kafka://{kafka_bootstrap}/{topic}", signing_key=KEY, writer="w") as a:
        first = a.record("hold.placed", actor="legal", reason="case 9", hold_id="h-1")
        a.record("hold.released", actor="legal", reason="case 9", hold_id="h-1")
    pub = tmp_path / "audit.pub"
    pub.write_text(public_key_pem(KEY.public_key))
    argv = ["audit", "verify", "--bootstrap", kafka_bootstrap, "--topic", topic]
    argv += ["--public-key", str(pub)]
    assert cli.main(argv) == 0
    assert "OK, 2 events" in capsys.readouterr().out

    # Someone with write access to the topic replays the first event: offset 2 is named.
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, value=orjson.dumps(first, option=orjson.OPT_SORT_KEYS), key=b"w")
    assert producer.flush(30) == 0
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "TAMPERED at offset 2" in err
    assert "writer w, seq 1" in err

    # A writer resuming after the replay continues from the newest event it finds (the
    # replayed copy): the log never heals, verify still names the replay.
    with open_auditor(f"kafka://{kafka_bootstrap}/{topic}", signing_key=KEY, writer="w") as a:
        a.record("retention.pass", actor="r")
    assert cli.main(argv) == 1
    assert "TAMPERED at offset 2" in capsys.readouterr().err


def test_the_audit_topic_is_created_with_one_partition_and_no_deletion(
    kafka_bootstrap: str, admin: AdminClient
) -> None:
    # admin re-exports ConfigResource without declaring it; import it from where it lives.
    from confluent_kafka.admin._config import ConfigResource  # noqa: PLC0415

    topic = unique_name("audit")
    with open_auditor(f"kafka://{kafka_bootstrap}/{topic}", signing_key=KEY, writer="w") as a:
        a.record("retention.pass", actor="r")
    md = admin.list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == 1
    res = ConfigResource("topic", topic)
    conf = admin.describe_configs([res])[res].result(timeout=30)
    assert conf["retention.ms"].value == "-1"
    assert conf["cleanup.policy"].value == "delete"


def test_a_topic_with_several_partitions_is_refused(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=3)
    with pytest.raises(AuditError, match="exactly 1"):
        open_auditor(f"kafka://{kafka_bootstrap}/{topic}", signing_key=KEY, writer="w")


def test_an_unreachable_broker_fails_the_open() -> None:
    # Nothing listens on port 1: opening (which reads the topic) fails with AuditError,
    # so no action can be reported as audited.
    with pytest.raises(AuditUnavailableError):
        open_auditor("kafka://127.0.0.1:1/cdr.audit", signing_key=KEY, writer="w", timeout_s=3)


_NO_BROKER = {"bootstrap.servers": "127.0.0.1:1"}  # nothing listens on port 1


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda: ensure_audit_topic(_NO_BROKER, "cdr.audit", timeout_s=1), id="open"),
        pytest.param(lambda: read_partition(_NO_BROKER, "cdr.audit", 0, None, 1), id="watermarks"),
        pytest.param(lambda: read_partition(_NO_BROKER, "cdr.audit", 0, 5, 1), id="fetch"),
        pytest.param(lambda: find_topic_head(_NO_BROKER, "cdr.audit", "w", timeout_s=1), id="head"),
    ],
)
def test_an_unreachable_broker_makes_the_topic_unavailable(read: Callable[[], object]) -> None:
    # Unavailable: a long-running caller (the processor) waits and retries.
    with pytest.raises(AuditUnavailableError, match=r"cdr\.audit") as exc:
        read()
    assert exc.value.code in {"_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT"}


def test_a_damaged_event_is_an_error_not_an_unavailable_topic(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=1)
    conf = {"bootstrap.servers": kafka_bootstrap}
    with open_auditor(f"kafka://{kafka_bootstrap}/{topic}", signing_key=KEY, writer="w") as a:
        a.record("retention.pass", actor="r")
    # The newest event of "w" ends with its writer field but is not a whole event.
    p = Producer(conf)
    p.produce(topic, b'{"seq":"torn","writer":"w"}', partition=0)
    assert p.flush(30) == 0
    with pytest.raises(AuditError, match="damaged event of writer w") as exc:
        find_topic_head(conf, topic, "w", timeout_s=10)
    assert not isinstance(exc.value, AuditUnavailableError)


def test_a_partition_shorter_than_its_known_end_is_an_error_not_unavailable(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    # An end the broker no longer has: records were lost (a truncated or re-created topic),
    # which no wait cures.
    topic = new_topic(partitions=1)
    conf = {"bootstrap.servers": kafka_bootstrap}
    p = Producer(conf)
    for i in range(3):
        p.produce(topic, b"event %d" % i, partition=0)
    assert p.flush(30) == 0
    with pytest.raises(AuditError, match="ends at offset 3, before offset 10") as exc:
        read_partition(conf, topic, 0, 10, timeout_s=2)
    assert not isinstance(exc.value, AuditUnavailableError)


def test_an_open_transaction_past_the_end_is_unavailable_not_lost_records(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    # Records of a transaction still open are there but not readable (read_committed): the
    # read waits for them and, timed out, says unavailable; once committed they are read.
    topic = new_topic(partitions=1)
    conf = {"bootstrap.servers": kafka_bootstrap}
    p = Producer(conf)
    p.produce(topic, b"committed", partition=0)
    assert p.flush(30) == 0
    txn = Producer({**conf, "transactional.id": unique_name("audit-open-txn")})
    txn.init_transactions(30)
    txn.begin_transaction()
    for value in (b"open 1", b"open 2"):
        txn.produce(topic, value, partition=0)
    assert txn.flush(30) == 0
    with pytest.raises(AuditUnavailableError, match="offset 3 not reached"):
        read_partition(conf, topic, 0, 3, timeout_s=2)
    txn.commit_transaction(30)
    assert [v for _, v in read_partition(conf, topic, 0, 3, timeout_s=10)] == [
        b"committed",
        b"open 1",
        b"open 2",
    ]
