"""The consume-transform-produce loop of ``cdranon run``: exactly once, with Kafka transactions.

One iteration, one transaction (the order matters):

1. ``consume(max_records, max_wait)``: a batch closes at the count or the time limit.
   Rebalance callbacks run only here, between transactions, so no transaction is ever
   open when partitions are revoked, and nothing from a revoked partition is produced
   after its revocation.
2. ``transform`` (pure, no I/O). KeystoreUnavailableError: nothing is written; the
   assigned partitions are paused, the batch is held and retried with exponential
   back-off while ``consume`` keeps the group membership alive (records of partitions
   revoked meanwhile are dropped from the held batch: their new owner reads them).
3. Output topics of the batch's months are made to exist (idempotent, cached).
4. ``begin_transaction``; ``produce`` every sealed, sanitised and rejected record
   (``BufferError``: serve delivery reports and retry, never drop; ``poll(0)`` served);
   ``send_offsets_to_transaction`` with the input offsets + 1 and fresh consumer group
   metadata (KIP-447: a zombie of an older generation is fenced by the broker);
   ``commit_transaction``.
5. Errors: *retriable* (commit timed out) -> retry the same call; *abortable*
   (``txn_requires_abort``) -> ``abort_transaction`` and rewind the consumer to the
   committed offsets, so the batch is read and transformed again; *fatal* (fenced,
   unrecoverable) -> KafkaFatalError: the process exits non-zero, with nothing partial
   committed (an open transaction is aborted by the broker).

Pipelining (``batch.pipeline``, on by default): step 4's ``send_offsets_to_transaction``
and ``commit_transaction`` (network round trips, ~80 ms per batch here) run on a helper
thread while the main thread consumes and transforms the next batch (pure CPU). The next
transaction begins only after that commit has finished; if it failed, it is aborted and
both batches are rewound. Rebalance callbacks first wait for an in-flight commit, so a
transaction is still never open when partitions are given up.

Shutdown (``request_stop``, called from SIGTERM/SIGINT): the current batch is finished (or,
if it cannot be, abandoned uncommitted), the consumer leaves the group, the run returns.
While Kafka does not answer, finishing is bounded by ``batch.stop_grace_s``: past it the run
returns without committing (``clean_exit`` False); the broker aborts the open transaction
and the batch's offsets stay uncommitted, so exactly-once holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import sha256

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from service.audit import default_audit_dir, ensure_audit_topic, load_signing_key
from service.config import Settings
from service.errors import (
    AuditError,
    AuditUnavailableError,
    KafkaFatalError,
    KeystoreUnavailableError,
)
from service.kafka.audit_txn import TxnAuditChain, find_head
from service.kafka.clients import (
    admin_config,
    consumer_config,
    kafka_error,
    passes,
    producer_config,
    transactional_id,
)
from service.kafka.topics import TopicNames, topic_manager
from service.logs import log_event
from service.merkle import root_of_leaf_buffer
from service.metrics import Metrics
from service.months import now_utc, to_ms
from service.outputs import BatchResult, OutRecord
from service.transform import Transformer

_LOG = logging.getLogger("cdranon.runner")
_TXN_TIMEOUT_S = 30.0
# A transaction call still blocked this long after it started is stuck (see _Background).
_STUCK_S = _TXN_TIMEOUT_S + 15.0
# One attempt to read the audit chain's head; past it the topic counts as unavailable and
# the read is retried with the broker back-off (AuditUnavailableError).
_AUDIT_READ_TIMEOUT_S = 30.0
# How long closing the consumer (leaving the group) may take at exit.
_CLOSE_WAIT_S = 10.0
# Months ahead are re-checked this often, so next month's topics exist before it starts.
_PRECREATE_EVERY_S = 600.0
_PRECREATE_RETRY_S = 30.0
_STOP_CHECK_S = 0.1  # how soon a back-off notices a stop request
# End-to-end latency is sampled (a histogram observation costs ~1 us; 10k per batch would
# be a tenth of the budget): at most this many records per batch, spread evenly.
_LATENCY_SAMPLES = 32
_POLL_EVERY = 1024
# Client errors that retrying cannot cure: the processor stops (fails closed) with them.
_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})
_FENCING = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
_DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes default
_REJECTED_ROOM = 64 * 1024  # for the key, the headers and the record overhead

TP = tuple[str, int]


@dataclass(slots=True)
class RunStats:
    """What one run did (for tests, the demo and the final log line)."""

    batches: int = 0
    consumed: int = 0
    sealed: int = 0
    sanitised: int = 0
    rejected: int = 0
    stripped: int = 0
    aborted: int = 0


class _StopGraceExpiredError(Exception):
    """Stop was requested and ``batch.stop_grace_s`` passed while Kafka did not answer."""


class Runner:
    """One processor instance: a consumer-group member with a transactional producer."""

    def __init__(
        self,
        settings: Settings,
        transformer: Transformer,
        metrics: Metrics,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._s = settings
        self._t = transformer
        self._m = metrics
        self._clock_ms = clock_ms or (lambda: to_ms(now_utc()))
        self.input_topic = settings.kafka.input_topic_name
        self.names = TopicNames(settings.kafka.topic_prefix)
        self.txn_id = transactional_id(settings)
        self.stats = RunStats()
        self._stop = False
        self._stop_at: float | None = None
        self._stop_grace_s = settings.batch.stop_grace_s
        # False when the run gave up on Kafka at stop (a call may still be blocked on a
        # helper thread): the caller should then exit without destroying the clients.
        self.clean_exit = True
        self._assigned: set[TP] = set()
        self._paused: str | None = None
        self._in_txn = False
        self._fatal: KafkaError | None = None
        self._last_precreate = 0.0
        self._sealed_topic: dict[str, str] = {}
        self._sanitised_topic: dict[str, str] = {}
        self._consumer = Consumer(
            consumer_config(settings, stats_cb=self._on_stats, error_cb=self._on_error)
        )
        pconf = producer_config(settings, self.txn_id, error_cb=self._on_error)
        self._queue_max = int(pconf["queue.buffering.max.messages"])
        # A rejected input is copied to cdr.rejected byte for byte, unless the copy could not
        # be produced (larger than the producer's message.max.bytes, less room for key and
        # headers): then it would abort every retry of its batch and wedge the partition.
        # Such a copy carries the headers, the size and the SHA-256 of the input instead.
        self._rejected_value_max = (
            int(pconf.get("message.max.bytes", _DEFAULT_MESSAGE_MAX_BYTES)) - _REJECTED_ROOM
        )
        self._producer = Producer(pconf)
        self._admin = AdminClient(admin_config(settings))
        self.topics = topic_manager(
            settings, transformer, self._admin, on_created=self._on_topic_created
        )
        # "Original form": one signed root per batch and month topic, in the transaction.
        self._integrity = settings.integrity.enabled and transformer.integrity
        self.audit_topic = settings.integrity.audit_topic or self.names.audit
        self._chain: TxnAuditChain | None = None
        self._audit_timeout_s = _AUDIT_READ_TIMEOUT_S
        # Leaves are tagged "<batch id>/<index>"; a batch id is unique across processes and
        # restarts (random per process + a counter), so a root names exactly its records
        # even when several processors write into one partition.
        # Letters around the random hex and the counter: an id with a long digit run (the
        # hex can be all digits) would look like a phone number to the audit log's guard.
        self._leaf_prefix = "b" + secrets.token_hex(6)
        self._batch_seq = 0
        # The batch whose transaction is committing on the helper thread (see the docstring).
        self._pipeline = settings.batch.pipeline
        self._pending: tuple[list[Message], BatchResult, float, _Background] | None = None
        # Watchdog of the blocking transaction calls (send_offsets, commit): when one of them
        # has not returned long after its own timeout (librdkafka can lose its group
        # coordinator across a broker restart and then wait for ever, librdkafka issues
        # 5456/5511), the producer is replaced: a new one with the same transactional.id
        # fences the stuck one and aborts its transaction, and the batch is read again.
        self._pconf = pconf
        self._blocking_since: float | None = None
        self._abandoned: list[Producer] = []

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to finish the current batch and return (signal-safe)."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stop = True

    def _check_stop_grace(self, during: str) -> None:
        """Raise _StopGraceExpiredError if stopping and the grace is over (called in waits)."""
        at = self._stop_at
        if at is not None and time.monotonic() - at > self._stop_grace_s:
            raise _StopGraceExpiredError(during)

    def run(self, *, until: Callable[[RunStats], bool] | None = None) -> RunStats:
        """Process until ``request_stop`` (or ``until(stats)`` is true); returns the stats.

        Raises KafkaFatalError on a fatal Kafka error (after closing what can be closed).
        """
        log_event(
            _LOG,
            "runner_starting",
            input_topic=self.input_topic,
            group_id=self._s.kafka.group_id,
            transactional_id=self.txn_id,
            max_records=self._s.batch.max_records,
            max_wait_ms=self._s.batch.max_wait_ms,
        )
        try:
            self._retry_kafka("init_transactions", self._init_transactions)
            self._init_integrity()
            self._retry_kafka("create_topics", self._precreate)
            self._consumer.subscribe(
                [self.input_topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            max_records = self._s.batch.max_records
            wait_s = self._s.batch.max_wait_ms / 1000
            consume = self._consumer.consume
            try:
                while not self._stop and not (until is not None and until(self.stats)):
                    self._check_fatal()
                    if time.monotonic() - self._last_precreate > _PRECREATE_EVERY_S:
                        self._precreate_in_passing()
                    msgs = consume(max_records, wait_s)
                    batch = self._records(msgs) if msgs else []
                    if batch:
                        self._process(batch)
                    else:
                        self._finish_pending()  # idle: make the last batch visible now
                    self._producer.poll(0)
                self._finish_pending()
            except _StopGraceExpiredError as exc:
                self._give_up(str(exc))
        finally:
            self._close()
        log_event(_LOG, "runner_stopped", **_stats_fields(self.stats))
        return self.stats

    def _init_integrity(self) -> None:
        """Open the in-transaction audit chain (after init_transactions: the previous
        incarnation's open transaction is aborted by then, so the head is the committed one).

        An audit topic that cannot be read yet is waited for, like the broker at
        init_transactions; a damaged chain ends the run (AuditError).
        """
        if not self._integrity:
            return
        a = self._s.audit
        key = load_signing_key(
            env=os.environ,
            text=a.signing_key.get_secret_value() if a.signing_key else None,
            key_file=a.signing_key_file,
            dev_dir=default_audit_dir(os.environ),
        )
        conf = admin_config(self._s)
        writer = f"processor/{self.txn_id}"
        timeout_s = self._audit_timeout_s

        def open_chain() -> None:
            ensure_audit_topic(conf, self.audit_topic, timeout_s=timeout_s)
            head = find_head(conf, self.audit_topic, writer, timeout_s=timeout_s)
            self._chain = TxnAuditChain(key, writer, head)

        self._retry_kafka("audit_head", open_chain)

    def _init_transactions(self) -> None:
        self._producer.init_transactions(_TXN_TIMEOUT_S)

    def _precreate(self) -> None:
        self._last_precreate = time.monotonic()
        months = self.topics.precreate(self._s.topics.precreate_months_ahead)
        log_event(_LOG, "topics_ready", months=months, level=logging.DEBUG)

    def _precreate_in_passing(self) -> None:
        """The periodic pre-creation of the coming months' topics, best effort: one try; if
        the broker does not answer, another in _PRECREATE_RETRY_S. Waiting here would stop
        polling the consumer (the group drops a member after max.poll.interval.ms), and
        nothing depends on it: a record of a month whose topics are missing creates them
        in _write."""
        try:
            self._precreate()
        except KafkaException as exc:
            err = kafka_error(exc)
            if not passes(err):
                raise _fatal_error(err, "create_topics") from None
            log_event(
                _LOG,
                "broker_unavailable",
                level=logging.WARNING,
                during="precreate",
                code=err.name(),
                error=err.str(),
                retry_in_s=_PRECREATE_RETRY_S,
            )
            self._last_precreate = time.monotonic() - _PRECREATE_EVERY_S + _PRECREATE_RETRY_S

    def _give_up(self, during: str) -> None:
        """Stop grace over: leave the open transaction to the broker's timeout (it aborts;
        the offsets stay uncommitted) and skip every call that waits for Kafka."""
        log_event(
            _LOG,
            "stop_grace_expired",
            level=logging.WARNING,
            during=during,
            grace_s=self._stop_grace_s,
            open_transaction=self._in_txn or self._pending is not None,
        )
        self.clean_exit = False
        self._pending = None
        self._in_txn = False

    def _close(self) -> None:
        if not self.clean_exit:
            # Kafka did not answer within the grace: a bounded leave (on a helper thread:
            # close() can wait for an unreachable coordinator) and no flush, since the open
            # transaction's messages are aborted anyway.
            _Background(self._consumer.close).done.wait(_CLOSE_WAIT_S)
            return
        try:
            if self._pending is not None:
                try:
                    self._finish_pending()
                except (KafkaFatalError, AuditError) as exc:
                    # AuditError: the chain head could not be re-read after a stuck producer
                    # was replaced; the close goes on (the error is in the log).
                    log_event(_LOG, "commit_failed_at_close", level=logging.ERROR, error=str(exc))
            if self._in_txn:
                self._abort_quietly()
        except _StopGraceExpiredError as exc:
            self._give_up(str(exc))
            _Background(self._consumer.close).done.wait(_CLOSE_WAIT_S)
            return
        if self._abandoned:
            # A replaced producer's call may still be blocked on its helper thread:
            # destroying it at interpreter exit could wait for ever.
            self.clean_exit = False
        # Leaving the group needs the coordinator: bounded, so an unreachable broker cannot
        # hold the exit (the group then notices the departure by the session timeout).
        closing = _Background(self._consumer.close)
        if not closing.done.wait(_CLOSE_WAIT_S):
            log_event(_LOG, "consumer_close_timed_out", level=logging.WARNING, wait_s=_CLOSE_WAIT_S)
            self.clean_exit = False
            return
        if isinstance(closing.error, (KafkaException, RuntimeError)):
            log_event(
                _LOG, "consumer_close_failed", level=logging.WARNING, error=str(closing.error)
            )
        elif closing.error is not None:
            raise closing.error
        try:
            remaining = self._producer.flush(10)
        except KafkaException as exc:
            # A fenced or fatal producer raises here; what it held was never committed, and
            # the error that ended the run (if any) must not be replaced by this one.
            log_event(_LOG, "producer_flush_failed", level=logging.WARNING, error=str(exc))
            return
        if remaining:
            log_event(_LOG, "producer_not_drained", level=logging.WARNING, messages=remaining)

    # -- callbacks (run inside consume()/poll(), on this thread) ---------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((p.topic, p.partition) for p in partitions)
        self._m.rebalances.labels("assigned").inc()
        log_event(
            _LOG,
            "partitions_assigned",
            partitions=sorted(p.partition for p in partitions),
            assigned=len(self._assigned),
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "lost")

    def _drop(self, partitions: list[TopicPartition], kind: str) -> None:
        """Give partitions up (revoked or lost), with no transaction left open.

        consume() runs between transactions, but with pipelining the previous batch may
        still be committing on the helper thread: finish it (or abort it) first. On lost
        too: a static member that lost its partitions (session timed out while the broker
        was away) can rejoin under the same generation, and a commit still in flight could
        land after the re-assigned partitions' offsets were fetched: read twice.
        """
        self._finish_pending()
        if self._in_txn:
            self._abort_quietly()
        self._assigned.difference_update((p.topic, p.partition) for p in partitions)
        self._m.rebalances.labels(kind).inc()
        for p in partitions:
            with contextlib.suppress(KeyError):
                self._m.consumer_lag.remove(str(p.partition))
        log_event(
            _LOG,
            f"partitions_{kind}",
            partitions=sorted(p.partition for p in partitions),
            assigned=len(self._assigned),
        )

    def _on_stats(self, stats_json: str) -> None:
        self._m.update_from_stats(stats_json, self.input_topic)

    def _on_error(self, err: KafkaError) -> None:
        # Called from poll()/consume() for client-level errors; most are transient (a broker
        # connection down) and librdkafka recovers by itself.
        if (err.fatal() or err.code() in _AUTH_ERRORS) and self._fatal is None:
            # Bad credentials or an untrusted certificate do not heal by retrying: stop
            # with the reason (fail closed) instead of timing out forever.
            self._fatal = err
        log_event(
            _LOG,
            "kafka_error",
            level=logging.ERROR if err.fatal() else logging.WARNING,
            code=err.name(),
            error=err.str(),
            fatal=err.fatal(),
        )

    def _on_topic_created(self, topic: str) -> None:
        kind = topic.split(".")[-2] if topic != self.names.rejected else "rejected"
        if kind in ("sealed", "sanitised", "rejected"):
            self._m.topics_created.labels(kind).inc()

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise _fatal_error(self._fatal, "client")

    # -- one batch ----------------------------------------------------------------------

    def _records(self, msgs: list[Message]) -> list[Message]:
        """The records of a consume() result; client-level errors are logged or raised."""
        out: list[Message] = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(msg)
                continue
            # A fatal consumer error can arrive as a message with code _FATAL whose
            # fatal() is False (e.g. the static member fenced by its own rejoin).
            if err.fatal() or err.code() == KafkaError._FATAL:
                raise _fatal_error(err, "consumer")
            log_event(
                _LOG,
                "consume_error",
                level=logging.WARNING,
                code=err.name(),
                error=err.str(),
                topic=msg.topic(),
            )
        return out

    def _process(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        result: BatchResult | None = None
        delay = self._s.retry.backoff_initial_s
        # The batch's id in its records' leaves ("<batch id>/<index>", written by the
        # transform) and in its signed roots: a new one per attempt, since an aborted
        # attempt's records stay in the log (aborted, but with its tags).
        leaf_tag = None
        if self._chain is not None:
            leaf_tag = f"{self._leaf_prefix}n{self._batch_seq}".encode()
            self._batch_seq += 1
        while result is None:
            values = [m.value() or b"" for m in batch]
            t0 = time.perf_counter()
            try:
                result = self._t.transform(values, self._clock_ms(), leaf_tag)
            except KeystoreUnavailableError as exc:
                log_event(
                    _LOG,
                    "keystore_unavailable",
                    level=logging.WARNING,
                    error=str(exc),
                    retry_in_s=round(delay, 3),
                    held_records=len(batch),
                )
                self._m.retries.labels("keystore").inc()
                batch = self._pause_and_wait("keystore", delay, batch)
                delay = min(delay * 2, self._s.retry.backoff_max_s)
                if self._stop or not batch:
                    # Nothing was written; the batch is read again by whoever owns it next.
                    self._resume()
                    if batch:
                        self._rewind(batch)
                    return
                continue
            self._m.transform_duration.observe(time.perf_counter() - t0)
        self._resume()
        self._m.month_keys_cached.set(len(self._t.keyring))
        if not self._finish_pending():
            # The previous batch's transaction aborted and was rewound; this batch was read
            # after it, so it is read again too.
            self._rewind(batch)
            return
        self._write(batch, result, started)

    def _write(self, batch: list[Message], result: BatchResult, started: float) -> None:
        """Write one batch's outputs and offsets in one transaction (committed here, or on
        the helper thread when pipelining: see :meth:`_finish_pending`)."""
        self._retry_kafka(
            "create_topics",
            lambda: self.topics.ensure_months(
                {r.month for r in result.sealed}, {r.month for r in result.sanitised}
            ),
        )
        offsets: dict[TP, int] = {}
        for m in batch:
            tp = (m.topic() or "", m.partition() or 0)
            off = (m.offset() or 0) + 1
            if off > offsets.get(tp, -1):
                offsets[tp] = off
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self._producer.begin_transaction()
            self._in_txn = True
            self._produce_all(batch, result)
            group = self._consumer.consumer_group_metadata()
        except KafkaException as exc:
            self._failed(exc, batch)
            return
        # On a helper thread even without pipelining, so the watchdog can see a stuck call.
        self._pending = (batch, result, started, _Background(self._send_and_commit, tps, group))
        if not self._pipeline:
            self._finish_pending()

    def _send_and_commit(self, tps: list[TopicPartition], group: object) -> None:
        """The input offsets into the transaction, then commit (may run on the helper thread).

        A retriable error (timed out: the broker is away) is retried with the same
        arguments, as librdkafka requires: aborting instead leaves the timed-out request
        in flight, and the next transaction's send_offsets then never completes.
        """
        delay = self._s.retry.backoff_initial_s
        producer = self._producer
        while True:
            try:
                self._mark_blocking(producer, time.monotonic())
                producer.send_offsets_to_transaction(tps, group, _TXN_TIMEOUT_S)
                self._mark_blocking(producer, None)
                break
            except KafkaException as exc:
                self._mark_blocking(producer, None)
                err = kafka_error(exc)
                if not err.retriable() or err.fatal() or err.txn_requires_abort() or self._stop:
                    raise
                log_event(
                    _LOG,
                    "send_offsets_retry",
                    level=logging.WARNING,
                    code=err.name(),
                    error=err.str(),
                    retry_in_s=round(delay, 3),
                )
                self._m.retries.labels("broker").inc()
                time.sleep(delay)  # the call's outcome is pending; retry it as is
                delay = min(delay * 2, self._s.retry.backoff_max_s)
        self._commit(producer)

    def _mark_blocking(self, producer: Producer, since: float | None) -> None:
        """Start (a time) or stop (None) the watchdog's clock of a blocking transaction call;
        ignored for a replaced producer, whose call may still be running on its helper
        thread and must not stop or restart the clock of the current one."""
        if producer is self._producer:
            self._blocking_since = since

    def _finish_pending(self) -> bool:
        """Wait for the batch committing on the helper thread; True if it committed (or
        none was pending), False if it was aborted and rewound."""
        pending, self._pending = self._pending, None
        if pending is None:
            return True
        batch, result, started, job = pending
        while not job.done.wait(1.0):
            since = self._blocking_since
            if self._stop:
                self._pending = pending  # still open: _give_up accounts for it
                self._check_stop_grace("commit")
                self._pending = None
            if since is not None and time.monotonic() - since > _STUCK_S:
                self._replace_stuck_producer(batch)
                return False
        if job.error is not None:
            if isinstance(job.error, KafkaException):
                self._failed(job.error, batch)
                return False
            raise job.error
        self._account(batch, result, started)
        return True

    def _replace_stuck_producer(self, batch: list[Message]) -> None:
        """A transaction call is stuck past its timeout: fence it with a new producer."""
        log_event(
            _LOG,
            "producer_stuck",
            level=logging.ERROR,
            stuck_for_s=round(time.monotonic() - (self._blocking_since or time.monotonic()), 1),
            records=len(batch),
        )
        # Kept referenced: destroying a producer with a call in flight can block too.
        self._abandoned.append(self._producer)
        self._producer = Producer(self._pconf)
        self._blocking_since = None
        self._in_txn = False
        # init_transactions with the same transactional.id bumps the epoch: the stuck
        # producer is fenced and its open transaction aborted by the coordinator.
        self._retry_kafka("init_transactions", self._init_transactions)
        # ... unless its commit was already prepared: the coordinator completes it, and
        # then its audit events are the chain. Forgetting them (as for an abort) would
        # reuse their sequence numbers and fork the chain: read the head again instead.
        self._retry_kafka("audit_head", self._resync_chain)
        self._m.transactions.labels("aborted").inc()
        self.stats.aborted += 1
        self._rewind(batch)

    def _resync_chain(self) -> None:
        """Resume the audit chain from its newest committed event in the topic (called when
        the last transaction's outcome is unknown here, after it was settled).

        AuditUnavailableError if the topic cannot be read now (the caller retries); a plain
        AuditError if the chain is damaged (never retried, never extended).
        """
        chain = self._chain
        if chain is None:
            return
        head = find_head(
            admin_config(self._s), self.audit_topic, chain.writer, timeout_s=self._audit_timeout_s
        )
        self._chain = TxnAuditChain(chain.key, chain.writer, head)

    def _failed(self, exc: KafkaException, batch: list[Message]) -> None:
        """A transaction failed: fatal -> KafkaFatalError; otherwise abort and rewind."""
        err = kafka_error(exc)
        if err.fatal():
            raise _fatal_error(err, "producer") from None
        log_event(
            _LOG,
            "transaction_aborting",
            level=logging.WARNING,
            code=err.name(),
            error=err.str(),
            abortable=err.txn_requires_abort(),
            records=len(batch),
        )
        self._abort()
        self._rewind(batch)

    def _produce_all(self, batch: Sequence[Message], result: BatchResult) -> None:
        n = self._produce_month(result.sealed, self._sealed_topic, self.names.sealed, 0)
        n = self._produce_month(result.sanitised, self._sanitised_topic, self.names.sanitised, n)
        if self._chain is not None:
            self._produce_roots(result)
        if result.rejected:
            now_ms = self._clock_ms()
            for rej in result.rejected:
                src = batch[rej.index]
                _, src_ts = src.timestamp()
                headers: list[tuple[str, str | bytes | None]] = [
                    ("reason", rej.reason.encode()),
                    ("field", (rej.field or "").encode()),
                    ("detail", rej.message.encode()),
                    ("source_topic", (src.topic() or "").encode()),
                    ("source_partition", str(src.partition()).encode()),
                    ("source_offset", str(src.offset()).encode()),
                    ("source_timestamp", str(src_ts).encode()),
                ]
                # The original bytes, unchanged (value() as read, None for a tombstone);
                # timestamped now: retention runs from rejection, see topics.py.
                value = src.value()
                if value is not None and len(value) > self._rejected_value_max:
                    headers += [
                        ("original_bytes", str(len(value)).encode()),
                        ("original_sha256", sha256(value).hexdigest().encode()),
                        ("value_dropped", b"too_large_to_copy"),
                    ]
                    value = None
                self._produce_one(self.names.rejected, value, src.key(), now_ms, headers)
        self._producer.poll(0)

    def _produce_one(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        timestamp: int = 0,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        """One produce; a full queue is waited on (never dropped). Off the hot path."""
        try:
            self._producer.produce(topic, value, key, timestamp=timestamp, headers=headers)
        except BufferError:
            self._wait_queue()
            self._producer.produce(topic, value, key, timestamp=timestamp, headers=headers)

    def _produce_month(
        self,
        records: Sequence[OutRecord],
        topics: dict[str, str],
        name: Callable[[str], str],
        n: int,
    ) -> int:
        """Produce month records to their month's topic (``topics`` caches ``name``);
        ``n`` counts produces across calls, to serve delivery reports every _POLL_EVERY."""
        # Hot path: bound methods in locals, the produce inlined.
        produce = self._producer.produce
        poll = self._producer.poll
        for rec in records:
            topic = topics.get(rec.month)
            if topic is None:
                topic = topics[rec.month] = name(rec.month)
            try:
                produce(topic, rec.value, rec.key, timestamp=rec.timestamp_ms)
            except BufferError:
                self._wait_queue()
                produce(topic, rec.value, rec.key, timestamp=rec.timestamp_ms)
            n += 1
            if n % _POLL_EVERY == 0:
                poll(0)
        return n

    def _produce_roots(self, result: BatchResult) -> None:
        """One signed integrity.root per month topic into the audit topic, in the batch's
        transaction: the tree over the leaves the transform tagged its records with."""
        chain = self._chain
        assert chain is not None
        if result.leaf_tag is None:
            if result.sanitised:
                raise AssertionError("sanitised records without leaves, integrity on")
            return
        batch_id = result.leaf_tag.decode()
        for month, leaves in result.leaves.items():
            topic = self._sanitised_topic.get(month)
            if topic is None:
                topic = self._sanitised_topic[month] = self.names.sanitised(month)
            raw = chain.event(
                "integrity.root",
                actor="processor",
                stream=topic,
                batch=batch_id,
                size=len(leaves) // 32,
                root=root_of_leaf_buffer(leaves).hex(),
            )
            self._produce_one(self.audit_topic, raw)

    def _wait_queue(self) -> None:
        """The producer queue is full: serve delivery reports until there is room."""
        self._m.paused.labels("producer_queue").set(1)
        try:
            # Bounded by the queue draining; librdkafka fails stuck messages after
            # message.timeout.ms, which then aborts the transaction.
            while len(self._producer) >= self._queue_max:
                self._producer.poll(0.05)
                self._check_stop_grace("producer queue")
            self._producer.poll(0)
        finally:
            self._m.paused.labels("producer_queue").set(0)

    def _commit(self, producer: Producer | None = None) -> None:
        producer = producer or self._producer
        delay = self._s.retry.backoff_initial_s
        while True:
            try:
                self._mark_blocking(producer, time.monotonic())
                producer.commit_transaction(_TXN_TIMEOUT_S)
                self._mark_blocking(producer, None)
                if producer is not self._producer:
                    return  # replaced meanwhile (stuck): its outcome no longer counts
                self._in_txn = False
                if self._chain is not None:
                    self._chain.committed()
                return
            except KafkaException as exc:
                self._mark_blocking(producer, None)
                err = kafka_error(exc)
                if not err.retriable() or err.fatal() or err.txn_requires_abort():
                    raise
                log_event(
                    _LOG,
                    "commit_retry",
                    level=logging.WARNING,
                    code=err.name(),
                    error=err.str(),
                    retry_in_s=round(delay, 3),
                )
                self._m.retries.labels("broker").inc()
                self._m.paused.labels("broker").set(1)
                time.sleep(delay)  # the commit's outcome is pending; it must be retried as is
                delay = min(delay * 2, self._s.retry.backoff_max_s)
            finally:
                if not self._in_txn:
                    self._m.paused.labels("broker").set(0)

    def _abort(self) -> None:
        delay = self._s.retry.backoff_initial_s
        while True:
            try:
                self._producer.abort_transaction(_TXN_TIMEOUT_S)
                self._in_txn = False
                if self._chain is not None:
                    self._chain.aborted()
                self._m.transactions.labels("aborted").inc()
                self.stats.aborted += 1
                return
            except KafkaException as exc:
                err = kafka_error(exc)
                if err.fatal() or not err.retriable():
                    raise _fatal_error(err, "producer (abort)") from None
                self._check_stop_grace("abort")
                self._m.retries.labels("broker").inc()
                time.sleep(delay)  # abort's outcome is pending; retry it as is
                delay = min(delay * 2, self._s.retry.backoff_max_s)

    def _abort_quietly(self) -> None:
        try:
            self._abort()
        except KafkaFatalError as exc:
            log_event(_LOG, "abort_failed", level=logging.ERROR, error=str(exc))
            self._in_txn = False

    def _rewind(self, batch: Sequence[Message]) -> None:
        """Seek the batch's partitions back to their committed offsets."""
        first: dict[TP, int] = {}
        for m in batch:
            tp = (m.topic() or "", m.partition() or 0)
            off = m.offset() or 0
            if off < first.get(tp, 2**63):
                first[tp] = off
        mine = [TopicPartition(t, p) for (t, p) in first if (t, p) in self._assigned]
        if not mine:
            return
        # Only the group's committed offsets say where to resume: never a guess. After a
        # stuck producer is replaced, its transaction may have committed after all (the
        # coordinator completes a prepared commit), and with pipelining two batches are
        # rewound one after the other; guessing from a batch's own first offsets
        # duplicated a batch across a broker restart (reliability scenario 2).
        delay = self._s.retry.backoff_initial_s
        while True:
            try:
                committed = self._consumer.committed(mine, timeout=_TXN_TIMEOUT_S)
                break
            except KafkaException as exc:
                log_event(
                    _LOG,
                    "committed_unavailable",
                    level=logging.WARNING,
                    error=str(exc),
                    retry_in_s=round(delay, 3),
                )
                self._check_stop_grace("rewind")
                self._m.retries.labels("broker").inc()
                time.sleep(delay)  # the group coordinator is away; ask again
                delay = min(delay * 2, self._s.retry.backoff_max_s)
        to: dict[str, int] = {}
        for c in committed:
            # No committed offset yet: from the beginning, where a new owner would start
            # (auto.offset.reset = earliest), not from this batch (an earlier uncommitted
            # batch of the partition may have been rewound just before).
            offset = c.offset if c.offset >= 0 else OFFSET_BEGINNING
            self._consumer.seek(TopicPartition(c.topic, c.partition, offset))
            to[str(c.partition)] = offset
        log_event(_LOG, "rewound", partitions=to)

    def _pause_and_wait(self, reason: str, delay_s: float, batch: list[Message]) -> list[Message]:
        """Pause consumption for ``delay_s`` while keeping group membership; return what is
        left of ``batch`` (records of partitions revoked meanwhile are dropped)."""
        if self._paused is None:
            self._consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = reason
            self._m.paused.labels(reason).set(1)
        deadline = time.monotonic() + delay_s
        while not self._stop:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            extra = self._consumer.consume(1000, min(0.2, remaining))
            if extra:
                # Only partitions assigned during the pause deliver: put them back.
                self._rewind_messages(self._records(extra))
        return [m for m in batch if (m.topic() or "", m.partition() or 0) in self._assigned]

    def _rewind_messages(self, msgs: Sequence[Message]) -> None:
        first: dict[TP, int] = {}
        for m in msgs:
            tp = (m.topic() or "", m.partition() or 0)
            first[tp] = min(first.get(tp, 2**63), m.offset() or 0)
        for (t, p), off in first.items():
            self._consumer.seek(TopicPartition(t, p, off))
        self._consumer.pause([TopicPartition(t, p) for (t, p) in first])

    def _resume(self) -> None:
        if self._paused is not None:
            self._consumer.resume([TopicPartition(t, p) for t, p in self._assigned])
            self._m.paused.labels(self._paused).set(0)
            log_event(_LOG, "resumed", reason=self._paused)
            self._paused = None

    def _retry_kafka(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn``; on a Kafka error that passes (:func:`~service.kafka.clients.passes`:
        broker away, request timed out, leader moving), or an audit topic that cannot be read
        now (AuditUnavailableError), back off and retry, paused on 'broker'.

        Any other error ends the run: a fatal or non-retriable Kafka error as
        KafkaFatalError, a damaged audit chain (a plain AuditError) as it is. While stopping,
        the attempt's error ends the run instead of a wait for the broker: an
        AuditUnavailableError as it is, a Kafka error as a KafkaFatalError that is not
        restarted (one line on stderr, exit 2; the open batch is read again by whoever
        takes the partitions).
        """
        delay = self._s.retry.backoff_initial_s
        while True:
            try:
                fn()
                break
            except (KafkaException, AuditUnavailableError) as exc:
                if isinstance(exc, AuditUnavailableError):
                    code, text = exc.code, str(exc)
                else:
                    err = kafka_error(exc)
                    if not passes(err):
                        raise _fatal_error(err, what) from None
                    code, text = err.name(), err.str()
                log_event(
                    _LOG,
                    "broker_unavailable",
                    level=logging.WARNING,
                    during=what,
                    code=code,
                    error=text,
                    retry_in_s=round(delay, 3),
                )
                self._m.retries.labels("broker").inc()
                self._m.paused.labels("broker").set(1)
                if not self._stop:
                    # Serve the error callbacks: during a blocking call they are only
                    # queued, and they hold the real reason (e.g. authentication failed).
                    self._producer.poll(0)
                    self._check_fatal()
                    # Back-off while the broker is away, cut short by a stop request.
                    until = time.monotonic() + delay
                    while not self._stop and time.monotonic() < until:
                        time.sleep(min(_STOP_CHECK_S, max(0.0, until - time.monotonic())))
                if self._stop:
                    if isinstance(exc, AuditUnavailableError):
                        raise
                    # One clear line for the operator (cdranon: error: ...), not a
                    # traceback: the broker is away and the open batch stays uncommitted.
                    raise KafkaFatalError(
                        f"stopped while the broker was unavailable ({what}: {code}: {text}); "
                        "nothing of the open batch was committed"
                    ) from None
                delay = min(delay * 2, self._s.retry.backoff_max_s)
        self._m.paused.labels("broker").set(0)

    def _account(self, batch: Sequence[Message], result: BatchResult, started: float) -> None:
        m = self._m
        n = len(batch)
        now = time.time()
        m.transactions.labels("committed").inc()
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
        step = max(1, n // _LATENCY_SAMPLES)
        for i in range(0, n, step):
            kind, ts = batch[i].timestamp()
            if kind != 0 and ts > 0:  # 0: TIMESTAMP_NOT_AVAILABLE
                m.end_to_end_latency.observe(max(0.0, now - ts / 1000))
        m.batch_duration.observe(time.perf_counter() - started)
        s = self.stats
        s.batches += 1
        s.consumed += n
        s.sealed += len(result.sealed)
        s.sanitised += len(result.sanitised)
        s.rejected += len(result.rejected)
        s.stripped += result.stripped
        log_event(
            _LOG,
            "batch_committed",
            level=logging.DEBUG,
            records=n,
            sealed=len(result.sealed),
            sanitised=len(result.sanitised),
            rejected=len(result.rejected),
            stripped=result.stripped,
        )


class _Background:
    """A call on a daemon thread (a stuck librdkafka call must not block the exit)."""

    def __init__(self, fn: Callable[..., None], *args: object) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        threading.Thread(
            target=self._run, args=(fn, *args), daemon=True, name="cdranon-commit"
        ).start()

    def _run(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001  # handed to the waiting thread
            self.error = exc
        finally:
            self.done.set()


def _fatal_error(err: KafkaError, where: str) -> KafkaFatalError:
    hint = (
        "another processor with a newer epoch or consumer-group generation took over "
        "(fenced): this instance stops without committing"
        if err.code() in _FENCING
        else "authentication or TLS failed (wrong SASL credentials, an untrusted certificate "
        "or one for another host): nothing was read or written; fix [kafka.librdkafka] "
        "security settings"
        if err.code() in _AUTH_ERRORS
        else "nothing of the open batch was committed; check the broker and the [kafka] settings"
    )
    # Fenced or fatal client state: fresh clients (same transactional id, same group) fence
    # what is left of these and resume from the committed offsets, so exactly once holds.
    restartable = err.code() not in _AUTH_ERRORS and (
        err.fatal() or err.code() in _FENCING or err.code() == KafkaError._FATAL
    )
    return KafkaFatalError(
        f"fatal Kafka error in {where}: {err.name()}: {err.str()}; {hint}", restartable=restartable
    )


def _stats_fields(s: RunStats) -> dict[str, int]:
    return {
        "batches": s.batches,
        "consumed": s.consumed,
        "sealed": s.sealed,
        "sanitised": s.sanitised,
        "rejected": s.rejected,
        "stripped": s.stripped,
        "aborted": s.aborted,
    }
