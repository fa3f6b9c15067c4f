"""Live checks: a real ``cdranon run`` on the real broker, a real retention pass, and
Debian's Prometheus server scraping both with the shipped scrape config.

- Every metric name in the dashboard's and the alerts' PromQL is exported by a live
  ``/metrics`` scrape: the processor's (``cdranon run``) or the retention controller's.
  The retention metrics come from a real pass (``Controller.run_pass`` in file mode,
  built by the same ``build`` as ``cdranon retention``), its registry served over HTTP by
  ``service.metrics.serve`` as ``retention watch`` does.
- Prometheus runs on 127.0.0.1 with deploy/prometheus/prometheus.yml (targets and
  intervals rewritten for the test) and alerts.yml; load goes through the processor
  while it scrapes; the HTTP API must show the key series with sane values, accept every
  dashboard and alert expression, and evaluate every rule without error.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka.admin import AdminClient

from service.audit import generate_signing_key
from service.cli import build_parser
from service.commands.retention import build
from service.generator import iter_generated
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.metrics import MetricsServer, RetentionMetrics, serve
from service.months import now_utc
from tests.deploy.support import (
    ALERTS,
    PROMETHEUS_SYNTHETIC,
    PROMETHEUS_YML,
    REPO,
    alert_rules,
    dashboard_exprs,
    exported_names,
    free_port,
    http_get,
    metric_names,
    promtool_paths,
    wait_until,
)
from tests.integration.kafka_helpers import create_topics, unique_name
from tests.integration.run_support import (
    Processor,
    month_ago,
    produce_input,
    recent_months,
    redate,
    wait_all_committed,
    write_config,
)

pytestmark = pytest.mark.integration

FIRST = 3_000  # records through the processor before Prometheus starts
SECOND = 2_000  # ... and while it scrapes


@dataclass
class Live:
    """A running processor and a served retention registry, with their load so far."""

    bootstrap: str
    prefix: str
    group: str
    processor: Processor
    processor_url: str
    retention_url: str
    consumed: int


def _inputs(n: int, seed: int) -> list[bytes]:
    """Generated CDRs: 5% malformed (rejected) and 1% dated 14 months back, past the
    identifier deadline (written stripped), so every processor series has samples."""
    gen = list(
        iter_generated(n, months=recent_months(2), seed=seed, malformed_ratio=0.05, now=now_utc())
    )
    values = [g.value for g in gen]
    stale_at = month_ago(14)
    valid = [i for i, g in enumerate(gen) if g.malformed is None]
    for i in valid[::100]:
        values[i] = redate(values[i], stale_at)
    return values


@pytest.fixture(scope="module")
def keys_env() -> dict[str, str]:
    """A master key and an audit signing key, as a deployment passes them."""
    return {
        "CDRANON_MASTER_KEY": generate_master_key(),
        "CDRANON_AUDIT_SIGNING_KEY": generate_signing_key(),
    }


@pytest.fixture(scope="module")
def retention_server(
    tmp_path_factory: pytest.TempPathFactory, keys_env: dict[str, str]
) -> Iterator[str]:
    """One real retention pass (file mode) and its metrics served on /metrics."""
    base = tmp_path_factory.mktemp("retention")
    out = base / "out"
    out.mkdir()
    args = build_parser().parse_args(
        ["retention", "run", "--out", str(out), "--keystore", f"file://{base / 'keys'}"]
    )
    metrics = RetentionMetrics()
    server: MetricsServer | None = None
    with pytest.MonkeyPatch.context() as m:
        for k in [k for k in os.environ if k.startswith("CDRANON_")]:
            m.delenv(k)
        for k, v in keys_env.items():
            m.setenv(k, v)
        built = build(args, metrics)
        try:
            report = built.controller.run_pass(now_utc())
        finally:
            built.close()
    assert report.ok, report.as_dict()
    server = serve(metrics.registry, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        server.close()


@pytest.fixture(scope="module")
def live(
    kafka_bootstrap: str,
    admin: AdminClient,
    tmp_path_factory: pytest.TempPathFactory,
    keys_env: dict[str, str],
    retention_server: str,
) -> Iterator[Live]:
    """``cdranon run`` with metrics, after FIRST records went through it."""
    base = tmp_path_factory.mktemp("live")
    prefix = unique_name("deploy")
    group = f"g-{prefix}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    cfg = write_config(
        base / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=base / "keys",
        metrics_port=0,
    )
    proc = Processor(cfg, keys_env, name="processor")
    try:
        url = proc.wait_for("metrics_serving", timeout_s=60)["url"]
        produce_input(kafka_bootstrap, names.raw, _inputs(FIRST, seed=7))
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=120)
        yield Live(kafka_bootstrap, prefix, group, proc, url, retention_server, FIRST)
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()


def _scrape_names(url: str, must_have: str) -> set[str]:
    """Sample names of a scrape, once ``must_have`` is among them (stats arrive later)."""

    def probe() -> set[str] | None:
        names = exported_names(http_get(url))
        return names if must_have in names else None

    return wait_until(probe, f"{must_have} in {url}", timeout_s=30)


def test_dashboard_and_alert_metrics_are_exported_by_live_scrapes(live: Live) -> None:
    exported = _scrape_names(live.processor_url, "cdranon_consumer_lag")
    exported |= _scrape_names(live.retention_url, "cdranon_retention_overdue_seconds")
    exported |= PROMETHEUS_SYNTHETIC
    missing = [
        (where, expr, sorted(metric_names(expr) - exported))
        for where, expr in [
            *dashboard_exprs(),
            *((r["alert"], r["expr"]) for r in alert_rules()),
        ]
        if metric_names(expr) - exported
        and not expr.lstrip().startswith(("rate(process_", "process_"))
    ]
    assert missing == []


def test_process_panels_metrics_are_exported(live: Live) -> None:
    exported = exported_names(http_get(live.processor_url))
    wanted = {n for _, e in dashboard_exprs() for n in metric_names(e) if n.startswith("process_")}
    assert wanted
    assert wanted <= exported


# --- Prometheus ---------------------------------------------------------------------


class PromAPI:
    """A little client of the Prometheus HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; AssertionError if Prometheus refuses the expression."""
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        doc = orjson.loads(http_get(url))
        assert doc["status"] == "success", (expr, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of a scalar-like query; None while it has no sample."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def get(self, path: str) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(http_get(f"{self.base}{path}"))
        assert doc["status"] == "success", doc
        return doc


def _templated_config(dest: Path, processor_target: str, retention_target: str) -> Path:
    """The shipped prometheus.yml with test targets and 1 s intervals; rules beside it."""
    doc = yaml.safe_load(PROMETHEUS_YML.read_text())
    doc["global"]["scrape_interval"] = "1s"
    doc["global"]["evaluation_interval"] = "1s"
    targets = {"cdranon-processor": processor_target, "cdranon-retention": retention_target}
    jobs = {j["job_name"] for j in doc["scrape_configs"]}
    assert jobs == set(targets), jobs
    for job in doc["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    shutil.copy(ALERTS, dest / ALERTS.name)
    path = dest / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def prometheus(live: Live, tmp_path: Path) -> Iterator[PromAPI]:
    """Debian's Prometheus on a free loopback port, scraping the live processes."""
    promtool, server = promtool_paths()
    cfg = _templated_config(
        tmp_path,
        urllib.parse.urlparse(live.processor_url).netloc,
        urllib.parse.urlparse(live.retention_url).netloc,
    )
    check = subprocess.run(
        [promtool, "check", "config", str(cfg)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            server,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool | None:
            if proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited {proc.returncode}: "
                    f"{(tmp_path / 'prometheus.log').read_text()[-1500:]}"
                )
            return True if "Ready" in http_get(f"{base}/-/ready") else None

        wait_until(ready, "prometheus ready", timeout_s=60)
        yield PromAPI(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()


def test_prometheus_scrapes_the_key_series_with_sane_values(
    live: Live, prometheus: PromAPI
) -> None:
    api = prometheus
    p = '{job="cdranon-processor"}'
    r = '{job="cdranon-retention"}'

    def up() -> bool | None:
        a, b = api.value(f"up{p}"), api.value(f"up{r}")
        return True if a == 1 and b == 1 else None

    wait_until(up, "both targets up", timeout_s=30)

    # More load through the processor while Prometheus scrapes it.
    produce_input(live.bootstrap, TopicNames(live.prefix).raw, _inputs(SECOND, seed=8))
    wait_all_committed(live.bootstrap, live.group, TopicNames(live.prefix).raw, timeout_s=120)
    total = live.consumed + SECOND

    wait_until(
        lambda: True if api.value(f"sum(cdranon_records_consumed_total{p})") == total else None,
        f"records consumed = {total} in Prometheus",
        timeout_s=30,
    )
    # Counts reconcile as docs/operations.md promises, seen through Prometheus.
    sanitised = api.value(
        'cdranon_records_produced_total{job="cdranon-processor",topic_kind="sanitised"}'
    )
    rejected = api.value(
        'cdranon_records_produced_total{job="cdranon-processor",topic_kind="rejected"}'
    )
    sealed = api.value(
        'cdranon_records_produced_total{job="cdranon-processor",topic_kind="sealed"}'
    )
    assert sanitised is not None
    assert rejected is not None
    assert sealed is not None
    assert sanitised + rejected == total
    assert rejected > 0  # 5% malformed input
    assert api.value(f"sum(cdranon_records_rejected_total{p})") == rejected
    stripped = api.value(f"sum(cdranon_records_stripped_total{p})")
    assert stripped is not None
    assert stripped > 0
    assert sealed + stripped == sanitised
    committed = api.value('cdranon_transactions_total{job="cdranon-processor",outcome="committed"}')
    assert committed is not None
    assert committed > 0
    assert (api.value(f"cdranon_end_to_end_latency_seconds_count{p}") or 0) > 0

    # Lag: one series per input partition (this processor owns all 3, even one the
    # sticky partitioner left empty), never negative, and 0 once everything is committed.
    seen: dict[str, float] = {}

    def lag_settled() -> list[dict[str, Any]] | None:
        series = api.query(f"cdranon_consumer_lag{p}")
        seen.clear()
        seen.update({s["metric"]["partition"]: float(s["value"][1]) for s in series})
        return series if len(series) == 3 and all(v == 0 for v in seen.values()) else None

    try:
        lag = wait_until(lag_settled, "lag series of 3 partitions at 0", timeout_s=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen by partition: {seen}") from None
    assert sorted(s["metric"]["partition"] for s in lag) == ["0", "1", "2"]

    # A rate over the second load is visible (the dashboard's "Records in" panel).
    rate = api.value(f"sum(increase(cdranon_records_consumed_total{p}[5m]))")
    assert rate is not None
    assert rate >= SECOND * 0.9

    # Retention controller: nothing overdue, a recent successful pass, keys ahead.
    assert api.value(f"cdranon_retention_overdue_seconds{r}") == 0
    last = api.value(f"cdranon_retention_last_success_timestamp_seconds{r}")
    assert last is not None
    assert abs(time.time() - last) < 600
    active = api.value('cdranon_month_keys{job="cdranon-retention",state="active"}')
    assert active is not None
    assert active >= 2
    age = api.value(f"cdranon_oldest_identifiable_month_age_seconds{r}")
    assert age is not None
    assert 0 <= age < 62 * 86_400
    assert api.value(f"cdranon_legal_holds_active{r}") == 0

    # Every dashboard and alert expression is valid PromQL for this Prometheus.
    for title, expr in dashboard_exprs():
        for s in api.query(expr):
            v = float(s["value"][1])
            assert not math.isinf(v), (title, expr, v)
    for rule in alert_rules():
        api.query(rule["expr"])

    # The rules are loaded and evaluate without error; with everything healthy, none of
    # the processor/retention alerts is firing.
    def evaluated() -> list[dict[str, Any]] | None:
        groups = api.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        return (
            rules
            if rules
            and all(
                x.get("lastEvaluation", "").startswith("2")
                and not x["lastEvaluation"].startswith("0001")
                for x in rules
            )
            else None
        )

    rules = wait_until(evaluated, "every rule evaluated", timeout_s=30)
    assert len(rules) == len(alert_rules())
    assert [x["name"] for x in rules if x["health"] != "ok"] == []
    firing = [a["labels"]["alertname"] for a in api.get("/api/v1/alerts")["data"]["alerts"]]
    assert not {"CdranonRetentionOverdue", "CdranonProcessorDown"} & set(firing), firing


# --- retention watch ----------------------------------------------------------------


def test_retention_watch_serves_metrics_after_a_pass(
    tmp_path: Path, keys_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDRANON_")}
    env |= keys_env | {"CDRANON_METRICS__PORT": str(port), "CDRANON_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "retention",
            "watch",
            "--out",
            str(out),
            "--keystore",
            f"file://{tmp_path / 'keys'}",
            "--interval",
            "3600",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def passed() -> bool | None:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"retention watch exited {proc.returncode}: {err[-600:]}")
            body = http_get(f"http://127.0.0.1:{port}/metrics")
            for line in body.splitlines():
                if line.startswith("cdranon_retention_last_success_timestamp_seconds "):
                    return True if float(line.split()[1]) > 0 else None
            return None

        wait_until(passed, "a pass recorded on /metrics", timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
