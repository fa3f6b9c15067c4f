"""The master key (KEK) that wraps the month secrets of the file keystore.

Where it comes from, first match wins:

1. ``CDRANON_MASTER_KEY``: 32 bytes as base64 (standard or URL-safe) or 64 hex digits;
2. a key file: ``CDRANON_MASTER_KEY_FILE``, else the ``key_file`` argument; the file holds
   the 32 raw bytes, or their base64 / hex text;
3. dev mode (``dev_dir`` given): ``<dev_dir>/master.key``, generated with mode 0600 on
   first use. The KEK then sits beside the keys it protects, so a copy of that directory
   is a copy of every secret in it: a WARNING says so each time.

The environment overrides a key file named by code or config, as is usual for secrets.
Key bytes never appear in a repr, a log line or an exception message; the master key is
known to the outside only by its *id*, a one-way fingerprint that tells two keys apart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.durable import create_exclusive
from service.errors import KeystoreError, MasterKeyError

MASTER_KEY_BYTES: Final = 32
ENV_MASTER_KEY: Final = "CDRANON_MASTER_KEY"
ENV_MASTER_KEY_FILE: Final = "CDRANON_MASTER_KEY_FILE"
DEV_MASTER_KEY_NAME: Final = "master.key"

log = logging.getLogger("cdranon.keystore")

_EXPECTED = (
    f"expected {MASTER_KEY_BYTES} bytes written as base64 (44 characters) or hex "
    "(64 digits); generate one with "
    '`python -c "from service.keystore import generate_master_key as g; print(g())"`'
)


class MasterKey:
    """32 bytes of key-encryption key. Its repr and str name its source and id, never it."""

    __slots__ = ("_aead", "_key", "key_id", "source")

    def __init__(self, key: bytes, *, source: str) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"the master key from {source} has the wrong length: {_EXPECTED}")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self.source = source
        # A fingerprint stored beside each wrap, so that "wrong master key" can be told
        # apart from "damaged file". HMAC under the key: it reveals nothing about the key.
        self.key_id = hmac.digest(self._key, b"cdranon master key id v1", "sha256")[:8].hex()

    def aead(self) -> AESGCM:
        """The AES-256-GCM cipher keyed with this master key."""
        return self._aead

    def __repr__(self) -> str:
        return f"MasterKey(id={self.key_id}, source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the key into places nobody audits (queues, caches, crash dumps).
        raise TypeError("a MasterKey cannot be pickled")


def generate_master_key() -> str:
    """A fresh random master key as base64 text, the form ``CDRANON_MASTER_KEY`` takes."""
    return base64.b64encode(secrets.token_bytes(MASTER_KEY_BYTES)).decode("ascii")


def parse_master_key_text(text: str, *, source: str) -> MasterKey:
    """Decode base64 or hex text into a MasterKey; MasterKeyError (without the text) if not."""
    t = "".join(text.split())
    raw: bytes | None = None
    # Hex first: 64 hex digits are also valid base64 (of 48 bytes).
    if len(t) == 2 * MASTER_KEY_BYTES:
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(t)
    if raw is None and t:
        padded = t + "=" * (-len(t) % 4)
        alphabet = b"-_" if ("-" in t or "_" in t) else b"+/"
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(padded, altchars=alphabet, validate=True)
    if raw is None or len(raw) != MASTER_KEY_BYTES:
        # Never echo the value: it is, or is close to, a secret.
        raise MasterKeyError(f"the master key from {source} is malformed: {_EXPECTED}")
    return MasterKey(raw, source=source)


def _read_key_file(path: Path) -> MasterKey:
    source = f"key file {path}"
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise MasterKeyError(
            f"master key file {path} does not exist: set {ENV_MASTER_KEY_FILE} to an "
            f"existing file or {ENV_MASTER_KEY} to the key itself"
        ) from exc
    except OSError as exc:
        raise MasterKeyError(
            f"cannot read master key file {path}: {exc.strerror or exc.__class__.__name__}"
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "master key file %s is readable by group or others (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    if len(data) == MASTER_KEY_BYTES:
        return MasterKey(data, source=source)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise MasterKeyError(
            f"master key file {path} is malformed: expected {MASTER_KEY_BYTES} raw bytes, "
            "or base64 or hex text"
        ) from exc
    return parse_master_key_text(text, source=source)


def _has_wrapped_keys(directory: Path) -> bool:
    return any(p.name != DEV_MASTER_KEY_NAME for p in directory.glob("*.key"))


def _dev_master_key(dev_dir: Path) -> MasterKey:
    try:
        dev_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeystoreError(
            f"cannot create keystore directory {dev_dir}: {exc.strerror or exc}"
        ) from exc
    path = dev_dir / DEV_MASTER_KEY_NAME
    if path.exists():
        key = _read_key_file(path)
        log.warning(
            "keystore in DEV MODE: the master key %s sits beside the keys it protects; "
            "anyone with a copy of %s can read every month secret. Set %s in production.",
            path,
            dev_dir,
            ENV_MASTER_KEY,
        )
        return key
    if _has_wrapped_keys(dev_dir):
        # A lost environment variable must not silently start a second KEK beside keys
        # wrapped under the first: fail loudly instead.
        raise MasterKeyError(
            f"{dev_dir} holds wrapped keys but no master key is configured: set "
            f"{ENV_MASTER_KEY} (or {ENV_MASTER_KEY_FILE}) to the master key they were made with"
        )
    text = generate_master_key() + "\n"
    # Same dance as the month keys: replicas starting together must agree on one KEK.
    try:
        created = create_exclusive(path, text.encode("ascii"), mode=0o600)
    except OSError as exc:
        raise KeystoreError(
            f"cannot write dev master key {path}: {exc.strerror or exc.__class__.__name__}"
        ) from exc
    key = _read_key_file(path)
    log.warning(
        "keystore in DEV MODE: %s master key %s beside the keys it protects; anyone with "
        "a copy of %s can read every month secret. Set %s in production.",
        "generated" if created else "using",
        path,
        dev_dir,
        ENV_MASTER_KEY,
    )
    return key


def load_master_key(
    *,
    env: Mapping[str, str],
    key_file: Path | None = None,
    dev_dir: Path | None = None,
) -> MasterKey:
    """Find the master key (see the module docstring for the order); MasterKeyError if none.

    Raises MasterKeyError if the configured key is malformed (the message says what is
    expected and never contains the value), KeystoreError if dev mode cannot write its key.
    """
    text = env.get(ENV_MASTER_KEY, "")
    if text.strip():
        return parse_master_key_text(text, source=f"environment variable {ENV_MASTER_KEY}")
    env_file = env.get(ENV_MASTER_KEY_FILE, "").strip()
    if env_file:
        return _read_key_file(Path(env_file).expanduser())
    if key_file is not None:
        return _read_key_file(key_file)
    if dev_dir is not None:
        return _dev_master_key(dev_dir)
    raise MasterKeyError(
        f"no master key configured: set {ENV_MASTER_KEY} to 32 bytes in base64 or hex, or "
        f"{ENV_MASTER_KEY_FILE} to a file holding it ({_EXPECTED.partition('; ')[2]})"
    )


__all__ = [
    "DEV_MASTER_KEY_NAME",
    "ENV_MASTER_KEY",
    "ENV_MASTER_KEY_FILE",
    "MASTER_KEY_BYTES",
    "MasterKey",
    "generate_master_key",
    "load_master_key",
    "parse_master_key_text",
]
