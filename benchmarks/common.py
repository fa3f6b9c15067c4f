"""Shared benchmark plumbing: machine facts, timing rounds, JSON results."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from service.runtime import tune_gc

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("orjson", "cryptography", "confluent-kafka", "phonenumbers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "packages": versions,
    }


def pin_one_core() -> int | None:
    """Pin this process to one core (as the notes' numbers were), if the OS allows."""
    try:
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        return None
    return core


def rounds(fn: Callable[[], object], n: int, warmup: int = 1) -> list[float]:
    """CPU seconds of this thread per call, over ``n`` rounds after ``warmup`` untimed ones.

    Thread CPU time, not wall time: on a shared 2-core machine other processes steal wall
    time unevenly between rounds, which would make the ratios noise. The code measured
    here is single-threaded and does no I/O, so its CPU time is its cost.
    """
    tune_gc()  # the collector settings the service runs with (service/runtime.py)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        gc.collect()
        t0 = time.thread_time_ns()
        fn()
        out.append((time.thread_time_ns() - t0) / 1e9)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(name: str, doc: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (pretty, sorted keys)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return path
