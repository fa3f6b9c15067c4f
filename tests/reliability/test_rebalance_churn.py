"""Scenario 3: rebalance churn. One processor, then three, then one again during a run;
one of the three is SIGKILLed right after a committed batch (mid-way through the next, with
more of its own input waiting), another leaves with SIGTERM. A live read_committed reader
and a final reader see every input exactly once (so nothing fetched under an old
generation was produced after its partitions moved: it would be there twice),
per-partition order preserved.

(tests/integration/test_run_group.py is the plain two-processor, one-stopped version.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial
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
    group_progress,
    join_sent,
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.streams import (
    LiveReader,
    exactly_once,
    order_violations,
    split_outputs,
)
from tests.reliability.support import Scale, wait_until

PARTITIONS = 6
MAX_RECORDS = 200  # per batch


def full_batch_committed(
    p: Processor, after: int, mine: set[int], progress: Callable[[], object], timeout_s: float
) -> None:
    """Wait until ``p`` commits a full batch (``MAX_RECORDS``: the batch closed at the count,
    so input was waiting) after its ``after``-th commit; AssertionError with its story, its
    partitions and ``progress()`` (their committed offsets and ends) at the deadline."""
    deadline = time.monotonic() + timeout_s
    k = after + 1
    try:
        while (
            p.wait_for("batch_committed", k, max(0.0, deadline - time.monotonic()))["records"]
            != MAX_RECORDS
        ):
            k += 1
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{p.name} owns {sorted(mine)} (log: {sorted(p.owned_partitions())}), "
            f"committed {p.count('batch_committed') - after} batches since the chunk, "
            f"alive={p.proc.poll() is None}, (committed, end) by partition: {progress()}"
            f"\n{p.story()}\nlast lines: {p.raw[-20:]}"
        ) from None


@pytest.mark.slow
def test_scale_one_three_one_with_a_kill_mid_batch(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str, scale: Scale
) -> None:
    n = scale.pick(10_000, 20_000)  # per chunk
    rounds = scale.pick(1, 4)
    rng = random.Random(unique_id)
    prefix = f"churn-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=PARTITIONS)
    # Input arrives in chunks while the group changes, so every member has work whatever
    # the processing speed: a chunk before each scale-up and before each kill, spread evenly
    # over the partitions (keyless input through the sticky partitioner put 9,995 of a chunk
    # in one partition: the victim's two got 1 record, which it committed at once).
    chunks = 1 + 2 * rounds
    trickle_size, trickles = 200, 200  # at most: the trickle stops once members commit
    pool = list(
        generate_cdrs(
            n * chunks + trickle_size * trickles * rounds,
            months=recent_months(2),
            seed=13,
            malformed_ratio=0.01,
            now=now_utc(),
        )
    )
    sent = produce_input(kafka_bootstrap, names.raw, pool[:n], PARTITIONS)

    def feed(size: int = n) -> None:
        nonlocal sent
        more = produce_input(
            kafka_bootstrap, names.raw, pool[len(sent.values) :][:size], PARTITIONS
        )
        sent = join_sent(sent, more)

    def trickle() -> None:
        if len(pool) - len(sent.values) >= trickle_size:
            feed(trickle_size)

    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(tmp_path / "home")}
    # Random transactional ids: fencing by consumer-group generation (KIP-447).
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=MAX_RECORDS,
    )
    live = LiveReader(kafka_bootstrap, prefix)
    procs: list[Processor] = []
    steps: list[str] = []
    try:
        first = Processor(cfg, env, name="p1")
        procs.append(first)
        first.wait_for("batch_committed", 2, timeout_s=90)
        for r in range(rounds):
            feed()
            extra = [Processor(cfg, env, name=f"p{r}-{i}") for i in (2, 3)]
            procs += extra
            # Each new member must commit work of its own. A chunk alone can be consumed by
            # the first member before a new one's partitions arrive (joining takes seconds),
            # so keep a trickle of input coming until both have committed, with a deadline.
            deadline = time.monotonic() + 90
            while not all(p.count("batch_committed") >= 1 for p in extra):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"a new member never committed a batch: {[p.raw[-3:] for p in extra]}"
                    )
                trickle()
                time.sleep(0.5)  # pacing of the trickle, not a wait for an outcome
            steps.append(f"3 members@{committed_total(kafka_bootstrap, group, names.raw)[0]}")
            victim, leaver = extra
            mine = victim.owned_partitions()
            assert mine, victim.summary()
            # Kill the victim right after it committed a full batch of this chunk: it then
            # has more input of its own and is in the next batch. Counted from before the
            # chunk: the victim reads its share while the chunk is still being written.
            before = victim.count("batch_committed")
            feed()
            full_batch_committed(
                victim,
                before,
                mine,
                partial(group_progress, kafka_bootstrap, group, names.raw, mine),
                timeout_s=60,
            )
            time.sleep(rng.uniform(0.0, 0.05))  # inside the next batch
            victim.kill9()
            # Its partitions are not reassigned before its session times out (6 s): what is
            # committed on them now is where the victim stopped.
            left = {
                part: high - done
                for part, (done, high) in group_progress(
                    kafka_bootstrap, group, names.raw, mine
                ).items()
            }
            assert sum(left.values()) > 0, (
                f"round {r}: the victim had no input left on {sorted(mine)} when killed, "
                f"so it was not mid-batch; make the chunk longer"
            )
            assert leaver.terminate() == 0, leaver.raw[-5:]
            done, _ = committed_total(kafka_bootstrap, group, names.raw)
            steps.append(f"1 member@{done} (victim left {left})")

            def first_owns_all() -> bool:
                return first.owned() == PARTITIONS

            wait_until(
                f"the first processor owns all {PARTITIONS} partitions again", first_owns_all, 60
            )
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=240)
        assert first.terminate() == 0, first.raw[-5:]
        total_in = len(sent.values)
        out = read_outputs(kafka_bootstrap, prefix, total_in)
        total = len(out.sealed) + len(out.sanitised) + len(out.rejected)
        wait_until("live reader caught up", lambda: live.count() >= total, timeout_s=120)
    finally:
        for p in procs:
            p.close()
        seen_live = live.stop()
    assert exactly_once(sent, out) == (0, 0), steps
    assert exactly_once(sent, split_outputs(prefix, seen_live)) == (0, 0), steps
    assert len(seen_live) == total
    assert order_violations(sent, [*out.sanitised, *out.rejected]) == 0
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == total_in
    revoked = sum(p.count("partitions_revoked") + p.count("partitions_lost") for p in procs)
    assert revoked >= 2, "no rebalance moved partitions"
    print(f"churn: {total_in} records, steps {steps}, revocations {revoked}, 0 lost, 0 duplicated")
