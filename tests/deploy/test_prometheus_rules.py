"""promtool on the shipped rules and scrape config (Debian's prometheus package).

scripts/promtool.sh installs the package when promtool is missing; if it cannot, the
tests fail saying so.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.support import ALERTS, DEPLOY, PROMETHEUS_YML, REPO, alert_rules, promtool_paths


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool (installed if missing)."""
    return promtool_paths()[0]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules(promtool: str) -> None:
    done = _run([promtool, "check", "rules", str(ALERTS)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout


def test_promtool_test_rules(promtool: str) -> None:
    done = _run([promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_check_config(promtool: str) -> None:
    done = _run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_test_and_a_runbook_section(promtool: str) -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    fired = {
        t["alertname"]
        for case in tests["tests"]
        for t in case["alert_rule_test"]
        if t.get("exp_alerts")
    }
    names = {r["alert"] for r in alert_rules()}
    assert names == tested == fired, "every alert needs a test where it fires"
    runbook = (REPO / "docs" / "operations.md").read_text().lower()
    for r in alert_rules():
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {anchor}" in runbook, f"docs/operations.md lacks a section for {anchor}"
