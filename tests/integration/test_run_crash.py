"""Exactly once under SIGKILL: the processor is killed at random moments at least 10 times
while it works through 100k records, restarted each time; nothing lost, nothing twice."""

from __future__ import annotations

import random
import time
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

N = 100_000
MID_STREAM_KILLS = 10


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str
) -> None:
    seed = int(time.time())
    rng = random.Random(seed)
    prefix = f"crash-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    values = list(
        generate_cdrs(
            N, months=recent_months(3), seed=7, malformed_ratio=0.01, late_ratio=0.05, now=now_utc()
        )
    )
    sent = produce_input(kafka_bootstrap, names.raw, values)
    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key()}
    # A stable instance id (as a StatefulSet pod has): each restart fences its killed
    # predecessor at once (static membership, same transactional.id).
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=1000,
        instance_id="crash-replica-0",
    )

    mid_stream = 0
    lives: list[str] = []
    while mid_stream < MID_STREAM_KILLS:
        proc = Processor(cfg, env, name=f"life-{len(lives)}")
        try:
            if rng.random() < 0.2:
                # Somewhere in start-up: before, during or just after joining the group.
                time.sleep(rng.uniform(0.2, 2.0))
                how = "start-up"
            else:
                # While working: after 1-3 committed batches, then 0-150 ms later, which
                # lands in consume, transform, produce or commit.
                proc.wait_for("batch_committed", rng.randint(1, 3), timeout_s=90)
                time.sleep(rng.uniform(0.0, 0.15))
                how = "working"
            proc.kill9()
        finally:
            proc.close()
        done, high = committed_total(kafka_bootstrap, group, names.raw)
        assert done < high, (
            f"the stream finished after {len(lives)} lives, before {MID_STREAM_KILLS} "
            f"mid-stream kills (seed {seed})"
        )
        if how == "working":
            mid_stream += 1
        lives.append(f"{how}@{done}")

    final = Processor(cfg, env, name="final")
    try:
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=180)
        assert final.terminate() == 0, final.raw[-5:]
    finally:
        final.close()
    assert final.count("runner_stopped") == 1

    out = read_outputs(kafka_bootstrap, prefix, N)
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == N, (seed, lives)
    # The kills really interrupted work in progress at different points of the stream.
    progress = [int(life.split("@")[1]) for life in lives]
    assert len(set(progress)) >= MID_STREAM_KILLS // 2, lives
