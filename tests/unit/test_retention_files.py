"""The retention pass over the batch mode's output directory, with the clock injected.

Time travel over 26 months of generated traffic (`cdranon process` month by month, then
`cdranon retention run --now` at each month's end); a destroy that fails for real (an
immutable keystore directory) is reported, retried, and raises the overdue gauge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service import cli
from service.audit import generate_signing_key, open_auditor
from service.errors import KeyDestroyedError
from service.generator import generate_cdrs
from service.holds import FileHoldRegistry, HoldSecrets
from service.keystore import FileKeystore, KeyState, MasterKey
from service.metrics import RetentionMetrics
from service.months import add_months, identifiers_until, month_start, parse_month, rfc3339
from service.policy import Policy, load_policy
from service.retention import ActionKind, Controller, FileMonthStore, Status, holds_dir

MASTER_B64 = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="  # 32 x 0x2a
MASTER = MasterKey(b"\x2a" * 32, source="test")

POLICY_FR = """
[fields]
billing = ["cdr_id", "event_time", "account_id", "channel", "direction", "sender_id",
  "status", "parts", "duration_s", "price", "currency", "route_id", "mcc", "mnc", "country"]
[fields.identifiers]
msisdn = "msisdn"
imsi = "imsi"
imei = "imei"
email = "email"
[retention.jurisdictions.fr]
countries = ["FR"]
identifier_months = 24
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    """A hermetic environment: keystore, master key, signing key, output dir, policy."""
    for name in ("CDRANON_CONFIG", "CDRANON_POLICY", "CDRANON_MASTER_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CDRANON_MASTER_KEY", MASTER_B64)
    monkeypatch.setenv("CDRANON_KEYSTORE", f"file://{tmp_path / 'keys'}")
    monkeypatch.setenv("CDRANON_AUDIT_SIGNING_KEY", generate_signing_key())
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_FR)
    return {"keys": tmp_path / "keys", "out": tmp_path / "out", "policy": policy, "tmp": tmp_path}


def month_at(start: str, n: int) -> str:
    """The month ``n`` months after ``start``."""
    y, m = add_months(*parse_month(start), n)
    return f"{y:04d}-{m:02d}"


def cli_json(capsys: pytest.CaptureFixture[str], argv: list[str], rc: int = 0) -> Any:
    """Run a command with --json; assert its exit code; return its JSON output."""
    got = cli.main(argv)
    captured = capsys.readouterr()
    out = captured.out
    assert got == rc, captured.err
    return json.loads(out)


def process_month(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], month: str, seed: int, count: int
) -> Path:
    """Generate ``count`` CDRs in ``month`` and `cdranon process` them at the month's end."""
    src = env["tmp"] / f"in-{month}.jsonl"
    lines = generate_cdrs(count, months=[month], seed=seed, accounts=6, subscribers=40)
    src.write_bytes(b"".join(v + b"\n" for v in lines))
    end = rfc3339(month_start(month_at(month, 1)) - timedelta(seconds=1))
    cli_json(
        capsys,
        ["process", "--input", str(src), "--out", str(env["out"]), "--now", end, "--json",
         "--no-progress", "--policy", str(env["policy"])],
    )  # fmt: skip
    return src


def retention(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], now: str, rc: int = 0
) -> dict[str, Any]:
    """`cdranon retention run --out DIR --now NOW --json`."""
    doc: dict[str, Any] = cli_json(
        capsys,
        ["retention", "run", "--out", str(env["out"]), "--now", now, "--json", "--no-progress",
         "--policy", str(env["policy"])],
        rc,
    )  # fmt: skip
    return doc


def key_states(env: dict[str, Path]) -> dict[str, KeyState]:
    return {i.key_id: i.state for i in FileKeystore(env["keys"], MASTER).list()}


def test_time_travel_26_months(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    policy: Policy = load_policy(env["policy"])
    months = [month_at("2024-01", i) for i in range(26)]
    backups: dict[str, list[bytes]] = {}
    for i, month in enumerate(months):
        process_month(env, capsys, month, seed=i, count=120)
        sealed = env["out"] / "sealed" / f"{month}.jsonl"
        backups[month] = sealed.read_bytes().splitlines()  # a consumer's copy, kept forever
        now_text = rfc3339(month_start(months[i + 1] if i + 1 < 26 else month_at(month, 1)))
        now = month_start(now_text[:7])
        report = retention(env, capsys, now_text)
        assert report["ok"]
        assert report["overdue_seconds"] == 0

        states = key_states(env)
        seen_classes: set[str] = set()
        for kid, state in states.items():
            m, cls = kid.split("/")
            seen_classes.add(cls)
            past = identifiers_until(m, policy.classes[cls].identifier_months) <= now
            assert (state is KeyState.DESTROYED) == past, (month, kid, state)
        for done in months[: i + 1]:
            assert f"{done}/default" in states
            sealed_there = (env["out"] / "sealed" / f"{done}.jsonl").exists()
            assert sealed_there == (identifiers_until(done, 24) > now), (month, done)
            assert (env["out"] / "sanitised" / f"{done}.jsonl").exists()
        # Keys exist ahead of time: this month's and the next, every class.
        for ahead in (now_text[:7], month_at(now_text[:7], 1)):
            for cls in ("default", "fr"):
                assert states.get(f"{ahead}/{cls}") is KeyState.ACTIVE
        # What was done was exactly what was due, once: a re-run does nothing.
        again = retention(env, capsys, now_text)
        assert again["counts"]["done"] == 0
        assert again["actions"] == []
        destroyed_now = {a["target"] for a in report["actions"] if a["action"] == "destroy_key"}
        expected = {
            kid
            for kid in states
            if identifiers_until(kid[:7], policy.classes[kid[8:]].identifier_months) == now
        }
        assert destroyed_now == expected
        assert "fr" in seen_classes or i < 3

    # After 26 months: 2024-01 and 2024-02 are gone in every class; unseal fails for
    # every record of every copy, and the pseudonym key cannot be derived by anyone.
    store = FileKeystore(env["keys"], MASTER)
    for month in ("2024-01", "2024-02"):
        for cls in ("default", "fr"):
            with pytest.raises(KeyDestroyedError):
                store.get(f"{month}/{cls}")
        copy = env["tmp"] / f"copy-{month}.jsonl"
        copy.write_bytes(b"".join(line + b"\n" for line in backups[month]))
        rc = cli.main(["unseal", "--input", str(copy), "--reason", "case 1", "--audit",
                       f"file://{env['tmp']}/unseal-audit.jsonl"])  # fmt: skip
        captured = capsys.readouterr()
        assert rc == 1
        assert captured.out == ""
        assert f"{len(backups[month])} record(s) could not be unsealed" in captured.err
    # A month still in its window unseals completely.
    live = env["tmp"] / "copy-live.jsonl"
    live.write_bytes(b"".join(line + b"\n" for line in backups["2025-03"]))
    rc = cli.main(["unseal", "--input", str(live), "--reason", "case 2", "--audit",
                   f"file://{env['tmp']}/unseal-audit.jsonl"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(captured.out.splitlines()) == len(backups["2025-03"])
    # 2024-03: default key gone (12 months), fr key still there (24), sealed file kept.
    states = key_states(env)
    assert states["2024-03/default"] is KeyState.DESTROYED
    assert states.get("2024-03/fr") in (KeyState.ACTIVE, None)
    assert (env["out"] / "sealed" / "2024-03.jsonl").exists()
    # The audit log of the output directory verifies.
    assert cli.main(["audit", "verify", "--file", str(env["out"] / "audit.jsonl")]) == 0


def test_sanitised_deleted_at_billing_deadline_and_rejected_bounded(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src = env["tmp"] / "in.jsonl"
    good = list(generate_cdrs(50, months=["2025-03"], seed=3, accounts=3, subscribers=10))
    bad = [
        b'{"cdr_id": "r-1", "event_time": "2025-03-04T00:00:00Z", "account_id": "A", "imei": "1"}',
        b'{"cdr_id": "r-2", "event_time": "2025-13-04T00:00:00Z", "account_id": "A"}',
        b"not json",
    ]
    src.write_bytes(b"".join(v + b"\n" for v in [*good, *bad]))
    cli_json(capsys, ["process", "--input", str(src), "--out", str(env["out"]), "--now",
                      "2025-03-31T00:00:00Z", "--json", "--no-progress"])  # fmt: skip
    rejected = env["out"] / "rejected.jsonl"
    assert len(rejected.read_bytes().splitlines()) == 3
    # Unreadable event times count from the file's last write: make it March 2025.
    stamp = month_start("2025-03").timestamp() + 3 * 86_400
    os.utime(rejected, (stamp, stamp))
    retention(env, capsys, "2026-03-31T23:59:59Z")
    assert len(rejected.read_bytes().splitlines()) == 3  # still identifiable (24-month class)
    doc = retention(env, capsys, "2027-04-01T00:00:00Z")
    pruned = [a for a in doc["actions"] if a["action"] == "prune_rejected"]
    assert pruned
    assert pruned[0]["status"] == "done"
    assert not rejected.exists()
    assert (env["out"] / "sanitised" / "2025-03.jsonl").exists()
    assert retention(env, capsys, "2035-12-31T23:59:59Z")["ok"]
    assert (env["out"] / "sanitised" / "2025-03.jsonl").exists()
    doc = retention(env, capsys, "2036-01-01T00:00:00Z")
    assert [a["target"] for a in doc["actions"] if a["action"] == "delete_sanitised"] == ["2025-03"]
    assert not (env["out"] / "sanitised" / "2025-03.jsonl").exists()


def test_dry_run_changes_nothing(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    process_month(env, capsys, "2025-01", seed=1, count=30)
    before = key_states(env)
    doc = cli_json(capsys, ["retention", "run", "--out", str(env["out"]), "--now",
                            "2026-02-01T00:00:00Z", "--dry-run", "--json"])  # fmt: skip
    assert {a["status"] for a in doc["actions"]} == {"planned"}
    assert "destroy_key" in {a["action"] for a in doc["actions"]}
    assert doc["overdue_seconds"] > 0  # what the gauge would read if nothing ran
    assert key_states(env) == before
    assert (env["out"] / "sealed" / "2025-01.jsonl").exists()


@pytest.fixture
def frozen_dir() -> Iterator[Any]:
    """Make a directory refuse writes for real: chattr +i as root, chmod 0500 otherwise."""
    frozen: list[Path] = []

    def freeze(path: Path) -> None:
        if os.geteuid() == 0:
            chattr = shutil.which("chattr")
            if chattr is None:
                pytest.fail("running as root without chattr: cannot make a read-only keystore")
            subprocess.run([chattr, "+i", str(path)], check=True)
        else:
            path.chmod(0o500)
        frozen.append(path)

    def thaw() -> None:
        while frozen:
            path = frozen.pop()
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            else:
                path.chmod(0o700)

    yield freeze, thaw
    thaw()


def test_failed_destroy_is_reported_retried_and_pages(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], frozen_dir: Any
) -> None:
    freeze, thaw = frozen_dir
    policy = load_policy(env["policy"])
    process_month(env, capsys, "2025-01", seed=5, count=40)
    keystore = FileKeystore(env["keys"], MASTER)
    metrics = RetentionMetrics()
    auditor = open_auditor(f"file://{env['out']}/audit.jsonl", writer="retention-test")
    controller = Controller(
        policy=policy,
        keystore=keystore,
        store=FileMonthStore(env["out"]),
        registry=FileHoldRegistry(holds_dir(env["keys"])),
        hold_secrets=HoldSecrets(holds_dir(env["keys"]), MASTER),
        auditor=auditor,
        metrics=metrics,
        lead_months=0,
    )
    deadline = identifiers_until("2025-01", 12)
    now = datetime.fromisoformat("2026-02-01T06:00:00+00:00")
    # This month's keys first, so that the only write the frozen keystore refuses is the destroy.
    for cls in ("default", "fr"):
        keystore.create_if_absent(f"2026-02/{cls}")
    freeze(env["keys"])
    report = controller.run_pass(now)
    destroy = [o for o in report.outcomes if o.action.kind is ActionKind.DESTROY_KEY]
    assert destroy
    assert all(o.status is Status.FAILED for o in destroy)
    assert all("2025-01/" in o.action.target for o in destroy)
    assert not report.ok
    assert report.overdue_seconds == (now - deadline).total_seconds() == 6 * 3600
    assert metrics.overdue._value.get() == 6 * 3600
    assert metrics.last_success._value.get() == 0
    assert metrics.actions.labels("destroy_key", "failed")._value.get() == len(destroy)
    assert keystore.get("2025-01/default") is not None  # still there: not reported destroyed
    # A one-shot `retention run` refuses to start on a keystore it cannot write: exit 2.
    rc = cli.main(["retention", "run", "--out", str(env["out"]), "--now", rfc3339(now)])
    assert rc == 2
    assert "not readable and writable" in capsys.readouterr().err

    thaw()
    later = datetime.fromisoformat("2026-02-01T07:00:00+00:00")
    retry = controller.run_pass(later)
    assert retry.ok, [o.as_dict() for o in retry.failed]
    assert [o.status for o in retry.outcomes if o.action.kind is ActionKind.DESTROY_KEY] == [
        Status.DONE
    ]
    with pytest.raises(KeyDestroyedError):
        keystore.get("2025-01/default")
    assert metrics.overdue._value.get() == 0
    assert metrics.last_success._value.get() == later.timestamp()
    assert metrics.month_keys.labels("destroyed")._value.get() >= 1
    auditor.close()
    events = [orjson.loads(line) for line in (env["out"] / "audit.jsonl").read_bytes().splitlines()]
    destroyed = [e for e in events if e["event"] == "key.destroyed"]
    assert [e["details"]["key_id"] for e in destroyed] == ["2025-01/default"]
