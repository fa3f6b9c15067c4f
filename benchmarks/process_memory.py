"""Memory of ``cdranon process`` over a long file: does RSS stay flat?

    python -m benchmarks.process_memory [--records 2000000] [--keep] [--interval 0.5]

Writes a JSON Lines file of generated CDRs (service.generator, streamed to disk, never held
in memory), runs ``python -m service.cli process`` on it as a subprocess, samples the
subprocess's resident set (VmRSS in /proc/PID/status) every ``--interval`` seconds, and
writes benchmarks/results/process_memory.json: records, seconds, records/s, RSS at 10%,
50% and 90% of the run, the peak, and a verdict. "flat" means RSS at 90% is within 20%
(plus 30 MB of slack for allocator noise) of RSS at 10%; "bounded" that it rose but the
rise slows down (a cache filling to its fixed budget, see verdict()); "grows" that the
second half of the run added as much as the first: a per-record leak or an unbounded
cache.

The machine is shared, so seconds and records/s are noisy; RSS is the point here.
Linux only (/proc). Not a test: run it by hand, compare the JSON between versions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import machine, write_results
from service.generator import generate_cdrs
from service.keystore.master import ENV_MASTER_KEY, generate_master_key

ROOT = Path(__file__).resolve().parent.parent
MONTHS = ["2026-08", "2026-09", "2026-10"]
NOW = "2026-11-01T00:00:00Z"
FLAT_RATIO = 0.20
FLAT_SLACK_KB = 30 * 1024
BOUNDED_RATIO = 0.5
_WRITE_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the subprocess: seconds since start, VmRSS and VmHWM in kB, and how
    far it has read its input (bytes; -1 if unknown)."""

    t: float
    rss_kb: int
    hwm_kb: int
    pos: int


def write_input(path: Path, n: int, seed: int) -> int:
    """Stream ``n`` generated CDRs to ``path`` as JSON Lines; returns the bytes written."""
    size = 0
    with path.open("wb") as f:
        chunk: list[bytes] = []
        for rec in generate_cdrs(
            n, months=MONTHS, seed=seed, malformed_ratio=0.002, late_ratio=0.01
        ):
            chunk.append(rec)
            if len(chunk) >= _WRITE_CHUNK:
                data = b"\n".join(chunk) + b"\n"
                f.write(data)
                size += len(data)
                chunk.clear()
        if chunk:
            data = b"\n".join(chunk) + b"\n"
            f.write(data)
            size += len(data)
    return size


def read_status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in kB, or None once the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = hwm = None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    if rss is None or hwm is None:  # a zombie has no memory lines left
        return None
    return rss, hwm


def input_position(pid: int, path: Path) -> int:
    """The file offset of ``pid``'s open ``path`` (/proc/PID/fdinfo), or -1 if not open."""
    target = str(path)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return -1
    for fd in fds:
        try:
            if os.readlink(fd) != target:
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("pos:"):
                    return int(line.split()[1])
        except OSError:
            continue
    return -1


def run_process(
    input_path: Path, out: Path, keys: Path, interval: float
) -> tuple[float, list[Sample], dict[str, Any], str]:
    """Run ``cdranon process``; sample its memory until it exits."""
    env = dict(os.environ)
    env[ENV_MASTER_KEY] = generate_master_key()
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "process",
        "--input",
        str(input_path),
        "--out",
        str(out),
        "--now",
        NOW,
        "--keystore",
        f"file://{keys}",
        "--no-progress",
        "--json",
    ]
    samples: list[Sample] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(  # our own interpreter and module, no shell
            cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr
        )
        next_tick = t0
        while proc.poll() is None:
            reading = read_status(proc.pid)
            if reading is not None:
                pos = input_position(proc.pid, input_path)
                samples.append(Sample(time.perf_counter() - t0, *reading, pos))
            next_tick += interval
            # Wait for the next tick or the exit, whichever comes first.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, next_tick - time.perf_counter()))
        seconds = time.perf_counter() - t0
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"cdranon process failed (exit {proc.returncode}):\n{err_text}")
    summary = orjson.loads(out_text)
    if not isinstance(summary, dict):
        raise SystemExit("cdranon process --json printed no JSON object")
    return seconds, samples, summary, err_text


def source_version() -> dict[str, Any]:
    """The commit measured, and whether service/ had uncommitted changes (shared tree)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607  # git from PATH, no shell
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "service_dirty": None}
    return {"commit": head, "service_dirty": bool(dirty)}


def rss_at(samples: list[Sample], fraction: float, size: int) -> int:
    """VmRSS (kB) when the process had read ``fraction`` of its input.

    By input progress, not wall time: interpreter start-up and imports take a second or
    two, which would put the "10%" reading before any record was processed.
    """
    target = fraction * size
    for s in samples:
        if s.pos >= target:
            return s.rss_kb
    return samples[-1].rss_kb


def verdict(rss10_kb: int, rss50_kb: int, rss90_kb: int) -> str:
    """'flat' if RSS at 90% is within 20% (+ 30 MB slack) of RSS at 10%; else 'bounded' if
    the growth slows down: the second 40% of the run (50% -> 90%) adds at most half of what
    the first 40% (10% -> 50%) added, + 30 MB; else 'grows'.

    'bounded' is a cache filling toward a fixed budget (the pseudonym cache: 2^19 entries,
    filled by a month's distinct identifiers, which a stream mostly shows early); a leak
    per record adds the same in both halves and stays 'grows'. At 2M records the slack
    lets through at most ~40 bytes per record.
    """
    if rss90_kb <= rss10_kb * (1 + FLAT_RATIO) + FLAT_SLACK_KB:
        return "flat"
    if rss90_kb - rss50_kb <= (rss50_kb - rss10_kb) * BOUNDED_RATIO + FLAT_SLACK_KB:
        return "bounded"
    return "grows"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/process_memory.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--records", type=int, default=2_000_000, help="CDRs in the input file")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.records < 1 or args.interval <= 0:
        ap.error("--records must be >= 1 and --interval > 0")

    tmp = Path(tempfile.mkdtemp(prefix="cdranon-process-memory-"))
    try:
        input_path = tmp / "cdrs.jsonl"
        t0 = time.perf_counter()
        size = write_input(input_path, args.records, args.seed)
        gen_s = time.perf_counter() - t0
        print(f"wrote {args.records} CDRs ({size / 1e6:.0f} MB) in {gen_s:.0f} s", flush=True)
        seconds, samples, summary, stderr = run_process(
            input_path, tmp / "out", tmp / "keys", args.interval
        )
        if len(samples) < 5:
            raise SystemExit(
                f"only {len(samples)} RSS samples: use more --records or a shorter --interval"
            )
        if summary.get("records") != args.records:
            raise SystemExit(f"processed {summary.get('records')} records, not {args.records}")
        if not any(s.pos >= 0 for s in samples):
            raise SystemExit("could not read the subprocess's input position from /proc")
        rss10 = rss_at(samples, 0.10, size)
        rss50 = rss_at(samples, 0.50, size)
        rss90 = rss_at(samples, 0.90, size)
        doc: dict[str, Any] = {
            "machine": machine(),
            "source": source_version(),
            "records": args.records,
            "input_bytes": size,
            "seconds": round(seconds, 2),
            "records_per_s": round(args.records / seconds),
            "samples": len(samples),
            "interval_s": args.interval,
            "fractions": "of the input read (file offset from /proc/PID/fdinfo)",
            "rss_mb": {
                "at_10pct": round(rss10 / 1024, 1),
                "at_50pct": round(rss50 / 1024, 1),
                "at_90pct": round(rss90 / 1024, 1),
                "peak_sampled": round(max(s.rss_kb for s in samples) / 1024, 1),
                "peak_hwm": round(max(s.hwm_kb for s in samples) / 1024, 1),
            },
            "growth_10_to_90_pct": round((rss90 - rss10) / rss10 * 100, 1),
            "flat_rule": "rss at 90% <= rss at 10% * 1.2 + 30 MB",
            "bounded_rule": "rss(90%) - rss(50%) <= (rss(50%) - rss(10%)) * 0.5 + 30 MB",
            "verdict": verdict(rss10, rss50, rss90),
            # A coarse curve (about 20 points) to see the shape, not just three readings:
            # [seconds, percent of input read, RSS MB].
            "rss_curve": [
                [round(s.t, 1), round(max(s.pos, 0) / size * 100, 1), round(s.rss_kb / 1024, 1)]
                for s in samples[:: max(1, len(samples) // 20)]
            ],
            "summary": summary,
            "note": "shared machine: seconds and records/s are noisy; RSS is what matters",
        }
        if stderr.strip():
            doc["stderr"] = stderr.strip().splitlines()[-5:]
        path = write_results("process_memory", doc)
        print(
            orjson.dumps(
                {k: doc[k] for k in ("records", "seconds", "records_per_s", "rss_mb", "verdict")}
            ).decode()
        )
        print(f"results: {path}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
