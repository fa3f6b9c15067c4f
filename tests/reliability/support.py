"""Shared pieces of the reliability suite: scale, leak scanning, and dedicated brokers.

A :class:`DedicatedBroker` is a single-node KRaft broker of one test, in its own directory
and on a port it keeps across restarts (``kafka.sh start`` re-formats its storage on every
start, so restarts that must keep the data relaunch the JVM here, on the same
``server.properties`` and log directory). It can be stopped cleanly, killed with SIGKILL,
frozen (SIGSTOP) and restarted; it watches the pytest process like the session broker, so
a killed run leaves nothing behind.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from service.devkafka import kafka_script

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Scale:
    """Counts of the CI-sized default and of ``--soak``."""

    soak: bool

    def pick(self, ci: int, soak: int) -> int:
        """``ci`` normally, ``soak`` with ``--soak``."""
        return soak if self.soak else ci


# -- leak scanning ----------------------------------------------------------------------


def spellings(value: str) -> set[bytes]:
    """Ways an identifier could show up in bytes: as given, case-folded, digits only,
    without '+', national form, hex, base64, JSON-escaped. Short forms (< 6 bytes) are left
    out: they would match by chance."""
    forms = {value, value.lower(), value.upper(), value.lstrip("+")}
    digits = re.sub(r"\D", "", value)
    # Digit-only forms for numbers (MSISDN, IMSI, IMEI), not for e-mail addresses: the 7-8
    # digits of a canary address's tag matched hex digests and UUIDs by chance (a false
    # leak in one full run).
    if len(digits) >= 8 and "@" not in value:
        forms.add(digits)
        if value.startswith("+44"):
            forms.add("0" + digits[2:])  # UK national form of the test numbers
        forms.add(digits[:-1])  # an IMEI without its check digit
    if "@" in value:
        forms.add(value.split("@", 1)[0])
    out: set[bytes] = set()
    for f in forms:
        b = f.encode()
        if len(b) < 6:
            continue
        out |= {b, b.hex().encode(), base64.b64encode(b), base64.urlsafe_b64encode(b)}
        out.add(f.encode("unicode_escape"))
        out.add("".join(f"\\u{ord(c):04x}" for c in f).encode())
    return {o for o in out if len(o) >= 6}


def key_spellings(secret: bytes) -> set[bytes]:
    """Raw, hex (both cases) and base64 forms of key material."""
    return {
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    }


def find_needles(
    haystacks: Iterable[tuple[str, bytes]], needles: Mapping[bytes, str]
) -> list[tuple[str, str]]:
    """``(where, what)`` for every needle found in a haystack; ``what`` names the needle
    (never the needle itself, which may be a canary identifier or key)."""
    if not needles:
        return []
    # One pass per haystack: an alternation of every needle, longest first.
    pattern = re.compile(b"|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
    hits: list[tuple[str, str]] = []
    for where, data in haystacks:
        for m in pattern.finditer(data):
            hits.append((where, needles[m.group(0)]))
            break
    return hits


def files_under(root: Path) -> list[tuple[str, bytes]]:
    """Every regular file below ``root`` as (path, bytes)."""
    return [(str(p), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


# -- waiting ------------------------------------------------------------------------------


def wait_until(what: str, cond: object, timeout_s: float, every_s: float = 0.2) -> None:
    """Poll ``cond()`` until true; AssertionError naming ``what`` at the deadline."""
    assert callable(cond)
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(every_s)  # polling an external process's state, deadline-bounded


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- a broker of one's own ----------------------------------------------------------------

_PROPS = """process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners={listeners},CONTROLLER://127.0.0.1:{cport}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
listener.security.protocol.map=CONTROLLER:PLAINTEXT,{protocol_map}
log.dirs={dir}/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
"""

_LOG4J = """Configuration:
  Appenders:
    File:
      name: F
      fileName: {dir}/server.log
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: F
"""


class DedicatedBroker:
    """A broker for one test; see the module docstring.

    ``listeners``: extra client listeners as (name, port, security protocol); the broker
    always has an ``INTERNAL`` PLAINTEXT listener on ``port`` (the bootstrap address the
    test's own tools use). ``extra_props``: more server properties (TLS, SASL).
    ``scram``: SCRAM-SHA-512 users created when the storage is formatted
    (``kafka-storage format --add-scram``), as (user, password).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        listeners: Sequence[tuple[str, int, str]] = (),
        extra_props: str = "",
        scram: Sequence[tuple[str, str]] = (),
        heap: str = "512m",
    ) -> None:
        self.dir = directory
        self.port = port or free_port()
        self.cport = free_port()
        self.listeners = list(listeners)
        self.extra_props = extra_props
        self.scram = list(scram)
        self.heap = heap
        self.proc: subprocess.Popen[bytes] | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._cp = self._classpath()

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT bootstrap address (``127.0.0.1:port``)."""
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _classpath() -> str:
        out = subprocess.run(
            [str(kafka_script()), "classpath"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip().splitlines()[-1]

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            f"-Dlog4j2.configurationFile={self.dir}/log4j2.yaml",
            "-cp",
            self._cp,
            *args,
        ]

    def transaction_state(self, transactional_id: str) -> str:
        """The coordinator's state of a transactional id (``Ongoing``, ``PrepareCommit``,
        ``CompleteCommit``, ...), from Kafka's own ``kafka-transactions`` tool."""
        out = subprocess.run(
            [
                "java",
                "-cp",
                self._cp,
                "org.apache.kafka.tools.TransactionsCommand",
                "--bootstrap-server",
                self.bootstrap,
                "describe",
                "--transactional-id",
                transactional_id,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        rows = [[c.strip() for c in line.split("\t")] for line in out.stdout.splitlines()]
        rows = [r for r in rows if any(r)]
        if out.returncode != 0 or len(rows) < 2 or "TransactionState" not in rows[0]:
            raise AssertionError(f"kafka-transactions describe failed: {out.stderr[-500:]}")
        return rows[1][rows[0].index("TransactionState")]

    def skipped_txn_markers(self) -> list[str]:
        """Lines where the broker's transaction coordinator skipped a transaction's markers
        because a partition had no leader (it takes that for a deleted topic). The outputs
        and offsets of that transaction then stay unmarked, which breaks its atomicity (see
        deploy/kafka/kafka.sh): a test seeing duplicates or losses names this cause."""
        log = self.dir / "server.log"
        if not log.exists():
            return []
        with log.open(errors="replace") as f:
            return [line.strip()[:300] for line in f if "likely deleted already" in line]

    def format(self) -> None:
        """Write the configuration and format fresh storage (with the SCRAM users)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        names = [("INTERNAL", self.port, "PLAINTEXT"), *self.listeners]
        props = _PROPS.format(
            cport=self.cport,
            dir=self.dir,
            listeners=",".join(f"{n}://127.0.0.1:{p}" for n, p, _ in names),
            advertised=",".join(f"{n}://127.0.0.1:{p}" for n, p, _ in names),
            protocol_map=",".join(f"{n}:{proto}" for n, _, proto in names),
        )
        (self.dir / "server.properties").write_text(props + self.extra_props)
        (self.dir / "log4j2.yaml").write_text(_LOG4J.format(dir=self.dir))
        cluster = subprocess.run(
            self._java("kafka.tools.StorageTool", "random-uuid"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster,
            "-c",
            str(self.dir / "server.properties"),
        )
        for user, password in self.scram:
            cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        fmt = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert fmt.returncode == 0, (
            f"storage format failed: {fmt.stdout[-800:]} {fmt.stderr[-800:]}"
        )

    def start(self, timeout_s: float = 90.0) -> str:
        """Start the JVM on the existing storage and wait until it answers metadata."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = (self.dir / "stdout.log").open("ab")
        mark = (self.dir / "server.log").stat().st_size if (self.dir / "server.log").exists() else 0
        self.proc = subprocess.Popen(
            [
                "java",
                "-Xms128m",
                f"-Xmx{self.heap}",
                "-XX:+UseG1GC",
                *self._java("kafka.Kafka", str(self.dir / "server.properties"))[1:],
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        # Like kafka.sh --watch-pid: a killed pytest takes this broker down with it.
        self._watcher = subprocess.Popen(
            [
                "bash",
                "-c",
                f"while kill -0 {os.getpid()} 2>/dev/null && kill -0 {self.proc.pid} 2>/dev/null;"
                f" do sleep 1; done; kill -KILL {self.proc.pid} 2>/dev/null",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited during start-up: {self.log_tail()}")
            if self._started_since(mark) and port_open(self.port):
                try:
                    AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=5)
                    return self.bootstrap
                except Exception:  # noqa: BLE001 - not answering yet; retried below
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"broker not up within {timeout_s}s: {self.log_tail()}")
            time.sleep(0.3)  # JVM start-up, deadline-bounded

    def _started_since(self, mark: int) -> bool:
        path = self.dir / "server.log"
        if not path.exists():
            return False
        with path.open("rb") as fh:
            fh.seek(mark)
            return b"Kafka Server started" in fh.read()

    def log_tail(self, n: int = 3000) -> str:
        """The end of the broker's log (for failure messages)."""
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"

    def kill9(self) -> None:
        """SIGKILL the broker (no clean shutdown)."""
        self._signal_and_wait(signal.SIGKILL, 30)

    def stop(self) -> None:
        """Clean shutdown (SIGTERM), SIGKILL after 60 s."""
        try:
            self._signal_and_wait(signal.SIGTERM, 60)
        except subprocess.TimeoutExpired:
            self.kill9()

    def freeze(self) -> None:
        """SIGSTOP: the broker holds its connections but answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _signal_and_wait(self, sig: signal.Signals, timeout_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a frozen JVM cannot act on SIGTERM
        self.proc.send_signal(sig)
        self.proc.wait(timeout_s)
        if self._watcher is not None:
            self._watcher.wait(10)

    def close(self) -> None:
        """Stop whatever is running (fixture teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
