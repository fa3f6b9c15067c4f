"""``cdranon generate --bootstrap``: every generated record lands in the topic, once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import orjson
from confluent_kafka.admin import AdminClient

from service.generator import generate_cdrs
from tests.integration.conftest import NewTopicFactory
from tests.integration.kafka_helpers import consume_until, partitions_of, unique_name

MONTHS = "2026-09,2026-10,2026-11"


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    # The real command line in its own process, as a user runs it.
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_generate_produces_exactly_count_records(kafka_bootstrap: str, admin: AdminClient) -> None:
    topic = unique_name("cdr.raw")  # not created beforehand: the command creates it
    proc = _generate(
        "--bootstrap", kafka_bootstrap, "--topic", topic, "--count", "2000",
        "--months", MONTHS, "--seed", "21", "--malformed-ratio", "0.05",
        "--partitions", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "generated 2000 CDRs" in proc.stdout
    assert "(created)" in proc.stdout
    assert partitions_of(admin, topic) == 3

    records = consume_until(kafka_bootstrap, [topic], count=2000, to_end=True)

    assert len(records) == 2000
    expected = list(generate_cdrs(2000, months=MONTHS.split(","), seed=21, malformed_ratio=0.05))
    assert Counter(r.value for r in records) == Counter(expected)
    # Key = account id: every well-formed record's key is its own account_id.
    for r in records:
        assert r.key is not None
        assert r.key.startswith(b"ACC-")
        try:
            account = orjson.loads(r.value or b"")["account_id"]
        except orjson.JSONDecodeError:
            continue  # the deliberately broken JSON records
        assert r.key == account.encode()


def test_generate_to_existing_topic_paced_by_rate(
    kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    topic = new_topic(partitions=2)
    count, rate = 300, 600.0
    started = time.monotonic()
    proc = _generate(
        "--bootstrap", kafka_bootstrap, "--topic", topic, "--count", str(count),
        "--months", "2026-10", "--seed", "2", "--rate", str(rate),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "(created)" not in proc.stdout
    # The token bucket allows a burst of rate/10 records, then one per 1/rate seconds:
    # a lower bound that holds however slow or loaded the machine is.
    assert elapsed >= (count - rate / 10) / rate

    records = consume_until(kafka_bootstrap, [topic], count=count, to_end=True)
    assert len(records) == count


def test_generate_fails_clearly_without_a_broker() -> None:
    proc = _generate(
        "--bootstrap", "127.0.0.1:1", "--topic", "cdr.raw", "--count", "5",
        "--months", "2026-10", "-X", "socket.connection.setup.timeout.ms=1000",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cdranon: error: cannot reach Kafka at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr
