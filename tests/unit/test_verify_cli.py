"""`cdranon process` signs integrity roots; `cdranon verify` proves records and finds tampering."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from service.cli import main
from tests.unit.core_helpers import cdr, raw

NOW = "2026-11-23T12:00:00Z"


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CDRANON_MASTER_KEY", base64.b64encode(b"\x05" * 32).decode())
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(raw(cdr(cdr_id=f"c{i}", price=i / 1000)) for i in range(30)) + b"\n")
    argv = ["process", "--input", str(inp), "--out", str(tmp_path / "out"), "--now", NOW]
    assert main([*argv, "--batch-size", "7", "--keystore", f"file://{tmp_path / 'keys'}"]) == 0
    return tmp_path / "out"


def test_untouched_month_verifies(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["verify", "--file", str(out / "sanitised/2026-10.jsonl"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sanitised/2026-10.jsonl"]["proven"] == 30
    assert doc["sanitised/2026-10.jsonl"]["ranges"] == 5  # batches of 7


@pytest.mark.parametrize("how", ["alter", "delete", "insert", "swap", "duplicate"])
def test_tampering_is_found(out: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    month = out / "sanitised/2026-10.jsonl"
    lines = month.read_bytes().splitlines()
    if how == "alter":
        doc = orjson.loads(lines[9])
        doc["price"] = 1.0
        lines[9] = orjson.dumps(doc)
    elif how == "delete":
        del lines[12]
    elif how == "insert":
        lines.insert(3, lines[20])
    elif how == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines.append(lines[0])
    month.write_bytes(b"\n".join(lines) + b"\n")
    capsys.readouterr()
    assert main(["verify", "--file", str(month)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_tampered_audit_log_is_refused(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = out / "audit.jsonl"
    events = audit.read_bytes().splitlines()
    ev = orjson.loads(events[1])
    ev["details"]["size"] += 1
    events[1] = orjson.dumps(ev, option=orjson.OPT_SORT_KEYS)
    audit.write_bytes(b"\n".join(events) + b"\n")
    assert main(["verify", "--file", str(out / "sanitised/2026-10.jsonl")]) == 1
    assert "not intact" in capsys.readouterr().err


def test_third_party_proof_checks_out(
    out: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    capsys.readouterr()
    assert main(["verify", "--file", str(out / "sanitised/2026-10.jsonl"), "--record", "c17"]) == 0
    proof = tmp_path / "proof.json"
    proof.write_text(capsys.readouterr().out)
    checker = Path(__file__).parents[2] / "scripts/check_proof.py"
    ok = subprocess.run(
        [sys.executable, str(checker), str(proof), str(out / "audit-signing.pub")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout
    doc = json.loads(proof.read_text())
    doc["billing"]["price"] = 5.0
    doc["canonical"] = json.dumps(doc["billing"], sort_keys=True, separators=(",", ":"))
    proof.write_text(json.dumps(doc))
    bad = subprocess.run(
        [sys.executable, str(checker), str(proof), str(out / "audit-signing.pub")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAILED check 1" in bad.stdout


def test_no_proof_is_printed_for_an_altered_record(
    out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    month = out / "sanitised/2026-10.jsonl"
    lines = month.read_bytes().splitlines()
    k = next(i for i, line in enumerate(lines) if orjson.loads(line)["cdr_id"] == "c17")
    doc = orjson.loads(lines[k])
    doc["price"] = 5.0
    lines[k] = orjson.dumps(doc)
    month.write_bytes(b"\n".join(lines) + b"\n")
    capsys.readouterr()
    assert main(["verify", "--file", str(month), "--record", "c17"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "record c17 is altered" in captured.err
