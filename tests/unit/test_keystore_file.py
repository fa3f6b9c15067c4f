"""The file keystore and master key loading, on real files under tmp_path."""

from __future__ import annotations

import base64
import errno
import json
import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.errors import (
    ConfigError,
    KeyDestroyedError,
    KeystoreError,
    KeystoreUnavailableError,
    MasterKeyError,
)
from service.keystore import (
    SECRET_BYTES,
    FileKeystore,
    KeyState,
    Keystore,
    MasterKey,
    default_keystore_url,
    generate_master_key,
    keystore_directory,
    load_master_key,
    open_keystore,
)
from tests.unprivileged import hand_over, shared_tmp, unprivileged_prefix

REPO = Path(__file__).resolve().parents[2]
KID = "2025-11/default"


def _master(seed: int = 1) -> MasterKey:
    return MasterKey(bytes([seed]) * 32, source="test")


def _store(tmp_path: Path, seed: int = 1) -> FileKeystore:
    return FileKeystore(tmp_path / "keys", _master(seed))


def _all_bytes(directory: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in directory.rglob("*") if p.is_file()]


# -- round trip and format --------------------------------------------------------------


def test_round_trip_and_protocol(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    assert isinstance(ks, Keystore)
    assert ks.get(KID) is None
    secret = ks.create_if_absent(KID)
    assert len(secret) == SECRET_BYTES
    assert ks.get(KID) == secret
    assert ks.create_if_absent(KID) == secret  # exists: the same secret, not a new one
    # A second store over the same directory (another process, a restart) sees it too.
    assert _store(tmp_path).get(KID) == secret
    other = ks.create_if_absent("2025-11/de-24m")
    assert other != secret


def test_key_file_never_holds_the_plaintext(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    secret = ks.create_if_absent(KID)
    path = tmp_path / "keys" / "2025-11.default.key"
    raw = path.read_bytes()
    for spelling in (secret, secret.hex().encode(), base64.b64encode(secret)):
        assert spelling not in raw
    doc = json.loads(raw)
    assert doc["format"] == 1
    assert doc["key_id"] == KID
    assert doc["created_at"].endswith("Z")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_wrap_is_bound_to_its_key_id(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    ks.create_if_absent(KID)
    keys = tmp_path / "keys"
    doc = json.loads((keys / "2025-11.default.key").read_text())
    doc["key_id"] = "2025-12/default"
    (keys / "2025-12.default.key").write_text(json.dumps(doc))
    with pytest.raises(MasterKeyError, match="damaged or tampered"):
        ks.get("2025-12/default")


def test_malformed_key_file_is_a_clear_error(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    (tmp_path / "keys" / "2025-11.default.key").write_text("{not json")
    with pytest.raises(KeystoreError, match=r"2025-11\.default\.key is not valid JSON"):
        ks.get(KID)


def test_invalid_key_id_rejected(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    with pytest.raises(ConfigError, match="expected YYYY-MM"):
        ks.get("2025-13/default")
    with pytest.raises(ConfigError):
        ks.create_if_absent("2025-11/../../etc")


# -- races ------------------------------------------------------------------------------


def _race_worker(
    directory: str,
    master: bytes,
    kids: list[str],
    barrier: threading.Barrier,
    out: multiprocessing.Queue[tuple[str, str]],
) -> None:
    ks = FileKeystore(Path(directory), MasterKey(master, source="test"))
    for kid in kids:
        barrier.wait(timeout=30)  # both processes reach create_if_absent together
        out.put((kid, ks.create_if_absent(kid).hex()))


def test_two_processes_racing_create_get_the_same_secret(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    kids = [f"2025-{m:02d}/default" for m in range(1, 13)] + [
        f"2026-{m:02d}/r{m}" for m in range(1, 9)
    ]
    assert len(kids) == 20
    directory = tmp_path / "keys"
    barrier = ctx.Barrier(2)
    out: multiprocessing.Queue[tuple[str, str]] = ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(directory), b"\x07" * 32, kids, barrier, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results: dict[str, set[str]] = {}
    for _ in range(2 * len(kids)):
        kid, secret_hex = out.get(timeout=60)
        results.setdefault(kid, set()).add(secret_hex)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    ks = FileKeystore(directory, MasterKey(b"\x07" * 32, source="test"))
    for kid in kids:
        assert len(results[kid]) == 1, kid
        secret = ks.get(kid)
        assert secret is not None
        assert results[kid] == {secret.hex()}
    # The losers cleaned up: only final key files remain.
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        kid.replace("/", ".") + ".key" for kid in kids
    )


def test_threads_racing_create_get_the_same_secret(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    with ThreadPoolExecutor(max_workers=8) as pool:
        secrets = set(pool.map(lambda _: ks.create_if_absent(KID), range(32)))
    assert len(secrets) == 1


# -- a directory that takes no new file -------------------------------------------------

NEW_KID = "2025-10/default"


def read_only_child(directory: str) -> None:
    """Run as an unprivileged user by the test below: the directory turns read-only
    between two months' creations, then writable again. Prints what it saw as JSON."""
    keys = Path(directory)
    ks = FileKeystore(keys, _master())
    first = ks.create_if_absent(KID)
    keys.chmod(0o555)
    seen: dict[str, object] = {}
    try:
        ks.create_if_absent(NEW_KID)
        seen["error"] = None
    except KeystoreUnavailableError as exc:
        seen["error"] = str(exc)
    seen["old_key_reads"] = ks.get(KID) == first
    seen["new_key_absent"] = ks.get(NEW_KID) is None
    seen["listing_read_only"] = sorted(os.listdir(keys))
    keys.chmod(0o700)
    second = ks.create_if_absent(NEW_KID)
    seen["new_key_after"] = ks.get(NEW_KID) == second != first
    seen["listing_after"] = sorted(os.listdir(keys))
    print(json.dumps(seen))


def test_read_only_directory_pauses_a_new_month_until_writable() -> None:
    """A real read-only directory (mode 0555, as a user file modes bind): creating a new
    month is KeystoreUnavailableError (the runner pauses), not a hard error that ends the
    run; existing keys still read, nothing is written, and creation works once writable."""
    with shared_tmp("cdranon-ro-unit-") as work:
        keys = hand_over(work / "keys")
        done = subprocess.run(
            [
                *unprivileged_prefix(),
                sys.executable,
                "-c",
                "import sys; from tests.unit.test_keystore_file import read_only_child; "
                "read_only_child(sys.argv[1])",
                str(keys),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    error = seen["error"]
    assert error is not None, "creating a key in a read-only directory did not fail"
    assert f"keystore directory {keys} does not accept the new key file of {NEW_KID}" in error
    assert "Permission denied" in error
    assert seen["old_key_reads"] is True
    assert seen["new_key_absent"] is True
    assert seen["listing_read_only"] == ["2025-11.default.key"]  # not even a temporary file
    assert seen["new_key_after"] is True
    assert seen["listing_after"] == ["2025-10.default.key", "2025-11.default.key"]


@pytest.mark.parametrize(
    "code", [errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC], ids=errno.errorcode.get
)
def test_directory_refusing_new_files_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """What a read-only remount (EROFS) or a full volume looks like: the same pause."""
    ks = _store(tmp_path)

    def refuse(final: Path, data: bytes, *, mode: int = 0o600) -> bool:
        raise OSError(code, os.strerror(code), str(final))

    monkeypatch.setattr("service.keystore.file.create_exclusive", refuse)
    with pytest.raises(KeystoreUnavailableError, match=os.strerror(code)) as info:
        ks.create_if_absent(KID)
    assert str(tmp_path / "keys") in str(info.value)
    monkeypatch.undo()
    assert ks.get(KID) is None
    assert len(ks.create_if_absent(KID)) == SECRET_BYTES


def test_other_write_errors_stay_hard_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error is no state an operator flips back: it ends the run, naming the file."""
    ks = _store(tmp_path)

    def broken(final: Path, data: bytes, *, mode: int = 0o600) -> bool:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(final))

    monkeypatch.setattr("service.keystore.file.create_exclusive", broken)
    with pytest.raises(
        KeystoreError, match=r"cannot write key file .*2025-11\.default\.key"
    ) as info:
        ks.create_if_absent(KID)
    assert not isinstance(info.value, KeystoreUnavailableError)


# -- destruction ------------------------------------------------------------------------


def test_destroy_leaves_no_trace_of_the_secret(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    secret = ks.create_if_absent(KID)
    keep = ks.create_if_absent("2025-12/default")
    keys = tmp_path / "keys"
    key_file = keys / "2025-11.default.key"
    wrapped = base64.b64decode(json.loads(key_file.read_text())["wrapped"])
    old_bytes = key_file.read_bytes()
    # A hard link outside the directory shares the inode: it shows whether destroy
    # overwrote the bytes in place or merely unlinked the name.
    witness = tmp_path / "witness"
    os.link(key_file, witness)

    assert ks.destroy(KID) is True

    for path, data in _all_bytes(keys):
        for needle in (secret, secret.hex().encode(), base64.b64encode(secret), wrapped):
            assert needle not in data, path
        assert base64.b64encode(wrapped) not in data, path
    overwritten = witness.read_bytes()
    assert len(overwritten) == len(old_bytes)
    assert overwritten != old_bytes
    assert base64.b64encode(wrapped) not in overwritten
    assert not key_file.exists()

    tomb = json.loads((keys / "2025-11.default.destroyed").read_text())
    assert tomb["key_id"] == KID
    assert tomb["destroyed_at"].endswith("Z")
    assert tomb["created_at"] is not None
    with pytest.raises(KeyDestroyedError, match=r"2025-11/default was destroyed at"):
        ks.get(KID)
    with pytest.raises(KeyDestroyedError):
        ks.create_if_absent(KID)
    # Another process opening the same directory sees the destruction too.
    with pytest.raises(KeyDestroyedError):
        _store(tmp_path).create_if_absent(KID)
    assert ks.get("2025-12/default") == keep  # other months are untouched


def test_destroy_is_idempotent_and_covers_never_created_keys(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    ks.create_if_absent(KID)
    assert ks.destroy(KID) is True
    first = (tmp_path / "keys" / "2025-11.default.destroyed").read_text()
    assert ks.destroy(KID) is False
    assert (tmp_path / "keys" / "2025-11.default.destroyed").read_text() == first

    assert ks.destroy("2025-10/default") is False
    with pytest.raises(KeyDestroyedError):
        ks.create_if_absent("2025-10/default")
    with pytest.raises(KeyDestroyedError):
        ks.get("2025-10/default")


def test_interrupted_destroy_is_completed_and_never_readable(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    ks.create_if_absent(KID)
    keys = tmp_path / "keys"
    # A crash after the tombstone but before the shredding leaves both files.
    (keys / "2025-11.default.destroyed").write_text(
        json.dumps({"format": 1, "key_id": KID, "destroyed_at": "2026-12-01T00:00:00Z"})
    )
    with pytest.raises(KeyDestroyedError):
        ks.get(KID)
    [info] = ks.list()
    assert info.state is KeyState.DESTROYED
    assert info.created_at is not None  # taken from the leftover key file
    assert ks.destroy(KID) is True
    assert not (keys / "2025-11.default.key").exists()


def test_destroy_works_without_the_master_key(tmp_path: Path) -> None:
    _store(tmp_path).create_if_absent(KID)
    admin = FileKeystore(tmp_path / "keys", None, create=False)
    with pytest.raises(MasterKeyError, match="without a master key"):
        admin.get(KID)
    assert admin.destroy(KID) is True
    with pytest.raises(KeyDestroyedError):
        _store(tmp_path).get(KID)


def test_list_reports_keys_and_tombstones_sorted(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    for kid in ("2026-01/default", "2025-11/default", "2025-11/b"):
        ks.create_if_absent(kid)
    ks.destroy("2025-11/default")
    ks.destroy("2024-01/default")
    infos = ks.list()
    assert [i.key_id for i in infos] == [
        "2024-01/default",
        "2025-11/b",
        "2025-11/default",
        "2026-01/default",
    ]
    states = {i.key_id: i.state for i in infos}
    assert states["2024-01/default"] is KeyState.DESTROYED
    assert states["2025-11/default"] is KeyState.DESTROYED
    assert states["2025-11/b"] is KeyState.ACTIVE
    by_id = {i.key_id: i for i in infos}
    assert by_id["2024-01/default"].created_at is None
    assert by_id["2025-11/default"].created_at is not None
    assert by_id["2025-11/default"].destroyed_at is not None
    assert by_id["2026-01/default"].destroyed_at is None
    assert {i.backend for i in infos} == {"file"}


# -- master key -------------------------------------------------------------------------


def test_wrong_master_key_is_named(tmp_path: Path) -> None:
    _store(tmp_path, seed=1).create_if_absent(KID)
    wrong = _store(tmp_path, seed=2)
    with pytest.raises(MasterKeyError, match=r"does not unwrap 2025-11/default: wrong CDRANON"):
        wrong.get(KID)
    with pytest.raises(MasterKeyError):
        wrong.create_if_absent(KID)


def test_master_key_from_env_base64_and_hex() -> None:
    raw = bytes(range(32))
    b64 = base64.b64encode(raw).decode()
    from_b64 = load_master_key(env={"CDRANON_MASTER_KEY": b64}, key_file=None, dev_dir=None)
    from_hex = load_master_key(env={"CDRANON_MASTER_KEY": raw.hex()}, key_file=None, dev_dir=None)
    from_url = load_master_key(
        env={"CDRANON_MASTER_KEY": base64.urlsafe_b64encode(raw).decode().rstrip("=")},
        key_file=None,
        dev_dir=None,
    )
    assert from_b64 == from_hex == from_url == MasterKey(raw, source="x")
    for text in (repr(from_b64), str(from_b64)):
        assert b64 not in text
        assert raw.hex() not in text
    generated = generate_master_key()
    assert len(base64.b64decode(generated)) == 32


@pytest.mark.parametrize(
    "value",
    [
        "c2VjcmV0LXRvby1zaG9ydA==",  # base64 of 17 bytes
        "zz" * 32,  # 64 characters, not hex
        "0123456789abcdef" * 5,  # hex, but 40 bytes
        "hunter2-is-not-a-key",
    ],
)
def test_malformed_env_master_key_is_not_echoed(value: str) -> None:
    with pytest.raises(MasterKeyError) as info:
        load_master_key(env={"CDRANON_MASTER_KEY": value}, key_file=None, dev_dir=None)
    message = str(info.value)
    assert value not in message
    assert "CDRANON_MASTER_KEY" in message
    assert "base64" in message
    assert "hex" in message


def test_master_key_file_raw_or_text(tmp_path: Path) -> None:
    raw = os.urandom(32)
    raw_file = tmp_path / "raw.key"
    raw_file.write_bytes(raw)
    text_file = tmp_path / "text.key"
    text_file.write_text(base64.b64encode(raw).decode() + "\n")
    env_file = load_master_key(
        env={"CDRANON_MASTER_KEY_FILE": str(raw_file)}, key_file=None, dev_dir=None
    )
    arg_file = load_master_key(env={}, key_file=text_file, dev_dir=None)
    assert env_file == arg_file == MasterKey(raw, source="x")
    with pytest.raises(MasterKeyError, match="does not exist"):
        load_master_key(env={}, key_file=tmp_path / "missing.key", dev_dir=None)


def test_no_master_key_says_what_to_set() -> None:
    with pytest.raises(MasterKeyError, match="set CDRANON_MASTER_KEY"):
        load_master_key(env={}, key_file=None, dev_dir=None)


def test_dev_mode_generates_a_0600_key_once_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev = tmp_path / "keys"
    with caplog.at_level(logging.WARNING, logger="cdranon.keystore"):
        first = load_master_key(env={}, key_file=None, dev_dir=dev)
    path = dev / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any(
        "DEV MODE" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    key_text = path.read_text().strip()
    assert all(key_text not in r.getMessage() for r in caplog.records)
    again = load_master_key(env={}, key_file=None, dev_dir=dev)
    assert again == first  # generated once, then reused
    # A configured key takes precedence over the dev key.
    configured = load_master_key(
        env={"CDRANON_MASTER_KEY": generate_master_key()}, key_file=None, dev_dir=dev
    )
    assert configured != first


def test_dev_mode_refuses_to_start_a_second_kek_beside_wrapped_keys(tmp_path: Path) -> None:
    _store(tmp_path).create_if_absent(KID)
    with pytest.raises(MasterKeyError, match="holds wrapped keys but no master key"):
        load_master_key(env={}, key_file=None, dev_dir=tmp_path / "keys")
    assert not (tmp_path / "keys" / "master.key").exists()


# -- URLs -------------------------------------------------------------------------------


def test_open_keystore_file_url_dev_mode(tmp_path: Path) -> None:
    ks = open_keystore(f"file://{tmp_path}/keys", env={})
    secret = ks.create_if_absent(KID)
    again = open_keystore(f"file:{tmp_path}/keys", env={})
    assert again.get(KID) == secret
    assert (tmp_path / "keys" / "master.key").exists()
    assert [i.key_id for i in ks.list()] == [KID]  # master.key is not a month key


def test_open_keystore_with_env_master_key_writes_no_dev_key(tmp_path: Path) -> None:
    env = {"CDRANON_MASTER_KEY": generate_master_key()}
    ks = open_keystore(f"file://{tmp_path}/keys", env=env)
    secret = ks.create_if_absent(KID)
    assert not (tmp_path / "keys" / "master.key").exists()
    assert open_keystore(f"file://{tmp_path}/keys", env=env).get(KID) == secret


def test_keystore_urls() -> None:
    assert keystore_directory("file:///var/lib/cdranon/keys") == Path("/var/lib/cdranon/keys")
    assert keystore_directory("file://relative/dir") == Path("relative/dir")
    assert keystore_directory("file:relative/dir") == Path("relative/dir")
    with pytest.raises(ConfigError, match=r"unknown keystore backend s3://; supported: file://"):
        open_keystore("s3://bucket/keys", env={})
    with pytest.raises(ConfigError, match="module path must be absolute"):
        open_keystore("pkcs11://token", env={})
    with pytest.raises(ConfigError, match="expected file://DIR"):
        open_keystore("/no/scheme", env={})
    with pytest.raises(ConfigError, match="no directory"):
        open_keystore("file://", env={})


def test_default_keystore_url() -> None:
    assert default_keystore_url({"CDRANON_HOME": "/srv/cdranon"}) == "file:///srv/cdranon/keys"
    home_default = default_keystore_url({})
    assert home_default.startswith("file:///")
    assert home_default.endswith("/.local/share/cdranon/keys")


def test_uncreatable_directory_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(KeystoreError, match=str(blocker)):
        FileKeystore(blocker / "keys", _master())
    with pytest.raises(KeystoreError, match="does not exist"):
        FileKeystore(tmp_path / "missing", None, create=False)
