"""Scenario 8: leak sweep.

Canary identifiers (MSISDN, IMSI, IMEI, e-mail, unique to this run) are seeded into last
month's CDRs among ordinary traffic of this month; ``cdranon run`` processes them at
DEBUG logging with metrics on; then ``cdranon retention run --now`` (past last month's
identifier deadline) destroys its key and deletes its sealed topic. Afterwards every
spelling of every canary, and the destroyed month's secret and derived keys (raw, hex,
base64), must be found nowhere: every topic of the run (all partitions, from the
beginning, read_uncommitted so aborted transactions are scanned too), the processor's and
the retention pass's logs, the ``/metrics`` output, the audit log, and every file of the
keystore directory. The master key and the audit signing key are looked for as well.
"""

from __future__ import annotations

import base64
import random
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient

from service.errors import KeyDestroyedError
from service.generator import generate_cdrs
from service.identifiers import luhn_ok
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key, open_keystore
from service.monthkeys import _INFO_PSEUDONYM, _INFO_SEAL_ROOT, hkdf
from service.months import add_months, now_utc
from tests.integration.kafka_helpers import consume_until, create_topics
from tests.integration.run_support import (
    REPO,
    Processor,
    produce_input,
    read_outputs,
    recent_months,
    wait_all_committed,
    write_config,
)
from tests.reliability.support import (
    Scale,
    files_under,
    find_needles,
    free_port,
    key_spellings,
    spellings,
    wait_until,
)


def _luhn(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


def canaries(rng: random.Random, n: int) -> list[dict[str, str]]:
    """``n`` canary identifier sets, unique to this run."""
    out = []
    for i in range(n):
        tag = f"{rng.randrange(10**6):06d}"
        out.append(
            {
                "msisdn": f"+4477009{rng.randrange(10**5):05d}",
                "imsi": f"23415{rng.randrange(10**10):010d}",
                "imei": _luhn(f"35{rng.randrange(10**12):012d}"),
                "email": f"canary.{tag}.{i}@leak-test.example",
            }
        )
    return out


def _canary_record(i: int, month: str, ids: dict[str, str]) -> bytes:
    return orjson.dumps(
        {
            "cdr_id": f"canary-{i}",
            "event_time": f"{month}-{1 + i % 27:02d}T12:00:00Z",
            "account_id": f"acct-canary-{i % 5}",
            "channel": "sms",
            "direction": "mo",
            "sender_id": "ACME",
            "status": "delivered",
            "parts": 1,
            "price": 0.05,
            "currency": "GBP",
            "mcc": "234",
            "mnc": "15",
            "country": "GB",
            "text": f"hello {ids['msisdn']}",  # a dropped field that holds an identifier
            **ids,
        }
    )


def _all_topic_bytes(bootstrap: str, prefix: str) -> list[tuple[str, bytes]]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = sorted(t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix + "."))
    records = consume_until(
        bootstrap, topics, to_end=True, timeout_s=120, isolation_level="read_uncommitted"
    )
    out: list[tuple[str, bytes]] = []
    for r in records:
        blob = (r.key or b"") + b"\n" + (r.value or b"")
        blob += b"".join(k.encode() + b"=" + (v or b"") for k, v in r.headers)
        out.append((f"{r.topic}/{r.partition}@{r.offset}", blob))
    return out


@pytest.mark.slow
def test_no_canary_or_destroyed_key_anywhere_after_the_deadline(
    kafka_bootstrap: str, admin: AdminClient, tmp_path: Path, unique_id: str, scale: Scale
) -> None:
    rng = random.Random(unique_id)
    prefix = f"leak-{unique_id}"
    group = f"g-{unique_id}"
    names = TopicNames(prefix)
    create_topics(admin, [names.raw], partitions=3)
    old, cur = recent_months(2)
    ids = canaries(rng, scale.pick(50, 500))
    values = [_canary_record(i, old, c) for i, c in enumerate(ids)]
    values += list(generate_cdrs(scale.pick(3000, 50_000), months=[cur], seed=11, now=now_utc()))
    rng.shuffle(values)
    sent = produce_input(kafka_bootstrap, names.raw, values)

    home = tmp_path / "home"
    keys = tmp_path / "keys"
    master = generate_master_key()
    env = {"CDRANON_MASTER_KEY": master, "CDRANON_HOME": str(home)}
    port = free_port()
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        group=group,
        keystore=keys,
        max_records=500,
        metrics_port=port,
    )
    proc = Processor(cfg, env, name="leak")
    try:
        wait_all_committed(kafka_bootstrap, group, names.raw, timeout_s=180)
        url = f"http://127.0.0.1:{port}/metrics"
        # Scrape after the last batch is counted: the committed-records counter is complete.
        metrics_text = [b""]

        def scraped_all() -> bool:
            with urllib.request.urlopen(url, timeout=5) as resp:
                metrics_text[0] = resp.read()
            return (
                f"cdranon_records_consumed_total {float(len(values))}".encode() in (metrics_text[0])
            )

        wait_until("metrics count every record", scraped_all, timeout_s=30)
        assert proc.terminate() == 0, proc.raw[-5:]
    finally:
        proc.close()
    out = read_outputs(kafka_bootstrap, prefix, len(values))
    assert len(out.rejected) == 0
    assert len(out.sanitised) == len(values)
    assert any(r.topic == names.sealed(old) for r in out.sealed)
    del sent

    # The month's secret and what is derived from it, read before the pass destroys it.
    store = open_keystore(f"file://{keys}", env=env)
    kids = [k.key_id for k in store.list() if k.key_id.startswith(old + "/")]
    assert kids, "no key of the canaries' month"
    key_needles: dict[bytes, str] = {}
    for kid in kids:
        secret = store.get(kid)
        assert secret is not None
        for label, material in (
            ("month secret", secret),
            ("seal root", hkdf(secret, _INFO_SEAL_ROOT + b"/" + kid.encode())),
            ("pseudonym key", hkdf(secret, _INFO_PSEUDONYM + b"/" + kid.encode())),
        ):
            for s in key_spellings(material):
                key_needles[s] = f"{label} of {kid}"
    for s in {master.encode(), *key_spellings(base64.b64decode(master))}:
        key_needles[s] = "master key"

    # Retention pass one day after the canaries' identifier deadline.
    y, m = (int(p) for p in old.split("-"))
    dy, dm = add_months(y, m, 13)
    when = datetime(dy, dm, 2, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ret = subprocess.run(
        [
            *(sys.executable, "-m", "service.cli", "retention", "run", "--config", str(cfg)),
            *("--now", when, "--json", "--no-progress"),
        ],
        cwd=REPO,
        env={**_env(), **env, "CDRANON_LOGGING__LEVEL": "DEBUG"},
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert ret.returncode == 0, ret.stderr[-2000:]
    report = orjson.loads(ret.stdout)
    assert report, "empty retention report"
    for kid in kids:
        with pytest.raises(KeyDestroyedError):
            store.get(kid)

    def sealed_gone() -> bool:
        return names.sealed(old) not in admin.list_topics(timeout=10).topics

    wait_until("sealed topic of the canaries' month deleted", sealed_gone, timeout_s=60)

    # The sweep.
    needles: dict[bytes, str] = {}
    for i, c in enumerate(ids):
        for field, value in c.items():
            for s in spellings(value):
                needles[s] = f"canary {i} {field}"
    # The input topic is upstream's (short retention, docs/operations.md): the canaries
    # are there by design. It is scanned only to show that the scanner sees them.
    topics = _all_topic_bytes(kafka_bootstrap, prefix)
    raw_topic = [(w, h) for w, h in topics if w.startswith(names.raw + "/")]
    assert find_needles(raw_topic, needles), "the scanner does not see the canaries"
    haystacks = [(w, h) for w, h in topics if not w.startswith(names.raw + "/")]
    assert any(
        w.startswith(names.rejected) or w.startswith(prefix + ".sanitised.") for w, _ in haystacks
    )
    haystacks.append(("processor log", "\n".join(proc.raw).encode()))
    haystacks.append(("retention stdout", ret.stdout))
    haystacks.append(("retention log", ret.stderr))
    haystacks.append(("/metrics", metrics_text[0]))
    haystacks += files_under(home)  # the audit log (and the dev audit key)
    haystacks += files_under(keys)
    assert any(w.endswith("audit.jsonl") for w, _ in haystacks), "no audit log was written"
    assert any(b'"integrity.root"' in h for _, h in haystacks), "no integrity roots in the scan"
    hits = find_needles(haystacks, needles)
    assert hits == [], f"canary identifiers found: {hits[:5]}"
    key_hits = find_needles(haystacks, key_needles)
    assert key_hits == [], f"key material found: {key_hits[:5]}"


def _env() -> dict[str, str]:
    import os  # noqa: PLC0415

    return dict(os.environ)
