"""Scenario 9, file keystore: its directory becomes unreachable, or read-only, mid-run.

Unreachable: the directory is moved away (as an unmount would do) and comes back.
Read-only: the processor runs as an unprivileged user (the tests run as root, which
ignores file modes), the directory turns mode 0555 and records of a month with no key yet
arrive, so a key must be created and cannot. Either way processing pauses (no offset
committed meanwhile), the ``cdranon_paused{reason="keystore"}`` gauge and a
``keystore_unavailable`` log line say why, nothing is written unsealed and no key is made
elsewhere, and the same process resumes when the directory is back or writable: every
input once, every identifiable record sealed under the store's keys.

The HSM part (a lost session, re-login) is tests/unit/test_keystore_pkcs11.py
(test_lost_session_pauses_then_logs_in_again). Not covered: a read-only file system
(EROFS, which needs a mount; tests/unit/test_keystore_file.py substitutes it) and a
``cdranon run`` process against a lost HSM session (see docs/reliability.md).
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import orjson
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
from tests.reliability.streams import exactly_once, open_transactions
from tests.reliability.support import free_port, wait_until
from tests.unprivileged import NOBODY, hand_over, is_root, shared_tmp, unprivileged_prefix

N = 20_000
# The read-only scenario: records of the current month, then of the month before.
N_FIRST = 2_000
N_SECOND = 3_000
PAUSED = b'cdranon_paused{reason="keystore"} 1.0'


def _metrics(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
        return body


def _uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return {int(u) for u in line.split()[1:]}
    raise AssertionError(f"no Uid line for process {pid}")


def _key_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.key"))


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
        # The batch before the paused one may still be committing on the pipeline's helper
        # thread (it was sealed before the outage): let it land, then nothing moves.
        wait_until(
            "in-flight commit done", lambda: open_transactions(kafka_bootstrap, prefix) == 0, 15
        )
        retries = proc.count("keystore_unavailable")
        proc.wait_for("keystore_unavailable", retries + 1, timeout_s=30)
        paused_at = committed_total(kafka_bootstrap, group, names.raw)[0]
        assert paused_at < N, "the stream finished before the outage; make it longer"
        proc.wait_for("keystore_unavailable", retries + 3, timeout_s=30)
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


@pytest.mark.slow
def test_read_only_keystore_pauses_new_month_and_resumes(
    kafka_bootstrap: str, admin: AdminClient, unique_id: str
) -> None:
    prefix = f"ksro-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    earlier, current = recent_months(2)
    now = now_utc()
    with shared_tmp("cdranon-ksro-") as work:
        keys = hand_over(work / "keys")
        home = hand_over(work / "home")
        port = free_port()
        env = {
            "CDRANON_MASTER_KEY": generate_master_key(),
            "CDRANON_HOME": str(home),
            "HOME": str(home),
            "CDRANON_RETRY__BACKOFF_MAX_S": "1",
        }
        cfg = write_config(
            work / "run.toml",
            bootstrap=kafka_bootstrap,
            prefix=prefix,
            group=group,
            keystore=keys,
            max_records=200,
            metrics_port=port,
        )
        first = produce_input(
            kafka_bootstrap,
            names.raw,
            list(generate_cdrs(N_FIRST, months=[current], seed=23, now=now)),
        )
        proc = Processor(cfg, env, name="ksro", prefix_cmd=unprivileged_prefix())
        try:
            # Writable: the processor makes the current month's key and processes.
            wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=120)
            assert _key_files(keys) == [f"{current}.default.key"]
            if is_root():  # file modes bind the processor: it does not run as root
                assert _uids(proc.proc.pid) == {NOBODY}
            keys.chmod(0o555)
            t_ro = time.monotonic()
            # A month whose key does not exist yet: the processor must create one, and
            # cannot.
            second = produce_input(
                kafka_bootstrap,
                names.raw,
                list(generate_cdrs(N_SECOND, months=[earlier], seed=29, now=now)),
            )
            proc.wait_for("keystore_unavailable", 1, timeout_s=30)
            wait_until("paused gauge set", lambda: PAUSED in _metrics(port), timeout_s=15)
            paused_at = committed_total(kafka_bootstrap, group, names.raw)[0]
            proc.wait_for("keystore_unavailable", 4, timeout_s=30)
            assert committed_total(kafka_bootstrap, group, names.raw)[0] == paused_at == N_FIRST
            assert proc.proc.poll() is None, proc.raw[-5:]
            # Nothing written to the directory (not even a temporary file).
            assert sorted(os.listdir(keys)) == [f"{current}.default.key"]
            retries = proc.count("keystore_unavailable")
            keys.chmod(0o700)
            wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=120)
            paused_s = time.monotonic() - t_ro
            assert PAUSED not in _metrics(port)
            assert proc.count("resumed") >= 1
            assert proc.count("runner_starting") == 1
            assert proc.terminate() == 0, proc.raw[-5:]
        finally:
            keys.chmod(0o700)
            proc.close()
        why = str(proc.events("keystore_unavailable")[0].get("error"))
        assert str(keys) in why, why
        assert "Permission denied" in why, why
        assert _key_files(keys) == sorted([f"{earlier}.default.key", f"{current}.default.key"])
        sent = join_sent(first, second)
        out = read_outputs(kafka_bootstrap, prefix, N_FIRST + N_SECOND)
        assert exactly_once(sent, out) == (0, 0)
        # Every identifiable record of both months sealed under the store's month keys.
        verdict = check_invariants(sent, out, prefix, f"file://{keys}", env)
        assert verdict.sanitised + verdict.rejected == N_FIRST + N_SECOND
        assert verdict.stripped == 0
        sealed_months = {orjson.loads(r.value or b"{}")["key_id"] for r in out.sealed}
        assert sealed_months == {f"{earlier}/default", f"{current}/default"}
    print(
        f"read-only keystore: paused at {paused_at}, {retries} retries while read-only, "
        f"{paused_s:.1f}s from chmod 0555 to all committed"
    )
