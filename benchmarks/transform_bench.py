"""The core transform on one core, against a plain orjson round trip of the same records.

    python -m benchmarks.transform_bench [--records 200000] [--rounds 7] [--profile]

Data: realistic CDRs from service.generator (~400 bytes), completed so that every record
carries all three identifiers (msisdn, imsi, imei), as the issue asks. Two identifier mixes:
- "realistic": identifiers repeat (a 50k-subscriber pool), as in real traffic;
- "unique": every identifier distinct, so the pseudonym cache never hits (the worst case).
Reported: ns/record, records/s, and the ratio to the round trip measured in the same run.
The transform runs its native path (service/_native.c) where built; "realistic_python"
is the realistic mix through the Python path alone (CDRANON_NATIVE=0), the reference the
native path matches byte for byte, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import machine, median, pin_one_core, rounds, write_results
from service.generator import generate_cdrs
from service.identifiers import luhn_ok
from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.months import parse_rfc3339, to_ms
from service.native import ENV as NATIVE_ENV
from service.policy import load_policy
from service.transform import Transformer

MONTHS = ["2026-09", "2026-10", "2026-11"]
NOW = "2026-12-01T00:00:00Z"
BATCH = 5000


def _imei(rng: random.Random) -> str:
    body = "35" + "".join(rng.choice("0123456789") for _ in range(12))
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


def dataset(n: int, *, unique: bool, seed: int = 7) -> list[bytes]:
    """``n`` records with msisdn, imsi and imei present (not timed)."""
    rng = random.Random(seed)
    out = []
    pool: dict[str, list[str]] = {"msisdn": [], "imsi": [], "imei": []}
    recs = [orjson.loads(r) for r in generate_cdrs(n, months=MONTHS, seed=seed)]
    for rec in recs:
        for f, values in pool.items():
            if rec.get(f):
                values.append(rec[f])
    for i, rec in enumerate(recs):
        if unique:
            rec["msisdn"] = f"+4477{i:09d}"[:14]
            rec["imsi"] = f"23415{i:010d}"
            rec["imei"] = _imei(rng)
        else:
            for f, values in pool.items():
                if not rec.get(f):
                    rec[f] = rng.choice(values)  # not crypto: test data
        out.append(orjson.dumps(rec))
    return out


@contextlib.contextmanager
def _python_path(on: bool) -> Iterator[None]:
    """Transformers built inside have the native path off when ``on``."""
    before = os.environ.get(NATIVE_ENV)
    if on:
        os.environ[NATIVE_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NATIVE_ENV, None)
        else:
            os.environ[NATIVE_ENV] = before


MIXES = ("realistic", "realistic_cold", "unique", "realistic_python")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one transform pass")
    ap.add_argument("--output", default="transform", help="results name under benchmarks/results/")
    args = ap.parse_args(argv)

    core = pin_one_core()
    now_ms = to_ms(parse_rfc3339(NOW))
    tmp = Path(tempfile.mkdtemp(prefix="cdranon-bench-"))
    keyring = Keyring(FileKeystore(tmp / "keys", MasterKey(b"\x01" * 32, source="bench")))
    policy = load_policy()

    results: dict[str, Any] = {"machine": machine(), "pinned_core": core, "records": args.records}
    # Three cases: "realistic" (identifiers repeat, a long-running processor whose
    # pseudonym cache is warm: the steady state), "realistic_cold" (the same records
    # through a fresh transformer: the first pass after a start), "unique" (every
    # identifier new, fresh transformer: the worst case, nothing cached).
    for mix in MIXES:
        data = dataset(args.records, unique=mix == "unique")
        batches = [data[i : i + BATCH] for i in range(0, len(data), BATCH)]
        nbytes = sum(map(len, data))
        python_only = mix == "realistic_python"
        with _python_path(python_only):
            shared = Transformer(policy, keyring)
        if mix == "realistic":
            results["native"] = shared.native

        def round_trip(data: list[bytes] = data) -> None:
            loads, dumps = orjson.loads, orjson.dumps
            for r in data:
                dumps(loads(r))

        def transform(
            batches: list[list[bytes]] = batches, mix: str = mix, shared: Transformer = shared
        ) -> None:
            warm = mix in ("realistic", "realistic_python")
            tf = shared if warm else Transformer(policy, keyring)
            for b in batches:
                res = tf.transform(b, now_ms)
                if res.rejected:
                    raise SystemExit(f"benchmark data rejected: {res.rejected[0].message}")

        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(transform)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
        rt = median(rounds(round_trip, args.rounds))
        tf_s = median(rounds(transform, args.rounds))
        n = len(data)
        results[mix] = {
            "bytes_per_record": round(nbytes / n, 1),
            "round_trip_ns_per_record": round(rt / n * 1e9, 1),
            "transform_ns_per_record": round(tf_s / n * 1e9, 1),
            "transform_records_per_s": round(n / tf_s),
            "transform_mb_per_s": round(nbytes / tf_s / 1e6, 1),
            "ratio_to_round_trip": round(tf_s / rt, 2),
        }
    results["target_ratio"] = 3.5
    results["stretch_ratio"] = 3.0
    path = write_results(args.output, results)
    print(f"{'mix':<15} {'round trip ns':>14} {'transform ns':>13} {'rec/s':>9} {'ratio':>6}")
    for mix in MIXES:
        r = results[mix]
        print(
            f"{mix:<15} {r['round_trip_ns_per_record']:>14} {r['transform_ns_per_record']:>13} "
            f"{r['transform_records_per_s']:>9} {r['ratio_to_round_trip']:>6}"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
