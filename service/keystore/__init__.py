"""Keystores of month secrets, chosen by URL.

- ``file://DIR`` (absolute ``file:///var/lib/cdranon/keys`` or relative ``file://keys``;
  ``file:keys`` works too) is the embedded default: see service/keystore/file.py. Without a
  configured master key it runs in dev mode, generating ``DIR/master.key`` with a warning.
- ``kafka://HOST:PORT[,HOST:PORT]/cdr.keys``: month secrets wrapped by the master key
  (``CDRANON_MASTER_KEY``, no dev mode: replicas must share it) in the compacted topic,
  shared by replicas on many machines (service/keystore/shared.py).
- ``pkcs11:///path/to/module.so?token=LABEL&pin-env=VAR&store=STORE``: a non-extractable
  per-month KEK in an HSM (service/keystore/pkcs11.py); the PIN is read from the
  environment variable ``pin-env`` names (default ``CDRANON_HSM_PIN``), never from the URL.
  ``STORE`` is where the wrapped secrets go: ``kafka://HOST:PORT/cdr.keys`` (replicas on
  many machines) or ``file:///DIR`` (one machine). See docs/key-management.md.
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
from service.keystore.pkcs11 import Pkcs11Wrapper, parse_pkcs11_url
from service.keystore.shared import (
    DirectoryStore,
    MasterKeyWrapper,
    WrappedKeystore,
    WrappedStore,
    topic_store_from_url,
)

ENV_HOME = "CDRANON_HOME"
ENV_KEYSTORE = "CDRANON_KEYSTORE"
SUPPORTED_SCHEMES = ("file://", "kafka://", "pkcs11://")


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
    return ConfigError(
        f"unknown keystore backend {scheme}://; supported: {', '.join(SUPPORTED_SCHEMES)}"
    )


def _open_store(url: str, *, need_secrets: bool) -> WrappedStore:
    """The wrapped-secret store of a ``store=`` URL: ``kafka://...`` or ``file://DIR``."""
    scheme = url.partition(":")[0].lower()
    if scheme == "kafka":
        return topic_store_from_url(url)
    if scheme == "file":
        return DirectoryStore(keystore_directory(url), create=need_secrets)
    raise ConfigError(
        f"invalid wrapped-secret store {url!r} in the pkcs11 keystore URL: expected "
        "store=kafka://HOST:PORT/cdr.keys or store=file:///DIR"
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
    scheme = url.partition(":")[0].lower()
    if scheme == "pkcs11":
        cfg = parse_pkcs11_url(url)
        if cfg.store is None:
            raise ConfigError(
                "pkcs11 keystore URL: store= is required: where the wrapped month secrets "
                "live (store=kafka://HOST:PORT/cdr.keys, or store=file:///DIR on one machine)"
            )
        # The token is needed even for destroy: destroying the month KEK is the point.
        wrapper = Pkcs11Wrapper(cfg, env=environ)
        try:
            return WrappedKeystore(wrapper, _open_store(cfg.store, need_secrets=need_secrets))
        except BaseException:
            wrapper.close()
            raise
    if scheme == "kafka":
        # No dev mode here: replicas on other machines must share one configured master key.
        master = load_master_key(env=environ) if need_secrets else None
        return WrappedKeystore(MasterKeyWrapper(master), topic_store_from_url(url))
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
    "WrappedKeystore",
    "default_keystore_url",
    "generate_master_key",
    "key_id",
    "keystore_directory",
    "load_master_key",
    "open_keystore",
    "split_key_id",
]
