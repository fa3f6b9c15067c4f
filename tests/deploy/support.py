"""Helpers for the deploy checks: PromQL metric names, tools, processes, HTTP, waiting."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cdranon.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = REPO / "docker-compose.yml"
K8S = DEPLOY / "k8s"

# Series Prometheus makes itself for every target; a dashboard may use them.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Not preceded by a digit or dot: the "e3" of 1e3 is no name.
_IDENT = re.compile(r"(?<![A-Za-z0-9_.:])[A-Za-z_:][A-Za-z0-9_:]*")
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN", "start", "end"}
)

T = TypeVar("T")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels removed)."""
    e = _STRINGS.sub('""', expr)
    e = _MATCHERS.sub(" ", e)
    e = _RANGES.sub(" ", e)
    e = _GROUPING.sub(" ", e)
    names: set[str] = set()
    for m in _IDENT.finditer(e):
        word = m.group()
        if word in _KEYWORDS or word in _AGGREGATIONS:
            continue
        if e[m.end() :].lstrip().startswith("("):
            continue  # a function call
        names.add(word)
    return names


def dashboard_panels() -> list[dict[str, Any]]:
    """Every non-row panel of the dashboard (rows' nested panels included)."""
    doc = json.loads(DASHBOARD.read_text())
    out: list[dict[str, Any]] = []
    for p in doc["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def exported_names(exposition: str) -> set[str]:
    """Sample names in a Prometheus text exposition (``_bucket``, ``_total``... included)."""
    return {s.name for fam in text_string_to_metric_families(exposition) for s in fam.samples}


def http_get(url: str, timeout_s: float = 5.0) -> str:
    """The body of a GET (raises on any HTTP or connection error)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
    return body.decode()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    probe: Callable[[], T | None], what: str, timeout_s: float, step_s: float = 0.25
) -> T:
    """Call ``probe`` until it returns something not None; AssertionError at the deadline.

    Exceptions from ``probe`` count as "not yet" (a server still starting); the last one
    is named in the failure.
    """
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            got = probe()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            got, last = None, exc
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s (last: {last!r})")
        time.sleep(step_s)  # polling a condition, bounded by the deadline


def promtool_paths() -> tuple[str, str]:
    """(promtool, prometheus), installed by scripts/promtool.sh if missing; fail if not."""
    script = REPO / "scripts" / "promtool.sh"
    try:
        done = subprocess.run(
            [str(script), "path"], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"scripts/promtool.sh path could not run: {exc}", pytrace=False)
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2:
        pytest.fail(
            "promtool/prometheus missing and scripts/promtool.sh could not install Debian's "
            f"prometheus package (exit {done.returncode}): {done.stderr.strip()[-800:]}",
            pytrace=False,
        )
    return lines[0], lines[1]
