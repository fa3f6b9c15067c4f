"""What "original form" costs, and how fast a month verifies (issue 10's targets).

    python -m benchmarks.integrity_bench [--records 1000000] [--rounds 3] [--e2e]

1. Verification: a month of sanitised records (made by the real transform) with their
   signed-root ranges, checked by service.verify.verify_stream: records/s (target >= 200k).
   The same month as a topic would hold it (each record tagged with its batch and leaf
   index, one root per batch), checked by verify_batches (`verify --topic`); and the
   inclusion proof of a record in the last range (`verify --record`), wall seconds.
2. The transform with integrity on vs off over the same records (thread CPU time).
3. With --e2e: `cdranon run` end to end through a local broker, integrity on vs off, in
   one run, side by side (benchmarks.e2e_bench scenarios "cdranon" and
   "cdranon-nointegrity", --side-by-side-only): CPU per record, all threads and the main
   thread, as throughput ratios (target >= 0.90).
Results: benchmarks/results/integrity.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import machine, median, pin_one_core, rounds, write_results
from service.generator import generate_cdrs
from service.integrity import added_fields, leaf_of
from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.months import parse_rfc3339, to_ms
from service.policy import load_policy
from service.transform import Transformer
from service.verify import (
    RootEvent,
    TaggedRecord,
    proof_for,
    root_event_details,
    verify_batches,
    verify_stream,
)

MONTH = "2026-10"
NOW = "2026-12-01T00:00:00Z"
BATCH = 5000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--e2e", action="store_true", help="also run cdranon run on/off via a broker")
    ap.add_argument("--e2e-records", type=int, default=50_000)
    args = ap.parse_args(argv)
    core = pin_one_core()
    policy = load_policy()
    now = to_ms(parse_rfc3339(NOW))
    tmp = Path(tempfile.mkdtemp(prefix="cdranon-integrity-"))
    keyring = Keyring(FileKeystore(tmp / "keys", MasterKey(b"\x02" * 32, source="bench")))
    print(f"generating {args.records} records of {MONTH} ...", file=sys.stderr)
    raw = list(generate_cdrs(args.records, months=[MONTH], seed=11, now=parse_rfc3339(NOW)))
    batches = [raw[i : i + BATCH] for i in range(0, len(raw), BATCH)]

    # The month as `cdranon process` writes it: records by line, one root per batch.
    tf = Transformer(policy, keyring)
    records: list[tuple[int, bytes]] = []
    roots: list[RootEvent] = []
    for b in batches:
        res = tf.transform(b, now)
        first = len(records)
        records += [(first + i, o.value) for i, o in enumerate(res.sanitised)]
        digests = [o.digest or "" for o in res.sanitised]
        roots.append(RootEvent(**root_event_details("m", first, len(records) - 1, digests)))
    added = added_fields(policy)
    n = len(records)

    def verify(jobs: int) -> None:
        rep = verify_stream("m", records, roots, added, jobs=jobs)
        if not rep.ok:
            raise SystemExit("benchmark month does not verify")

    # One process: thread CPU time. All cores: wall time (the workers' CPU is elsewhere).
    v_s = median(rounds(lambda: verify(1), args.rounds, warmup=0))
    jobs = os.cpu_count() or 1
    v_all_s = _wall_on_all_cores(lambda: verify(jobs), jobs)

    vb_s, proof_s = _topic_and_proof(records, roots, added, args.rounds)

    def transform(integrity: bool) -> None:
        t = Transformer(policy, keyring, integrity=integrity)
        for i, b in enumerate(batches):
            # With integrity, as `cdranon run` calls it: each record tagged with its leaf.
            t.transform(b, now, b"bbenchn%d" % i if integrity else None)

    # Interleaved (on, off, on, off, ...): all "on" rounds first put any drift of the
    # machine (memory first touched, other load) into the ratio.
    on_s: list[float] = []
    off_s: list[float] = []
    transform(True)  # warm-up of both, untimed
    transform(False)
    for _ in range(args.rounds):
        on_s += rounds(lambda: transform(True), 1, warmup=0)
        off_s += rounds(lambda: transform(False), 1, warmup=0)
    on, off = median(on_s), median(off_s)
    result: dict[str, Any] = {
        "machine": machine(),
        "pinned_core": core,
        "records": n,
        "verify_records_per_s_one_core": round(n / v_s),
        "verify_records_per_s_all_cores": round(n / v_all_s),
        "verify_jobs": jobs,
        "verify_target_records_per_s": 200_000,
        "verify_topic_records_per_s_one_core": round(n / vb_s),
        "proof_one_record_s": round(proof_s, 2),
        "transform_integrity_on_ns_per_record": round(on / len(raw) * 1e9),
        "transform_integrity_off_ns_per_record": round(off / len(raw) * 1e9),
        "transform_on_off_throughput_ratio": round(off / on, 3),
    }
    if args.e2e:
        result.update(_e2e(args.e2e_records))
    path = write_results("integrity", result)
    for k, v in result.items():
        if k != "machine":
            print(f"{k:40s} {v}")
    print(f"results: {path}")
    return 0


def _topic_and_proof(
    records: list[tuple[int, bytes]], roots: list[RootEvent], added: frozenset[str], n_rounds: int
) -> tuple[float, float]:
    """(seconds of verify_batches over the month tagged as the stream processor tags it:
    one batch per range, leaf = (batch, index); wall seconds of one inclusion proof of a
    record in the last range)."""
    tagged: list[TaggedRecord] = []
    batch_roots: list[RootEvent] = []
    for ev in roots:
        batch = f"b{ev.first}"
        tagged += [("0", p, v, (batch, p - ev.first)) for p, v in records[ev.first : ev.last + 1]]
        batch_roots.append(
            RootEvent(ev.stream, -1, -1, ev.size, ev.root, writer=ev.writer, batch=batch)
        )

    def verify_tagged() -> None:
        # `verify --topic` reads each record's tag from its bytes (integrity.leaf_of); these
        # records carry none, so the tags are given, and the search for one is timed here.
        for _part, _off, value, _leaf in tagged:
            leaf_of(value)
        if not verify_batches("m", tagged, batch_roots, added).ok:
            raise SystemExit("benchmark month does not verify as a topic")

    vb_s = median(rounds(verify_tagged, n_rounds, warmup=0))
    target = orjson.loads(records[-3][1])["cdr_id"]
    started = time.perf_counter()
    if proof_for(target, "m", records, roots, added) is None:
        raise SystemExit("no proof for a record of the benchmark month")
    return vb_s, time.perf_counter() - started


def _wall_on_all_cores(fn: Callable[[], None], cores: int) -> float:
    """Wall seconds of ``fn`` with this process unpinned: forked workers inherit the
    affinity, and pinned they all shared one core (the first runs measured that: slower
    than one process)."""
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(cores))
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, pinned)


def _e2e(records: int, n_rounds: int = 7) -> dict[str, Any]:
    """`cdranon run` with integrity on and off through a local broker, side by side: both
    read the same input at the same time, and their CPU per record is compared round by
    round (records/s of runs one after the other moved +-30% with the broker's warm-up).
    Throughput ratio = off's CPU per record over on's: what a CPU-bound processor's
    records/s would show; the target is within 10% (>= 0.90)."""
    cmd = [sys.executable, "-m", "benchmarks.e2e_bench", "--only", "cdranon,cdranon-nointegrity"]
    cmd += ["--records", str(records), "--side-by-side-rounds", str(n_rounds)]
    cmd += ["--side-by-side-only", "--output", "e2e-integrity"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(out.stdout, file=sys.stderr)
    e2e = orjson.loads((Path(__file__).parent / "results/e2e-integrity.json").read_bytes())
    sbs = e2e["side_by_side"]
    return {
        "e2e_integrity_on_cpu_us_per_record": sbs["cdranon"]["cpu_us_per_record"],
        "e2e_integrity_off_cpu_us_per_record": sbs["cdranon-nointegrity"]["cpu_us_per_record"],
        "e2e_on_off_throughput_ratio": round(1 / sbs["ratio_nointegrity_to_file_cpu"], 3),
        "e2e_on_off_throughput_ratio_main_thread": round(
            1 / sbs["ratio_nointegrity_to_file_main_thread_cpu"], 3
        ),
        "e2e_on_off_target_ratio": 0.9,
    }


if __name__ == "__main__":
    sys.exit(main())
