"""The librdkafka configurations of the processor's three clients, and error helpers.

The runner owns every setting exactly-once depends on; the ``[kafka.librdkafka]``,
``[kafka.consumer]`` and ``[kafka.producer]`` pass-through tables add to them (security,
SASL, TLS, tuning) but cannot override them (service.config refuses those keys).

Consumer: ``enable.auto.commit=false`` (offsets are committed only inside the output
transaction), ``isolation.level=read_committed`` (never read an aborted upstream write),
``partition.assignment.strategy=cooperative-sticky``: a rebalance moves only the partitions
that change owner, the others keep streaming; and because the rebalance callbacks run
inside ``consume()``, which the runner calls only between transactions, no transaction is
ever open when partitions are revoked.

Producer: ``transactional.id = <prefix>-<instance id>`` when ``kafka.instance_id`` is set
(stable: a restarted replica aborts its predecessor's open transaction at once), else
``<prefix>-<host>-<pid>-<random>``. A random id is safe: since KIP-447 a zombie is fenced by
the consumer-group generation sent with ``send_offsets_to_transaction``, not by sharing a
transactional.id; its only cost is that a killed process's open transaction blocks
read_committed readers of the output partitions until ``transaction.timeout.ms``.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from service.config import Settings, plain_conf

_LIBRDKAFKA_LOG = logging.getLogger("cdranon.librdkafka")


def transactional_id(settings: Settings) -> str:
    """The producer's transactional.id (see the module docstring)."""
    k = settings.kafka
    if k.instance_id:
        return f"{k.transactional_id_prefix}-{k.instance_id}"
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"{k.transactional_id_prefix}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _common(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "logger": _LIBRDKAFKA_LOG,
    }
    conf.update(plain_conf(settings.kafka.librdkafka))
    return conf


def consumer_config(
    settings: Settings,
    *,
    stats_cb: Callable[[str], None] | None = None,
    error_cb: Callable[[KafkaError], None] | None = None,
) -> dict[str, Any]:
    """Configuration of the input consumer."""
    k = settings.kafka
    conf = _common(settings)
    conf.update(
        {
            "session.timeout.ms": k.session_timeout_ms,
            # A batch of max_records is fetched at once; let librdkafka prefetch about one.
            "queued.max.messages.kbytes": 65536,
        }
    )
    conf.update(plain_conf(k.consumer))
    conf.update(
        {
            "group.id": k.group_id,
            # Not overridable: a partition without a committed offset must be read from
            # its start ("latest" would skip CDRs), and the runner's rewind relies on it.
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.partition.eof": False,
        }
    )
    if k.instance_id:
        conf["group.instance.id"] = k.instance_id
    if stats_cb is not None and k.statistics_interval_ms > 0:
        conf["statistics.interval.ms"] = k.statistics_interval_ms
        conf["stats_cb"] = stats_cb
    if error_cb is not None:
        conf["error_cb"] = error_cb
    return conf


def producer_config(
    settings: Settings,
    txn_id: str,
    *,
    error_cb: Callable[[KafkaError], None] | None = None,
) -> dict[str, Any]:
    """Configuration of the transactional output producer."""
    k = settings.kafka
    conf = _common(settings)
    conf.update(
        {
            # Java-compatible key hashing: an account lands on the same partition number
            # whichever client writes it.
            "partitioner": "murmur2_random",
            "linger.ms": 10,
            # Two outputs per input record; keep a whole batch in the queue.
            "queue.buffering.max.messages": max(100_000, 3 * settings.batch.max_records),
        }
    )
    conf.update(plain_conf(k.producer))
    conf.update(
        {
            "transactional.id": txn_id,
            "enable.idempotence": True,
            "transaction.timeout.ms": k.transaction_timeout_ms,
        }
    )
    if error_cb is not None:
        conf["error_cb"] = error_cb
    return conf


def admin_config(settings: Settings) -> dict[str, Any]:
    """Configuration of the admin client (topic creation)."""
    return _common(settings)


# Errors that pass: the broker or its controller cannot be reached now. Errors built
# from a bare error code (admin futures, get_watermark_offsets, list_topics) never carry
# librdkafka's retriable flag, so the codes are named here.
_PASSING = (
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._TIMED_OUT_QUEUE,
    KafkaError._RESOLVE,
    KafkaError._WAIT_COORD,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NOT_CONTROLLER,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
)


def passes(err: KafkaError) -> bool:
    """True if retrying later can cure ``err`` (a broker away, a leader moving); False for
    what needs an operator (not authorised, invalid configuration) or is fatal."""
    return not err.fatal() and (err.retriable() or err.code() in _PASSING)


def kafka_error(exc: KafkaException) -> KafkaError:
    """The KafkaError carried by a KafkaException (its first argument)."""
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, KafkaError):
        return arg
    return KafkaError(KafkaError._FAIL, str(arg))
