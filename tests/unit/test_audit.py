"""The audit log: signing, chaining, resuming, and detection of every kind of tampering.

Tamper tests are exhaustive over a small log (issue 5 "Done when", issue 9 scenario 10):
every single-bit flip of every byte, every dropped event, every swap of two events of a
writer, forged and replayed insertions. Each must fail verification AND name the event
that was changed (its position in the log).
"""

from __future__ import annotations

import base64
import itertools
import logging
import multiprocessing
import pickle
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from service import cli
from service.audit import (
    ENV_SIGNING_KEY,
    ENV_SIGNING_KEY_FILE,
    GENESIS,
    Auditor,
    ChainHead,
    SigningKey,
    canonical,
    check_free_text,
    event_hash,
    load_signing_key,
    open_auditor,
    parse_target,
    public_key_pem,
    split_lines,
    verify,
    verify_bytes,
    verify_file,
)
from service.errors import AuditError, AuditWriteError, ConfigError
from service.keyring import Keyring
from service.keystore import FileKeystore, MasterKey

# A fixed key: child processes (spawned, so they re-import this module) sign with it too.
KEY_B64 = base64.b64encode(bytes(range(100, 132))).decode()
KEY = load_signing_key(env={ENV_SIGNING_KEY: KEY_B64})
OTHER = SigningKey.generate(source="attacker")
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that ticks one second per reading (deterministic, increasing times)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, "CDRANON_CONFIG", "CDRANON_KEYSTORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))


def _open(path: Path, writer: str, clock: Callable[[], datetime] | None = None) -> Auditor:
    return open_auditor(f"file://{path}", signing_key=KEY, writer=writer, clock=clock or Clock())


def _small_log(path: Path) -> bytes:
    """Seven events of two interleaved writers (a processor and the retention controller)."""
    clock = Clock()
    p = _open(path, "processor-0", clock)
    r = _open(path, "retention", clock)
    p.record("key.created", actor="processor-0", key_id="2026-11/default")
    r.record("retention.pass", actor="retention", destroyed=0, deleted=0)
    p.record("integrity.root", actor="processor-0", topic="cdr.sanitised.2026-11", root="ab" * 32)
    r.record("key.destroyed", actor="retention", reason="deadline", key_id="2025-10/default")
    r.record("topic.deleted", actor="retention", topic="cdr.sealed.2025-10")
    p.record("unseal", actor="alice", reason="case 17", key_ids=["2026-11/default"], records=2)
    r.record("retention.pass", actor="retention", destroyed=1, deleted=1)
    p.close()
    r.close()
    return path.read_bytes()


def _writers(lines: list[bytes]) -> list[str]:
    return [str(orjson.loads(x)["writer"]) for x in lines]


def _join(lines: list[bytes]) -> bytes:
    return b"".join(x + b"\n" for x in lines)


def _sign(body: dict[str, Any], key: SigningKey = KEY) -> bytes:
    body = {**body, "key_id": body.get("key_id", key.key_id)}
    body.pop("sig", None)
    return canonical({**body, "sig": key.sign(canonical(body)).hex()})


# ------------------------------------------------------------------ the happy path


def test_chain_verifies_and_events_have_the_documented_shape(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines, clean = split_lines(data)
    assert clean
    assert len(lines) == 7
    report = verify_bytes(data, [KEY.public_key])
    assert report.ok, report.problem
    assert report.events == 7
    assert {w: h.seq for w, h in report.heads.items()} == {"processor-0": 3, "retention": 4}
    first = orjson.loads(lines[0])
    assert set(first) == {
        *("version", "writer", "seq", "time", "event", "actor", "reason", "details", "prev"),
        *("key_id", "sig"),
    }
    assert first["seq"] == 1
    assert first["prev"] == GENESIS
    assert first["key_id"] == KEY.key_id
    assert first["time"] == "2026-11-01T12:00:01.000000Z"
    # Stored bytes are exactly the canonical encoding, and prev chains over them.
    for raw in lines:
        assert canonical(orjson.loads(raw)) == raw
    by_writer = [x for x in lines if orjson.loads(x)["writer"] == "retention"]
    for before, after in itertools.pairwise(by_writer):
        assert orjson.loads(after)["prev"] == event_hash(before)


def test_record_returns_the_stored_event(tmp_path: Path) -> None:
    with _open(tmp_path / "a.jsonl", "w") as a:
        ev = a.record("hold.placed", actor="legal", reason="case 9", hold_id="h-1")
    assert canonical(ev) + b"\n" == (tmp_path / "a.jsonl").read_bytes()
    assert ev["details"] == {"hold_id": "h-1"}


def test_resume_after_reopen_continues_seq_and_prev(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with _open(path, "retention") as a:
        a.record("retention.pass", actor="r")
        last = a.record("retention.pass", actor="r")
    with _open(path, "other") as o:
        o.record("unseal", actor="bob", reason="case 1", records=1)
    with _open(path, "retention") as a:
        again = a.record("retention.pass", actor="r")
    assert again["seq"] == 3
    assert again["prev"] == event_hash(canonical(last))
    assert verify_file(path, [KEY.public_key]).ok


def test_two_auditors_of_one_writer_in_one_process_do_not_fork(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    a, b = _open(path, "w"), _open(path, "w")
    seqs = [x.record("retention.pass", actor="r")["seq"] for x in (a, b, a, b, b, a)]
    a.close()
    b.close()
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert verify_file(path, [KEY.public_key]).ok


def _append_many(path: str, writer: str, n: int) -> None:
    key = load_signing_key(env={ENV_SIGNING_KEY: KEY_B64})
    with open_auditor(f"file://{path}", signing_key=key, writer=writer) as a:
        for i in range(n):
            a.record("integrity.root", actor=writer, sync=False, batch=i)


def test_processes_sharing_a_writer_and_a_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_append_many, args=(str(path), w, 40))
        for w in ("shared", "shared", "shared", "solo")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    report = verify_file(path, [KEY.public_key])
    assert report.ok, report.problem
    assert report.heads["shared"].seq == 120
    assert report.heads["solo"].seq == 40


def test_sync_false_then_flush(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with _open(path, "p") as a:
        for i in range(50):
            a.record("integrity.root", actor="p", sync=False, partition=i % 3, root="cd" * 32)
        a.flush()
        assert len(split_lines(path.read_bytes())[0]) == 50
    assert verify_file(path, [KEY.public_key]).ok


def test_a_clock_stepping_back_does_not_break_the_chain(tmp_path: Path) -> None:
    times = iter([T0, T0 - timedelta(hours=1), T0 + timedelta(seconds=1)])
    path = tmp_path / "a.jsonl"
    with _open(path, "w", clock=lambda: next(times)) as a:
        evs = [a.record("retention.pass", actor="r") for _ in range(3)]
    assert evs[1]["time"] == evs[0]["time"]
    assert verify_file(path, [KEY.public_key]).ok


# ------------------------------------------------------------------ tampering


def _tiny_log(path: Path) -> bytes:
    """Four events of two writers, short details: the bit-flip test verifies ~10^4 logs."""
    clock = Clock()
    with _open(path, "p", clock) as p, _open(path, "r", clock) as r:
        p.record("key.created", actor="p", key_id="2026-11/default")
        r.record("key.destroyed", actor="r", reason="deadline", key_id="2025-10/default")
        p.record("unseal", actor="alice", reason="case 17", records=2)
        r.record("retention.pass", actor="r", destroyed=1)
    return path.read_bytes()


@pytest.mark.slow
def test_every_single_bit_flip_of_every_byte_is_detected_at_its_event(tmp_path: Path) -> None:
    data = _tiny_log(tmp_path / "a.jsonl")
    keys = {KEY.key_id: KEY.public_key}
    line_of: list[int] = []
    for n, line in enumerate(split_lines(data)[0]):
        line_of.extend([n] * (len(line) + 1))  # a line's newline belongs to it
    assert len(line_of) == len(data)
    missed = []
    checked = 0
    for pos in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            report = verify_bytes(bytes(bad), keys)
            checked += 1
            if report.ok or report.problem is None or report.problem.index != line_of[pos]:
                missed.append((pos, bit, report.problem))
    assert checked == 8 * len(data)
    assert missed == []


def test_every_dropped_event_is_detected_except_a_writers_newest(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines = split_lines(data)[0]
    writers = _writers(lines)
    full = verify_bytes(data, [KEY.public_key])
    for i in range(len(lines)):
        rest = lines[:i] + lines[i + 1 :]
        report = verify(rest, [KEY.public_key])
        later_same = [j for j in range(i + 1, len(lines)) if writers[j] == writers[i]]
        if later_same:
            assert report.problem is not None, f"dropping event {i} went unnoticed"
            # Named: the writer's next event, now at position later_same[0] - 1.
            assert report.problem.index == later_same[0] - 1
            assert report.problem.writer == writers[i]
        else:
            # The documented limit of a hash chain: its newest events can be cut off...
            assert report.ok
            # ...which anchors saved from an earlier verify reveal.
            anchored = verify(rest, [KEY.public_key], anchors=full.heads)
            assert anchored.problem is not None
            assert anchored.problem.writer == writers[i]
            assert "truncated" in anchored.problem.reason


def test_truncating_the_whole_tail_is_caught_by_anchors(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines = split_lines(data)[0]
    heads = verify_bytes(data, [KEY.public_key]).heads
    for cut in range(len(lines)):
        assert not verify(lines[:cut], [KEY.public_key], anchors=heads).ok


def test_anchor_detects_a_rewritten_event(tmp_path: Path) -> None:
    heads = {"w": ChainHead(1, "00" * 32, "2026-11-01T12:00:01.000000Z")}
    path = tmp_path / "a.jsonl"
    with _open(path, "w") as a:
        a.record("retention.pass", actor="r")
    report = verify_file(path, [KEY.public_key], anchors=heads)
    assert report.problem is not None
    assert "differs from the anchor" in report.problem.reason


def test_every_swap_of_two_events_of_a_writer_is_detected(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines = split_lines(data)[0]
    writers = _writers(lines)
    pairs = [
        (i, j) for i, j in itertools.combinations(range(len(lines)), 2) if writers[i] == writers[j]
    ]
    assert len(pairs) == 3 + 6
    for i, j in pairs:
        swapped = list(lines)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        report = verify(swapped, [KEY.public_key])
        assert report.problem is not None, (i, j)
        assert report.problem.index == i


def test_replayed_events_are_detected_wherever_inserted(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines = split_lines(data)[0]
    for src in range(len(lines)):
        for at in range(len(lines) + 1):
            forged = [*lines[:at], lines[src], *lines[at:]]
            report = verify(forged, [KEY.public_key])
            assert report.problem is not None, (src, at)
            # Either the copy or its byte-identical original is named.
            original = src if src < at else src + 1
            assert report.problem.index in (at, original)


def _forged_next(lines: list[bytes], writer: str, key: SigningKey, **over: Any) -> bytes:
    last = [x for x in lines if orjson.loads(x)["writer"] == writer][-1]
    ev = orjson.loads(last)
    body = {
        **ev,
        "seq": ev["seq"] + 1,
        "prev": event_hash(last),
        "event": "key.destroyed",
        "details": {"key_id": "2026-11/default"},
        "key_id": key.key_id,
    }
    body.update(over)
    return _sign(body, key)


@pytest.mark.parametrize("where", ["end", "middle"])
def test_forged_events_are_detected(tmp_path: Path, where: str) -> None:
    lines = split_lines(_small_log(tmp_path / "a.jsonl"))[0]
    at = len(lines) if where == "end" else 3
    base = lines[:at]
    cases = [
        # Signed with the attacker's own key: unknown key id.
        ("unknown key", _forged_next(base, "retention", OTHER)),
        # The attacker's signature under our key id.
        ("does not verify", _forged_next(base, "retention", OTHER, key_id=KEY.key_id)),
        # A copy of a real event with a made-up signature.
        ("does not verify", canonical({**orjson.loads(base[-1]), "sig": "00" * 64})),
    ]
    for why, forged in cases:
        report = verify([*base, forged, *lines[at:]], [KEY.public_key])
        assert report.problem is not None, why
        assert report.problem.index == at
        assert why in report.problem.reason


def test_a_validly_signed_event_with_a_wrong_chain_is_detected() -> None:
    first = _sign(
        {
            "version": 1,
            "writer": "w",
            "seq": 1,
            "time": "2026-11-01T12:00:01.000000Z",
            "event": "retention.pass",
            "actor": "r",
            "reason": None,
            "details": {},
            "prev": GENESIS,
        }
    )
    good = orjson.loads(first)
    variants = {
        "seq 3 where 2": {"seq": 3, "prev": event_hash(first)},
        "prev does not match": {"seq": 2, "prev": "11" * 32},
        "time earlier": {
            "seq": 2,
            "prev": event_hash(first),
            "time": "2026-11-01T11:00:00.000000Z",
        },
    }
    for why, over in variants.items():
        second = _sign({**good, **over})
        report = verify([first, second], [KEY.public_key])
        assert report.problem is not None
        assert report.problem.index == 1
        assert why in report.problem.reason


def test_non_canonical_but_equivalent_json_is_rejected(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines = split_lines(data)[0]
    pretty = orjson.dumps(orjson.loads(lines[2]), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    spaced = lines[2].replace(b'"seq":', b'"seq": ')
    for variant in (pretty.replace(b"\n", b""), spaced):
        report = verify([*lines[:2], variant, *lines[3:]], [KEY.public_key])
        assert report.problem is not None
        assert report.problem.index == 2


def test_torn_last_line_fails_verify_and_refuses_appends(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    data = _small_log(path)
    path.write_bytes(data[:-1])
    report = verify_file(path, [KEY.public_key])
    assert report.problem is not None
    assert report.problem.index == 6
    with pytest.raises(AuditError, match="does not end with a newline"):
        _open(path, "w")


def test_inserted_blank_line_is_detected(tmp_path: Path) -> None:
    data = _small_log(tmp_path / "a.jsonl")
    lines = split_lines(data)[0]
    report = verify_bytes(_join([*lines[:4], b"", *lines[4:]]), [KEY.public_key])
    assert report.problem is not None
    assert report.problem.index == 4


def test_events_under_a_rotated_key_verify_with_both_keys(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with _open(path, "w") as a:
        a.record("retention.pass", actor="r")
    with open_auditor(f"file://{path}", signing_key=OTHER, writer="w") as b:
        b.record("retention.pass", actor="r")
    assert not verify_file(path, [KEY.public_key]).ok
    assert verify_file(path, [KEY.public_key, OTHER.public_key]).ok


# ------------------------------------------------------------------ what record() refuses


@pytest.mark.parametrize(
    "text",
    [
        "+44 7700 900123",
        "call from 447700900123",
        "imsi 234150999999999",
        "imei 35-209900-176148-1",
        "mail alice.smith@example.com",
        "(020) 7946-0958 12",
    ],
)
def test_free_text_with_an_identifier_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        check_free_text(text, what="--reason")
    assert text not in str(exc.value)


@pytest.mark.parametrize(
    "text", ["case 2026-0042", "ticket INC-123456", "court order 17/2026", "fraud review Q3"]
)
def test_ordinary_reasons_are_accepted(text: str) -> None:
    check_free_text(text)


def test_record_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with _open(path, "w") as a:
        with pytest.raises(ConfigError):
            a.record("unseal", actor="bob", reason="for +447700900123")
        with pytest.raises(AuditError, match="identifier"):
            a.record("hold.placed", actor="legal", msisdn="+447700900123")
        with pytest.raises(AuditError, match="identifier"):
            a.record("hold.placed", actor="legal", who={"email": ["x@example.org"]})
        with pytest.raises(AuditError, match="NaN"):
            a.record("retention.pass", actor="r", ratio=float("nan"))
        with pytest.raises(AuditError, match="event name"):
            a.record("Key Created", actor="r")
        with pytest.raises(AuditError, match="actor"):
            a.record("retention.pass", actor=" ")
        with pytest.raises(AuditError, match="JSON"):
            a.record("retention.pass", actor="r", when=object())
        a.record("retention.pass", actor="r")
    assert orjson.loads(path.read_bytes())["seq"] == 1


def test_closed_auditor_refuses(tmp_path: Path) -> None:
    a = _open(tmp_path / "a.jsonl", "w")
    a.close()
    a.close()
    with pytest.raises(AuditError, match="closed"):
        a.record("retention.pass", actor="r")


def test_a_failed_write_raises_audit_write_error() -> None:
    # /dev/full: every write fails with ENOSPC, as a full disk would.
    a = open_auditor("file:///dev/full", signing_key=KEY, writer="w")
    with pytest.raises(AuditWriteError, match="cannot write audit log"):
        a.record("retention.pass", actor="r")


def test_targets_parse() -> None:
    assert parse_target("file:///var/log/a.jsonl") == ("file", "/var/log/a.jsonl", None)
    assert parse_target("kafka://127.0.0.1:9092/cdr.audit") == (
        "kafka",
        "cdr.audit",
        "127.0.0.1:9092",
    )
    assert parse_target("kafka:cdr.audit") == ("kafka", "cdr.audit", None)
    for bad in ("cdr.audit", "s3://b/k", "kafka://host", "file://"):
        with pytest.raises(ConfigError, match="invalid audit target"):
            parse_target(bad)


def test_writer_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="writer"):
        _open(tmp_path / "a.jsonl", "has space")


# ------------------------------------------------------------------ signing keys


def _seed() -> bytes:
    return bytes(range(32))


def test_signing_key_from_env_base64_hex_pem_and_file(tmp_path: Path) -> None:
    b64 = base64.b64encode(_seed()).decode()
    ids = {
        load_signing_key(env={ENV_SIGNING_KEY: b64}).key_id,
        load_signing_key(env={ENV_SIGNING_KEY: _seed().hex()}).key_id,
    }
    pem_path = tmp_path / "k.pem"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    pem = Ed25519PrivateKey.from_private_bytes(_seed()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ids.add(load_signing_key(env={ENV_SIGNING_KEY: pem.decode()}).key_id)
    pem_path.write_bytes(pem)
    pem_path.chmod(0o600)
    ids.add(load_signing_key(env={ENV_SIGNING_KEY_FILE: str(pem_path)}).key_id)
    ids.add(load_signing_key(env={}, key_file=pem_path).key_id)
    ids.add(load_signing_key(env={}, text=b64).key_id)
    assert len(ids) == 1
    # The environment wins over the setting and the file.
    other = base64.b64encode(b"\x01" * 32).decode()
    assert load_signing_key(env={ENV_SIGNING_KEY: other}, text=b64).key_id not in ids


def test_malformed_or_missing_signing_key_errors_never_echo_it(tmp_path: Path) -> None:
    secret = base64.b64encode(b"\x05" * 31).decode()
    with pytest.raises(AuditError, match="malformed") as exc:
        load_signing_key(env={ENV_SIGNING_KEY: secret})
    assert secret not in str(exc.value)
    with pytest.raises(AuditError, match="no audit signing key"):
        load_signing_key(env={})
    with pytest.raises(AuditError, match="does not exist"):
        load_signing_key(env={ENV_SIGNING_KEY_FILE: str(tmp_path / "nope")})


def test_dev_mode_generates_a_private_key_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "audit"
    with caplog.at_level(logging.WARNING, logger="cdranon.audit"):
        k1 = load_signing_key(env={}, dev_dir=d)
    assert "DEV MODE" in caplog.text
    assert "generated" in caplog.text
    key_file = d / "audit-signing.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (d / "audit-signing.pub").read_text() == public_key_pem(k1.public_key)
    assert key_file.read_text().strip() not in caplog.text
    assert load_signing_key(env={}, dev_dir=d).key_id == k1.key_id


def test_signing_key_never_shows_itself() -> None:
    k = load_signing_key(env={ENV_SIGNING_KEY: base64.b64encode(_seed()).decode()})
    assert _seed().hex() not in repr(k)
    assert base64.b64encode(_seed()).decode() not in repr(k)
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(k)


# ------------------------------------------------------------------ the keyring hook


def test_keyring_reports_creation_once_and_retries_a_failed_report(tmp_path: Path) -> None:
    store = FileKeystore(tmp_path / "keys", MasterKey(b"\x03" * 32, source="test"))
    store.create_if_absent("2026-10/default")
    calls: list[str] = []
    fail = [True]

    def hook(kid: str) -> None:
        calls.append(kid)
        if fail[0]:
            raise AuditWriteError("audit down")

    ring = Keyring(store, on_created=hook)
    ring.get("2026-10/default")  # existed: not a creation
    assert calls == []
    with pytest.raises(AuditWriteError):
        ring.get("2026-11/default")
    fail[0] = False
    ring.get("2026-11/default")
    ring.get("2026-11/default")
    assert calls == ["2026-11/default", "2026-11/default"]


# ------------------------------------------------------------------ the command line


def _cli(argv: list[str]) -> int | str | None:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    p = tmp_path / "audit.pub"
    p.write_text(public_key_pem(KEY.public_key))
    return p


def test_cli_verify_ok_tampered_and_usage(
    tmp_path: Path, pub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.jsonl"
    data = _small_log(path)
    assert _cli(["audit", "verify", "--file", str(path), "--public-key", str(pub)]) == 0
    assert "OK, 7 events, 2 writer chain(s)" in capsys.readouterr().out
    lines = split_lines(data)[0]
    path.write_bytes(_join([*lines[:3], *lines[4:]]))  # drop retention seq 2
    assert _cli(["audit", "verify", "--file", str(path), "--public-key", str(pub)]) == 1
    err = capsys.readouterr().err
    assert "TAMPERED at line 4" in err
    assert "writer retention, seq 3" in err
    # Usage errors: exit 2.
    assert _cli(["audit", "verify", "--file", str(path), "--topic", "x"]) == 2
    assert (
        _cli(["audit", "verify", "--file", str(tmp_path / "none.jsonl"), "--public-key", str(pub)])
        == 2
    )
    assert _cli(["audit", "verify", "--file", str(path)]) == 2  # no key configured
    assert "no public key" in capsys.readouterr().err


def test_cli_verify_json_and_anchors(
    tmp_path: Path, pub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a.jsonl"
    data = _small_log(path)
    anchors = tmp_path / "heads.json"
    argv = ["audit", "verify", "--file", str(path), "--public-key", str(pub)]
    assert _cli([*argv, "--save-anchors", str(anchors), "--json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert out["writers"]["retention"]["seq"] == 4
    lines = split_lines(data)[0]
    path.write_bytes(_join(lines[:-1]))  # cut off the newest event
    assert _cli(argv) == 0  # the chain alone cannot see it...
    capsys.readouterr()
    assert _cli([*argv, "--anchors", str(anchors), "--json"]) == 1  # ...the anchors can
    out = orjson.loads(capsys.readouterr().out)
    assert out["problem"]["writer"] == "retention"
    assert "truncated" in out["problem"]["reason"]


def test_cli_show_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.jsonl"
    _small_log(path)
    assert _cli(["audit", "show", "--file", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TIME", "WRITER", "SEQ", "EVENT", "ACTOR", "REASON", "DETAILS"]
    assert len(out) == 8
    assert _cli(["audit", "show", "--file", str(path), "--event", "retention.pass", "--json"]) == 0
    evs = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["details"]["destroyed"] for e in evs] == [0, 1]
    assert (
        _cli(
            [
                "audit",
                "show",
                "--file",
                str(path),
                "--event",
                "key.",
                "--since",
                "2026-11-01T12:00:04Z",
                "--json",
            ]
        )
        == 0
    )
    evs = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in evs] == ["key.destroyed"]
    assert _cli(["audit", "show", "--file", str(path), "--since", "yesterday"]) == 2


def test_cli_uses_the_dev_key_beside_the_configured_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "logs" / "audit.jsonl"
    monkeypatch.setenv("CDRANON_AUDIT__TARGET", f"file://{target}")
    from service.commands.audit import open_configured_auditor  # noqa: PLC0415
    from service.config import load_settings  # noqa: PLC0415

    with open_configured_auditor(load_settings(), writer="cli") as a:
        a.record("retention.pass", actor="r")
    assert (tmp_path / "logs" / "audit-signing.pub").exists()
    assert _cli(["audit", "verify"]) == 0
    assert "OK, 1 events" in capsys.readouterr().out


def test_no_event_is_ever_written_with_an_unknown_field(tmp_path: Path) -> None:
    # verify insists on the exact field set: an extra field is tampering, even if signed.
    path = tmp_path / "a.jsonl"
    with _open(path, "w") as a:
        ev = a.record("retention.pass", actor="r")
    extra = _sign({**ev, "note": "x"})
    report = verify([extra], [KEY.public_key])
    assert report.problem is not None
    assert "wrong fields" in report.problem.reason


def _iter_once(lines: list[bytes]) -> Iterator[bytes]:
    yield from lines


def test_verify_takes_any_iterable(tmp_path: Path) -> None:
    lines = split_lines(_small_log(tmp_path / "a.jsonl"))[0]
    assert verify(_iter_once(lines), {KEY.key_id: KEY.public_key}).ok


# ------------------------------------------------------------------ unseal is audited


@pytest.fixture
def sealed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """Two sealed records of 2026-10 written by `cdranon process`; (file, keystore URL)."""
    from tests.unit.core_helpers import cdr, raw  # noqa: PLC0415

    monkeypatch.setenv("CDRANON_MASTER_KEY", base64.b64encode(b"\x07" * 32).decode())
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY_B64)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        raw(cdr(cdr_id="a", event_time="2026-10-01T00:00:00Z"))
        + b"\n"
        + raw(cdr(cdr_id="b", event_time="2026-10-02T00:00:00Z"))
        + b"\n"
    )
    ks = f"file://{tmp_path / 'keys'}"
    argv = ["process", "--input", str(inp), "--out", str(tmp_path / "out"), "--keystore", ks]
    assert _cli([*argv, "--now", "2026-11-23T12:00:00Z"]) == 0
    return tmp_path / "out/sealed/2026-10.jsonl", ks


def test_unseal_writes_one_audit_event_without_identifiers(
    tmp_path: Path, sealed_file: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    sealed, ks = sealed_file
    log = tmp_path / "audit.jsonl"
    capsys.readouterr()
    argv = ["unseal", "--input", str(sealed), "--keystore", ks, "--audit", f"file://{log}"]
    assert _cli([*argv, "--reason", "case 2026-0042", "--by", "alice"]) == 0
    out = capsys.readouterr().out
    assert "+447700900123" in out  # the identifiers were restored...
    text = log.read_text()
    assert "447700900123" not in text  # ...and none reached the audit log
    (ev,) = [orjson.loads(x) for x in text.splitlines()]
    assert ev["event"] == "unseal"
    assert ev["actor"] == "alice"
    assert ev["reason"] == "case 2026-0042"
    assert ev["details"] == {
        "key_ids": ["2026-10/default"],
        "months": ["2026-10"],
        "records": 2,
        "failed": 0,
        "input": "file",
    }
    assert verify_file(log, [KEY.public_key]).ok


def test_unseal_needs_a_reason_without_identifiers_and_a_working_audit_log(
    tmp_path: Path, sealed_file: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    sealed, ks = sealed_file
    log = tmp_path / "audit.jsonl"
    base = ["unseal", "--input", str(sealed), "--keystore", ks]
    capsys.readouterr()
    assert _cli([*base, "--audit", f"file://{log}"]) == 2  # no --reason
    assert _cli([*base, "--audit", f"file://{log}", "--reason", "call +44 7700 900123"]) == 2
    cap = capsys.readouterr()
    assert "7700" not in cap.err
    # The audit write fails (a full disk): nothing is shown.
    assert _cli([*base, "--audit", "file:///dev/full", "--reason", "case 1"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "cannot write audit log" in cap.err
    assert not log.exists()


def test_keys_destroy_is_audited(
    tmp_path: Path, sealed_file: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, ks = sealed_file
    log = tmp_path / "audit.jsonl"
    argv = ["keys", "destroy", "--month", "2026-10", "--keystore", ks, "--yes"]
    assert _cli([*argv, "--audit", f"file://{log}", "--reason", "test", "--by", "ops"]) == 0
    assert _cli([*argv, "--audit", f"file://{log}"]) == 0  # already destroyed: no event
    (ev,) = [orjson.loads(x) for x in log.read_text().splitlines()]
    assert ev["event"] == "key.destroyed"
    assert ev["actor"] == "ops"
    assert ev["details"]["key_id"] == "2026-10/default"
    assert ev["details"]["existed"] is True
