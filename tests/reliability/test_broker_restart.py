"""Scenario 2: the broker restarts under a running processor, once cleanly (SIGTERM) and
once with SIGKILL, on the same port and data: the same process recovers by itself (no
process restart, no manual action; it may replace its Kafka clients) and the outputs hold
every input exactly once.

The broker is the test's own (tests/reliability/support.py: DedicatedBroker), not the
session broker that other tests share.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from service.config import load_settings
from service.generator import generate_cdrs
from service.kafka.clients import transactional_id
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.months import now_utc
from tests.integration.kafka_helpers import create_topics
from tests.integration.run_support import (
    Processor,
    check_invariants,
    committed_total,
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.streams import exactly_once, explain_duplicates, order_violations
from tests.reliability.support import DedicatedBroker, Scale, wait_until

# Coordinator states in which a transaction's markers are being written.
_COMPLETING = frozenset({"PrepareCommit", "PrepareAbort", "PrepareEpochFence"})


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DedicatedBroker]:
    """A broker of this test's own, formatted and started."""
    b = DedicatedBroker(tmp_path / "broker")
    b.format()
    b.start()
    try:
        yield b
    finally:
        b.close()


def _committed(bootstrap: str, group: str, topic: str) -> int:
    return committed_total(bootstrap, group, topic, timeout_s=60)[0]


@pytest.mark.slow
def test_processor_survives_clean_and_hard_broker_restarts(
    broker: DedicatedBroker, tmp_path: Path, scale: Scale
) -> None:
    n = scale.pick(30_000, 200_000)
    bootstrap = broker.bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    prefix = "restart"
    group = "g-restart"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    values = list(
        generate_cdrs(n, months=recent_months(2), seed=4, malformed_ratio=0.01, now=now_utc())
    )
    sent = produce_input(bootstrap, names.raw, values)
    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(tmp_path / "home")}
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=300,
        instance_id="restart-0",
    )
    proc = Processor(cfg, env, name="survivor")
    txn = transactional_id(load_settings(cfg))
    outages: list[str] = []
    try:
        for how in ("clean", "kill -9"):
            proc.wait_for("batch_committed", proc.count("batch_committed") + 2, timeout_s=120)
            before = _committed(bootstrap, group, names.raw)
            assert before < n, "the stream finished before the restart; make it longer"
            mark = len(proc.lines)
            # The broker goes down while no commit is being completed. A single node's
            # transaction coordinator drops the markers of a commit it is completing when
            # the partitions lose their leader (a controlled shutdown does that; so does
            # the fencing of the old incarnation after a restart), and then records the
            # commit complete: Kafka breaks the transaction whatever the client does
            # (docs/reliability.md, scenario 2). So the processor is held still (SIGSTOP:
            # nothing new is sent) until the coordinator has no commit in progress, the
            # broker goes down, and the processor resumes into the outage, its batch open.
            proc.proc.send_signal(signal.SIGSTOP)
            try:
                wait_until(
                    "no commit in progress on the broker",
                    lambda: broker.transaction_state(txn) not in _COMPLETING,
                    timeout_s=90,
                )
                if how == "clean":
                    broker.stop()
                else:
                    broker.kill9()
            finally:
                proc.proc.send_signal(signal.SIGCONT)
            # The processor sees the broker gone (a warning: connection, commit, abort) ...
            wait_until(
                f"processor notices the {how} outage",
                lambda m=mark: any(d.get("level") in ("warning", "error") for d in proc.lines[m:]),
                timeout_s=60,
            )
            broker.start()
            # ... and, the same process, makes progress again by itself.
            try:
                wait_until(
                    f"progress after the {how} restart",
                    lambda b=before: _committed(bootstrap, group, names.raw) > b + 300,
                    # librdkafka can stall a transaction call past its timeout after the
                    # restart (issues 5456/5511): the watchdog replaces the producer at 45 s,
                    # and a static consumer fenced by its own rejoin gets new clients.
                    timeout_s=150,
                )
            except AssertionError as exc:
                # Connection failures repeat during the outage and hide the rest.
                tail = [
                    d
                    for d in proc.lines[mark:]
                    if d.get("level") != "debug" and not str(d.get("event", "")).startswith("FAIL")
                ][-25:]
                raise AssertionError(f"{exc}; processor since the outage: {tail}") from None
            assert proc.proc.poll() is None, proc.raw[-5:]
            outages.append(f"{how}@{before}")
        wait_all_committed(bootstrap, group, names.raw, timeout_s=300)
        # The same process throughout (new clients inside it are allowed: no manual action).
        assert proc.proc.poll() is None, proc.raw[-5:]
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()
    # The broker itself must have written every commit's markers (a single node's
    # controlled shutdown skipped them: deploy/kafka/kafka.sh); else it, not the
    # processor, broke the transactions.
    assert broker.skipped_txn_markers() == [], broker.skipped_txn_markers()
    out = read_outputs(bootstrap, prefix, n)
    lost_dup = exactly_once(sent, out)
    assert lost_dup == (0, 0), (
        f"lost, duplicated {lost_dup} after {outages}\n"
        f"{explain_duplicates(sent, out)}\n{proc.story()}"
    )
    assert order_violations(sent, [*out.sanitised, *out.rejected]) == 0
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == n
    print(
        f"broker restarts: {outages}, aborted {proc.count('transaction_aborting')}, "
        f"stuck producers replaced {proc.count('producer_stuck')}, "
        f"client restarts {proc.count('kafka_clients_restarting')}"
    )
