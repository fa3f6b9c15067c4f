"""`cdranon keys list` and `cdranon keys destroy`, through service.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service import cli
from service.errors import KeyDestroyedError
from service.keystore import FileKeystore, MasterKey

MASTER = MasterKey(b"\x2a" * 32, source="test")


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CDRANON_MASTER_KEY", "CDRANON_MASTER_KEY_FILE", "CDRANON_KEYSTORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDRANON_HOME", str(tmp_path / "home"))
    # Only the keys command: these tests must not depend on the other commands' modules,
    # which are built in parallel and tested on their own.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("service.commands.keys",))


@pytest.fixture
def store(tmp_path: Path) -> FileKeystore:
    ks = FileKeystore(tmp_path / "keys", MASTER)
    ks.create_if_absent("2025-11/default")
    ks.create_if_absent("2025-12/default")
    ks.destroy("2025-10/default")
    return ks


def _url(ks: FileKeystore) -> str:
    return f"file://{ks.directory}"


def test_list_table(store: FileKeystore, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "list", "--keystore", _url(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KEY", "ID", "STATE", "CREATED", "DESTROYED", "BACKEND"]
    rows = [line.split() for line in out[1:]]
    assert [r[0] for r in rows] == ["2025-10/default", "2025-11/default", "2025-12/default"]
    assert [r[1] for r in rows] == ["destroyed", "active", "active"]
    assert rows[0][2] == "-"  # never created
    assert rows[1][3] == "-"  # not destroyed
    assert {r[4] for r in rows} == {"file"}


def test_list_json_uses_env_keystore(
    store: FileKeystore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDRANON_KEYSTORE", _url(store))
    assert cli.main(["keys", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["key_id"] for d in doc] == ["2025-10/default", "2025-11/default", "2025-12/default"]
    assert doc[1]["state"] == "active"
    assert doc[1]["created_at"].endswith("Z")
    assert doc[1]["destroyed_at"] is None
    assert doc[0]["state"] == "destroyed"
    assert set(doc[0]) == {"key_id", "state", "created_at", "destroyed_at", "backend"}


def test_list_default_keystore_is_under_cdranon_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ks = FileKeystore(tmp_path / "home" / "keys", MASTER)
    ks.create_if_absent("2030-01/default")
    assert cli.main(["keys", "list", "--json"]) == 0
    assert [d["key_id"] for d in json.loads(capsys.readouterr().out)] == ["2030-01/default"]


def test_list_never_creates_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "typo"
    assert cli.main(["keys", "list", "--keystore", f"file://{missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert not missing.exists()


def test_destroy_without_yes_is_refused(
    store: FileKeystore, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["keys", "destroy", "--month", "2025-11", "--keystore", _url(store)])
    assert rc == 2
    captured = capsys.readouterr()
    assert "without --yes" in captured.err
    assert captured.err.count("\n") == 1
    assert store.get("2025-11/default") is not None  # untouched


def test_destroy_with_yes(store: FileKeystore, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["keys", "destroy", "--month", "2025-11", "--keystore", _url(store), "--yes"]
    assert cli.main(argv) == 0
    assert "destroyed key 2025-11/default" in capsys.readouterr().out
    with pytest.raises(KeyDestroyedError):
        store.get("2025-11/default")
    assert store.get("2025-12/default") is not None
    # Again: idempotent, and says so.
    assert cli.main(argv) == 0
    assert "already destroyed" in capsys.readouterr().out


def test_destroy_class_and_never_created(
    store: FileKeystore, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["keys", "destroy", "--month", "2027-02", "--class", "de-24m"]
    assert cli.main([*argv, "--keystore", _url(store), "--yes"]) == 0
    assert "2027-02/de-24m did not exist" in capsys.readouterr().out
    with pytest.raises(KeyDestroyedError):
        store.create_if_absent("2027-02/de-24m")


@pytest.mark.parametrize("month", ["2025-13", "25-11", "2025-11/x"])
def test_bad_month_is_one_line_exit_2(
    store: FileKeystore, capsys: pytest.CaptureFixture[str], month: str
) -> None:
    rc = cli.main(["keys", "destroy", "--month", month, "--keystore", _url(store), "--yes"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("cdranon: error: invalid month")
    assert "expected YYYY-MM" in err
    assert err.count("\n") == 1


def test_bad_class_and_unknown_backend(
    store: FileKeystore, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["keys", "destroy", "--month", "2025-11", "--class", "Bad.Class"]
    rc = cli.main([*argv, "--keystore", _url(store), "--yes"])
    assert rc == 2
    assert "invalid key id" in capsys.readouterr().err
    assert cli.main(["keys", "list", "--keystore", "vault://x"]) == 2
    assert "unknown keystore backend vault://; supported: file://" in capsys.readouterr().err


def test_keys_without_action_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["keys"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
