"""``make bench``: cdranon against the alternatives, side by side, in one session.

    python -m benchmarks.run [--records 1000000] [--faust-s 60] [--latency-s 10]
                             [--no-scaling] [--output bench]

One local broker (service.devkafka.LocalKafka), one generated data set (``--records`` CDRs
of ~370 bytes, realistic mix: 3 months, 1% malformed, 5% late) written once to an input
topic of 8 partitions; then, each processor in its own process, its own consumer group
reading that topic from the start:

1. ``broker``: the broker's own ceiling, Kafka's ProducerPerformance with the same records
   as payload, then ConsumerPerformance reading them back (Java, the pinned jars);
2. ``passthrough-plain`` / ``passthrough-txn``: confluent-kafka consume -> produce of the
   same bytes, no transform (at least once / one transaction per batch);
3. ``cdranon``: ``cdranon run`` (confluent-kafka engine, exactly once);
4. ``faust``: ``cdranon run --engine faust`` (at least once), for at most ``--faust-s``;
5. ``core``: the transform alone on one core, no broker (thread CPU time), with an orjson
   loads+dumps round trip of the same records for the ratio.

Throughput: the group's committed offsets are sampled every 0.2 s; records/s is
(committed at the end - committed at the first commit) / the time between, so start-up
and group join are not counted. CPU s per million records: the processor's utime+stime
(/proc) over that window (the broker's is reported apart). Peak RSS: the processor's
ru_maxrss at exit. Latency: with the processor caught up, new records are produced at a
fixed rate (half the rate just measured) for ``--latency-s``; a read_committed reader
notes when each cdr_id appears in the output; p50/p99 of (seen - produced).

Scaling: 1, 2 and 4 ``cdranon run`` processes in one group on the 8-partition topic.

Results: benchmarks/results/<output>.json (+ machine facts), .md (table) and .png (chart).
The machine is shared and has 2 cores: CPU seconds are the stable number; wall-clock
rates move with whatever else runs (the load average is recorded per scenario).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

from benchmarks.common import RESULTS, machine, median, rounds, write_results
from benchmarks.e2e_bench import _produce
from service.devkafka import LocalKafka, kafka_script
from service.generator import generate_cdrs
from service.keyring import Keyring
from service.keystore import generate_master_key, open_keystore
from service.months import add_months, month_of, now_utc
from service.policy import load_policy
from service.transform import Transformer

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 8
CORE_RECORDS = 200_000
_TICK = os.sysconf("SC_CLK_TCK")


def _months() -> list[str]:
    y, m = (int(p) for p in month_of(now_utc()).split("-"))
    out = []
    for back in (2, 1, 0):
        y2, m2 = add_months(y, m, -back)
        out.append(f"{y2:04d}-{m2:02d}")
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (and its waited-for children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # fields[0] is the state (field 3): utime, stime, cutime, cstime are fields 14-17.
    return sum(int(x) for x in fields[11:15]) / _TICK


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a running process (VmHWM), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def loadavg() -> float:
    """The 1-minute load average (how busy the shared machine was)."""
    return os.getloadavg()[0]


@dataclass
class Proc:
    """A processor subprocess; ``finish`` returns its peak RSS (MiB) from wait4."""

    p: subprocess.Popen[bytes]

    @classmethod
    def start(cls, args: Sequence[str], env: dict[str, str], log: Path) -> Proc:
        """``python -m args...`` with ``env`` added, stderr to ``log``."""
        with log.open("ab") as err:
            p = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=REPO,
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return cls(p)

    def finish(self, timeout_s: float = 60) -> float:
        """SIGTERM, wait (SIGKILL at the deadline); peak RSS in MiB (VmHWM before the stop:
        wait4's ru_maxrss would carry the forking bench process's own peak over exec)."""
        peak = vm_hwm_mib(self.p.pid)
        self.p.terminate()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                return peak
            time.sleep(0.1)  # waiting for a clean stop, deadline-bounded
        self.p.kill()
        self.p.wait(30)
        return peak


class Committed:
    """Sum of a group's committed offsets on the input topic (one long-lived client)."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.c = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
            }
        )
        self.tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    def __call__(self) -> int:
        try:
            got = self.c.committed(self.tps, timeout=10)
        except KafkaException:
            return 0  # coordinator not ready yet: nothing committed as far as we know
        return sum(max(0, tp.offset) for tp in got)

    def close(self) -> None:
        self.c.close()


def high_watermark(bootstrap: str, topic: str) -> int:
    """Sum of the topic's end offsets."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"hw-{uuid.uuid4().hex[:6]}"})
    try:
        return sum(
            c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(PARTITIONS)
        )
    finally:
        c.close()


@dataclass
class Window:
    """What a drain measured."""

    records: int
    seconds: float
    cpu_s: float
    broker_cpu_s: float
    reached: bool


def drain(
    committed: Committed,
    target: int,
    pids: Sequence[int],
    broker_pid: int | None,
    cap_s: float,
    start_timeout_s: float = 120,
) -> Window:
    """Wait for the first commit, then measure until ``target`` is committed or ``cap_s``."""
    deadline = time.monotonic() + start_timeout_s
    c0 = committed()
    while c0 == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the processor committed nothing within its start-up deadline")
        time.sleep(0.05)  # polling committed offsets, deadline-bounded
        c0 = committed()
    t0 = time.monotonic()
    cpu0 = sum(cpu_seconds(p) for p in pids)
    b0 = cpu_seconds(broker_pid) if broker_pid else float("nan")
    c1, t1 = c0, t0
    while c1 < target and time.monotonic() - t0 < cap_s:
        time.sleep(0.2)  # sampling committed offsets, bounded by cap_s
        c = committed()
        if c > c1:
            c1, t1 = c, time.monotonic()
    cpu1 = sum(cpu_seconds(p) for p in pids)
    b1 = cpu_seconds(broker_pid) if broker_pid else float("nan")
    return Window(c1 - c0, max(t1 - t0, 1e-9), cpu1 - cpu0, b1 - b0, c1 >= target)


def latency(
    bootstrap: str,
    src: str,
    pattern: str,
    committed: Committed,
    values: list[bytes],
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """p50/p99 end-to-end latency of records produced at ``rate`` per second."""
    n = min(len(values), max(100, int(rate * seconds)))
    seen: dict[str, float] = {}
    stop = threading.Event()
    assigned = threading.Event()
    reader = threading.Thread(target=_read, args=(bootstrap, pattern, seen, stop, assigned))
    reader.start()
    if not assigned.wait(60):
        stop.set()
        raise RuntimeError(f"the latency reader got no partition of {pattern} within 60 s")
    time.sleep(1)  # the reader fetches its 'latest' positions before the timed records
    try:
        sent = _produce(bootstrap, src, values[:n], rate=rate)
        deadline = time.monotonic() + 60
        while len(seen) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)  # the reader catches up with the output, deadline-bounded
    finally:
        stop.set()
        reader.join(30)
    lat = sorted(seen[c] - t for c, t in sent.items() if c in seen)
    q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [float("nan")] * 99
    return {
        "offered_per_s": round(rate),
        "records": n,
        "seen": len(lat),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


def _read(
    bootstrap: str,
    pattern: str,
    seen: dict[str, float],
    stop: threading.Event,
    assigned: threading.Event,
) -> None:
    """Note when each cdr_id first appears in the (read_committed) output."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    c.subscribe([pattern], on_assign=lambda _c, _p: assigned.set())
    loads = orjson.loads
    while not stop.is_set():
        for m in c.consume(5000, 0.05):
            v = m.value()
            if m.error() is None and v:
                now = time.time()
                try:
                    cid = loads(v).get("cdr_id")
                except orjson.JSONDecodeError:
                    continue
                if isinstance(cid, str) and cid not in seen:
                    seen[cid] = now
    c.close()


class Bench:
    """One session: the broker, the data, the scenarios."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, broker_pid: int | None) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.tmp = Path(tempfile.mkdtemp(prefix="cdranon-bench-"))
        self.log = self.tmp / "processors.log"
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.src = f"bench-{uuid.uuid4().hex[:6]}.raw"
        months = _months()
        print(f"generating {args.records} records over {months} ...", flush=True)
        self.values = list(
            generate_cdrs(
                args.records,
                months=months,
                seed=11,
                now=now_utc(),
                malformed_ratio=0.01,
                late_ratio=0.05,
            )
        )
        # For the latency phases: records never seen before, all valid (latency is read
        # from the sanitised output by cdr_id).
        self.fresh = list(
            generate_cdrs(100_000, months=months, seed=12, now=now_utc(), malformed_ratio=0.0)
        )
        # Faust runs ~100x slower: it gets its own, shorter input (the same first records).
        self.faust_src = f"bench-{uuid.uuid4().hex[:6]}.faust.raw"
        self.mean_bytes = sum(map(len, self.values)) / len(self.values)
        self._create([self.src, self.faust_src], PARTITIONS)

    def close(self) -> None:
        """Drop the admin client (before the broker stops: no reconnect noise)."""
        del self.admin

    def _create(self, topics: list[str], partitions: int) -> None:
        new = [NewTopic(t, partitions, 1) for t in topics]
        for f in self.admin.create_topics(new).values():
            f.result()

    # -- 1. the broker ----------------------------------------------------------------

    def broker(self) -> dict[str, Any]:
        """ProducerPerformance with our records as payload, then ConsumerPerformance."""
        cp = subprocess.run(
            [str(kafka_script()), "classpath"], capture_output=True, text=True, check=True
        ).stdout.strip()
        payload = self.tmp / "payload.txt"
        sample = self.values[:100_000]
        payload.write_bytes(b"\n".join(v.replace(b"\n", b" ") for v in sample))
        topic = f"perf-{uuid.uuid4().hex[:6]}"
        self._create([topic], PARTITIONS)
        n = len(self.values)
        prod, pcpu, prss, pwall = _java(
            cp,
            "org.apache.kafka.tools.ProducerPerformance",
            [
                *("--topic", topic, "--num-records", str(n), "--payload-file", str(payload)),
                *(
                    "--throughput",
                    "-1",
                    "--command-property",
                    f"bootstrap.servers={self.bootstrap}",
                ),
            ],
        )
        last = [x for x in prod.splitlines() if "records sent" in x][-1]
        p_rate = float(last.split(",")[1].split()[0])
        p_lat = {k: float(v) for v, k in _ms_fields(last)}
        cons, ccpu, crss, cwall = _java(
            cp,
            "org.apache.kafka.tools.ConsumerPerformance",
            [
                *("--bootstrap-server", self.bootstrap, "--topic", topic),
                *("--num-records", str(n), "--group", f"perf-g-{uuid.uuid4().hex[:6]}"),
            ],
        )
        row = [x for x in cons.splitlines() if x[:4].isdigit()][-1].split(",")
        c_rate = float(row[5])
        return {
            "producer": {
                "records_per_s": round(p_rate),
                "mb_per_s": round(p_rate * self.mean_bytes / 1e6, 1),
                "cpu_s_per_million": round(pcpu / n * 1e6, 2),
                "peak_rss_mib": round(prss),
                "latency_at_full_speed_ms": p_lat,
            },
            "consumer": {
                "records_per_s": round(c_rate),
                "mb_per_s": round(c_rate * self.mean_bytes / 1e6, 1),
                "cpu_s_per_million": round(ccpu / n * 1e6, 2),
                "peak_rss_mib": round(crss),
                "wall_s_incl_jvm_start": round(cwall, 1),
            },
            "producer_wall_s_incl_jvm_start": round(pwall, 1),
        }

    # -- 2-4. processors -----------------------------------------------------------------

    def _cdranon_env(self, tag: str, group: str, src: str) -> dict[str, str]:
        keys = self.tmp / f"keys-{tag}"
        return {
            "CDRANON_MASTER_KEY": generate_master_key(),
            "CDRANON_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "CDRANON_KAFKA__TOPIC_PREFIX": tag,
            "CDRANON_KAFKA__INPUT_TOPIC": src,
            "CDRANON_KAFKA__GROUP_ID": group,
            "CDRANON_KEYSTORE": f"file://{keys}",
            "CDRANON_METRICS__ENABLED": "false",
            "CDRANON_LOGGING__LEVEL": "WARNING",
            "CDRANON_TOPICS__REPLICATION_FACTOR": "1",
        }

    def processor(self, name: str, procs: int = 1, with_latency: bool = True) -> dict[str, Any]:
        """Run ``procs`` processors of kind ``name`` over the input topic; measure."""
        tag = f"{name}-{procs}-{uuid.uuid4().hex[:6]}"
        group = f"{tag}-g"
        load0 = loadavg()
        src = self.faust_src if name == "faust" else self.src
        if name in ("cdranon", "faust"):
            env = self._cdranon_env(tag, group, src)
            args = ["service.cli", "run"] + (["--engine", "faust"] if name == "faust" else [])
            pattern = rf"^{tag}\.sanitised\.[0-9]{{4}}-[0-9]{{2}}$"
        else:
            self._create([f"{tag}.out"], PARTITIONS)
            env = {}
            args = ["benchmarks.e2e_bench", "--role", name, "--bootstrap", self.bootstrap]
            args += ["--src", src, "--dst", f"{tag}.out", "--group", group]
            pattern = rf"^{tag}\.out$"
        target = high_watermark(self.bootstrap, src)
        committed = Committed(self.bootstrap, group, src)
        running = [Proc.start(args, env, self.log) for _ in range(procs)]
        rss: list[float] = []
        try:
            cap = self.args.faust_s if name == "faust" else self.args.cap_s
            w = drain(committed, target, [p.p.pid for p in running], self.broker_pid, cap)
            if w.records == 0:
                raise RuntimeError(
                    f"{name}: its first offset commit already covered the whole input; "
                    "give it more records (--records / --faust-records)"
                )
            rate = w.records / w.seconds
            out: dict[str, Any] = {
                "processes": procs,
                "records_measured": w.records,
                "drained_all": w.reached,
                "seconds": round(w.seconds, 2),
                "records_per_s": round(rate),
                "records_per_s_per_process": round(rate / procs),
                "mb_per_s": round(rate * self.mean_bytes / 1e6, 1),
                "cpu_s_per_million": round(w.cpu_s / max(w.records, 1) * 1e6, 2),
                "cpu_utilisation_cores": round(w.cpu_s / w.seconds, 2),
                "broker_cpu_s_per_million": round(w.broker_cpu_s / max(w.records, 1) * 1e6, 2),
                "load_average_before": round(load0, 2),
            }
            if with_latency:
                if not w.reached:
                    # Capped before the end: let it catch up before timing latency.
                    drain(committed, target, [], None, 900)
                # The same fresh records for every scenario: each reads its own output
                # from 'latest', after its drain.
                out["latency"] = latency(
                    self.bootstrap,
                    src,
                    pattern,
                    committed,
                    self.fresh,
                    rate / 2,
                    self.args.latency_s,
                )
        finally:
            rss = [p.finish() for p in running]
            committed.close()
        out["peak_rss_mib"] = round(max(rss))
        return out

    # -- 5. the core ----------------------------------------------------------------------

    def core(self) -> dict[str, Any]:
        """The transform alone on one core (thread CPU time), and the orjson round trip."""
        values = self.values[:CORE_RECORDS]
        keys = self.tmp / "keys-core"
        env = {"CDRANON_MASTER_KEY": generate_master_key()}
        t = Transformer(load_policy(None), Keyring(open_keystore(f"file://{keys}", env=env)))
        now_ms = int(time.time() * 1000)
        batches = [values[i : i + 10_000] for i in range(0, len(values), 10_000)]

        def run() -> None:
            for b in batches:
                t.transform(b, now_ms)

        def round_trip() -> None:
            loads, dumps = orjson.loads, orjson.dumps
            for v in values:
                # The malformed 1% fail here as they fail in the transform.
                with contextlib.suppress(orjson.JSONDecodeError):
                    dumps(loads(v))

        secs = median(rounds(run, 5))
        rt = median(rounds(round_trip, 5))
        rate = len(values) / secs
        return {
            "records": len(values),
            "records_per_s": round(rate),
            "ns_per_record": round(secs / len(values) * 1e9),
            "mb_per_s": round(rate * self.mean_bytes / 1e6, 1),
            "cpu_s_per_million": round(secs / len(values) * 1e6, 2),
            "round_trip_ns_per_record": round(rt / len(values) * 1e9),
            "ratio_to_round_trip": round(secs / rt, 2),
            "peak_rss_mib": None,
        }


def _java(cp: str, main: str, args: list[str]) -> tuple[str, float, float, float]:
    """Run a Kafka tool; (stdout, CPU s, peak RSS MiB, wall s) from wait4."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(
            ["java", "-Xmx512m", "-cp", cp, main, *args],  # noqa: S607
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        peak = 0.0
        while True:
            # ru_maxrss would carry this process's peak over exec: sample VmHWM instead.
            hwm = vm_hwm_mib(p.pid)
            if not math.isnan(hwm):
                peak = max(peak, hwm)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.1)  # the tool runs to completion; sampled until it exits
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{main} failed ({p.returncode}): {text[-2000:]}")
    return text, usage.ru_utime + usage.ru_stime, peak, wall


def _ms_fields(line: str) -> list[tuple[float, str]]:
    """ProducerPerformance's '151 ms 50th, 204 ms 99th' -> [(151, 'p50'), (204, 'p99')]."""
    out = []
    for part in line.split(","):
        words = part.split()
        if len(words) == 3 and words[1] == "ms" and words[2] in ("50th", "99th"):
            out.append((float(words[0]), "p" + words[2][:2]))
    return out


def _broker_pid(directory: Path) -> int | None:
    try:
        return int((directory / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


ROWS = ("broker-producer", "broker-consumer", "passthrough-plain", "passthrough-txn")


def table(doc: dict[str, Any]) -> str:
    """The Markdown table of one results document."""
    rows: list[tuple[str, dict[str, Any]]] = []
    b = doc.get("broker")
    if b:
        rows += [
            ("broker ProducerPerformance", b["producer"]),
            ("broker ConsumerPerformance", b["consumer"]),
        ]
    labels = {
        "passthrough-plain": "passthrough (consume->produce, at least once)",
        "passthrough-txn": "passthrough (transactions, exactly once)",
        "cdranon": "cdranon run (confluent engine, exactly once)",
        "faust": "cdranon run --engine faust (at least once)",
        "core": "core transform alone (1 core, no broker)",
    }
    rows += [(label, doc[k]) for k, label in labels.items() if k in doc]
    lines = [
        "| what | records/s | MB/s | p50 ms | p99 ms | offered/s | CPU s per 1M | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lat = r.get("latency") or {}
        if not lat and "latency_at_full_speed_ms" in r:
            lat = {**r["latency_at_full_speed_ms"], "offered_per_s": "max"}
        p50 = lat.get("p50", lat.get("p50_ms", "-"))
        p99 = lat.get("p99", lat.get("p99_ms", "-"))
        lines.append(
            f"| {label} | {r['records_per_s']:,} | {r['mb_per_s']} | {p50} "
            f"| {p99} | {lat.get('offered_per_s', '-')} "
            f"| {r['cpu_s_per_million']} | {r.get('peak_rss_mib') or '-'} |"
        )
    if "scaling" in doc:
        lines += [
            "",
            "| cdranon processes (8 partitions) | records/s | per process | CPU cores busy "
            "| CPU s per 1M | broker CPU s per 1M |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in doc["scaling"]:
            lines.append(
                f"| {r['processes']} | {r['records_per_s']:,} | {r['records_per_s_per_process']:,} "
                f"| {r['cpu_utilisation_cores']} | {r['cpu_s_per_million']} "
                f"| {r['broker_cpu_s_per_million']} |"
            )
    if "ratios" in doc:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in doc["ratios"].items()]
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    """Records/s and CPU s per million records, one bar per scenario."""
    import matplotlib  # noqa: PLC0415 - only when writing the chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names: list[str] = []
    rates: list[float] = []
    cpus: list[float] = []
    for key in ("passthrough-plain", "passthrough-txn", "cdranon", "faust", "core"):
        if key in doc:
            names.append(key)
            rates.append(doc[key]["records_per_s"])
            cpus.append(doc[key]["cpu_s_per_million"])
    if "broker" in doc:
        names.insert(0, "broker-consume")
        rates.insert(0, doc["broker"]["consumer"]["records_per_s"])
        cpus.insert(0, doc["broker"]["consumer"]["cpu_s_per_million"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(names, rates, color="#4c72b0")
    a.set_yscale("log")
    a.set_ylabel("records/s (log)")
    a.set_title("throughput")
    b.bar(names, cpus, color="#dd8452")
    b.set_yscale("log")
    b.set_ylabel("CPU seconds per million records (log)")
    b.set_title("cost")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"cdranon benchmarks, {doc['machine']['when']}, {doc['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(doc: dict[str, Any]) -> dict[str, float]:
    """The ratios the README and bench-check quote (same-run numbers only)."""
    out: dict[str, float] = {}

    def rate(k: str) -> float | None:
        r = doc.get(k)
        return float(r["records_per_s"]) if r else None

    c, core, faust = rate("cdranon"), rate("core"), rate("faust")
    for ceiling in ("passthrough-plain", "passthrough-txn"):
        p = rate(ceiling)
        if c and p:
            out[f"cdranon_to_{ceiling}"] = round(c / p, 3)
    if c and core:
        out["cdranon_to_core"] = round(c / core, 3)
    if c and faust:
        out["cdranon_to_faust"] = round(c / faust, 2)
    if "core" in doc:
        out["core_to_orjson_round_trip_cost"] = doc["core"]["ratio_to_round_trip"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--faust-s", type=float, default=90.0, help="measure Faust this long at most")
    ap.add_argument(
        "--faust-records", type=int, default=60_000, help="the Faust engine's (shorter) input"
    )
    ap.add_argument(
        "--cap-s", type=float, default=300.0, help="measure any drain this long at most"
    )
    ap.add_argument("--latency-s", type=float, default=10.0)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-broker-tools", action="store_true")
    ap.add_argument(
        "--only", default="passthrough-plain,passthrough-txn,cdranon,faust", help="processors"
    )
    ap.add_argument("--output", default="bench", help="results name under benchmarks/results/")
    args = ap.parse_args(argv)

    started = time.monotonic()
    kdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    broker = LocalKafka(kdir, watch_pid=os.getpid())
    bootstrap = broker.start()
    doc: dict[str, Any] = {"machine": machine(), "records": args.records}
    doc["machine"]["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    bench: Bench | None = None
    try:
        bench = Bench(args, bootstrap, _broker_pid(kdir))
        doc["mean_record_bytes"] = round(bench.mean_bytes)
        print(f"producing {args.records} records to {bench.src} ...", flush=True)
        _produce(bootstrap, bench.src, bench.values)
        _produce(bootstrap, bench.faust_src, bench.values[: args.faust_records])
        _scenarios(bench, args, doc)
    finally:
        if bench is not None:
            bench.close()
        broker.stop()
    assert bench is not None
    print("core transform ...", flush=True)
    doc["core"] = bench.core()
    doc["ratios"] = ratios(doc)
    doc["bench_process_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    doc["wall_s"] = round(time.monotonic() - started)
    path = write_results(args.output, doc)
    (RESULTS / f"{args.output}.md").write_text(table(doc))
    chart(doc, RESULTS / f"{args.output}.png")
    print(table(doc))
    print(f"written to {path} (+ .md, .png)")
    return 0


def _scenarios(bench: Bench, args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if not args.no_broker_tools:
        print("broker perf tools ...", flush=True)
        doc["broker"] = bench.broker()
        print(f"  {doc['broker']}", flush=True)
    for name in args.only.split(","):
        print(f"{name} ...", flush=True)
        doc[name] = bench.processor(name)
        print(f"  {doc[name]}", flush=True)
    if not args.no_scaling:
        doc["scaling"] = []
        for n in (1, 2, 4):
            print(f"scaling: {n} cdranon processes ...", flush=True)
            doc["scaling"].append(bench.processor("cdranon", procs=n, with_latency=False))
            print(f"  {doc['scaling'][-1]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
