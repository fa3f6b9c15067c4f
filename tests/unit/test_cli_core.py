"""`cdranon process`, `unseal` and `deadlines` through the real command line entry point."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import orjson
import pytest

from service.cli import main
from tests.unit.core_helpers import cdr, raw

NOW = "2026-11-23T12:00:00Z"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CDRANON_MASTER_KEY", base64.b64encode(b"\x07" * 32).decode())
    monkeypatch.delenv("CDRANON_KEYSTORE", raising=False)
    monkeypatch.delenv("CDRANON_POLICY", raising=False)
    # unseal and keys destroy write audit events: keep them (and the dev key) in tmp.
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    return tmp_path


def _exit_code(argv: list[str]) -> int | str | None:
    """main()'s return code, or the code argparse exits with from inside."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _input(tmp: Path, lines: list[bytes]) -> Path:
    p = tmp / "in.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _process(tmp: Path, inp: Path, *extra: str) -> int:
    return main(
        [
            "process",
            "--input",
            str(inp),
            "--out",
            str(tmp / "out"),
            "--now",
            NOW,
            "--keystore",
            f"file://{tmp / 'keys'}",
            *extra,
        ]
    )


def test_process_writes_month_files_and_a_summary(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        raw(cdr(cdr_id="a", event_time="2026-10-01T00:00:00Z")),
        raw(cdr(cdr_id="b", event_time="2026-09-30T23:59:59Z")),
        raw(cdr(cdr_id="old", event_time="2025-01-15T00:00:00Z")),
        b"",
        b"{broken",
        raw(cdr(cdr_id="bad-imei", imei="490154203237519")),
    ]
    inp = _input(env, lines)
    assert _process(env, inp, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 5
    assert summary["blank_lines_skipped"] == 1
    assert summary["sealed"] == 2
    assert summary["stripped"] == 1
    assert summary["rejected"] == 2
    assert summary["sealed"] + summary["stripped"] + summary["rejected"] == summary["records"]
    out = env / "out"
    assert sorted(p.name for p in (out / "sealed").iterdir()) == ["2026-09.jsonl", "2026-10.jsonl"]
    assert sorted(p.name for p in (out / "sanitised").iterdir()) == [
        "2025-01.jsonl",
        "2026-09.jsonl",
        "2026-10.jsonl",
    ]
    rejected = [orjson.loads(x) for x in (out / "rejected.jsonl").read_bytes().splitlines()]
    assert [(r["line"], r["reason"], r["field"]) for r in rejected] == [
        (5, "invalid_json", None),
        (6, "invalid_value", "imei"),
    ]
    assert rejected[0]["original"] == "{broken"
    assert stat.S_IMODE((out / "rejected.jsonl").stat().st_mode) == 0o600
    # No plaintext identifier in any output file but the rejected one.
    for kind in ("sealed", "sanitised"):
        for f in (out / kind).iterdir():
            text = f.read_text()
            for value in ("447700900123", "234150000000001", "490154203237518"):
                assert value not in text


def test_process_appends_and_human_summary(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = _input(env, [raw(cdr(cdr_id="a"))])
    assert _process(env, inp) == 0
    assert _process(env, inp) == 0
    text = capsys.readouterr().out
    assert "sealed" in text
    assert "processed 1 records" in text
    assert len((env / "out/sealed/2026-10.jsonl").read_bytes().splitlines()) == 2


def test_unseal_restores_and_destroyed_key_fails_per_record(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = _input(
        env,
        [
            raw(cdr(cdr_id="a", event_time="2026-10-01T00:00:00Z")),
            raw(cdr(cdr_id="b", event_time="2026-09-01T00:00:00Z", msisdn="+33 6 12 34 56 78")),
        ],
    )
    assert _process(env, inp) == 0
    capsys.readouterr()
    sealed = env / "sealed.jsonl"
    sealed.write_bytes(
        (env / "out/sealed/2026-10.jsonl").read_bytes()
        + (env / "out/sealed/2026-09.jsonl").read_bytes()
    )
    ks = f"file://{env / 'keys'}"
    assert main(["unseal", "--input", str(sealed), "--keystore", ks, "--reason", "test"]) == 0
    got = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [g["msisdn"] for g in got] == ["+447700900123", "+33 6 12 34 56 78"]
    assert all("sealed" not in g for g in got)

    assert main(["keys", "destroy", "--month", "2026-09", "--keystore", ks, "--yes"]) == 0
    capsys.readouterr()
    assert main(["unseal", "--input", str(sealed), "--keystore", ks, "--reason", "t"]) == 1
    cap = capsys.readouterr()
    assert len(cap.out.splitlines()) == 1  # the 2026-10 record still opens
    assert "line 2" in cap.err
    assert "destroyed" in cap.err
    assert "+33" not in cap.err


def test_deadlines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deadlines", "--event-time", "2025-12-01T00:30:00+01:00"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "month": "2025-11",
        "retention_class": "default",
        "identifiers_until": "2026-12-01T00:00:00Z",
        "billing_until": "2036-01-01T00:00:00Z",
    }
    assert main(["deadlines", "--event-time", "1764547200000"]) == 0
    assert json.loads(capsys.readouterr().out)["month"] == "2025-12"


def test_deadlines_with_a_jurisdiction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    text = (Path(__file__).parents[2] / "service/data/policy.toml").read_text()
    policy.write_text(
        text + '\n[retention.jurisdictions.it]\ncountries = ["IT"]\nidentifier_months = 24\n'
    )
    assert (
        main(
            [
                "deadlines",
                "--event-time",
                "2025-11-30T23:59:59Z",
                "--country",
                "IT",
                "--policy",
                str(policy),
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["retention_class"] == "it"
    assert doc["identifiers_until"] == "2027-12-01T00:00:00Z"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["deadlines", "--event-time", "yesterday"], "--event-time"),
        (["deadlines", "--event-time", "2025-11-30T23:59:59Z", "--country", "UK"], "--country"),
        (["deadlines"], "required"),
        (["process", "--input", "/nonexistent/in.jsonl", "--out", "OUT"], "cannot read --input"),
        (["process", "--input", "-", "--out", "OUT", "--now", "soon"], "--now"),
        (["process", "--input", "-", "--out", "OUT", "--policy", "BADPOLICY"], "policy"),
        (["process", "--input", "-", "--out", "OUT", "--keystore", "s3://bucket"], "keystore"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    bad = env / "bad.toml"
    bad.write_text("[fields\n")
    argv = [a.replace("OUT", str(env / "out")).replace("BADPOLICY", str(bad)) for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err
