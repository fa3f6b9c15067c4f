"""The real broker works end to end with confluent-kafka, transactions included."""

from __future__ import annotations

from confluent_kafka import Producer

from tests.integration.conftest import NewTopicFactory
from tests.integration.kafka_helpers import Record, consume_until, unique_name


def _values(records: list[Record]) -> list[bytes]:
    out: list[bytes] = []
    for r in records:
        assert r.value is not None
        out.append(r.value)
    return out


def test_produce_and_consume(kafka_bootstrap: str, new_topic: NewTopicFactory) -> None:
    topic = new_topic(partitions=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent = [f"plain-{i}".encode() for i in range(300)]
    for i, value in enumerate(sent):
        producer.produce(topic, value=value, key=str(i % 50).encode())
        producer.poll(0)
    assert producer.flush(30) == 0

    records = consume_until(kafka_bootstrap, [topic], count=len(sent), to_end=True)

    assert sorted(_values(records)) == sorted(sent)
    assert {r.partition for r in records} == {0, 1, 2}
    # One key, one partition: the broker kept per-key order.
    by_key: dict[bytes | None, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())


def test_aborted_transaction_invisible_to_read_committed(
    kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    topic = new_topic(partitions=2)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_name("txn")}
    )
    producer.init_transactions(30)

    def transaction(prefix: str, n: int, *, commit: bool) -> list[bytes]:
        values = [f"{prefix}-{i}".encode() for i in range(n)]
        producer.begin_transaction()
        for i, value in enumerate(values):
            producer.produce(topic, value=value, partition=i % 2)
            producer.poll(0)
        if commit:
            producer.commit_transaction(30)
        else:
            # Flush first so the records really sit in the log before the abort marker.
            assert producer.flush(30) == 0
            producer.abort_transaction(30)
        return values

    committed = transaction("committed", 50, commit=True)
    aborted = transaction("aborted", 40, commit=False)
    # A committed transaction after the aborted one: once a reader has it, the abort
    # markers before it are settled, so "aborted absent" is a fact, not a race.
    sentinel = transaction("sentinel", 10, commit=True)
    want_committed = set(committed) | set(sentinel)

    read_committed = consume_until(
        kafka_bootstrap,
        [topic],
        until=lambda rs: set(sentinel) <= {r.value for r in rs},
        to_end=True,
        isolation_level="read_committed",
    )
    assert sorted(_values(read_committed)) == sorted(want_committed)

    read_uncommitted = consume_until(
        kafka_bootstrap,
        [topic],
        count=len(want_committed) + len(aborted),
        to_end=True,
        isolation_level="read_uncommitted",
    )
    assert sorted(_values(read_uncommitted)) == sorted(want_committed | set(aborted))
