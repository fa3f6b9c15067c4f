"""Scenario 1: crash soak. The processor is SIGKILLed at random points while a concurrent
read_committed reader watches the outputs; kills that land between produce and commit
are counted (an output partition whose last stable offset trails its high watermark right
after the kill: the killed process's transaction was open). Both the live reader and a
final reader see every input exactly once; per input partition, order is preserved in
every output partition.

CI: 30k records, 12 kills. --soak: 200k records, 30 kills. (tests/integration/
test_run_crash.py is the plain 100k / 10 kills version without the live reader.)
"""

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
from tests.reliability.streams import (
    LiveReader,
    exactly_once,
    open_transactions,
    order_violations,
    split_outputs,
)
from tests.reliability.support import Scale, wait_until


@pytest.mark.slow
def test_crash_soak_exactly_once_with_a_live_reader(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str, scale: Scale
) -> None:
    n = scale.pick(30_000, 200_000)
    kills = scale.pick(12, 30)
    seed = int(time.time())
    rng = random.Random(seed)
    prefix = f"soak-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    values = list(
        generate_cdrs(
            n,
            months=recent_months(3),
            seed=seed,
            malformed_ratio=0.01,
            late_ratio=0.05,
            now=now_utc(),
        )
    )
    sent = produce_input(kafka_bootstrap, names.raw, values)
    keys = tmp_path / "keys"
    env = {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(tmp_path / "home")}
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=max(200, n // 100),
        instance_id="soak-replica-0",
    )
    live = LiveReader(kafka_bootstrap, prefix)
    lives: list[str] = []
    open_at_kill = 0
    try:
        while len(lives) < kills:
            proc = Processor(cfg, env, name=f"life-{len(lives)}")
            try:
                proc.wait_for("batch_committed", rng.randint(1, 2), timeout_s=90)
                time.sleep(rng.uniform(0.0, 0.3))  # anywhere in consume/transform/produce/commit
                proc.kill9()
            finally:
                proc.close()
            caught = open_transactions(kafka_bootstrap, prefix)
            open_at_kill += caught > 0
            done, high = committed_total(kafka_bootstrap, group, names.raw)
            assert done < high, f"stream finished after {len(lives)} kills (seed {seed})"
            lives.append(f"{done}{'+open' if caught else ''}")
        final = Processor(cfg, env, name="final")
        try:
            wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=300)
            assert final.terminate() == 0, final.raw[-5:]
        finally:
            final.close()
        out = read_outputs(kafka_bootstrap, prefix, n)
        total = len(out.sealed) + len(out.sanitised) + len(out.rejected)
        wait_until("live reader caught up", lambda: live.count() >= total, timeout_s=120)
    finally:
        seen_live = live.stop()
    assert live.errors == []

    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == n
    live_out = split_outputs(prefix, seen_live)
    assert exactly_once(sent, live_out) == (0, 0), (seed, lives)
    assert len(seen_live) == total, "the live reader saw records the final reader did not"
    assert order_violations(sent, seen_live) == 0
    assert order_violations(sent, [*out.sanitised, *out.rejected]) == 0
    # Some kills really hit an open transaction (between produce and commit).
    assert open_at_kill >= 1, (open_at_kill, lives)
    print(
        f"crash soak: {n} records, {kills} kills ({open_at_kill} with an open transaction), "
        f"0 lost, 0 duplicated; lives {lives}"
    )
