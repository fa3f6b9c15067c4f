"""Month checkpoints: written once a month closes, and checked against the roots before them."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import orjson
import pytest

from service.audit import _check_details as check_details  # the guard record() applies
from service.checkpoints import (
    check_checkpoints,
    checkpoint_details,
    due_checkpoints,
    month_of_stream,
)
from service.cli import main
from service.months import parse_rfc3339
from tests.unit.core_helpers import cdr, raw


def _root(stream: str, r: str) -> bytes:
    return orjson.dumps({"event": "integrity.root", "details": {"stream": stream, "root": r}})


def test_month_of_stream() -> None:
    assert month_of_stream("sanitised/2026-10.jsonl") == "2026-10"
    assert month_of_stream("cdr.sanitised.2026-10") == "2026-10"
    assert month_of_stream("cdr.sealed.2026-10") is None


def test_due_only_after_the_month_closes_and_once() -> None:
    events = [_root("cdr.sanitised.2026-10", "aa" * 32), _root("cdr.sanitised.2026-11", "bb" * 32)]
    assert due_checkpoints(events, parse_rfc3339("2026-11-07T23:59:59Z")) == {}
    due = due_checkpoints(events, parse_rfc3339("2026-11-08T00:00:00Z"))
    assert list(due) == ["2026-10"]
    assert due["2026-10"] == checkpoint_details("2026-10", ["aa" * 32])
    events.append(orjson.dumps({"event": "integrity.checkpoint", "details": due["2026-10"]}))
    assert due_checkpoints(events, parse_rfc3339("2026-12-31T00:00:00Z")) == {
        "2026-11": checkpoint_details("2026-11", ["bb" * 32])
    }


def test_a_root_slipped_in_before_the_checkpoint_is_caught() -> None:
    roots = [_root("sanitised/2026-10.jsonl", h * 32) for h in ("aa", "bb")]
    cp = orjson.dumps(
        {
            "event": "integrity.checkpoint",
            "details": checkpoint_details("2026-10", ["aa" * 32, "bb" * 32]),
        }
    )
    assert check_checkpoints([*roots, cp]) == {"2026-10": None}
    later = _root("sanitised/2026-10.jsonl", "cc" * 32)
    assert check_checkpoints([*roots, cp, later]) == {"2026-10": None}  # after: its own root
    inserted = [roots[0], later, roots[1], cp]
    assert check_checkpoints(inserted)["2026-10"] is not None
    assert check_checkpoints([roots[1], roots[0], cp])["2026-10"] is not None  # reordered
    assert check_checkpoints([roots[0], cp])["2026-10"] is not None  # one removed


def test_retention_pass_writes_checkpoints_that_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CDRANON_MASTER_KEY", base64.b64encode(b"\x09" * 32).decode())
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        b"\n".join(
            raw(cdr(cdr_id=f"c{i}", event_time=f"2026-{9 + i % 2:02d}-15T10:00:00Z"))
            for i in range(20)
        )
        + b"\n"
    )
    out, keys = tmp_path / "out", f"file://{tmp_path / 'keys'}"
    base = ["--out", str(out), "--keystore", keys]
    assert main(["process", "--input", str(inp), "--now", "2026-10-20T00:00:00Z", *base]) == 0
    assert main(["retention", "run", "--now", "2026-10-20T00:00:00Z", "--no-progress", *base]) == 0
    events = [orjson.loads(x) for x in (out / "audit.jsonl").read_bytes().splitlines()]
    done = [e["details"]["month"] for e in events if e["event"] == "integrity.checkpoint"]
    assert done == ["2026-09"]  # 2026-10 has not closed yet
    assert main(["retention", "run", "--now", "2026-11-10T00:00:00Z", "--no-progress", *base]) == 0
    events = [orjson.loads(x) for x in (out / "audit.jsonl").read_bytes().splitlines()]
    done = [e["details"]["month"] for e in events if e["event"] == "integrity.checkpoint"]
    assert done == ["2026-09", "2026-10"]
    capsys.readouterr()
    assert main(["verify", "--file", str(out / "sanitised/2026-10.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sanitised/2026-10.jsonl"]["ok"]
    assert main(["audit", "verify", "--file", str(out / "audit.jsonl")]) == 0


def test_batch_ids_never_look_like_identifiers_to_the_audit_guard() -> None:
    # The worst case: random hex that happens to be all digits, and a large counter.
    root = "0123456789" * 6 + "abcd"
    for batch in ("b" + "1" * 12 + "n" + "9" * 9, "b" + "0123456789ab" + "n0"):
        check_details({"batch": batch, "stream": "cdr.sanitised.2026-10", "root": root})
