"""Two processors in one consumer group; one is stopped mid-stream; still exactly once."""

from __future__ import annotations

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
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.support import wait_until

N = 100_000


@pytest.mark.slow
def test_two_processors_one_stopped_mid_stream(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str
) -> None:
    prefix = f"grp-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=6)
    values = list(
        generate_cdrs(
            N, months=recent_months(3), seed=9, malformed_ratio=0.01, late_ratio=0.05, now=now_utc()
        )
    )
    sent = produce_input(kafka_bootstrap, names.raw, values)
    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key()}
    # No instance id: each process gets a random transactional.id (KIP-447 fencing).
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=500,
    )
    p1 = Processor(cfg, env, name="p1")
    p2 = Processor(cfg, env, name="p2")
    try:
        # Both own partitions and both have committed work.
        for p in (p1, p2):
            p.wait_for("batch_committed", 2, timeout_s=90)
        assert all(p.owned() < 6 for p in (p1, p2)), (
            "the group never split the partitions between the two processors",
            p1.summary(),
            p2.summary(),
        )
        done, high = committed_total(kafka_bootstrap, group, names.raw)
        assert done < high, "the stream finished before the stop; make it longer"

        assert p1.terminate() == 0, p1.raw[-5:]  # SIGTERM mid-stream: finish the batch, leave
        stopped = p1.events("runner_stopped")
        assert len(stopped) == 1
        assert stopped[0]["consumed"] > 0

        # p2 takes over every partition and finishes the stream.
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=180)
        # p1's partitions may all have been finished before it left, so the stream can end
        # before p2's rebalance callback runs: wait for the takeover, do not assume it.
        wait_until("p2 owns every partition", lambda: p2.owned() == 6, timeout_s=60)
        assert p2.terminate() == 0, p2.raw[-5:]
    finally:
        p1.close()
        p2.close()

    out = read_outputs(kafka_bootstrap, prefix, N)
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == N
