"""Static checks of the deploy files: schemas, consistency with the service, no sleeps.

- docker-compose.yml against the Compose Specification JSON schema (the copy vendored in
  the ``check-jsonschema`` package), then cdranon's own rules for it;
- deploy/k8s against the Kubernetes 1.30 OpenAPI-derived JSON schemas (strict: unknown
  fields fail) shipped in the ``kubernetes-validate`` package, offline;
- the settings in both are loaded by the real ``load_settings`` and the commands parsed
  by the real ``cdranon`` argument parser;
- the Grafana dashboard and provisioning agree on datasource and paths.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.cli import build_parser
from service.config import load_settings
from tests.deploy.support import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    K8S,
    REPO,
    alert_rules,
    dashboard_exprs,
    dashboard_panels,
    metric_names,
)

K8S_VERSION = "1.30.0"


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _compose_validator() -> jsonschema.protocols.Validator:
    text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    schema = json.loads(text)
    # The schema names draft-07 without the trailing '#'; say so explicitly.
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in _compose_validator().iter_errors(doc)
    ]


# --- docker-compose.yml -------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    assert _schema_errors(_compose()) == []


def test_compose_schema_check_catches_mistakes() -> None:
    """The validator is not vacuous: typical mistakes are reported."""
    good = _compose()
    bad = copy.deepcopy(good)
    bad["services"]["processor"]["depends_on"]["kafka"]["condition"] = "service_ready"
    assert _schema_errors(bad)
    bad = copy.deepcopy(good)
    bad["services"]["processor"]["healthcheck"]["intervall"] = "5s"
    assert _schema_errors(bad)
    bad = copy.deepcopy(good)
    bad["services"]["prometheus"]["ports"] = {"9090": 9090}
    assert _schema_errors(bad)


def test_compose_services_are_wired_without_sleeps() -> None:
    doc = _compose()
    services: dict[str, dict[str, Any]] = doc["services"]
    assert {"kafka", "processor", "retention", "generator", "prometheus", "grafana"} <= set(
        services
    )
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["generator"]["profiles"] == ["generator"]
    for name, svc in services.items():
        text = json.dumps(svc)
        assert not re.search(r"\bsleep\b", text), f"{name} sleeps instead of waiting"
        for dep, cond in svc.get("depends_on", {}).items():
            assert isinstance(cond, dict), f"{name} -> {dep}: no condition"
            assert "condition" in cond, f"{name} -> {dep}: no condition"
            assert dep in services
        long_running = svc.get("restart") != "no"
        if long_running:
            assert "healthcheck" in svc, f"{name} has no healthcheck"
    # The services that need Kafka wait for it to be healthy, not merely started.
    for name in ("processor", "retention", "generator"):
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
    # Host-mounted files exist (a typo would mount an empty directory).
    for name in ("prometheus", "grafana"):
        for vol in services[name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO / src).exists(), f"{name} mounts missing {src}"


def test_compose_commands_parse_and_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cdranon service's command is valid for the real CLI; its environment is valid
    settings (load_settings, as the container would run it)."""
    services = _compose()["services"]
    parser = build_parser()
    for name in ("processor", "retention", "generator"):
        parser.parse_args(services[name]["command"])
    for name in ("processor", "retention"):
        with monkeypatch.context() as m:
            for k, v in services[name]["environment"].items():
                m.setenv(k, str(v))
            m.delenv("CDRANON_CONFIG", raising=False)
            s = load_settings(None)
        assert s.kafka.bootstrap_servers == "kafka:9092"
        assert s.metrics.host == "0.0.0.0"
        assert s.metrics.port == 9464
        assert s.keystore.url == "file:///var/lib/cdranon/keys"
        assert s.audit.writer
    # Prometheus in compose scrapes the port the services serve on.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets == {
        "cdranon-processor": ["processor:9464"],
        "cdranon-retention": ["retention:9464"],
    }


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "no USER: the image would run as root"
    assert not users[-1].startswith(("root", "0:", "0")), users[-1]
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignore)


def test_dockerfile_builds_the_native_path() -> None:
    # The wheel carries service/_native.c compiled: the build stage needs setup.py and
    # libcrypto's headers, and the runtime stage proves the module loads.
    text = (REPO / "Dockerfile").read_text()
    build, runtime = text.split("AS runtime")
    assert "libssl-dev" in build
    assert "setup.py" in build
    assert "import service._native" in runtime
    ignore = (REPO / ".dockerignore").read_text().split()
    assert not {"setup.py", "service"} & set(ignore)


# --- Kubernetes ---------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and not str(doc.get("apiVersion", "")).startswith("kustomize."):
                out.append((path.name, doc))
    return out


def _k8s_validate(doc: dict[str, Any]) -> None:
    # kubernetes_validate ships no type hints; its schemas are in the wheel (offline).
    kv = importlib.import_module("kubernetes_validate")
    kv.validate(doc, K8S_VERSION, strict=True)


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    docs = _k8s_docs()
    kinds = sorted({d["kind"] for _, d in docs})
    assert {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "StatefulSet",
    } <= set(kinds)
    failures = []
    for name, doc in docs:
        try:
            _k8s_validate(doc)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures.append(f"{name} {doc['kind']}: {exc}")
    assert failures == []


def test_k8s_schema_check_catches_mistakes() -> None:
    kv = importlib.import_module("kubernetes_validate")
    sts = next(d for _, d in _k8s_docs() if d["kind"] == "StatefulSet")
    mutations: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
            containerPort="metrics"
        ),
        lambda d: d["spec"].update(replica=3),
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=60),
    ]
    for mutate in mutations:
        bad = copy.deepcopy(sts)
        mutate(bad)
        with pytest.raises(kv.ValidationError):
            _k8s_validate(bad)


def test_k8s_objects_refer_to_each_other_consistently(tmp_path: Path) -> None:
    docs = [d for _, d in _k8s_docs()]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    secrets = {d["metadata"]["name"] for d in by_kind["Secret"]}
    configmaps = {d["metadata"]["name"]: d for d in by_kind["ConfigMap"]}
    pvcs = {d["metadata"]["name"] for d in by_kind["PersistentVolumeClaim"]}
    workloads = by_kind["StatefulSet"] + by_kind["Deployment"]
    assert {w["metadata"]["name"] for w in workloads} == {
        "cdranon-processor",
        "cdranon-retention",
    }
    pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in by_kind["PodDisruptionBudget"]]
    svc_selectors = [s["spec"]["selector"] for s in by_kind["Service"]]
    parser = build_parser()
    for w in workloads:
        spec = w["spec"]
        pod = spec["template"]
        labels = pod["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert any(sel.items() <= labels.items() for sel in pdb_selectors), "no PDB"
        assert any(sel.items() <= labels.items() for sel in svc_selectors), "no Service"
        pspec = pod["spec"]
        assert pspec["terminationGracePeriodSeconds"] >= 30
        assert pspec["securityContext"]["runAsNonRoot"] is True
        (container,) = pspec["containers"]
        parser.parse_args(container["args"])
        port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == port
        mounts = {m["name"] for m in container["volumeMounts"]}
        for vol in pspec["volumes"]:
            assert vol["name"] in mounts, f"{w['metadata']['name']}: unused volume"
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs
        env = {e["name"]: e.get("value") for e in container["env"]}
        config_path = Path(env["CDRANON_CONFIG"])
        cm_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert config_path.parent == Path(cm_mount["mountPath"])
        # The settings file the pod reads is valid for the real settings loader.
        toml = configmaps["cdranon-config"]["data"][config_path.name]
        (tmp_path / "cdranon.toml").write_text(toml)
        with pytest.MonkeyPatch.context() as m:
            for k in list(os.environ):
                if k.startswith("CDRANON_"):
                    m.delenv(k)
            m.setenv("CDRANON_AUDIT__WRITER", "cdranon-processor-0")
            if "CDRANON_KAFKA__INSTANCE_ID" in env:
                m.setenv("CDRANON_KAFKA__INSTANCE_ID", "cdranon-processor-0")
            s = load_settings(tmp_path / "cdranon.toml")
        assert s.metrics.port == port
        assert s.metrics.host == "0.0.0.0"
        keys_mount = next(m for m in container["volumeMounts"] if m["name"] == "keys")
        assert s.keystore.url == f"file://{keys_mount['mountPath']}"
        assert s.audit.signing_key_file is not None
        audit_mount = next(m for m in container["volumeMounts"] if m["name"] == "audit-key")
        assert s.audit.signing_key_file.parent == Path(audit_mount["mountPath"])
    processor = by_kind["StatefulSet"][0]
    p_env = {e["name"]: e for e in processor["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert p_env["CDRANON_KAFKA__INSTANCE_ID"]["value"] == "$(POD_NAME)"
    retention = by_kind["Deployment"][0]
    assert retention["spec"]["replicas"] == 2  # leader + standby via the Kafka lease
    assert retention["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "retention",
        "watch",
    ]


# --- Grafana ------------------------------------------------------------------------


def test_dashboard_is_provisioned_with_its_datasource() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uid = ds["datasources"][0]["uid"]
    panels = dashboard_panels()
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], f"{p['title']} has no query"
    prov = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "cdranon.yaml").read_text()
    )
    path = prov["providers"][0]["options"]["path"]
    grafana = _compose()["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    titles = " ".join(p["title"].lower() for p in panels)
    for needed in ("overdue", "oldest identifiable", "retention pass", "lag", "latency", "cpu"):
        assert needed in titles, needed


def test_dashboard_and_alerts_use_only_cdranon_metrics_and_up() -> None:
    """Every selector names a cdranon_ metric, a process_ metric or Prometheus's `up`;
    tests/deploy/test_live.py checks each against a live /metrics scrape."""
    names = {n for _, e in dashboard_exprs() for n in metric_names(e)}
    names |= {n for r in alert_rules() for n in metric_names(r["expr"])}
    odd = {n for n in names if not n.startswith(("cdranon_", "process_")) and n != "up"}
    assert odd == set()


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x", y=~"b(c)"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("time() - max(b_seconds) > 3 * 3600 or absent(c)") == {
        "b_seconds",
        "c",
    }
    assert metric_names("sum(d) - sum(d offset 10m) > 1e3 and on(x) e") == {"d", "e"}
