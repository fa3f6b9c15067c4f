"""Scenario 5: backpressure. The processor's producer queue is made small (500 messages;
a batch makes ~2,000), and the test's own broker is frozen (SIGSTOP: connections stay
open, nothing is answered) until the queue is full: the processor waits with
``cdranon_paused{reason="producer_queue"} 1``, drops nothing, and resumes when the broker
is thawed. Frozen again, the processor gets SIGTERM while it waits: once the broker is back
it finishes or aborts the batch and exits 0. A last processor finishes the stream: every
input exactly once, so no offset was ever committed for output that was not written.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from service.generator import generate_cdrs
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.months import now_utc
from tests.integration.kafka_helpers import create_topics
from tests.integration.run_support import (
    Processor,
    check_invariants,
    committed_total,
    join_sent,
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.streams import exactly_once, explain_duplicates
from tests.reliability.support import DedicatedBroker, free_port, wait_until

N = 60_000
EXTRA = 5_000  # written just before the last freeze, so that processor has work in flight
PAUSED = b'cdranon_paused{reason="producer_queue"} 1.0'


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DedicatedBroker]:
    """A broker of this test's own."""
    # Its controller would fence it after a freeze longer than its session (9 s), and a
    # fenced single node has no partition leaders: the transaction coordinator then drops
    # commit markers (Kafka; docs/reliability.md, scenario 2). The freezes here are <= 15 s.
    b = DedicatedBroker(tmp_path / "broker", extra_props="broker.session.timeout.ms=30000\n")
    b.format()
    b.start()
    try:
        yield b
    finally:
        b.close()


def _metrics(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
        return body


@pytest.mark.slow
def test_full_producer_queue_pauses_and_sigterm_never_commits_unwritten_output(
    broker: DedicatedBroker, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    prefix, group = "bp", "g-bp"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    values = list(generate_cdrs(N + EXTRA, months=recent_months(2), seed=19, now=now_utc()))
    sent = produce_input(bootstrap, names.raw, values[:N])
    keys = tmp_path / "keys"
    port = free_port()
    env = {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(tmp_path / "home")}
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=1000,
        metrics_port=port,
        extra="[kafka.producer]\nqueue_buffering_max_messages = 500\n",
    )
    proc = Processor(cfg, env, name="bp")
    frozen = False
    try:
        proc.wait_for("batch_committed", 2, timeout_s=90)
        before = committed_total(bootstrap, group, names.raw)[0]

        def freeze_until_queue_full() -> bool:
            """Freeze the broker until the queue is full (True), or give up after tries:
            a freeze that lands in the commit is undone and tried again."""
            nonlocal frozen
            for _ in range(10):
                broker.freeze()
                frozen = True
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    if PAUSED in _metrics(port):
                        return True
                    time.sleep(0.1)  # polling /metrics, deadline-bounded
                broker.thaw()
                frozen = False
                proc.wait_for("batch_committed", proc.count("batch_committed") + 1, timeout_s=60)
            return False

        assert freeze_until_queue_full(), "never caught the producer queue full"
        time.sleep(3)  # hold the broker frozen a little longer (the pause must persist)
        assert PAUSED in _metrics(port)
        assert proc.proc.poll() is None
        broker.thaw()
        frozen = False
        wait_until(
            "progress after the thaw",
            lambda: committed_total(bootstrap, group, names.raw)[0] > before + 2000,
            timeout_s=90,
        )
        wait_until("pause cleared", lambda: PAUSED not in _metrics(port), timeout_s=30)
        # Again, and SIGTERM while the queue is full.
        queue_full_at_sigterm = freeze_until_queue_full()
        if not frozen:
            broker.freeze()
            frozen = True
        proc.proc.send_signal(15)
        time.sleep(2)  # the stop request is pending while the broker is away
        broker.thaw()
        frozen = False
        try:
            rc = proc.proc.wait(90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 90 s after SIGTERM; {proc.summary()}") from None
        assert rc == 0, proc.raw[-5:]
    finally:
        if frozen:
            broker.thaw()
        proc.close()
    assert proc.count("runner_stopped") == 1
    stopped_at, high = committed_total(bootstrap, group, names.raw)
    assert stopped_at < high, "the stream finished before the SIGTERM; make it longer"

    # SIGTERM while the broker stays away: the exit is bounded by batch.stop_grace_s (3 s
    # here) plus the bounded consumer close, never a hang; nothing is committed meanwhile.
    stuck = Processor(cfg, {**env, "CDRANON_BATCH__STOP_GRACE_S": "3"}, name="stuck")
    try:
        stuck.wait_for("batch_committed", 1, timeout_s=90)
        sent = join_sent(sent, produce_input(bootstrap, names.raw, values[N:]))
        broker.freeze()
        frozen = True
        stuck.proc.send_signal(15)
        t0 = time.monotonic()
        try:
            rc = stuck.proc.wait(45)
        except subprocess.TimeoutExpired:
            msg = f"no exit 45 s after SIGTERM, broker away; {stuck.summary()}"
            raise AssertionError(msg) from None
        took = time.monotonic() - t0
        assert rc == 0, stuck.raw[-5:]
        assert stuck.count("runner_stopped") == 1, stuck.raw[-5:]
        gave_up = stuck.count("stop_grace_expired") + stuck.count("consumer_close_timed_out")
        assert gave_up >= 1, stuck.raw[-8:]
    finally:
        if frozen:
            broker.thaw()
            frozen = False
        stuck.close()
    final = Processor(cfg, env, name="final")
    try:
        try:
            wait_all_committed(bootstrap, group, names.raw, timeout_s=180)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; {final.summary()}; {stuck.summary()}\n"
                f"{proc.story()}\n{stuck.story()}\n{final.story()}\n"
                f"broker skipped transaction markers: {broker.skipped_txn_markers()}"
            ) from None
        assert final.terminate() == 0, final.raw[-5:]
    finally:
        final.close()
    # Every commit's markers written by the broker (see the restart test).
    assert broker.skipped_txn_markers() == [], broker.skipped_txn_markers()
    out = read_outputs(bootstrap, prefix, len(sent.values))
    lost_dup = exactly_once(sent, out)
    assert lost_dup == (0, 0), (
        f"lost, duplicated {lost_dup}\n{explain_duplicates(sent, out)}\n"
        f"{proc.story()}\n{stuck.story()}\n{final.story()}"
    )
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == len(sent.values)
    print(
        f"backpressure: SIGTERM at {stopped_at}/{high} (queue full then: "
        f"{queue_full_at_sigterm}); with the broker away the exit took {took:.1f} s; "
        "0 lost, 0 duplicated"
    )
