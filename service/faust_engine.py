"""The Faust engine: the same transform as ``cdranon run``, inside a faust-streaming app.

``cdranon run --engine faust`` runs a Faust worker with one agent over the input topic
(``cdr.raw``); it writes ``cdr.sealed.YYYY-MM``, ``cdr.sanitised.YYYY-MM`` and
``cdr.rejected`` exactly as the confluent-kafka engine does (same core, same topics with
the same ``retention.ms``, same keys, timestamps and reason headers). Teams that already
run Faust workers attach the agent to their own app with :class:`Anonymiser` (see
docs/faust.md).

Processing guarantee: **at least once**. An input event is acknowledged only after every
output record of its batch has been acknowledged by the broker (the delivery futures are
awaited), and Faust commits only acknowledged offsets, after flushing its producer. So no
input is ever lost; after a crash (kill -9, a lost partition) the events read since the
last offset commit (Faust commits every ``broker_commit_interval``, 2.8 s by default) are
transformed and written again: duplicates are possible. Faust's own ``exactly_once``
guarantee is not used: it is experimental in faust-streaming, and the confluent-kafka
engine is the exactly-once one.

A delivery failure (the broker refused a record for good) ends the process at once with
exit code 70 before the batch is acknowledged: a Faust agent that raises would still have
its buffered events acknowledged by ``take_events``, which would lose them.

faust-streaming is an optional extra (``pip install 'cdranon[faust]'``); it is imported
when an engine is built, so the rest of cdranon never needs it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka.admin import AdminClient

from service.config import Settings
from service.errors import ConfigError, KeystoreUnavailableError
from service.kafka.clients import admin_config
from service.kafka.topics import TopicManager, topic_manager
from service.logs import log_event
from service.metrics import Metrics
from service.months import now_utc, to_ms
from service.outputs import BatchResult
from service.transform import Transformer

_LOG = logging.getLogger("cdranon.faust")
EXIT_DELIVERY_FAILED = 70  # EX_SOFTWARE: outputs could not be written; nothing acknowledged


def import_faust() -> Any:
    """The ``faust`` module, or ConfigError saying how to install the optional extra.

    Typed Any on purpose: faust's decorators and generics are only partly annotated, and
    this module talks to a handful of its calls, each checked by the integration test.
    """
    try:
        return importlib.import_module("faust")
    except ImportError:
        raise ConfigError(
            "the Faust engine needs faust-streaming: pip install 'cdranon[faust]' "
            "(or run with --engine confluent, the default)"
        ) from None


def broker_urls(bootstrap_servers: str) -> list[str]:
    """librdkafka's ``host:port,host:port`` as Faust's list of ``kafka://`` URLs."""
    return [f"kafka://{h.strip()}" for h in bootstrap_servers.split(",") if h.strip()]


@dataclass(slots=True)
class FaustStats:
    """What the agent did (for the final log line)."""

    batches: int = 0
    consumed: int = 0
    sealed: int = 0
    sanitised: int = 0
    rejected: int = 0
    stripped: int = 0


class Anonymiser:
    """The anonymiser as a Faust agent, attachable to any ``faust.App``.

    ``attach()`` registers one agent over ``input_topic`` on ``app``. Output topics are
    created (with their retention) through the Kafka admin API before the first record of
    a month is sent, never by Faust's auto-declare or the broker's auto-create.
    """

    def __init__(
        self,
        app: Any,
        transformer: Transformer,
        topics: TopicManager,
        *,
        input_topic: str,
        max_records: int = 10_000,
        max_wait_s: float = 0.1,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] | None = None,
        on_delivery_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.app = app
        self.transformer = transformer
        self.topics = topics
        self.names = topics.names
        self.input_topic = input_topic
        self.max_records = max_records
        self.max_wait_s = max_wait_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._m = metrics
        self._clock_ms = clock_ms or (lambda: to_ms(now_utc()))
        self._on_delivery_failure = on_delivery_failure or _exit_delivery_failed
        self._out: dict[str, Any] = {}
        self.stats = FaustStats()
        self.agent: Any = None

    def _topic(self, name: str) -> Any:
        t = self._out.get(name)
        if t is None:
            t = self._out[name] = self.app.topic(
                name, key_serializer="raw", value_serializer="raw", allow_empty=True
            )
        return t

    def attach(self) -> Any:
        """Register the agent on the app and return it."""
        source = self.app.topic(
            self.input_topic,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            allow_empty=True,
        )

        async def anonymise(stream: Any) -> AsyncIterator[None]:
            log_event(_LOG, "faust_agent_started", input_topic=self.input_topic)
            async for events in stream.take_events(self.max_records, within=self.max_wait_s):
                await self.process(events)
                yield None

        anonymise.__name__ = "cdranon_anonymise"
        self.agent = self.app.agent(source, name="cdranon-anonymise", sink=None)(anonymise)
        return self.agent

    async def _transform(self, values: list[bytes]) -> BatchResult:
        delay, delay_max = self._backoff
        while True:
            try:
                return self.transformer.transform(values, self._clock_ms())
            except KeystoreUnavailableError as exc:
                # Nothing written, nothing acknowledged: the batch waits (and with it the
                # stream: backpressure, Faust stops fetching once its buffers are full).
                log_event(
                    _LOG,
                    "keystore_unavailable",
                    level=logging.WARNING,
                    error=str(exc),
                    retry_in_s=round(delay, 3),
                    held_records=len(values),
                )
                if self._m is not None:
                    self._m.retries.labels("keystore").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, delay_max)

    async def process(self, events: Sequence[Any]) -> None:
        """Transform one batch of Faust events and write its outputs; returns once every
        output record is acknowledged by the broker (then Faust may ack the inputs)."""
        started = time.perf_counter()
        values = [e.value if e.value is not None else b"" for e in events]
        result = await self._transform(values)
        await asyncio.to_thread(
            self.topics.ensure_months,
            {r.month for r in result.sealed},
            {r.month for r in result.sanitised},
        )
        if result.rejected:
            await asyncio.to_thread(self.topics.ensure, [self.names.rejected])
        pending: list[Awaitable[Any]] = []
        add = pending.append
        names = self.names
        topic = self._topic
        for rec in result.sealed:
            # Faust takes float seconds and truncates ts * 1000: +0.5 ms survives the
            # float round trip, so the broker keeps the event time to the millisecond.
            add(
                await topic(names.sealed(rec.month)).send(
                    key=rec.key, value=rec.value, timestamp=(rec.timestamp_ms + 0.5) / 1000
                )
            )
        for rec in result.sanitised:
            add(
                await topic(names.sanitised(rec.month)).send(
                    key=rec.key, value=rec.value, timestamp=(rec.timestamp_ms + 0.5) / 1000
                )
            )
        if result.rejected:
            now_s = (self._clock_ms() + 0.5) / 1000
            rejected_topic = topic(names.rejected)
            for rej in result.rejected:
                msg = events[rej.index].message
                src_ts = round(msg.timestamp * 1000) if msg.timestamp else -1
                headers = [
                    ("reason", rej.reason.encode()),
                    ("field", (rej.field or "").encode()),
                    ("detail", rej.message.encode()),
                    ("source_topic", str(msg.topic).encode()),
                    ("source_partition", str(msg.partition).encode()),
                    ("source_offset", str(msg.offset).encode()),
                    ("source_timestamp", str(src_ts).encode()),
                ]
                # The original bytes, as read (the raw serializer passes them through).
                add(
                    await rejected_topic.send(
                        key=msg.key, value=msg.value, timestamp=now_s, headers=headers
                    )
                )
        try:
            await asyncio.gather(*pending)
        except Exception as exc:  # any delivery failure ends the process (re-raised)
            self._on_delivery_failure(exc)
            raise
        self._account(len(events), result, started)

    def _account(self, n: int, result: BatchResult, started: float) -> None:
        s = self.stats
        s.batches += 1
        s.consumed += n
        s.sealed += len(result.sealed)
        s.sanitised += len(result.sanitised)
        s.rejected += len(result.rejected)
        s.stripped += result.stripped
        m = self._m
        if m is not None:
            m.records_consumed.inc(n)
            m.batch_records.observe(n)
            m.records_produced.labels("sealed").inc(len(result.sealed))
            m.records_produced.labels("sanitised").inc(len(result.sanitised))
            m.records_produced.labels("rejected").inc(len(result.rejected))
            m.count_transform_paths(n, result.python_path)
            if result.rejected:
                m.count_rejected(r.reason for r in result.rejected)
            for reason, count in result.stripped_reasons.items():
                m.records_stripped.labels(m.reason_label(reason)).inc(count)
            m.batch_duration.observe(time.perf_counter() - started)
        log_event(
            _LOG,
            "faust_batch_written",
            level=logging.DEBUG,
            records=n,
            sealed=len(result.sealed),
            sanitised=len(result.sanitised),
            rejected=len(result.rejected),
            stripped=result.stripped,
        )


def _exit_delivery_failed(exc: BaseException) -> None:
    log_event(
        _LOG,
        "faust_delivery_failed",
        level=logging.ERROR,
        error=type(exc).__name__,
        detail=str(exc)[:200],
        exit_code=EXIT_DELIVERY_FAILED,
    )
    logging.shutdown()
    # Not sys.exit: the stream would acknowledge the batch on the way out.
    os._exit(EXIT_DELIVERY_FAILED)


def build_app(settings: Settings) -> Any:
    """A standalone ``faust.App`` configured from cdranon's settings.

    The app id is the consumer group id. Faust's web server, leader topic and topic
    auto-declaration are off: the app only reads the input topic and writes the topics
    the TopicManager created.
    """
    faust = import_faust()
    k = settings.kafka
    return faust.App(
        k.group_id,
        broker=broker_urls(k.bootstrap_servers),
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=k.session_timeout_ms / 1000,
        producer_acks=-1,
        processing_guarantee="at_least_once",
    )


def run_faust(settings: Settings, transformer: Transformer, metrics: Metrics) -> int:
    """Run a Faust worker with the anonymiser agent until SIGTERM/SIGINT; its exit code."""
    faust = import_faust()
    app = build_app(settings)
    topics = topic_manager(settings, transformer, AdminClient(admin_config(settings)))
    # Month topics ahead of time, as the confluent engine does at start.
    topics.precreate(settings.topics.precreate_months_ahead)
    anonymiser = Anonymiser(
        app,
        transformer,
        topics,
        input_topic=settings.kafka.input_topic_name,
        max_records=settings.batch.max_records,
        max_wait_s=settings.batch.max_wait_ms / 1000,
        backoff_initial_s=settings.retry.backoff_initial_s,
        backoff_max_s=settings.retry.backoff_max_s,
        metrics=metrics,
    )
    anonymiser.attach()
    log_event(
        _LOG,
        "faust_starting",
        input_topic=settings.kafka.input_topic_name,
        group_id=settings.kafka.group_id,
        guarantee="at_least_once",
    )
    # Faust's own log lines go to stderr as plain text at WARNING and above; ours stay JSON.
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    s = anonymiser.stats
    log_event(
        _LOG,
        "faust_stopped",
        exit_code=code,
        batches=s.batches,
        consumed=s.consumed,
        sealed=s.sealed,
        sanitised=s.sanitised,
        rejected=s.rejected,
        stripped=s.stripped,
    )
    return code
