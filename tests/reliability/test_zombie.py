"""Scenario 4: zombie fencing. A processor is frozen (SIGSTOP) while its transaction is
open, past the session timeout; its partitions move to the other processor, which
re-processes the frozen batch and goes on; then the zombie is thawed (SIGCONT). Its
transaction must be fenced (aborted, never committed): no input appears twice in the
outputs, nothing is lost, and the zombie's log shows the fencing.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports OffsetSpec without declaring it.
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
    lso_and_high,
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.streams import exactly_once
from tests.reliability.support import wait_until

N = 20_000
CHUNK = 2_000


def _stuck_partitions(
    admin: AdminClient, prefix: str, watch_s: float = 1.5
) -> set[tuple[str, int]]:
    """Output partitions with an open transaction that stays open for ``watch_s`` while the
    other processor keeps committing: the frozen processor's transaction."""
    lso0, high0 = lso_and_high(admin, prefix)
    time.sleep(watch_s)  # the other processor commits every few hundred ms meanwhile
    lso1, _ = lso_and_high(admin, prefix)
    return {
        (tp.topic, tp.partition)
        for tp, lso in lso0.items()
        if lso < high0[tp] and lso1.get(tp) == lso
    }


@pytest.mark.slow
def test_a_frozen_processor_is_fenced_and_its_output_never_visible(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str
) -> None:
    rng = random.Random(unique_id)
    prefix = f"zombie-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=6)
    # The stream is fed a chunk before each freeze, so there is always work in flight.
    pool = list(
        generate_cdrs(N + 30 * CHUNK + 20_000, months=recent_months(2), seed=21, now=now_utc())
    )
    sent = produce_input(kafka_bootstrap, names.raw, pool[:N])
    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(tmp_path / "home")}
    # Random transactional ids: the zombie is fenced by consumer-group generation (KIP-447),
    # not by a successor sharing its transactional.id. Small batches: many transactions.
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=100,
    )
    # A 10 s session: the probe that finds a frozen transaction (a few admin calls and
    # 1.5 s of watching) stays well inside it on a loaded machine.
    env["CDRANON_KAFKA__SESSION_TIMEOUT_MS"] = "10000"
    zombie = Processor(cfg, env, name="zombie")
    other = Processor(cfg, env, name="other")
    frozen = False
    try:
        # Both must commit work of their own: one could finish the first chunk before the
        # other's partitions arrive, so keep a trickle coming until both have, with a deadline.
        deadline = time.monotonic() + 90
        while not all(p.count("batch_committed") >= 1 for p in (zombie, other)):
            assert time.monotonic() < deadline, (
                "a processor never committed a batch",
                zombie.summary(),
                other.summary(),
            )
            if len(sent.values) + 100 <= len(pool):
                more = produce_input(kafka_bootstrap, names.raw, pool[len(sent.values) :][:100])
                sent = join_sent(sent, more)
            time.sleep(0.5)  # pacing of the trickle, not a wait for an outcome
        stuck: set[tuple[str, int]] = set()
        for attempt in range(30):  # noqa: B007 - reported below
            if zombie.proc.poll() is not None:
                # An earlier freeze outlived the session under load and got it fenced:
                # start a fresh one and try again.
                zombie.close()
                zombie = Processor(cfg, env, name="zombie")
                zombie.wait_for("batch_committed", 1, timeout_s=90)
            more = produce_input(kafka_bootstrap, names.raw, pool[len(sent.values) :][:CHUNK])
            sent = join_sent(sent, more)
            time.sleep(rng.uniform(0.0, 0.1))
            zombie.proc.send_signal(19)  # SIGSTOP
            frozen = True
            stuck = _stuck_partitions(admin, prefix)
            if stuck:
                break
            zombie.proc.send_signal(18)  # SIGCONT: not caught mid-transaction, try again
            frozen = False
            with contextlib.suppress(AssertionError):  # it may own nothing just now
                zombie.wait_for("batch_committed", zombie.count("batch_committed") + 1, timeout_s=5)
        assert stuck, "never froze the processor inside a transaction in 30 attempts"
        done_at_freeze, high = committed_total(kafka_bootstrap, group, names.raw)
        assert done_at_freeze < high

        # Past the session timeout (10 s): the other processor owns all 6 partitions.
        def took_over() -> bool:
            return other.owned() == 6

        wait_until("the other processor took every partition", took_over, timeout_s=60)
        # ... and re-processed the frozen batch's inputs: everything produced up to the
        # freeze is committed. (A fixed "+500 past the freeze" could exceed what was left:
        # with 100-record batches the other processor had often drained its own share
        # already, and the test then waited for records that were never coming.) Its
        # offset fetch for the zombie's partitions waits for the broker to abort the frozen
        # transaction: transaction timeout (10 s) plus the abort scan (up to 10 s).
        wait_until(
            "the frozen batch's inputs re-processed by the other processor",
            lambda: committed_total(kafka_bootstrap, group, names.raw)[0] >= high,
            timeout_s=90,
        )
        thawed_at = len(zombie.lines)
        zombie.proc.send_signal(18)  # SIGCONT
        frozen = False
        # The zombie reacts: an aborted transaction, new clients or a fatal exit; never a
        # frozen batch (checked below through the outputs).
        wait_until(
            "the zombie notices it was fenced",
            lambda: (
                zombie.count("transaction_aborting")
                + zombie.count("fatal")
                + zombie.count("kafka_clients_restarting")
                > 0
                or zombie.proc.poll() is not None
            ),
            timeout_s=60,
        )
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=180)
        assert other.terminate() == 0, other.raw[-5:]
        if zombie.proc.poll() is None:
            zombie.terminate()
    finally:
        if frozen:
            zombie.proc.send_signal(18)
        zombie.close()
        other.close()

    # After the thaw the zombie's transaction was aborted (by the broker's fencing, a
    # timed-out commit or the group's new generation) or the process stopped: never
    # committed, which the exactly-once check below shows.
    after = zombie.lines[thawed_at:]
    reactions = [
        d.get("event")
        for d in after
        if d.get("event") in ("transaction_aborting", "fatal", "kafka_clients_restarting")
    ]
    assert reactions or zombie.proc.returncode not in (None, 0), after[-5:]
    out = read_outputs(kafka_bootstrap, prefix, len(sent.values))
    assert exactly_once(sent, out) == (0, 0)
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == len(sent.values)
    print(f"zombie: {len(stuck)} stuck partitions; reactions {reactions[:3]}; tries {attempt + 1}")
