"""The file keystore: one small JSON file per month secret, wrapped by the master key.

Layout of the directory (mode 0700, files 0600)::

    2025-11.default.key        {"format": 1, "key_id", "created_at", "kek_id", "nonce", "wrapped"}
    2025-10.default.destroyed  {"format": 1, "key_id", "created_at", "destroyed_at"}
    master.key                 dev mode only: the KEK itself (see master.py)

``wrapped`` is the 32-byte secret under AES-256-GCM with the master key, a random 96-bit
nonce (a KEK wraps a few keys a month, far below the ~2^32 bound of random nonces) and
associated data binding the format version, key id and creation time, so a wrap cannot
be moved to another month. The plaintext secret is never written.

Creation is atomic across processes without locks: the new file is written under a
temporary name, fsynced, then hard-linked to its final name; ``link`` fails if the name
exists, so exactly one writer wins and everyone returns the winner's secret.

Destruction writes the tombstone first (so nothing can re-create or read the month while
it proceeds), then overwrites the key file's bytes in place with random bytes, fsyncs,
unlinks, and fsyncs the directory. Overwriting reaches every hard link of the file; it
cannot reach copies (backups, snapshots, copy-on-write blocks): see docs/keystore.md.

The file operations themselves (create by hard link, shred, temporary names) are
service/durable.py's; temporary files start with a dot, so list() ignores them.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag

from service.durable import create_exclusive, shred, temp_files
from service.errors import (
    KeyDestroyedError,
    KeystoreError,
    KeystoreUnavailableError,
    MasterKeyError,
)
from service.keystore.base import SECRET_BYTES, KeyInfo, KeyState, split_key_id
from service.keystore.master import DEV_MASTER_KEY_NAME, MasterKey

FORMAT_VERSION: Final = 1
KEY_SUFFIX: Final = ".key"
TOMBSTONE_SUFFIX: Final = ".destroyed"
_FILE_NAME = re.compile(r"^(\d{4}-\d{2})\.([a-z0-9][a-z0-9_-]{0,31})\.(key|destroyed)$")
# A directory that takes no new file now (made read-only, remounted read-only, its owner
# or mode changed, the volume full) while existing keys still read: an operator can fix
# it while the process waits, so a new month pauses rather than ending the run.
_CANNOT_WRITE_NOW: Final = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
)

log = logging.getLogger("cdranon.keystore")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aad(kid: str, created_at: str) -> bytes:
    return f"cdranon keystore file v{FORMAT_VERSION}\x00{kid}\x00{created_at}".encode()


def _reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


class FileKeystore:
    """Month secrets in a directory, wrapped by a master key. Thread- and process-safe.

    ``master`` may be None for administration only (``list`` and ``destroy``, which never
    need the KEK: destruction must work even when the KEK is lost); ``get`` and
    ``create_if_absent`` then raise MasterKeyError.
    """

    backend = "file"

    def __init__(
        self,
        directory: Path,
        master: MasterKey | None,
        *,
        create: bool = True,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.directory = Path(directory)
        self._master = master
        self._clock = clock
        self._lock = threading.RLock()
        if create:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise KeystoreError(
                    f"cannot create keystore directory {self.directory}: {_reason(exc)}"
                ) from exc
        if not self.directory.is_dir():
            raise KeystoreError(
                f"keystore directory {self.directory} does not exist or is not a directory"
            )
        if not os.access(self.directory, os.R_OK | os.W_OK | os.X_OK):
            raise KeystoreError(
                f"keystore directory {self.directory} is not readable and writable by this user"
            )

    def __repr__(self) -> str:
        return f"FileKeystore({str(self.directory)!r}, master={self._master!r})"

    # -- paths ---------------------------------------------------------------------------

    def _stem(self, kid: str) -> str:
        month, cls = split_key_id(kid)
        return f"{month}.{cls}"

    def _key_path(self, kid: str) -> Path:
        return self.directory / (self._stem(kid) + KEY_SUFFIX)

    def _tombstone_path(self, kid: str) -> Path:
        return self.directory / (self._stem(kid) + TOMBSTONE_SUFFIX)

    # -- reading files -------------------------------------------------------------------

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        """The file's JSON object, None if the file does not exist."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeystoreError(f"cannot read keystore file {path}: {_reason(exc)}") from exc
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise KeystoreError(f"keystore file {path} is not valid JSON: damaged?") from exc
        if not isinstance(doc, dict):
            raise KeystoreError(f"keystore file {path} is not a JSON object: damaged?")
        return doc

    # -- secrets -------------------------------------------------------------------------

    def _require_master(self) -> MasterKey:
        if self._master is None:
            raise MasterKeyError(
                f"keystore {self.directory} was opened without a master key: "
                "set CDRANON_MASTER_KEY to read or create month secrets"
            )
        return self._master

    def _raise_if_destroyed(self, kid: str) -> None:
        tomb = self._read_json_lenient(self._tombstone_path(kid))
        if tomb is not None:
            when = tomb.get("destroyed_at")
            raise KeyDestroyedError(kid, when if isinstance(when, str) else None)

    def _read_json_lenient(self, path: Path) -> dict[str, Any] | None:
        """Like _read_json, but a damaged file reads as ``{}`` (it still exists)."""
        try:
            return self._read_json(path)
        except KeystoreError:
            if path.exists():
                log.warning("keystore file %s is damaged; treating it as present", path)
                return {}
            raise

    def _unwrap(self, kid: str, path: Path, doc: dict[str, Any]) -> bytes:
        master = self._require_master()
        try:
            if doc.get("format") != FORMAT_VERSION or doc.get("key_id") != kid:
                raise ValueError("format or key id")
            created_at = doc["created_at"]
            nonce = base64.b64decode(doc["nonce"], validate=True)
            wrapped = base64.b64decode(doc["wrapped"], validate=True)
            if not isinstance(created_at, str) or len(nonce) != 12:
                raise ValueError("created_at or nonce")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise KeystoreError(
                f"key file {path} is malformed (expected format {FORMAT_VERSION} for {kid}): "
                "damaged or not a cdranon key file"
            ) from exc
        try:
            secret = master.aead().decrypt(nonce, wrapped, _aad(kid, created_at))
        except InvalidTag:
            if doc.get("kek_id") != master.key_id:
                raise MasterKeyError(
                    f"the master key does not unwrap {kid}: wrong CDRANON_MASTER_KEY? "
                    f"({path.name} was wrapped under master key id {doc.get('kek_id')}, "
                    f"the current one is {master.key_id})"
                ) from None
            raise MasterKeyError(
                f"the master key does not unwrap {kid}: {path} was wrapped under this master "
                "key but does not authenticate, so it was damaged or tampered with"
            ) from None
        if len(secret) != SECRET_BYTES:
            raise KeystoreError(f"key file {path} holds a secret of the wrong length")
        return secret

    def _require_directory(self) -> None:
        # A directory that existed at start-up and is gone now is an unmounted or moved
        # volume, not an empty keystore: "no key" would make callers create a new month
        # secret in the wrong place (or fail every record). Unavailable: the runner pauses.
        if not self.directory.is_dir():
            raise KeystoreUnavailableError(
                f"keystore directory {self.directory} is not reachable (unmounted or moved?); "
                "processing pauses until it is back"
            )

    def get(self, kid: str) -> bytes | None:
        """The month secret, None if never created; KeyDestroyedError if destroyed;
        KeystoreUnavailableError if the keystore directory is gone."""
        with self._lock:
            self._require_directory()
            self._raise_if_destroyed(kid)
            path = self._key_path(kid)
            doc = self._read_json(path)
            if doc is None:
                return None
            return self._unwrap(kid, path, doc)

    def create_if_absent(self, kid: str) -> bytes:
        """Create the month secret unless it exists (atomically); return the winner's.

        KeystoreUnavailableError if the directory is gone or takes no new file now
        (read-only, permission denied, full): no key was created, the caller retries.
        """
        with self._lock:
            self._require_directory()
            master = self._require_master()
            self._raise_if_destroyed(kid)
            path = self._key_path(kid)
            doc = self._read_json(path)
            if doc is not None:
                return self._unwrap(kid, path, doc)
            secret = secrets.token_bytes(SECRET_BYTES)
            created_at = _rfc3339(self._clock())
            nonce = secrets.token_bytes(12)
            wrapped = master.aead().encrypt(nonce, secret, _aad(kid, created_at))
            body = {
                "format": FORMAT_VERSION,
                "key_id": kid,
                "created_at": created_at,
                "kek_id": master.key_id,
                "nonce": base64.b64encode(nonce).decode("ascii"),
                "wrapped": base64.b64encode(wrapped).decode("ascii"),
            }
            data = (json.dumps(body, indent=1) + "\n").encode("ascii")
            try:
                won = create_exclusive(path, data, mode=0o600)
            except FileNotFoundError:
                # A concurrent destroy removed our temporary file before we linked it.
                self._raise_if_destroyed(kid)
                raise KeystoreError(f"could not create {path}: temporary file vanished") from None
            except OSError as exc:
                if exc.errno in _CANNOT_WRITE_NOW:
                    raise KeystoreUnavailableError(
                        f"keystore directory {self.directory} does not accept the new key "
                        f"file of {kid}: {_reason(exc)} (read-only, not writable by this "
                        "user, or full?); processing pauses until it can be written"
                    ) from exc
                raise KeystoreError(f"cannot write key file {path}: {_reason(exc)}") from exc
            # A destroy may have written its tombstone between our check and our link:
            # a destroyed month must never end up with a key, so undo ours.
            if self._tombstone_path(kid).exists():
                shred(path)
                self._raise_if_destroyed(kid)
            if won:
                log.info("created month key %s in %s", kid, self.directory)
                return secret
            winner = self._read_json(path)
            if winner is None:  # created then destroyed in between: the tombstone says so
                self._raise_if_destroyed(kid)
                raise KeystoreError(f"key file {path} vanished while being created")
            return self._unwrap(kid, path, winner)

    def destroy(self, kid: str) -> bool:
        """Destroy the month secret beyond recovery from this directory; True if it existed.

        Always leaves a tombstone, even for a key never created, so that the month can
        never get a key afterwards. Idempotent.
        """
        with self._lock:
            path = self._key_path(kid)
            tomb_path = self._tombstone_path(kid)
            try:
                doc = self._read_json_lenient(path)
                created_at = doc.get("created_at") if doc else None
                tomb = {
                    "format": FORMAT_VERSION,
                    "key_id": kid,
                    "created_at": created_at if isinstance(created_at, str) else None,
                    "destroyed_at": _rfc3339(self._clock()),
                }
                # Tombstone first: from this instant no get or create succeeds. An existing
                # tombstone (an earlier or concurrent destroy) is kept as the record.
                create_exclusive(
                    tomb_path, (json.dumps(tomb, indent=1) + "\n").encode(), mode=0o600
                )
                existed = shred(path)
                # Temporary files of a racing or crashed create_if_absent hold a wrap too.
                for debris in temp_files(path):
                    shred(debris)
            except OSError as exc:
                raise KeystoreError(
                    f"destroying {kid} in {self.directory} failed: {_reason(exc)}; run the "
                    "destroy again (it is idempotent)"
                ) from exc
            if existed:
                log.info("destroyed month key %s in %s", kid, self.directory)
            return existed

    def list(self) -> list[KeyInfo]:
        """Every key and tombstone in the directory, sorted by key id."""
        with self._lock:
            try:
                names = sorted(os.listdir(self.directory))
            except OSError as exc:
                raise KeystoreError(
                    f"cannot list keystore directory {self.directory}: {_reason(exc)}"
                ) from exc
            found: dict[str, KeyInfo] = {}
            for name in names:
                m = _FILE_NAME.match(name)
                if not m:
                    # Subdirectories belong to others (holds/: the legal hold registry).
                    if (
                        name != DEV_MASTER_KEY_NAME
                        and not name.startswith(".")
                        and not (self.directory / name).is_dir()
                    ):
                        log.warning("ignoring unexpected file %s in the keystore", name)
                    continue
                kid = f"{m.group(1)}/{m.group(2)}"
                doc = self._read_json_lenient(self.directory / name) or {}
                created = doc.get("created_at")
                created_at = created if isinstance(created, str) else None
                if m.group(3) == "destroyed":
                    when = doc.get("destroyed_at")
                    found[kid] = KeyInfo(
                        key_id=kid,
                        state=KeyState.DESTROYED,
                        created_at=created_at or _created_of(found.get(kid)),
                        destroyed_at=when if isinstance(when, str) else None,
                        backend=self.backend,
                    )
                elif kid not in found:
                    found[kid] = KeyInfo(kid, KeyState.ACTIVE, created_at, None, self.backend)
                elif found[kid].created_at is None:  # tombstone seen first, key file left over
                    old = found[kid]
                    found[kid] = KeyInfo(kid, old.state, created_at, old.destroyed_at, self.backend)
            return [found[k] for k in sorted(found)]


def _created_of(info: KeyInfo | None) -> str | None:
    return info.created_at if info else None


__all__ = ["FORMAT_VERSION", "FileKeystore"]
