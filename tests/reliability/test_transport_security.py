"""Scenario 11: transport security. A dedicated broker with two SASL_SSL listeners on
127.0.0.1 (certificates from scripts/tls-broker.sh, a SCRAM-SHA-512 user created when the
storage is formatted): one with a certificate for 127.0.0.1, one with a certificate for
another host. ``cdranon run`` works over the first with the right password; with a wrong
password, or against the wrong-host certificate, it fails closed: a clear error, no
record acknowledged, nothing written. The SASL password appears in no log line.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from service.generator import generate_cdrs
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.months import now_utc
from tests.integration.kafka_helpers import create_topics
from tests.integration.run_support import (
    REPO,
    Processor,
    check_invariants,
    committed_total,
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.support import DedicatedBroker, find_needles, free_port

USER = "cdranon-proc"
N = 2_000


@dataclass
class SecureBroker:
    broker: DedicatedBroker
    good_port: int
    wrong_host_port: int
    ca: Path
    password: str


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """The broker with its TLS + SCRAM listeners (module scope: one start for the tests)."""
    tmp = tmp_path_factory.mktemp("tls")
    certs = tmp / "certs"
    subprocess.run([str(REPO / "scripts" / "tls-broker.sh"), "certs", str(certs)], check=True)
    kspw = (certs / "keystore.password").read_text().strip()
    password = secrets.token_urlsafe(18)
    good, wrong = free_port(), free_port()
    props = "\n".join(
        [
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "ssl.keystore.type=PKCS12",
            *(
                line
                for name, p12 in (("secure", "server.p12"), ("wronghost", "wronghost.p12"))
                for line in (
                    f"listener.name.{name}.scram-sha-512.sasl.jaas.config="
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                    f"listener.name.{name}.ssl.keystore.location={certs / p12}",
                    f"listener.name.{name}.ssl.keystore.password={kspw}",
                    f"listener.name.{name}.ssl.keystore.type=PKCS12",
                )
            ),
            "",
        ]
    )
    broker = DedicatedBroker(
        tmp / "broker",
        listeners=[("SECURE", good, "SASL_SSL"), ("WRONGHOST", wrong, "SASL_SSL")],
        extra_props=props,
        scram=[(USER, password)],
    )
    broker.format()
    broker.start()
    try:
        yield SecureBroker(broker, good, wrong, certs / "ca.pem", password)
    finally:
        broker.close()


def _config(
    tmp: Path, sb: SecureBroker, *, port: int, password: str, prefix: str, group: str
) -> Path:
    # The password goes through the environment, as in production; the file holds the rest.
    extra = "\n".join(
        [
            "[kafka.librdkafka]",
            'security_protocol = "SASL_SSL"',
            'sasl_mechanism = "SCRAM-SHA-512"',
            f'sasl_username = "{USER}"',
            f'ssl_ca_location = "{sb.ca}"',
            'ssl_endpoint_identification_algorithm = "https"',
            "",
        ]
    )
    del password
    return write_config(
        tmp / f"{prefix}.toml",
        bootstrap=f"127.0.0.1:{port}",
        prefix=prefix,
        group=group,
        keystore=tmp / "keys",
        max_records=500,
        extra=extra,
    )


def _env(tmp: Path, password: str) -> dict[str, str]:
    return {
        "CDRANON_MASTER_KEY": generate_master_key(),
        "CDRANON_HOME": str(tmp / "home"),
        "CDRANON_KAFKA__LIBRDKAFKA__SASL_PASSWORD": password,
    }


def _run_input(sb: SecureBroker, prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": sb.broker.bootstrap})
    create_topics(admin, [TopicNames(prefix).raw], partitions=3)


@pytest.mark.slow
def test_processor_works_over_tls_and_scram(secure: SecureBroker, tmp_path: Path) -> None:
    prefix, group = "tls-ok", "g-tls-ok"
    _run_input(secure, prefix)
    plain = secure.broker.bootstrap
    values = list(generate_cdrs(N, months=recent_months(2), seed=8, now=now_utc()))
    sent = produce_input(plain, TopicNames(prefix).raw, values)
    env = _env(tmp_path, secure.password)
    cfg = _config(
        tmp_path,
        secure,
        port=secure.good_port,
        password=secure.password,
        prefix=prefix,
        group=group,
    )
    proc = Processor(cfg, env, name="tls")
    try:
        wait_all_committed(plain, group, TopicNames(prefix).raw, timeout_s=120)
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()
    out = read_outputs(plain, prefix, N)
    verdict = check_invariants(sent, out, prefix, f"file://{tmp_path / 'keys'}", env)
    assert verdict.sanitised + verdict.rejected == N
    needles = {secure.password.encode(): "SASL password"}
    assert find_needles([("processor log", "\n".join(proc.raw).encode())], needles) == []
    assert any('"sasl.password":"**********"' in line for line in proc.raw), "not masked"


@pytest.mark.parametrize("case", ["wrong password", "wrong-host certificate"])
@pytest.mark.slow
def test_wrong_credentials_or_certificate_fail_closed(
    secure: SecureBroker, tmp_path: Path, case: str
) -> None:
    prefix = "tls-bad-" + ("pw" if case == "wrong password" else "host")
    group = f"g-{prefix}"
    _run_input(secure, prefix)
    plain = secure.broker.bootstrap
    produce_input(plain, TopicNames(prefix).raw, [b'{"cdr_id":"x"}'] * 50)
    wrong_pw = secrets.token_urlsafe(18)
    password = wrong_pw if case == "wrong password" else secure.password
    port = secure.good_port if case == "wrong password" else secure.wrong_host_port
    env = _env(tmp_path, password)
    cfg = _config(tmp_path, secure, port=port, password=password, prefix=prefix, group=group)
    proc = Processor(cfg, env, name=prefix)
    try:
        # Fails closed: the process stops with the reason (not a retry loop of timeouts).
        rc = proc.proc.wait(120)
        assert rc != 0
        fatal = " ".join(str(d.get("error", "")) for d in proc.events("fatal")).lower()
        if case == "wrong password":
            assert "authentication" in fatal, proc.raw[-5:]
        else:
            assert "certificate" in fatal or "ssl" in fatal, proc.raw[-5:]
        assert "nothing was read or written" in fatal
        done, high = committed_total(plain, group, TopicNames(prefix).raw)
        assert (done, high) == (0, 50)
        assert proc.count("batch_committed") == 0
    finally:
        proc.close()
    admin = AdminClient({"bootstrap.servers": plain})
    topics = admin.list_topics(timeout=10).topics
    made = sorted(t for t in topics if t.startswith(prefix + ".") and t != TopicNames(prefix).raw)
    assert made == [], f"topics created without valid credentials: {made}"
    needles = {password.encode(): "SASL password", wrong_pw.encode(): "wrong password"}
    assert find_needles([("processor log", "\n".join(proc.raw).encode())], needles) == []
