"""``make bench-check``: a short benchmark run against the last committed results, as ratios.

    python -m benchmarks.check [--records 60000] [--baseline benchmarks/results/bench.json]
                               [--max-drop 0.25]

Runs ``benchmarks.run`` briefly (no scaling, no Java tools, a short Faust run) and compares
ratios measured within each run, never absolute rates: the machine is shared, so a rate
moves with the load, while a ratio of two rates measured minutes apart moves much less.
The baseline is ``benchmarks/results/bench.json`` as last committed (``git show
HEAD:...``), or the file on disk outside a git checkout. Exits 1 if a ratio dropped by more
than ``--max-drop`` (25%); not part of ``make test``.

Compared (higher is better for each):
- cdranon / passthrough (plain): what anonymisation costs against moving the same bytes;
- cdranon / Faust engine;
- cdranon / core transform: how much of the core's rate the Kafka loop keeps;
- orjson round trip / core transform (cost): the core's efficiency, one core.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from benchmarks import run
from benchmarks.common import RESULTS

REPO = Path(__file__).resolve().parents[1]
BASELINE = RESULTS / "bench.json"


def comparable(doc: dict[str, Any]) -> dict[str, float]:
    """The higher-is-better ratios of one results document."""
    r = doc.get("ratios", {})
    out: dict[str, float] = {}
    for key in ("cdranon_to_passthrough-plain", "cdranon_to_faust", "cdranon_to_core"):
        if key in r:
            out[key] = float(r[key])
    if r.get("core_to_orjson_round_trip_cost"):
        out["orjson_round_trip_to_core_speed"] = 1 / float(r["core_to_orjson_round_trip_cost"])
    return out


def committed_baseline(path: Path) -> dict[str, Any]:
    """The results JSON as last committed, else as on disk."""
    rel = path.resolve().relative_to(REPO)
    try:
        text = subprocess.run(
            ["git", "show", f"HEAD:{rel}"],  # noqa: S607 - git from PATH
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, OSError):
        text = path.read_bytes()
    doc: dict[str, Any] = orjson.loads(text)
    return doc


def compare(
    base: dict[str, float], now: dict[str, float], max_drop: float
) -> tuple[list[str], bool]:
    """Lines of a report, and whether every shared ratio kept ``1 - max_drop`` of its value."""
    lines, ok = [], True
    for key in sorted(base.keys() & now.keys()):
        change = now[key] / base[key] if base[key] else float("inf")
        bad = change < 1 - max_drop
        ok = ok and not bad
        lines.append(
            f"{'FAIL' if bad else 'ok  '} {key:<36} baseline {base[key]:.3f}  now {now[key]:.3f}"
            f"  ({change:.2f}x)"
        )
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("--max-drop", type=float, default=0.25)
    args = ap.parse_args(argv)

    base = comparable(committed_baseline(args.baseline))
    if not base:
        print(f"no ratios in the baseline {args.baseline}: run `make bench` and commit it")
        return 1
    run.main(
        [
            *("--records", str(args.records), "--no-scaling", "--no-broker-tools"),
            *("--faust-records", "20000", "--faust-s", "30", "--latency-s", "3"),
            *("--only", "passthrough-plain,cdranon,faust", "--output", "bench-check"),
        ]
    )
    now = comparable(orjson.loads((RESULTS / "bench-check.json").read_bytes()))
    lines, ok = compare(base, now, args.max_drop)
    print("\n".join(lines))
    missing = sorted(base.keys() - now.keys())
    if missing:
        print(f"not measured now: {missing}")
        ok = False
    print("bench-check:", "passed" if ok else f"FAILED (a ratio dropped > {args.max_drop:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
