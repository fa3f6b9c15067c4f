"""Scenario 9 (file keystore part): the keystore directory becomes unreachable mid-run (the
volume is moved away, as an unmount would do) and comes back. Processing pauses (no
offset committed meanwhile), the ``cdranon_paused{reason="keystore"}`` gauge and a
``keystore_unavailable`` log line say why, nothing is written unsealed and no key is
created elsewhere, and the same process resumes when the directory is back.

Not covered here: a read-only keystore (the tests run as root, which ignores file modes)
and a lost HSM session (see docs/reliability.md).
"""

from __future__ import annotations

import os
import urllib.request
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
from tests.reliability.streams import exactly_once
from tests.reliability.support import free_port, wait_until

N = 20_000
PAUSED = b'cdranon_paused{reason="keystore"} 1.0'


def _metrics(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
        return body


@pytest.mark.slow
def test_unreachable_keystore_pauses_and_resumes(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str
) -> None:
    prefix = f"ks-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    values = list(generate_cdrs(N, months=recent_months(2), seed=17, now=now_utc()))
    sent = produce_input(kafka_bootstrap, names.raw, values)
    keys = tmp_path / "keys"
    away = tmp_path / "keys.away"
    port = free_port()
    env = {
        "CDRANON_MASTER_KEY": generate_master_key(),
        "CDRANON_HOME": str(tmp_path / "home"),
        # Cached month keys are re-checked against the store every second.
        "CDRANON_KEYSTORE__RECHECK_S": "1",
        "CDRANON_RETRY__BACKOFF_MAX_S": "1",
    }
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=200,
        metrics_port=port,
    )
    proc = Processor(cfg, env, name="ks")
    moved = False
    try:
        proc.wait_for("batch_committed", 3, timeout_s=90)
        os.rename(keys, away)
        moved = True
        proc.wait_for("keystore_unavailable", 1, timeout_s=30)
        wait_until("paused gauge set", lambda: PAUSED in _metrics(port), timeout_s=15)
        # Paused: no offset moves while the keystore is away.
        paused_at = committed_total(kafka_bootstrap, group, names.raw)[0]
        assert paused_at < N, "the stream finished before the outage; make it longer"
        proc.wait_for("keystore_unavailable", 3, timeout_s=30)
        assert committed_total(kafka_bootstrap, group, names.raw)[0] == paused_at
        assert proc.proc.poll() is None, proc.raw[-5:]
        # No key (and no keystore) was created in its place meanwhile.
        assert not keys.exists()
        os.rename(away, keys)
        moved = False
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=180)
        assert PAUSED not in _metrics(port)
        assert proc.count("resumed") >= 1
        assert proc.count("runner_starting") == 1
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        if moved:
            os.rename(away, keys)
        proc.close()
    why = proc.events("keystore_unavailable")[0]
    assert "not reachable" in str(why.get("error")), why
    out = read_outputs(kafka_bootstrap, prefix, N)
    assert exactly_once(sent, out) == (0, 0)
    # Every identifiable record sealed under the one month key of the store.
    verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
    assert verdict.sanitised + verdict.rejected == N
    assert verdict.stripped == 0
    print(f"keystore outage: paused at {paused_at}, {proc.count('keystore_unavailable')} retries")
