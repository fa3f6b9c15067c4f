"""End to end through the local broker: ``cdranon run`` against a plain passthrough.

    python -m benchmarks.e2e_bench [--records 100000] [--rounds 3] [--bootstrap HOST:PORT]

Three processors read the same bytes from an input topic and write them out, each in its
own process (so the bench's producer and reader do not share its GIL):

- ``cdranon``: ``cdranon run`` (transform + one transaction per batch, the real service);
- ``passthrough-txn``: confluent-kafka consume -> produce of the same bytes, one
  transaction per batch with the offsets (the same exactly-once plumbing, no transform);
- ``passthrough-plain``: consume -> produce, offsets committed by the consumer after a
  flush (at-least-once): the ceiling of Python + librdkafka on this machine.

Variants of ``cdranon`` (``--only``): ``cdranon-nointegrity`` (no digests, no signed
roots) and ``cdranon-pkcs11``: the keystore is ``pkcs11://`` on a SoftHSM2 token made by
scripts/softhsm.sh, wrapped secrets in a ``cdr.keys`` topic of the scenario's own
(``cdranon-pkcs11-dir``: in a directory instead, to tell the HSM's cost from the topic
follower's). A name
may be given more than once, to interleave runs on a noisy machine, e.g.
``--only cdranon,cdranon-pkcs11,cdranon,cdranon-pkcs11``: such a name's figure is the
median over its runs, each run kept under ``runs``. ``--side-by-side-rounds N`` then runs
the distinct ``cdranon`` variants at the same time on one input topic (each its own
group) and compares their CPU per record round by round, under the same load: the
steadiest comparison on a shared machine (results under ``side_by_side``), with each
one's main-thread CPU per record beside its total (the main thread bounds a processor's
records/s); ``--side-by-side-only`` skips the runs one after the other.

Throughput: the processor is running and warmed up (month topics exist, partitions
assigned); the bench produces ``--records`` CDRs as fast as it can and measures from the
first produce to the moment the group's committed offsets cover them all (polled every
20 ms). Median of ``--rounds``. Latency: records produced at 50% of the measured rate for
``--latency-s`` seconds; a read_committed reader in the bench notes when each cdr_id
appears in the output; p50/p99 of (seen - produced). The core transform alone is
measured on one core over the same records (thread CPU time). Results:
benchmarks/results/e2e.json. Not a test: numbers, to be compared as ratios.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

from benchmarks.common import machine, median, rounds, write_results
from service.devkafka import LocalKafka
from service.generator import generate_cdrs
from service.keyring import Keyring
from service.keystore import generate_master_key, open_keystore
from service.months import add_months, month_of, now_utc
from service.policy import load_policy
from service.transform import Transformer

REPO = Path(__file__).resolve().parents[1]
BATCH = 10_000
SOFTHSM_SH = REPO / "scripts" / "softhsm.sh"
PIN_ENV = "CDRANON_HSM_PIN"
_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
    }
)


def _softhsm_token() -> tuple[str, dict[str, str]]:
    """A fresh SoftHSM2 token: its module path and the environment (config, PIN) to use it."""
    directory = Path(tempfile.mkdtemp(prefix="e2e-softhsm-"))
    pin = secrets.token_hex(8)
    env = {**os.environ, PIN_ENV: pin, "CDRANON_HSM_SO_PIN": secrets.token_hex(8)}
    subprocess.run(
        [str(SOFTHSM_SH), "init", str(directory), "cdranon-bench"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    module = subprocess.run(
        [str(SOFTHSM_SH), "module"], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    return module, {"SOFTHSM2_CONF": str(directory / "softhsm2.conf"), PIN_ENV: pin}


def _months() -> list[str]:
    y, m = (int(p) for p in month_of(now_utc()).split("-"))
    out = []
    for back in (2, 1, 0):
        y2, m2 = add_months(y, m, -back)
        out.append(f"{y2:04d}-{m2:02d}")
    return out


# -- the passthrough processes ------------------------------------------------------------


def passthrough(bootstrap: str, src: str, dst: str, group: str, txn: bool) -> None:
    """Consume ``src``, produce the same bytes to ``dst``; until SIGTERM."""
    import signal  # noqa: PLC0415 - only the child process needs it

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    pconf: dict[str, Any] = {"bootstrap.servers": bootstrap, "linger.ms": 10}
    if txn:
        pconf["transactional.id"] = f"pt-{uuid.uuid4().hex[:8]}"
    producer = Producer(pconf)
    if txn:
        producer.init_transactions(30)
    consumer.subscribe([src])
    while not stop.is_set():
        msgs = [m for m in consumer.consume(BATCH, 0.1) if m.error() is None]
        if not msgs:
            continue
        if txn:
            producer.begin_transaction()
        offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            value = m.value()
            while True:
                try:
                    producer.produce(dst, value, m.key(), timestamp=m.timestamp()[1])
                    break
                except BufferError:
                    producer.poll(0.05)
            offsets[(m.topic() or "", m.partition() or 0)] = (m.offset() or 0) + 1
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if txn:
            producer.send_offsets_to_transaction(tps, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(30)
        else:
            producer.flush(30)
            consumer.commit(offsets=tps, asynchronous=False)
    consumer.close()


# -- the orchestration ---------------------------------------------------------------------


def _stat_cpu_s(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proc:
    """A processor subprocess."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the process has used so far."""
        return _stat_cpu_s(Path(f"/proc/{self.p.pid}/stat"))

    def main_cpu_s(self) -> float:
        """CPU seconds of its main thread alone: the Python loop (consume, transform,
        produce calls), which bounds one processor's throughput; librdkafka's threads run
        beside it. From schedstat, in ns: /proc's stat counts 10 ms ticks, +-2% of a
        60k-record round."""
        ns = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/schedstat").read_text().split()[0]
        return int(ns) / 1e9

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)


def _committed(bootstrap: str, group: str, topic: str, parts: int) -> int:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(parts)], timeout=10)
        return sum(max(0, tp.offset) for tp in got)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() in _COORDINATOR_MOVING:
            return -1  # a young broker's group coordinator is loading: ask again
        raise
    finally:
        c.close()


def _produce(
    bootstrap: str, topic: str, values: list[bytes], rate: float | None = None
) -> dict[str, float]:
    """Produce ``values`` (at ``rate``/s if given); return cdr_id -> produce wall time."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sent: dict[str, float] = {}
    start = time.monotonic()
    for i, v in enumerate(values):
        if rate is not None:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0.002:
                time.sleep(ahead)  # pacing at the target rate
        while True:
            try:
                producer.produce(topic, v)
                break
            except BufferError:
                producer.poll(0.01)
        if rate is not None:
            sent[orjson.loads(v)["cdr_id"]] = time.time()
        producer.poll(0)
    producer.flush(60)
    return sent


def _wait_committed(
    bootstrap: str, group: str, topic: str, target: int, timeout_s: float = 300
) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        if _committed(bootstrap, group, topic, 3) >= target:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"group {group} did not reach {target} committed records")
        time.sleep(0.02)  # resolution of the end time


def _reader(bootstrap: str, pattern: str, seen: dict[str, float], stop: threading.Event) -> None:
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
    c.subscribe([pattern])
    while not stop.is_set():
        for m in c.consume(5000, 0.05):
            if m.error() is None and m.value():
                now = time.time()
                try:
                    cid = orjson.loads(m.value() or b"{}").get("cdr_id")
                except orjson.JSONDecodeError:
                    continue
                if isinstance(cid, str) and cid not in seen:
                    seen[cid] = now
    c.close()


def _pkcs11_env(
    name: str, topic_store: str, hsm: tuple[str, dict[str, str]] | None
) -> dict[str, str]:
    """The keystore of a pkcs11 scenario: the token, wrapped secrets in the topic or a dir."""
    if hsm is None:
        raise ValueError(f"{name} needs a SoftHSM2 token")
    module, hsm_env = hsm
    store = topic_store
    if name.endswith("-dir"):
        store = f"file://{tempfile.mkdtemp(prefix='e2e-wrapped-')}"
    url = f"pkcs11://{module}?token=cdranon-bench&pin-env={PIN_ENV}&store={store}"
    return {**hsm_env, "CDRANON_KEYSTORE": url}


def _cdranon_env(
    name: str,
    bootstrap: str,
    tag: str,
    group: str,
    hsm: tuple[str, dict[str, str]] | None,
    input_topic: str | None = None,
) -> dict[str, str]:
    """The environment of a ``cdranon run`` scenario: its topics, group and keystore."""
    keys = Path(tempfile.mkdtemp(prefix="e2e-keys-"))
    env = {
        "CDRANON_MASTER_KEY": generate_master_key(),
        "CDRANON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "CDRANON_KAFKA__TOPIC_PREFIX": tag,
        "CDRANON_KAFKA__GROUP_ID": group,
        "CDRANON_KEYSTORE": f"file://{keys}",
        "CDRANON_METRICS__ENABLED": "false",
        "CDRANON_LOGGING__LEVEL": "WARNING",
        "CDRANON_TOPICS__REPLICATION_FACTOR": "1",
        # "cdranon-nointegrity": the same processor without digests and signed roots,
        # so the cost of "original form" is measured in the same run.
        "CDRANON_INTEGRITY__ENABLED": "false" if name.endswith("nointegrity") else "true",
    }
    if input_topic is not None:
        env["CDRANON_KAFKA__INPUT_TOPIC"] = input_topic
    if "pkcs11" in name:
        env.update(_pkcs11_env(name, f"kafka://{bootstrap}/cdr.keys.{tag}", hsm))
    return env


def _scenario(
    name: str,
    bootstrap: str,
    args: argparse.Namespace,
    data: list[list[bytes]],
    warm: list[bytes],
    latency_data: list[bytes],
    hsm: tuple[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    src, group = f"{tag}.raw", f"{tag}-g"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(src, 3, 1), NewTopic(f"{tag}.out", 3, 1)]).values():
        f.result()
    if name.startswith("cdranon"):
        proc = Proc(["service.cli", "run"], _cdranon_env(name, bootstrap, tag, group, hsm))
        pattern = rf"^{tag}\.(sanitised)\.[0-9]{{4}}-[0-9]{{2}}$"
    else:
        proc = Proc(
            [
                "benchmarks.e2e_bench",
                "--role",
                name,
                "--bootstrap",
                bootstrap,
                "--src",
                src,
                "--dst",
                f"{tag}.out",
                "--group",
                group,
            ],
            {},
        )
        pattern = f"^{tag}\\.out$"
    try:
        total = len(warm)
        _produce(bootstrap, src, warm)
        _wait_committed(bootstrap, group, src, total)
        rates = []
        cpu_us = []
        for batch in data:
            t0, c0 = time.monotonic(), proc.cpu_s()
            _produce(bootstrap, src, batch)
            total += len(batch)
            t1 = _wait_committed(bootstrap, group, src, total)
            rates.append(len(batch) / (t1 - t0))
            # The processor's own CPU per record: what it costs, whatever else the shared
            # machine runs meanwhile (wall-clock rates here vary by +-30%).
            cpu_us.append((proc.cpu_s() - c0) / len(batch) * 1e6)
        rate = median(rates)
        # Latency at half the measured rate.
        seen: dict[str, float] = {}
        stop = threading.Event()
        reader = threading.Thread(target=_reader, args=(bootstrap, pattern, seen, stop))
        reader.start()
        time.sleep(3)  # the reader joins and positions at the end before the timed records
        n = min(len(latency_data), int(rate / 2 * args.latency_s))
        sent = _produce(bootstrap, src, latency_data[:n], rate=rate / 2)
        total += n
        _wait_committed(bootstrap, group, src, total)
        deadline = time.monotonic() + 30
        while len(seen) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)  # the reader catches up with the committed output
        stop.set()
        reader.join(30)
        lat = sorted(seen[c] - t for c, t in sent.items() if c in seen)
        q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [float("nan")] * 99
        return {
            "records_per_s": round(rate),
            "rounds_records_per_s": [round(r) for r in rates],
            "cpu_us_per_record": round(median(cpu_us), 2),
            "rounds_cpu_us_per_record": [round(c, 2) for c in cpu_us],
            "latency_rate_per_s": round(rate / 2),
            "latency_records": len(lat),
            "latency_p50_ms": round(q[49] * 1000, 1),
            "latency_p99_ms": round(q[98] * 1000, 1),
        }
    finally:
        proc.stop()


def _side_by_side(
    names: list[str],
    bootstrap: str,
    data: list[list[bytes]],
    warm: list[bytes],
    hsm: tuple[str, dict[str, str]] | None,
) -> dict[str, Any]:
    """The ``cdranon`` variants ``names`` running AT ONCE on one input topic, each in its
    own group with its own outputs; per round, each one's CPU per record.

    Interleaved runs meet different load (on a shared 2-vCPU machine their CPU per record
    moved by 12-21% between runs of one scenario); processors that work through the same
    records at the same time meet the same load, so their per-round ratios compare the
    variants themselves. They share the cores, so their wall-clock rates are not reported.
    """
    run_tag = uuid.uuid4().hex[:6]
    src = f"side-{run_tag}.raw"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(src, 3, 1)]).values():
        f.result()
    procs: dict[str, tuple[Proc, str]] = {}
    try:
        for i, name in enumerate(names):
            tag = f"{name}-{i}-{run_tag}"
            group = f"{tag}-g"
            env = _cdranon_env(name, bootstrap, tag, group, hsm, input_topic=src)
            procs[name] = (Proc(["service.cli", "run"], env), group)
        total = len(warm)
        _produce(bootstrap, src, warm)
        for _, group in procs.values():
            _wait_committed(bootstrap, group, src, total)
        cpu: dict[str, list[float]] = {name: [] for name in procs}
        main: dict[str, list[float]] = {name: [] for name in procs}
        for batch in data:
            c0 = {name: p.cpu_s() for name, (p, _) in procs.items()}
            m0 = {name: p.main_cpu_s() for name, (p, _) in procs.items()}
            _produce(bootstrap, src, batch)
            total += len(batch)
            for _, group in procs.values():
                _wait_committed(bootstrap, group, src, total)
            for name, (p, _) in procs.items():
                cpu[name].append((p.cpu_s() - c0[name]) / len(batch) * 1e6)
                main[name].append((p.main_cpu_s() - m0[name]) / len(batch) * 1e6)
            last = {n: (round(c[-1], 1), round(main[n][-1], 1)) for n, c in cpu.items()}
            print(f"  {last}", flush=True)
    finally:
        for p, _ in procs.values():
            p.stop()
    out: dict[str, Any] = {"records": len(data[0]), "rounds": len(data)}
    out |= {
        name: {
            "cpu_us_per_record": round(median(c), 2),
            "rounds_cpu_us_per_record": [round(x, 2) for x in c],
            "main_thread_cpu_us_per_record": round(median(main[name]), 2),
            "rounds_main_thread_cpu_us_per_record": [round(x, 2) for x in main[name]],
        }
        for name, c in cpu.items()
    }
    if "cdranon" in cpu:
        for name in names:
            if name == "cdranon":
                continue
            # file over the variant, as in _pkcs11_ratios: 1.0 = as cheap, above 0.95 is
            # "within 5%"; the median of the per-round ratios of paired measurements.
            pairs = [f / v for f, v in zip(cpu["cdranon"], cpu[name], strict=True)]
            short = name.removeprefix("cdranon-").replace("-", "_")
            out[f"ratio_{short}_to_file_cpu"] = round(median(pairs), 3)
            out[f"ratio_{short}_to_file_cpu_rounds"] = [round(r, 3) for r in pairs]
            # The same for the main thread alone (what bounds the records/s of one
            # processor): the figure for "throughput within N%" on a machine where
            # librdkafka's threads have a core of their own.
            mains = [f / v for f, v in zip(main["cdranon"], main[name], strict=True)]
            out[f"ratio_{short}_to_file_main_thread_cpu"] = round(median(mains), 3)
            out[f"ratio_{short}_to_file_main_thread_cpu_rounds"] = [round(r, 3) for r in mains]
    return out


def _core(values: list[bytes], n_rounds: int) -> dict[str, Any]:
    """The transform alone, on one core, over the same bytes (thread CPU time)."""
    keys = Path(tempfile.mkdtemp(prefix="e2e-core-"))
    env = {"CDRANON_MASTER_KEY": generate_master_key()}
    t = Transformer(load_policy(None), Keyring(open_keystore(f"file://{keys}", env=env)))
    now_ms = int(time.time() * 1000)
    batches = [values[i : i + BATCH] for i in range(0, len(values), BATCH)]

    def run() -> None:
        for b in batches:
            t.transform(b, now_ms)

    secs = median(rounds(run, n_rounds))
    return {
        "records_per_s": round(len(values) / secs),
        "ns_per_record": round(secs / len(values) * 1e9),
    }


def _by_name(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One entry per scenario name: its run, or the medians over its runs and the runs."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(n for n, _ in runs):
        mine = [r for n, r in runs if n == name]
        if len(mine) == 1:
            out[name] = mine[0]
            continue
        out[name] = {
            k: round(median([float(r[k]) for r in mine]), 1)
            for k in ("records_per_s", "cpu_us_per_record", "latency_p50_ms", "latency_p99_ms")
        }
        out[name]["runs"] = mine
    return out


def _pkcs11_ratios(
    runs: list[tuple[str, dict[str, Any]]], results: dict[str, Any]
) -> dict[str, Any]:
    """pkcs11 over file throughput: of the medians, and of each run over the file run before it."""
    out: dict[str, Any] = {"target_ratio_pkcs11_to_file": 0.95}
    for variant in ("cdranon-pkcs11", "cdranon-pkcs11-dir"):
        if variant not in results:
            continue
        pairs = []
        last_file: float | None = None
        for name, r in runs:
            if name == "cdranon":
                last_file = float(r["records_per_s"])
            elif name == variant and last_file is not None:
                pairs.append(round(float(r["records_per_s"]) / last_file, 3))
        short = variant.removeprefix("cdranon-").replace("-", "_")
        out[f"ratio_{short}_to_file"] = round(
            results[variant]["records_per_s"] / results["cdranon"]["records_per_s"], 3
        )
        out[f"ratio_{short}_to_file_pairs"] = pairs
        # Cost: the processor's CPU per record, file over this variant (1.0 = as cheap;
        # above 0.95 is "within 5%"). Steadier than the wall-clock rates on this machine.
        out[f"ratio_{short}_to_file_cpu"] = round(
            results["cdranon"]["cpu_us_per_record"] / results[variant]["cpu_us_per_record"], 3
        )
    return out


def _add_ratios(results: dict[str, Any]) -> None:
    """cdranon's throughput over the core transform's and over each passthrough's."""
    if "cdranon" not in results:
        return
    core = results["core_transform_one_core"]["records_per_s"]
    e2e = results["cdranon"]["records_per_s"]
    results["ratio_e2e_to_core"] = round(e2e / core, 3)
    results["target_ratio_e2e_to_core"] = 0.8
    for ceiling in ("passthrough-txn", "passthrough-plain"):
        if ceiling in results:
            results[f"ratio_e2e_to_{ceiling}"] = round(e2e / results[ceiling]["records_per_s"], 3)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-s", type=float, default=10.0)
    ap.add_argument("--bootstrap", default=os.environ.get("CDRANON_BOOTSTRAP", ""))
    ap.add_argument("--only", default="cdranon,passthrough-txn,passthrough-plain")
    ap.add_argument("--output", default="e2e", help="results name under benchmarks/results/")
    ap.add_argument(
        "--side-by-side-rounds",
        type=int,
        default=0,
        help="then run the distinct cdranon variants of --only at once on one input topic "
        "for this many rounds of --records, and compare their CPU per record round by round",
    )
    ap.add_argument(
        "--side-by-side-only",
        action="store_true",
        help="skip the one-after-the-other runs (and the core figure): side by side only",
    )
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.role:
        passthrough(
            args.bootstrap, args.src, args.dst, args.group, txn=args.role == "passthrough-txn"
        )
        return 0

    months = _months()
    now = now_utc()
    need = args.records * max(args.rounds, args.side_by_side_rounds)
    print(f"generating {need + 2000 + args.records} records over {months} ...", flush=True)
    allv = list(generate_cdrs(need + args.records + 2000, months=months, seed=11, now=now))
    # The generator writes records in time order: the warm-up must sample every month,
    # or the first measured round pays for creating month keys (with a cdr.keys topic
    # store ~1 s each: a transactional publish and a sync), which is not the steady state.
    warm = allv[:: max(1, len(allv) // 2000)][:2000]
    data = [
        allv[2000 + i * args.records : 2000 + (i + 1) * args.records] for i in range(args.rounds)
    ]
    latency_data = allv[2000 + need :]

    broker: LocalKafka | None = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = LocalKafka(Path(tempfile.mkdtemp(prefix="e2e-kafka-")), watch_pid=os.getpid())
        bootstrap = broker.start()
    results: dict[str, Any] = {"machine": machine(), "records": args.records, "rounds": args.rounds}
    names = args.only.split(",")
    hsm = _softhsm_token() if any("pkcs11" in n for n in names) else None
    runs: list[tuple[str, dict[str, Any]]] = []
    try:
        for name in [] if args.side_by_side_only else names:
            print(f"{name} ...", flush=True)
            # Each scenario gets its own fresh copy of the bytes (the same bytes).
            run = _scenario(name, bootstrap, args, data, warm, latency_data, hsm)
            runs.append((name, run))
            print(f"  {run}", flush=True)
        side = [n for n in dict.fromkeys(names) if n.startswith("cdranon")]
        if args.side_by_side_rounds > 0 and len(side) > 1:
            print(f"side by side: {','.join(side)} ...", flush=True)
            side_data = [
                allv[2000 + i * args.records : 2000 + (i + 1) * args.records]
                for i in range(args.side_by_side_rounds)
            ]
            results["side_by_side"] = _side_by_side(side, bootstrap, side_data, warm, hsm)
    finally:
        if broker is not None:
            broker.stop()
    results.update(_by_name(runs))
    if "cdranon" in results and "cdranon-pkcs11" in results:
        results.update(_pkcs11_ratios(runs, results))
    if not args.side_by_side_only:
        results["core_transform_one_core"] = _core(data[0], args.rounds)
    _add_ratios(results)
    path = write_results(args.output, results)
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
