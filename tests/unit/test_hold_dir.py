"""Where hold secrets live for each keystore backend (``retention.hold_dir``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.commands.retention import hold_directory, hold_master_key
from service.config import load_settings
from service.errors import ConfigError, MasterKeyError

PKCS11 = "pkcs11:///usr/lib/softhsm/libsofthsm2.so?token=t&store=kafka://k:9092/cdr.keys"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CDRANON_CONFIG",
        "CDRANON_RETENTION__HOLD_DIR",
        "CDRANON_MASTER_KEY",
        "CDRANON_MASTER_KEY_FILE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_file_keystore_default_is_beside_the_keys(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert hold_directory(settings, f"file://{tmp_path}/keys") == tmp_path / "keys" / "holds"


@pytest.mark.parametrize("url", [PKCS11, "kafka://k:9092/cdr.keys"])
def test_other_keystores_require_hold_dir(url: str) -> None:
    with pytest.raises(ConfigError, match=r"retention\.hold_dir is required"):
        hold_directory(load_settings(None), url)


def test_hold_dir_setting_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDRANON_RETENTION__HOLD_DIR", str(tmp_path / "h"))
    settings = load_settings(None)
    assert hold_directory(settings, PKCS11) == tmp_path / "h"
    assert hold_directory(settings, f"file://{tmp_path}/keys") == tmp_path / "h"


def test_no_dev_master_key_without_a_file_keystore(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError):
        hold_master_key(PKCS11)
    # Beside a file keystore dev mode generates the same key the month secrets use.
    first = hold_master_key(f"file://{tmp_path}/keys")
    assert hold_master_key(f"file://{tmp_path}/keys").key_id == first.key_id
