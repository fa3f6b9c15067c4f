"""The pkcs11 keystore on a real SoftHSM2 token (no mocks), wrapped secrets in a directory."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType
from pkcs11 import exceptions as p11e

from service.errors import (
    ConfigError,
    KeyDestroyedError,
    KeystoreError,
    KeystoreUnavailableError,
)
from service.keyring import Keyring
from service.keystore import KeyState, WrappedKeystore, key_id, open_keystore
from service.keystore.pkcs11 import Pkcs11Wrapper, parse_pkcs11_url
from service.keystore.shared import DirectoryStore, WrappedRecord
from tests.integration.hsm_fixtures import REPO, SoftHsmToken, softhsm_token

__all__ = ["softhsm_token"]  # the fixture, imported to be used here


@pytest.fixture
def kid() -> str:
    """A key id of this test alone (the token is shared by the test process)."""
    return key_id("2025-11", "t" + secrets.token_hex(6))


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'wrapped'}"


@pytest.fixture
def ks(softhsm_token: SoftHsmToken, store_url: str) -> Iterator[WrappedKeystore]:
    store = open_keystore(softhsm_token.url(store_url))
    assert isinstance(store, WrappedKeystore)
    yield store
    store.close()


@contextmanager
def _fresh_session(token: SoftHsmToken) -> Iterator[pkcs11.Session]:
    """A new session of our own on the token (logged in, unless this process already is)."""
    tok = pkcs11.lib(token.module).get_token(token_label=token.label)
    try:
        session = tok.open(rw=True, user_pin=token.pin)
    except p11e.UserAlreadyLoggedIn:
        session = tok.open(rw=True)
    with session:
        yield session


def _fresh_search(token: SoftHsmToken, label: str) -> list[str]:
    """CKA_IDs (hex) of the objects labelled ``label``, seen from a new session."""
    with _fresh_session(token) as session:
        return [o[Attribute.ID].hex() for o in session.get_objects({Attribute.LABEL: label})]


def test_round_trip_and_one_kek_per_month(
    ks: WrappedKeystore, kid: str, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    assert ks.get(kid) is None
    secret = ks.create_if_absent(kid)
    assert len(secret) == 32
    assert ks.get(kid) == secret
    assert ks.create_if_absent(kid) == secret
    [info] = [i for i in ks.list() if i.key_id == kid]
    assert (info.state, info.backend, info.destroyed_at) == (KeyState.ACTIVE, "pkcs11", None)
    assert info.created_at is not None
    assert len(_fresh_search(softhsm_token, kid)) == 1
    # A second keystore (another replica) reads the same secret through the token.
    other = open_keystore(softhsm_token.url(f"file://{tmp_path / 'wrapped'}"))
    assert other.get(kid) == secret
    # The secret is nowhere in the stored record, in any encoding.
    for f in (tmp_path / "wrapped").iterdir():
        body = f.read_bytes()
        assert secret not in body
        assert secret.hex().encode() not in body


def test_kek_is_not_extractable(ks: WrappedKeystore, kid: str, softhsm_token: SoftHsmToken) -> None:
    ks.create_if_absent(kid)
    with _fresh_session(softhsm_token) as session:
        [kek] = list(session.get_objects({Attribute.LABEL: kid}))
        assert isinstance(kek, pkcs11.SecretKey)
        assert kek.key_type == KeyType.AES
        assert kek.key_length == 256
        assert kek[Attribute.TOKEN] is True
        assert kek[Attribute.SENSITIVE] is True
        assert kek[Attribute.ALWAYS_SENSITIVE] is True
        assert kek[Attribute.EXTRACTABLE] is False
        assert kek[Attribute.NEVER_EXTRACTABLE] is True
        assert kek[Attribute.COPYABLE] is False
        with pytest.raises(p11e.AttributeSensitive):
            kek[Attribute.VALUE]
        # Lifting the flag is refused too (CKA_EXTRACTABLE can only go true -> false).
        with pytest.raises(p11e.PKCS11Error):
            kek[Attribute.EXTRACTABLE] = True
        assert kek[Attribute.EXTRACTABLE] is False


def test_destroy_sticks(
    ks: WrappedKeystore, kid: str, softhsm_token: SoftHsmToken, store_url: str
) -> None:
    ks.create_if_absent(kid)
    assert ks.destroy(kid) is True
    assert _fresh_search(softhsm_token, kid) == []
    with pytest.raises(KeyDestroyedError, match=f"key {kid} was destroyed at "):
        ks.get(kid)
    with pytest.raises(KeyDestroyedError):
        ks.create_if_absent(kid)  # a destroyed month is never keyed again
    [info] = [i for i in ks.list() if i.key_id == kid]
    assert info.state == KeyState.DESTROYED
    assert info.destroyed_at is not None
    assert info.created_at is not None
    assert ks.destroy(kid) is False  # idempotent
    # A fresh keystore (a new process would do the same) cannot read it either.
    fresh = open_keystore(softhsm_token.url(store_url))
    with pytest.raises(KeyDestroyedError):
        fresh.get(kid)
    with pytest.raises(KeyDestroyedError):
        Keyring(fresh).get(kid)


def test_wrapped_record_alone_is_useless_after_destroy(
    ks: WrappedKeystore, kid: str, tmp_path: Path
) -> None:
    """A copy of the wrapped record taken before destruction (a backup) opens nothing."""
    secret = ks.create_if_absent(kid)
    [record_file] = (tmp_path / "wrapped").glob("*.wrapped")
    backup = WrappedRecord.from_json(record_file.read_bytes(), where="backup")
    assert ks.wrapper.unwrap(backup) == secret
    ks.destroy(kid)
    assert not record_file.exists()
    with pytest.raises(KeystoreError, match="missing from token"):
        ks.wrapper.unwrap(backup)


def test_destroy_that_does_not_stick_is_an_error(
    ks: WrappedKeystore, kid: str, softhsm_token: SoftHsmToken
) -> None:
    """A KEK the token refuses to destroy (CKA_DESTROYABLE false) fails the destroy loudly."""
    ks.create_if_absent(kid)
    with _fresh_session(softhsm_token) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=kid,
            id=b"stuck",
            store=True,
            template={Attribute.DESTROYABLE: False},
        )
    with pytest.raises(KeystoreError, match=f"KEK of {kid} did not stick: 1 object"):
        ks.destroy(kid)
    # The destroyed marker was written first: the month is unusable all the same.
    with pytest.raises(KeyDestroyedError):
        ks.get(kid)
    assert len(_fresh_search(softhsm_token, kid)) == 1  # only the undestroyable one


def test_tampered_record_does_not_unwrap(ks: WrappedKeystore, kid: str, tmp_path: Path) -> None:
    ks.create_if_absent(kid)
    [record_file] = (tmp_path / "wrapped").glob("*.wrapped")
    rec = WrappedRecord.from_json(record_file.read_bytes(), where="test")
    moved = WrappedRecord(
        rec.key_id, rec.backend, rec.kek_id, rec.nonce, rec.wrapped, "2020-01-01T00:00:00Z"
    )
    record_file.write_bytes(moved.to_json())
    with pytest.raises(KeystoreError, match="does not unwrap"):
        ks.get(kid)


def test_racing_creators_end_with_one_secret_and_one_kek(
    softhsm_token: SoftHsmToken, store_url: str, kid: str
) -> None:
    stores = [open_keystore(softhsm_token.url(store_url)) for _ in range(4)]
    got: list[bytes] = []
    gate = threading.Barrier(len(stores))

    def run(s: object) -> None:
        assert isinstance(s, WrappedKeystore)
        gate.wait(10)
        got.append(s.create_if_absent(kid))

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4
    assert len(set(got)) == 1
    assert len(_fresh_search(softhsm_token, kid)) == 1  # the losers discarded their KEKs


def test_urls_and_configuration_errors(softhsm_token: SoftHsmToken, store_url: str) -> None:
    cfg = parse_pkcs11_url(
        "pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=cdranon&pin-env=MY_PIN"
        "&store=kafka://h1:9092,h2:9092/cdr.keys"
    )
    assert cfg.module == "/usr/lib/softhsm/libsofthsm2.so"
    assert (cfg.token, cfg.pin_env, cfg.store) == (
        "cdranon",
        "MY_PIN",
        "kafka://h1:9092,h2:9092/cdr.keys",
    )
    assert parse_pkcs11_url("pkcs11:///m.so?token=t").pin_env == "CDRANON_HSM_PIN"
    with pytest.raises(ConfigError, match="PIN in the keystore URL is refused"):
        parse_pkcs11_url("pkcs11:///m.so?token=t&pin=1234")
    with pytest.raises(ConfigError, match="token=LABEL is required"):
        parse_pkcs11_url("pkcs11:///m.so")
    with pytest.raises(ConfigError, match="three slashes"):
        parse_pkcs11_url("pkcs11://token")
    with pytest.raises(ConfigError, match="unknown pkcs11 keystore URL parameter"):
        parse_pkcs11_url("pkcs11:///m.so?token=t&slot=0")
    with pytest.raises(ConfigError, match="store= is required"):
        open_keystore(f"pkcs11://{softhsm_token.module}?token={softhsm_token.label}")
    url = softhsm_token.url(store_url)
    with pytest.raises(ConfigError, match="no PIN for HSM token"):
        open_keystore(url, env={})
    with pytest.raises(ConfigError, match="no token labelled 'nope'"):
        open_keystore(url.replace(f"token={softhsm_token.label}", "token=nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        open_keystore(url.replace(softhsm_token.module, "/nonexistent/libp11.so"))
    with pytest.raises(ConfigError, match="invalid wrapped-secret store"):
        open_keystore(url.replace(store_url, "s3://bucket"))


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``cdranon ARGV`` in a new process: no login state inherited from this one.

    PKCS#11 login is per process, so a wrong PIN can only be told apart in a process that
    is not logged in yet.
    """
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *argv],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_wrong_pin_is_a_config_error_without_the_pin(
    softhsm_token: SoftHsmToken, store_url: str
) -> None:
    wrong = "pin-" + secrets.token_hex(6)
    done = _cli(
        "keys", "list", "--keystore", softhsm_token.url(store_url), env={"CDRANON_HSM_PIN": wrong}
    )
    assert done.returncode == 2, done.stderr
    assert "is not accepted by token 'cdranon-test'" in done.stderr
    assert wrong not in done.stderr + done.stdout
    assert softhsm_token.pin not in done.stderr + done.stdout
    w = Pkcs11Wrapper(parse_pkcs11_url(softhsm_token.url(store_url)))
    try:
        assert softhsm_token.pin not in repr(w)
    finally:
        w.close()


def test_keys_cli_lists_and_destroys_on_the_token(
    ks: WrappedKeystore, kid: str, softhsm_token: SoftHsmToken, store_url: str
) -> None:
    ks.create_if_absent(kid)
    url = softhsm_token.url(store_url)
    done = _cli("keys", "list", "--json", "--keystore", url, env={})
    assert done.returncode == 0, done.stderr
    [row] = [r for r in json.loads(done.stdout) if r["key_id"] == kid]
    assert (row["state"], row["backend"], row["destroyed_at"]) == ("active", "pkcs11", None)
    month, cls = kid.split("/")
    done = _cli(
        "keys", "destroy", "--month", month, "--class", cls, "--keystore", url, "--yes", env={}
    )
    assert done.returncode == 0, done.stderr
    assert _fresh_search(softhsm_token, kid) == []
    with pytest.raises(KeyDestroyedError):
        ks.get(kid)
    done = _cli("keys", "list", "--json", "--keystore", url, env={})
    [row] = [r for r in json.loads(done.stdout) if r["key_id"] == kid]
    assert row["state"] == "destroyed"
    assert row["destroyed_at"] is not None


def test_unwrap_of_a_master_key_record_is_refused(
    softhsm_token: SoftHsmToken, tmp_path: Path, kid: str
) -> None:
    """Records of the file backend on the same store are not silently fed to the token."""
    store = DirectoryStore(tmp_path / "wrapped")
    rec = WrappedRecord(kid, "file", "00" * 8, b"\0" * 12, b"\0" * 48, "2025-11-01T00:00:00Z")
    assert store.publish_first(rec) == rec
    ks = open_keystore(softhsm_token.url(f"file://{tmp_path / 'wrapped'}"))
    with pytest.raises(KeystoreError, match="wrapped by the file backend"):
        ks.get(kid)


def test_keks_are_on_the_token_not_in_the_session(softhsm_token: SoftHsmToken, kid: str) -> None:
    """CKA_TOKEN: the KEK outlives the session that made it (a restart keeps the month)."""
    w = Pkcs11Wrapper(parse_pkcs11_url(softhsm_token.url("file:///unused")))
    kek_id = w.new_kek(kid)
    w.close()
    assert _fresh_search(softhsm_token, kid) == [kek_id]
    w2 = Pkcs11Wrapper(parse_pkcs11_url(softhsm_token.url("file:///unused")))
    try:
        assert w2.destroy(kid) is True
    finally:
        w2.close()
    assert _fresh_search(softhsm_token, kid) == []


def _close_all_sessions(token: SoftHsmToken) -> None:
    """C_CloseAllSessions on the token's slot, called into SoftHSM2 itself.

    Every session this process has on the token is gone, and with the last one its login:
    what a restarted or unplugged HSM, or a dropped link to a network HSM, leaves behind
    (stale handles answered with CKR_SESSION_HANDLE_INVALID). SoftHSM2 runs inside the
    process that uses it, so nothing outside the process can take its sessions away; the
    module's own call is the nearest to that, and the keystore's code takes no part in it.
    python-pkcs11 does not expose the call: ctypes reaches the module already loaded (the
    same path gives the same library and state).
    """
    slot = pkcs11.lib(token.module).get_token(token_label=token.label).slot.slot_id
    module = ctypes.CDLL(token.module)
    module.C_CloseAllSessions.argtypes = [ctypes.c_ulong]
    module.C_CloseAllSessions.restype = ctypes.c_ulong
    assert module.C_CloseAllSessions(slot) == 0  # CKR_OK


# python-pkcs11 finishes a search whose C_FindObjectsInit failed (the dead session) again
# in the search object's __del__, which fails the same way: an "Exception ignored" report
# from the library, not from the keystore, which has already raised its own error.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. 'pkcs11._pkcs11.OperationContext.__del__'"
    ":pytest.PytestUnraisableExceptionWarning"
)
def test_lost_session_pauses_then_logs_in_again(
    ks: WrappedKeystore, kid: str, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    """Scenario 9, HSM part: the session is lost under a keystore in use. The documented
    contract (module docstring): the next call raises KeystoreUnavailableError (the runner
    pauses, nothing is written), the session is opened and logged in again on the call
    after; the same secret comes back and nothing is created twice."""
    secret = ks.create_if_absent(kid)
    assert ks.get(kid) == secret
    _close_all_sessions(softhsm_token)
    with pytest.raises(KeystoreUnavailableError, match=f"unreachable while unwrapping {kid}") as e:
        ks.get(kid)
    assert isinstance(e.value.__cause__, p11e.SessionHandleInvalid)  # the session did die
    assert softhsm_token.pin not in str(e.value)
    assert ks.get(kid) == secret  # a new session, logged in again

    # As the processor meets it: its keyring's periodic re-check of a cached month key
    # (every call here) fails once, keeps the cached key, and then answers again.
    keyring = Keyring(ks, recheck_s=0.0)
    keys = keyring.get(kid)
    _close_all_sessions(softhsm_token)
    with pytest.raises(KeystoreUnavailableError):
        keyring.get(kid)
    assert keyring.get(kid) is keys

    # A new month while the session is gone: no KEK and no record made, then exactly one.
    new = key_id("2025-12", kid.split("/")[1])
    _close_all_sessions(softhsm_token)
    with pytest.raises(KeystoreUnavailableError, match=f"creating the KEK of {new}"):
        ks.create_if_absent(new)
    assert ks.get(new) is None
    assert _fresh_search(softhsm_token, new) == []
    created = ks.create_if_absent(new)
    assert created != secret
    assert ks.get(new) == created
    assert len(_fresh_search(softhsm_token, new)) == 1
    assert len(_fresh_search(softhsm_token, kid)) == 1
    month, cls = kid.split("/")
    assert sorted(f.name for f in (tmp_path / "wrapped").glob("*.wrapped")) == [
        f"{month}.{cls}.wrapped",
        f"2025-12.{cls}.wrapped",
    ]
