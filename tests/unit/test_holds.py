"""Legal holds in file mode: placed, copied at the deadline, unsealed from the hold store,
released; MSISDNs matched by normalised number and never stored in clear."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from service import cli
from service.errors import ConfigError, KeyDestroyedError
from service.holds import HoldSecrets, msisdn_mac, new_hold
from service.identifiers import check_msisdn
from service.months import parse_rfc3339
from service.retention import holds_dir
from tests.unit.test_retention_files import MASTER, env, process_month, retention

__all__ = ["env"]  # the fixture, re-exported for pytest


def _records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _unseal(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, object]], str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, [orjson.loads(x) for x in captured.out.splitlines()], captured.err


def test_account_hold_survives_the_deadline_then_release_destroys_it(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src = process_month(env, capsys, "2025-01", seed=11, count=150)
    process_month(env, capsys, "2025-02", seed=12, count=50)
    inputs = {str(r["cdr_id"]): r for r in _records(src)}
    sealed_path = env["out"] / "sealed" / "2025-01.jsonl"
    sealed = _records(sealed_path)
    account = str(sealed[0]["account_id"])
    held_ids = {
        str(r["cdr_id"])
        for r in sealed
        if r["account_id"] == account and str(r["key_id"]).endswith("/default")
    }
    assert 0 < len(held_ids) < len(sealed)
    copy_of_month = env["tmp"] / "copy-2025-01.jsonl"
    copy_of_month.write_bytes(sealed_path.read_bytes())

    out = ["--out", str(env["out"])]
    assert cli.main(["hold", "place", "--id", "case-7", "--reason", "court order 7", "--by",
                     "alice", "--month", "2025-01", "--account", account, *out]) == 0  # fmt: skip
    capsys.readouterr()
    # Before the deadline nothing moves.
    retention(env, capsys, "2026-01-31T23:59:59Z")
    assert not (env["out"] / "hold" / "case-7.jsonl").exists()

    doc = retention(env, capsys, "2026-02-01T00:00:00Z")
    kinds = [(a["action"], a["status"]) for a in doc["actions"] if a["action"] != "create_key"]
    assert kinds[:2] == [("copy_hold", "done"), ("destroy_key", "done")]
    hold_file = env["out"] / "hold" / "case-7.jsonl"
    held = _records(hold_file)
    assert {str(r["cdr_id"]) for r in held} == held_ids
    assert all(
        r["key_id"] == "2025-01/hold-case-7" and r["held_from"] == "2025-01/default" for r in held
    )

    # Only the held account's records of that month can be unsealed, from the hold store.
    rc, opened, err = _unseal(["hold", "unseal", "--id", "case-7", "--input", str(hold_file),
                             "--reason", "court order 7", *out], capsys)  # fmt: skip
    assert rc == 0, err
    assert {str(r["cdr_id"]) for r in opened} == held_ids
    for r in opened:
        original = inputs[str(r["cdr_id"])]
        for f in ("msisdn", "imsi", "imei", "email"):
            assert r.get(f) == original.get(f)
    rc, opened, err = _unseal(["unseal", "--input", str(copy_of_month), "--reason", "case 7",
                               "--audit", f"file://{env['tmp']}/a.jsonl"], capsys)  # fmt: skip
    fr = sum(1 for r in sealed if str(r["key_id"]).endswith("/fr"))
    assert rc == 1
    assert {str(r["cdr_id"]) for r in opened} <= {
        str(r["cdr_id"]) for r in sealed if str(r["key_id"]).endswith("/fr")
    }  # the 24-month class is still in its window; every default record fails
    assert len(opened) == fr
    # The next month is untouched.
    assert (env["out"] / "sealed" / "2025-02.jsonl").exists()

    # Listed with who, why, when.
    assert cli.main(["hold", "list", "--json", *out]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["state"] == "active"
    assert listed["placed_by"] == "alice"
    assert listed["reason"] == "court order 7"
    assert listed["records_held"] == len(held_ids)

    # Release: the hold key is destroyed and its store deleted at once.
    held_copy = env["tmp"] / "held-copy.jsonl"
    held_copy.write_bytes(hold_file.read_bytes())
    assert cli.main(["hold", "release", "--id", "case-7", "--by", "bob", *out]) == 0
    capsys.readouterr()
    assert not hold_file.exists()
    with pytest.raises(KeyDestroyedError):
        HoldSecrets(holds_dir(env["keys"]), MASTER).get("case-7")
    rc, opened, err = _unseal(["hold", "unseal", "--id", "case-7", "--input", str(held_copy),
                               "--reason", "court order 7", *out], capsys)  # fmt: skip
    assert rc == 1
    assert opened == []
    assert f"{len(held_ids)} record(s) could not be unsealed" in err
    assert cli.main(["hold", "list", "--json", *out]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["state"] == "destroyed"
    assert listed["released_by"] == "bob"
    # The audit log of the directory has the whole story and verifies.
    events = [e["event"] for e in _records(env["out"] / "audit.jsonl")]
    for name in ("hold.placed", "hold.copied", "key.destroyed", "hold.released", "unseal"):
        assert name in events
    assert cli.main(["audit", "verify", "--file", str(env["out"] / "audit.jsonl")]) == 0


def test_msisdn_hold_matches_the_normalised_number_never_stored_in_clear(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src = process_month(env, capsys, "2025-01", seed=21, count=200)
    inputs = _records(src)
    with_msisdn = [r for r in inputs if isinstance(r.get("msisdn"), str)]
    # FR records are the 24-month class (not due yet): hold someone else's number.
    with_msisdn = [r for r in with_msisdn if r.get("country") != "FR"]
    target = str(with_msisdn[0]["msisdn"])
    normalised, _ = check_msisdn("msisdn", target)
    expected = {
        str(r["cdr_id"])
        for r in with_msisdn
        if check_msisdn("msisdn", r["msisdn"])[0] == normalised
    }
    written_as = "00 " + " ".join(
        normalised[1:][i : i + 3] for i in range(0, len(normalised) - 1, 3)
    )
    out = ["--out", str(env["out"])]
    assert cli.main(["hold", "place", "--id", "sub-1", "--reason", "fraud case 12", "--by",
                     "carol", "--msisdn", written_as, *out]) == 0  # fmt: skip
    capsys.readouterr()
    registry_bytes = b"".join(p.read_bytes() for p in holds_dir(env["keys"]).glob("*.json"))
    digits = normalised[1:].encode()
    assert digits not in registry_bytes
    assert digits[-7:] not in registry_bytes
    retention(env, capsys, "2026-02-01T00:00:00Z")
    held = _records(env["out"] / "hold" / "sub-1.jsonl")
    assert {str(r["cdr_id"]) for r in held} == expected
    rc, opened, _ = _unseal(["hold", "unseal", "--id", "sub-1", "--input",
                             str(env["out"] / "hold" / "sub-1.jsonl"), "--reason", "fraud case 12",
                             *out], capsys)  # fmt: skip
    assert rc == 0
    assert {check_msisdn("msisdn", r["msisdn"])[0] for r in opened} == {normalised}


def test_hold_validation_and_mac() -> None:
    secret = b"\x01" * 32
    assert msisdn_mac(secret, "+44 7700 900123") == msisdn_mac(secret, "00447700900123")
    assert msisdn_mac(secret, "+447700900123") != msisdn_mac(b"\x02" * 32, "+447700900123")
    now = parse_rfc3339("2026-01-01T00:00:00Z")
    base = {"reason": "r", "placed_by": "a", "placed_at": now, "registry_secret": secret}
    with pytest.raises(ConfigError, match="must name what it covers"):
        new_hold(hold_id="h", months=[], accounts=[], msisdns=[], **base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid hold id"):
        new_hold(hold_id="Bad/Id", months=["2025-01"], accounts=[], msisdns=[], **base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--msisdn #1") as err:
        new_hold(hold_id="h", months=[], accounts=[], msisdns=["12"], **base)  # type: ignore[arg-type]
    assert "12" not in str(err.value).replace("--msisdn #1", "")
