"""``cdranon retention watch`` started before its broker (a fresh deployment): it waits,
with a ``broker_unavailable`` warning per attempt, and does its first pass once the broker
is up; a SIGTERM while it waits ends it with exit 0. It used to exit 2 at once ("cannot
create topic <prefix>.holds: ... Timed out").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from service.keystore import generate_master_key
from tests.integration.run_support import write_config
from tests.reliability.support import REPO, DedicatedBroker, free_port, wait_until


class _Watch:
    """A ``retention watch`` subprocess whose JSON log events are collected as they come."""

    def __init__(self, cfg: Path, home: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDRANON_")}
        env |= {"CDRANON_MASTER_KEY": generate_master_key(), "CDRANON_HOME": str(home)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "retention",
                "watch",
                "--config",
                str(cfg),
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[str] = []
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if line.startswith("{"):
                self.events.append(str(orjson.loads(line).get("event")))

    def count(self, event: str) -> int:
        return self.events.count(event)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


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
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=late_broker.bootstrap,
        prefix="late",
        group="g-late",
        keystore=tmp_path / "keys",
    )
    watch = _Watch(cfg, tmp_path / "home", "--max-passes", "1")
    try:
        wait_until(
            "two broker_unavailable warnings",
            lambda: watch.count("broker_unavailable") >= 2 or watch.proc.poll() is not None,
            timeout_s=60,
        )
        assert watch.proc.poll() is None, watch.lines[-5:]
        late_broker.format()
        late_broker.start()
        # One pass (--max-passes 1) once the broker answers, then exit 0.
        assert watch.proc.wait(180) == 0, watch.lines[-10:]
        assert watch.count("retention_pass") == 1, watch.lines[-10:]
        assert watch.count("retention_pass_failed") == 0, watch.lines[-10:]
    finally:
        watch.close()


def test_sigterm_while_waiting_for_the_broker_exits_0(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=f"127.0.0.1:{free_port()}",  # nothing listens there
        prefix="never",
        group="g-never",
        keystore=tmp_path / "keys",
    )
    watch = _Watch(cfg, tmp_path / "home")
    try:
        wait_until(
            "a broker_unavailable warning",
            lambda: watch.count("broker_unavailable") >= 1 or watch.proc.poll() is not None,
            timeout_s=60,
        )
        assert watch.proc.poll() is None, watch.lines[-5:]
        started = time.monotonic()
        watch.proc.send_signal(signal.SIGTERM)
        assert watch.proc.wait(30) == 0, watch.lines[-5:]
        # Cut short: at most one metadata request (5 s) after the signal, not a back-off.
        assert time.monotonic() - started < 15
    finally:
        watch.close()
