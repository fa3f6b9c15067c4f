"""``cdranon run`` end to end: 100k CDRs across 3 months, exactly once, read_committed out."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource  # not re-exported for mypy

from service.generator import iter_generated
from service.kafka.topics import TopicNames, sealed_retention_ms
from service.months import now_utc
from tests.integration.hsm_fixtures import (  # noqa: F401  # fixtures
    KeystoreUnderTest,
    keystore_backend,
    softhsm_token,
)
from tests.integration.kafka_helpers import create_topics
from tests.integration.run_support import (
    Processor,
    check_invariants,
    month_ago,
    produce_input,
    read_outputs,
    recent_months,
    redate,
    wait_all_committed,
    write_config,
)

N = 100_000
STALE = 300  # records re-dated 14 months back: past the identifier deadline


def _metric(body: str, line_start: str) -> float:
    for line in body.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


@pytest.mark.slow
def test_100k_cdrs_three_months_exactly_once(
    kafka_bootstrap: str,
    admin: AdminClient,
    tmp_path: Path,
    unique_id: str,
    keystore_backend: KeystoreUnderTest,  # noqa: F811  # the imported fixture
) -> None:
    """Run once with the file keystore and once with pkcs11 on SoftHSM2 (+ cdr.keys)."""
    prefix = f"pipe-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    months = recent_months(3)
    gen = list(
        iter_generated(
            N, months=months, seed=4, malformed_ratio=0.02, late_ratio=0.05, now=now_utc()
        )
    )
    values = [g.value for g in gen]
    stale_at = month_ago(14)
    valid = [i for i, g in enumerate(gen) if g.malformed is None]
    for i in valid[:: len(valid) // STALE][:STALE]:
        values[i] = redate(values[i], stale_at)
    sent = produce_input(kafka_bootstrap, names.raw, values)

    env = dict(keystore_backend.env)
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=f"g-{unique_id}",
        keystore=tmp_path / "keys",
        keystore_url=keystore_backend.url,
        metrics_port=0,
    )
    proc = Processor(cfg, env)
    try:
        url = proc.wait_for("metrics_serving", timeout_s=60)["url"]
        try:
            wait_all_committed(kafka_bootstrap, f"g-{unique_id}", names.raw, timeout_s=180)
        except AssertionError as exc:
            # What the processor did meanwhile (its log never holds identifiers).
            raise AssertionError(f"{exc}\n{proc.story()}\nlast lines: {proc.raw[-20:]}") from None
        # The broker has the last commit; the processor accounts for it a moment later
        # (pipelined: when its main thread next looks). Wait for the metric, with a deadline.
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read().decode()
            if _metric(body, "cdranon_records_consumed_total") >= N or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()

    out = read_outputs(kafka_bootstrap, prefix, N)
    verdict = check_invariants(sent, out, prefix, keystore_backend.url, env)
    malformed = sum(1 for g in gen if g.malformed is not None)
    assert verdict.rejected >= malformed
    assert verdict.stripped >= STALE - 1
    assert verdict.sealed > N // 2
    # The three months' topics got their records.
    assert {r.topic for r in out.sealed} == {names.sealed(m) for m in months}

    # Metrics agree with what was read back.
    assert _metric(body, "cdranon_records_consumed_total") == N
    assert _metric(body, 'cdranon_records_produced_total{topic_kind="sealed"}') == verdict.sealed
    assert (
        _metric(body, 'cdranon_records_produced_total{topic_kind="rejected"}') == verdict.rejected
    )
    assert _metric(body, 'cdranon_transactions_total{outcome="committed"}') >= N / 10_000
    assert "cdranon_consumer_lag{" in body
    for v in (values[0], values[1]):
        assert v[:40].decode(errors="replace") not in body

    # Broker-side retention of a month topic: identifier deadline - month start + grace.
    res = ConfigResource("topic", names.sealed(months[0]))
    configs = admin.describe_configs([res])[res].result()
    assert int(configs["retention.ms"].value) == sealed_retention_ms(months[0], 12)
    assert configs["message.timestamp.type"].value == "CreateTime"
