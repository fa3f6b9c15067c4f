"""The processor's in-transaction audit chain when a transaction's outcome was unknown.

A stuck producer is replaced by a new one with the same transactional.id; if the stuck
transaction's commit was already prepared, the coordinator completes it, so its
``integrity.root`` events are part of the chain although the runner never saw the commit
return. The runner then re-reads the chain head from the audit topic
(``Runner._resync_chain``); continuing from its own last known head would reuse the
committed events' sequence numbers and fork the chain.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from service.audit import event_hash, generate_signing_key, read_partition
from service.commands.run import build_runner
from service.config import load_settings
from service.kafka.clients import admin_config
from service.keystore import generate_master_key
from service.metrics import Metrics
from tests.integration.run_support import write_config

pytestmark = pytest.mark.integration

_ROOT = {"stream": "s", "batch": "b", "size": 1, "root": "ab" * 32}


def test_chain_continues_from_a_commit_the_runner_did_not_see(
    kafka_bootstrap: str, tmp_path: Path, unique_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDRANON_MASTER_KEY", generate_master_key())
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CDRANON_AUDIT__SIGNING_KEY", generate_signing_key())
    cfg = write_config(
        tmp_path / "run.toml",
        bootstrap=kafka_bootstrap,
        prefix=f"chain-{unique_id}",
        group=f"g-{unique_id}",
        keystore=tmp_path / "keys",
        instance_id=f"chain-{unique_id}",
    )
    settings = load_settings(cfg)
    runner = build_runner(settings, Metrics())
    try:
        runner._init_transactions()
        runner._init_integrity()
        chain = runner._chain
        assert chain is not None
        producer = runner._producer

        def write(raw: bytes) -> None:
            producer.begin_transaction()
            producer.produce(runner.audit_topic, raw)
            producer.commit_transaction(30)

        write(chain.event("integrity.root", actor="processor", **_ROOT))
        chain.committed()
        # This commit's return is never seen by the chain (the stuck producer's case).
        unseen = chain.event("integrity.root", actor="processor", **_ROOT)
        write(unseen)
        # The runner used to treat it as aborted: the chain's memory says seq 1 again.
        chain.aborted()
        assert orjson.loads(chain.event("integrity.root", actor="processor", **_ROOT))["seq"] == 2
        chain.aborted()

        runner._resync_chain()
        after = runner._chain
        assert after is not None
        nxt = after.event("integrity.root", actor="processor", **_ROOT)
        write(nxt)
        after.committed()

        mine = [
            orjson.loads(v)
            for _, v in read_partition(admin_config(settings), runner.audit_topic, 0, None)
            if v is not None and orjson.loads(v)["writer"] == chain.writer
        ]
        assert [e["seq"] for e in mine] == [1, 2, 3]
        assert orjson.loads(nxt)["prev"] == event_hash(unseen)
    finally:
        runner._close()
