"""A real local Kafka broker for tests, the demo and benchmarks.

A thin wrapper around ``deploy/kafka/kafka.sh`` (single-node KRaft, Apache Kafka from the
jars pinned in ``deploy/kafka/pom.xml``). The script does the work (fetching jars,
formatting storage, waiting until the broker answers metadata requests); this module only
runs it and turns its failures into a :class:`~service.errors.CdranonError` carrying the
script's stderr, which includes the broker's log tail.

The script lives in the repository, not in the installed package: an installed cdranon
without its source tree has no local broker and says so.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType

import service
from service.errors import CdranonError

# kafka.sh waits CDRANON_KAFKA_START_TIMEOUT (default 90 s) for the broker; a first run
# also fetches the jars through Maven, so the outer bound is generous.
_DEFAULT_START_TIMEOUT_S = 90.0
_FETCH_ALLOWANCE_S = 600.0
_STOP_TIMEOUT_S = 60.0


def kafka_script() -> Path:
    """Path of ``deploy/kafka/kafka.sh`` in the source tree; CdranonError if absent."""
    script = Path(service.__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"
    if not script.is_file():
        raise CdranonError(
            f"the local Kafka script is missing ({script}): the local broker needs the "
            "cdranon source tree (git clone), not only the installed package; or point "
            "cdranon at an existing broker with its bootstrap address"
        )
    return script


class LocalKafka:
    """One local single-node broker whose state lives in ``directory``.

    ``watch_pid``: the broker stops by itself when that process dies, even by SIGKILL (the
    script watches it), so a killed test run or demo leaves no broker behind.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        watch_pid: int | None = None,
        port: int | None = None,
        start_timeout_s: float | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.watch_pid = watch_pid
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._script = kafka_script()
        self._bootstrap: str | None = None

    @property
    def bootstrap(self) -> str:
        """The bootstrap address (``127.0.0.1:PORT``); CdranonError if not started."""
        if self._bootstrap is None:
            raise CdranonError("the local Kafka broker is not started: call start() first")
        return self._bootstrap

    def start(self) -> str:
        """Start the broker (or find it already running) and return its bootstrap address."""
        args = ["start", "--dir", str(self.directory)]
        if self.port is not None:
            args += ["--port", str(self.port)]
        if self.watch_pid is not None:
            args += ["--watch-pid", str(self.watch_pid)]
        env = dict(os.environ)
        wait_s = _DEFAULT_START_TIMEOUT_S
        if self.start_timeout_s is not None:
            env["CDRANON_KAFKA_START_TIMEOUT"] = str(max(1, round(self.start_timeout_s)))
            wait_s = self.start_timeout_s
        proc = self._run(args, env=env, timeout_s=wait_s + _FETCH_ALLOWANCE_S)
        lines = proc.stdout.strip().splitlines()
        if not lines or ":" not in lines[-1]:
            raise CdranonError(
                f"kafka.sh start printed no bootstrap address (state in {self.directory}); "
                f"its stderr:\n{proc.stderr.strip()}"
            )
        self._bootstrap = lines[-1].strip()
        return self._bootstrap

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM, SIGKILL after the script's deadline)."""
        self._run(["stop", "--dir", str(self.directory)], env=None, timeout_s=_STOP_TIMEOUT_S)
        self._bootstrap = None

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(
        self, args: list[str], *, env: dict[str, str] | None, timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self._script), *args]
        try:
            # The script's children (broker, watcher) redirect their own output, so
            # capturing ours cannot hang on a pipe they keep open.
            proc = subprocess.run(  # noqa: S603 - fixed script path, no shell
                command,
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CdranonError(
                f"kafka.sh {args[0]} did not finish within {timeout_s:.0f}s "
                f"(state in {self.directory})"
            ) from exc
        except OSError as exc:
            raise CdranonError(f"could not run {self._script}: {exc}") from exc
        if proc.returncode != 0:
            raise CdranonError(
                f"kafka.sh {args[0]} failed (exit {proc.returncode}, state in "
                f"{self.directory}):\n{proc.stderr.strip()}"
            )
        return proc
