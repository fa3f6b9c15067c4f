"""The processor's in-transaction audit chain when a transaction's outcome was unknown.

A stuck producer is replaced by a new one with the same transactional.id; if the stuck
transaction's commit was already prepared, the coordinator completes it, so its
``integrity.root`` events are part of the chain although the runner never saw the commit
return. The runner then re-reads the chain head from the audit topic
(``Runner._resync_chain``); continuing from its own last known head would reuse the
committed events' sequence numbers and fork the chain.

Reading that head can meet an audit topic the broker does not serve right now: the runner
then waits and retries, as for any broker outage. A damaged chain is never waited for.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from service.audit import event_hash, read_partition
from service.commands.run import build_runner
from service.errors import AuditError, AuditUnavailableError
from service.kafka.clients import admin_config
from service.metrics import Metrics
from tests.integration.run_support import runner_settings

pytestmark = pytest.mark.integration

_ROOT = {"stream": "s", "batch": "b", "size": 1, "root": "ab" * 32}


def _write(producer: Producer, topic: str, raw: bytes) -> None:
    """One audit event in its own committed transaction (as the runner writes them)."""
    producer.begin_transaction()
    producer.produce(topic, raw)
    producer.commit_transaction(30)


def _retries(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("cdranon_retries_total", {"reason": "broker"})
    return value or 0.0


def _wait_for(what: str, cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(0.05)  # polling another thread's progress, deadline-bounded


def test_chain_continues_from_a_commit_the_runner_did_not_see(
    kafka_bootstrap: str, tmp_path: Path, unique_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = runner_settings(
        kafka_bootstrap, tmp_path, f"chain-{unique_id}", monkeypatch, signing_key=True
    )
    runner = build_runner(settings, Metrics())
    try:
        runner._init_transactions()
        runner._init_integrity()
        chain = runner._chain
        assert chain is not None
        producer = runner._producer

        def write(raw: bytes) -> None:
            _write(producer, runner.audit_topic, raw)

        write(chain.event("integrity.root", actor="processor", **_ROOT))
        chain.committed()
        # This commit's return is never seen by the chain (the stuck producer's case).
        unseen = chain.event("integrity.root", actor="processor", **_ROOT)
        write(unseen)
        # The runner used to treat it as aborted: the chain's memory says seq 1 again.
        chain.aborted()
        assert orjson.loads(chain.event("integrity.root", actor="processor", **_ROOT))["seq"] == 2
        chain.aborted()

        runner._resync_chain()
        after = runner._chain
        assert after is not None
        nxt = after.event("integrity.root", actor="processor", **_ROOT)
        write(nxt)
        after.committed()

        mine = [
            orjson.loads(v)
            for _, v in read_partition(admin_config(settings), runner.audit_topic, 0, None)
            if v is not None and orjson.loads(v)["writer"] == chain.writer
        ]
        assert [e["seq"] for e in mine] == [1, 2, 3]
        assert orjson.loads(nxt)["prev"] == event_hash(unseen)
    finally:
        runner._close()


class _Gate:
    """A TCP port in front of the broker: forwards while open, refuses connections while shut.

    Clients bootstrap through it. While it is shut a new client meets what it meets when
    the broker is down (connection refused, then "all broker connections are down"); once
    open, the client learns the broker's own address from the metadata and goes on there.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """The bootstrap address to give clients."""
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        """Accept and forward connections (again)."""
        if self._listener is not None:
            return
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        ls.settimeout(0.1)  # so the accept loop sees shut() soon
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def shut(self) -> None:
        """Refuse new connections and cut the forwarded ones."""
        ls, self._listener = self._listener, None
        if ls is not None:
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, ls: socket.socket) -> None:
        while self._listener is ls:
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # shut
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def gate(kafka_bootstrap: str) -> Iterator[_Gate]:
    """A gate in front of the session broker, open."""
    g = _Gate(kafka_bootstrap)
    g.open()
    try:
        yield g
    finally:
        g.shut()


def test_the_chain_head_is_waited_for_while_the_audit_topic_is_unreachable(
    gate: _Gate,
    tmp_path: Path,
    unique_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Start-up and the resync after a stuck producer wait for the audit topic, then read
    the right head; while stopping, they give up instead.

    The runner's clients bootstrap through a gate (a TCP forwarder) in front of the session
    broker rather than a broker of the test's own that is stopped and restarted: shutting
    the gate is what a stopped broker is to a new client (connection refused, all brokers
    down), and each read of the head opens new clients, so the gate decides whether it
    reaches the broker; no Kafka call is faked. Stopping and restarting a broker would cost
    two JVM starts and test nothing more of the retry. Each read is given 2 s instead of
    30 s so that a failed attempt comes round quickly.
    """
    settings = runner_settings(
        gate.address, tmp_path, f"chain-{unique_id}", monkeypatch, signing_key=True
    )
    metrics = Metrics()
    runner = build_runner(settings, metrics)
    runner._audit_timeout_s = 2.0
    caplog.set_level(logging.WARNING, logger="cdranon.runner")
    try:
        with ThreadPoolExecutor(1) as pool:
            runner._init_transactions()  # the producer now talks to the broker directly

            # Start-up with the broker away: waited for, not the end of the run.
            gate.shut()
            job = pool.submit(runner._init_integrity)
            _wait_for(
                "a retry of the start-up read", lambda: _retries(metrics) >= 1 or job.done(), 60
            )
            assert not job.done(), job.exception()
            gate.open()
            job.result(timeout=120)
            chain = runner._chain
            assert chain is not None

            _write(
                runner._producer,
                runner.audit_topic,
                chain.event("integrity.root", actor="processor", **_ROOT),
            )
            chain.committed()
            unseen = chain.event("integrity.root", actor="processor", **_ROOT)
            _write(runner._producer, runner.audit_topic, unseen)
            chain.aborted()  # as after a stuck producer: its commit's outcome is unknown

            # The resync after replacing a stuck producer, with the broker away.
            before = _retries(metrics)
            gate.shut()
            job = pool.submit(lambda: runner._retry_kafka("audit_head", runner._resync_chain))
            _wait_for("a retry of the resync", lambda: _retries(metrics) > before or job.done(), 60)
            assert not job.done(), job.exception()
            paused = metrics.registry.get_sample_value("cdranon_paused", {"reason": "broker"})
            assert paused == 1
            gate.open()
            job.result(timeout=120)
            assert metrics.registry.get_sample_value("cdranon_paused", {"reason": "broker"}) == 0

        after = runner._chain
        assert after is not None
        nxt = orjson.loads(after.event("integrity.root", actor="processor", **_ROOT))
        assert nxt["seq"] == 3
        assert nxt["prev"] == event_hash(unseen)
        waits = [
            r.__dict__["cdranon_fields"]
            for r in caplog.records
            if r.getMessage() == "broker_unavailable"
        ]
        assert waits
        assert {w["during"] for w in waits} == {"audit_head"}

        # Stopping: the read fails once and the error ends the wait.
        gate.shut()
        runner.request_stop()
        with pytest.raises(AuditUnavailableError, match=re.escape(runner.audit_topic)):
            runner._retry_kafka("audit_head", runner._resync_chain)
    finally:
        gate.open()
        runner._close()


def test_a_damaged_chain_is_never_retried(
    kafka_bootstrap: str,
    tmp_path: Path,
    unique_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = runner_settings(
        kafka_bootstrap, tmp_path, f"chain-{unique_id}", monkeypatch, signing_key=True
    )
    metrics = Metrics()
    runner = build_runner(settings, metrics)
    caplog.set_level(logging.WARNING, logger="cdranon.runner")
    try:
        runner._init_transactions()
        runner._init_integrity()
        chain = runner._chain
        assert chain is not None
        # The writer's newest event ends with its writer field but is not a whole event.
        torn = b'{"seq":"torn","writer":' + orjson.dumps(chain.writer) + b"}"
        _write(runner._producer, runner.audit_topic, torn)

        steps: list[Callable[[], None]] = [
            lambda: runner._retry_kafka("audit_head", runner._resync_chain),  # stuck producer
            runner._init_integrity,  # start-up
        ]
        for step in steps:
            with pytest.raises(AuditError, match="damaged event of writer") as exc:
                step()
            assert not isinstance(exc.value, AuditUnavailableError)
        assert _retries(metrics) == 0
        assert not [r for r in caplog.records if r.getMessage() == "broker_unavailable"]
    finally:
        runner._close()
