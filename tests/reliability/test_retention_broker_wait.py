"""``cdranon retention watch`` started before its broker (a fresh deployment): it waits,
with a ``broker_unavailable`` warning per attempt, and does its first pass once the broker
is up; a SIGTERM while it waits ends it with exit 0. It used to exit 2 at once ("cannot
create topic <prefix>.holds: ... Timed out").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.keystore import generate_master_key
from tests.integration.run_support import Processor, write_config
from tests.reliability.support import DedicatedBroker, free_port


def _watch(tmp_path: Path, bootstrap: str, *flags: str) -> Processor:
    """``retention watch`` on its own prefix and keystore, pointed at ``bootstrap``."""
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=bootstrap,
        prefix="late",
        group="g-late",
        keystore=tmp_path / "keys",
    )
    env = {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(tmp_path / "home")}
    return Processor(cfg, env, name="retention", command=("retention", "watch", *flags))


@pytest.fixture
def late_broker(tmp_path: Path) -> Iterator[DedicatedBroker]:
    b = DedicatedBroker(tmp_path / "broker")
    try:
        yield b
    finally:
        b.close()


@pytest.mark.slow
def test_watch_waits_for_a_broker_that_starts_late(
    late_broker: DedicatedBroker, tmp_path: Path
) -> None:
    watch = _watch(tmp_path, late_broker.bootstrap, "--max-passes", "1")
    try:
        watch.wait_for("broker_unavailable", 2, timeout_s=60)
        assert watch.proc.poll() is None, watch.raw[-5:]
        late_broker.format()
        late_broker.start()
        # One pass (--max-passes 1) once the broker answers, then exit 0.
        assert watch.proc.wait(180) == 0, watch.raw[-10:]
        watch.close()
        assert watch.count("retention_pass") == 1, watch.raw[-10:]
        assert watch.count("retention_pass_failed") == 0, watch.raw[-10:]
    finally:
        watch.close()


def test_sigterm_while_waiting_for_the_broker_exits_0(tmp_path: Path) -> None:
    watch = _watch(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        watch.wait_for("broker_unavailable", timeout_s=60)
        started = time.monotonic()
        assert watch.terminate(30) == 0, watch.raw[-5:]
        # Cut short: at most one metadata request (5 s) after the signal, not a back-off.
        assert time.monotonic() - started < 15
    finally:
        watch.close()
