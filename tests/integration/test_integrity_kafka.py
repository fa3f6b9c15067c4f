"""Original form on the stream: two processors sign roots in their transactions, and
`cdranon verify` proves every sanitised record, then finds forged and altered ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from service.audit import generate_signing_key
from service.generator import generate_cdrs
from service.integrity import LEAF_FIELD
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.months import now_utc
from tests.integration.kafka_helpers import consume_until, create_topics
from tests.integration.run_support import (
    REPO,
    Processor,
    produce_input,
    recent_months,
    wait_all_committed,
    write_config,
)

N = 6_000


def _verify(
    bootstrap: str, topic: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "verify",
            "--topic",
            topic,
            "--bootstrap",
            bootstrap,
            *extra,
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_stream_roots_prove_records_and_catch_tampering(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str
) -> None:
    prefix = f"int-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    months = recent_months(2)
    values = list(generate_cdrs(N, months=months, seed=5, malformed_ratio=0.01, now=now_utc()))
    produce_input(kafka_bootstrap, names.raw, values)
    env = {
        "CDRANON_MASTER_KEY": generate_master_key(),
        "CDRANON_AUDIT_SIGNING_KEY": generate_signing_key(),
        "CDRANON_HOME": str(tmp_path / "home"),
    }
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=f"g-{unique_id}",
        keystore=tmp_path / "keys",
        max_records=700,
    )
    procs = [Processor(cfg, env, name=f"p{i}") for i in (1, 2)]
    try:
        wait_all_committed(kafka_bootstrap, f"g-{unique_id}", names.raw, timeout_s=180)
        for p in procs:
            assert p.terminate() == 0, p.raw[-5:]
    finally:
        for p in procs:
            p.close()

    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "audit",
            "verify",
            "--bootstrap",
            kafka_bootstrap,
            "--topic",
            names.audit,
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr

    proven = 0
    for month in months:
        r = _verify(kafka_bootstrap, names.sanitised(month), env, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = orjson.loads(r.stdout)[names.sanitised(month)]
        assert rep["proven"] == rep["records"] > 0
        proven += rep["proven"]
    everything = consume_until(kafka_bootstrap, [names.sanitised(m) for m in months], to_end=True)
    assert proven == len(everything)

    # A third party's proof for one record.
    topic = names.sanitised(months[-1])
    one = consume_until(kafka_bootstrap, [topic], count=1)[0]
    assert one.value is not None
    cdr_id = orjson.loads(one.value)["cdr_id"]
    proof = _verify(kafka_bootstrap, topic, env, "--record", cdr_id)
    assert proof.returncode == 0, proof.stderr
    assert orjson.loads(proof.stdout)["tree_size"] >= 1

    # Tampering: a copy with a changed price (its leaf tag kept) and an untagged insert.
    doc = orjson.loads(one.value)
    doc["price"] = 123.0
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, orjson.dumps(doc))
    untagged = orjson.loads(one.value)
    del untagged[LEAF_FIELD]
    producer.produce(topic, orjson.dumps(untagged))
    assert producer.flush(30) == 0
    bad = _verify(kafka_bootstrap, topic, env, "--json")
    assert bad.returncode == 1, bad.stdout
    kinds = {f["kind"] for f in orjson.loads(bad.stdout)[topic]["findings"]}
    assert {"altered", "unproven", "duplicate"} <= kinds, kinds
