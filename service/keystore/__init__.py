"""Keystores of month secrets, chosen by URL.

``file://DIR`` (absolute ``file:///var/lib/cdranon/keys`` or relative ``file://keys``;
``file:keys`` works too) is the embedded default: see service/keystore/file.py. Without a
configured master key it runs in dev mode, generating ``DIR/master.key`` with a warning.
Further backends (``pkcs11://`` for an HSM) plug in at ``open_keystore``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from service.errors import ConfigError
from service.keystore.base import (
    SECRET_BYTES,
    KeyInfo,
    KeyState,
    Keystore,
    key_id,
    split_key_id,
)
from service.keystore.file import FileKeystore
from service.keystore.master import (
    ENV_MASTER_KEY,
    ENV_MASTER_KEY_FILE,
    MasterKey,
    generate_master_key,
    load_master_key,
)

ENV_HOME = "CDRANON_HOME"
ENV_KEYSTORE = "CDRANON_KEYSTORE"
SUPPORTED_SCHEMES = ("file://",)


def default_keystore_url(env: Mapping[str, str]) -> str:
    """``file://`` + ``${CDRANON_HOME:-~/.local/share/cdranon}/keys``, as an absolute path."""
    home = env.get(ENV_HOME, "").strip() or "~/.local/share/cdranon"
    return "file://" + str(Path(home).expanduser().absolute() / "keys")


DEFAULT_KEYSTORE_URL = default_keystore_url(os.environ)


def keystore_directory(url: str) -> Path:
    """The directory of a ``file:`` keystore URL; ConfigError for any other URL."""
    scheme, sep, rest = url.partition(":")
    if not sep or not scheme:
        raise ConfigError(
            f"invalid keystore URL {url!r}: expected file://DIR "
            f"(supported: {', '.join(SUPPORTED_SCHEMES)})"
        )
    if scheme.lower() != "file":
        raise _unknown_backend(scheme)
    # file:///abs, file://rel (not a host: a keystore is always local) and file:rel.
    path = rest[2:] if rest.startswith("//") else rest
    if not path:
        raise ConfigError(f"invalid keystore URL {url!r}: no directory after file://")
    return Path(path).expanduser()


def _unknown_backend(scheme: str) -> ConfigError:
    if scheme.lower() == "pkcs11":
        # The HSM backend lands with its own issue; until then say so plainly.
        return ConfigError(
            "keystore backend pkcs11:// is not available in this version; "
            f"supported: {', '.join(SUPPORTED_SCHEMES)}"
        )
    return ConfigError(
        f"unknown keystore backend {scheme}://; supported: {', '.join(SUPPORTED_SCHEMES)}"
    )


def open_keystore(
    url: str,
    *,
    env: Mapping[str, str] | None = None,
    need_secrets: bool = True,
) -> Keystore:
    """Open the keystore named by ``url``.

    With ``need_secrets`` (the default) the store can read and create month secrets: the
    directory is created if missing and the master key is loaded (dev mode: generated
    beside the keys when none is configured). Without it, for ``list`` and ``destroy``
    only: nothing is created, the directory must exist, and no master key is needed, so
    destruction works even when the master key is lost.
    Raises ConfigError (bad URL), KeystoreError / MasterKeyError (see load_master_key).
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    directory = keystore_directory(url)
    if not need_secrets:
        return FileKeystore(directory, None, create=False)
    master = load_master_key(env=environ, key_file=None, dev_dir=directory)
    return FileKeystore(directory, master)


__all__ = [
    "DEFAULT_KEYSTORE_URL",
    "ENV_HOME",
    "ENV_KEYSTORE",
    "ENV_MASTER_KEY",
    "ENV_MASTER_KEY_FILE",
    "SECRET_BYTES",
    "FileKeystore",
    "KeyInfo",
    "KeyState",
    "Keystore",
    "MasterKey",
    "default_keystore_url",
    "generate_master_key",
    "key_id",
    "keystore_directory",
    "load_master_key",
    "open_keystore",
    "split_key_id",
]
