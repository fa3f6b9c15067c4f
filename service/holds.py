"""Legal holds: the registry, the hold keys, matching, and re-sealing held records.

A hold names what it covers: months, accounts and subscribers (MSISDNs). Dimensions are
ANDed, the values of one dimension ORed, and an empty dimension means "any": a hold on
``--month 2025-11 --account acct-7`` covers acct-7's records of November 2025. A hold
must name at least one thing.

When a covered month reaches its identifier deadline, the retention controller copies the
covered sealed records into the hold's own store (``cdr.hold.<ID>`` or
``DIR/hold/<ID>.jsonl``), re-sealed under the hold's key, then destroys the month key as
usual. Releasing a hold destroys the hold key (cryptographic erasure, as for months) and
deletes its store.

Protection of the registry (docs/retention.md):
- MSISDNs are never stored in clear: the registry holds
  HMAC-SHA256(registry secret, "msisdn" 0x00 normalised E.164) of each one. The registry
  secret is 32 random bytes, stored only wrapped by the master key
  (``<keystore dir>/holds/registry.key``), so a copy of the registry alone cannot be used
  to test candidate numbers.
- Hold keys (one random 32-byte secret per hold) live beside it, wrapped the same way
  (``<keystore dir>/holds/<ID>.key``), and are destroyed like month keys: tombstone first,
  overwrite in place, unlink, fsync.
- Registry entries (who, why, when, what) live in a durable store: JSON files in
  ``<keystore dir>/holds/`` (file mode) or the compacted topic ``cdr.holds`` (broker mode).

The file operations themselves (atomic replace, create by hard link, shred) are
service/durable.py's.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from service.durable import create_exclusive, replace_file, shred, temp_files
from service.errors import (
    ConfigError,
    KeyDestroyedError,
    KeyNotFoundError,
    KeystoreError,
    MasterKeyError,
    RecordError,
    SealError,
)
from service.identifiers import check_msisdn
from service.keystore.master import MasterKey
from service.monthkeys import MonthKeys, hkdf
from service.months import parse_month, rfc3339
from service.sealing import BatchSealer, Unsealer, blob_key_id

HOLD_ID: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,26}$")
HOLD_KEY_PREFIX: Final = "hold/"
# Blobs re-sealed for a hold name "YYYY-MM/hold-<ID>": the shape of a month key id (which
# sealed blobs must carry), with the retention class "hold-<ID>" reserved for holds.
_HOLD_BLOB_KID: Final = re.compile(r"^(\d{4}-(?:0[1-9]|1[0-2]))/hold-([a-z0-9][a-z0-9_-]{0,26})$")
REGISTRY_SECRET_NAME: Final = "registry"  # noqa: S105 - a file name
_FORMAT: Final = 1
_INFO_HOLD_SEAL: Final = b"cdranon/v1/hold-seal-root/"
_INFO_HOLD_UNUSED: Final = b"cdranon/v1/hold-pseudonym/"
_MSISDN_TAG: Final = b"msisdn\x00"


def check_hold_id(hold_id: str) -> str:
    """Validate a hold id (it names a topic, a file and a key); ConfigError if malformed."""
    if not isinstance(hold_id, str) or not HOLD_ID.match(hold_id):
        raise ConfigError(
            f"invalid hold id {hold_id!r}: expected 1-27 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return hold_id


def hold_key_id(hold_id: str, month: str) -> str:
    """The key id that blobs re-sealed for a hold name: ``YYYY-MM/hold-<ID>``.

    Month key ids are the only form a sealed blob may carry (service/sealing.py); the
    month is the one the records came from, and the class ``hold-<ID>`` is reserved.
    """
    return f"{month}/hold-{check_hold_id(hold_id)}"


def hold_id_of_key(kid: str) -> tuple[str, str] | None:
    """``(hold id, month)`` of a ``YYYY-MM/hold-<ID>`` key id, None for any other key id."""
    m = _HOLD_BLOB_KID.match(kid)
    return (m.group(2), m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class Hold:
    """One legal hold as the registry keeps it. ``msisdn_macs`` never reveal the numbers."""

    hold_id: str
    reason: str
    placed_by: str
    placed_at: str  # RFC 3339 UTC
    months: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    msisdn_macs: tuple[str, ...] = ()
    released_at: str | None = None
    released_by: str | None = None
    # Released holds: the hold key and store go at this instant (the release, or the
    # original deadline when configured so and later).
    destroy_after: str | None = None
    destroyed_at: str | None = None
    # Month key id -> records copied into the hold store at that key's deadline.
    copied: Mapping[str, int] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """True until released."""
        return self.released_at is None

    def covers_month(self, month: str) -> bool:
        """Whether any record of ``month`` may be covered (months empty: every month)."""
        return not self.months or month in self.months

    def covers_account(self, account: object) -> bool:
        """Whether records of ``account`` are covered (accounts empty: every account)."""
        return not self.accounts or str(account) in self.accounts

    def to_json(self) -> dict[str, Any]:
        """The registry document (no identifier in clear)."""
        return {
            "format": _FORMAT,
            "hold_id": self.hold_id,
            "reason": self.reason,
            "placed_by": self.placed_by,
            "placed_at": self.placed_at,
            "months": list(self.months),
            "accounts": list(self.accounts),
            "msisdn_macs": list(self.msisdn_macs),
            "released_at": self.released_at,
            "released_by": self.released_by,
            "destroy_after": self.destroy_after,
            "destroyed_at": self.destroyed_at,
            "copied": dict(sorted(self.copied.items())),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> Hold:
        """Parse a registry document; ConfigError naming ``where`` if it is malformed."""
        try:
            hold = cls(
                hold_id=check_hold_id(str(doc["hold_id"])),
                reason=str(doc["reason"]),
                placed_by=str(doc["placed_by"]),
                placed_at=str(doc["placed_at"]),
                months=tuple(str(m) for m in doc.get("months", [])),
                accounts=tuple(str(a) for a in doc.get("accounts", [])),
                msisdn_macs=tuple(str(m) for m in doc.get("msisdn_macs", [])),
                released_at=_opt_str(doc.get("released_at")),
                released_by=_opt_str(doc.get("released_by")),
                destroy_after=_opt_str(doc.get("destroy_after")),
                destroyed_at=_opt_str(doc.get("destroyed_at")),
                copied={str(k): int(v) for k, v in dict(doc.get("copied", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"hold registry entry {where} is malformed: damaged?") from exc
        return hold

    def summary(self) -> dict[str, Any]:
        """What ``hold list`` shows: who, why, when, what (MSISDNs as a count only)."""
        state = "active" if self.active else ("destroyed" if self.destroyed_at else "released")
        return {
            "hold_id": self.hold_id,
            "state": state,
            "reason": self.reason,
            "placed_by": self.placed_by,
            "placed_at": self.placed_at,
            "months": list(self.months),
            "accounts": list(self.accounts),
            "msisdns": len(self.msisdn_macs),
            "released_by": self.released_by,
            "released_at": self.released_at,
            "destroy_after": self.destroy_after,
            "destroyed_at": self.destroyed_at,
            "records_held": sum(self.copied.values()),
            "copied_from": sorted(self.copied),
        }


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


# -- the registry ------------------------------------------------------------------------


class HoldRegistry(Protocol):
    """Durable store of holds: every hold ever placed, released ones included."""

    def list(self) -> list[Hold]:
        """Every hold, sorted by id."""
        ...

    def put(self, hold: Hold) -> None:
        """Write (insert or replace) one hold durably; raise if it could not be written."""
        ...


def get_hold(registry: HoldRegistry, hold_id: str) -> Hold | None:
    """The hold with this id, or None."""
    return next((h for h in registry.list() if h.hold_id == hold_id), None)


class FileHoldRegistry:
    """Holds as ``<dir>/<ID>.json`` files (file mode): written to a temp name and renamed."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeystoreError(
                f"cannot create hold directory {self.directory}: {exc.strerror}"
            ) from exc

    def list(self) -> list[Hold]:
        """Every hold in the directory, sorted by id."""
        out = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read hold registry entry {path}: damaged?") from exc
            if not isinstance(doc, dict):
                raise ConfigError(f"hold registry entry {path} is not a JSON object")
            out.append(Hold.from_json(doc, str(path)))
        return sorted(out, key=lambda h: h.hold_id)

    def put(self, hold: Hold) -> None:
        """Replace ``<ID>.json`` atomically (temp file, fsync, rename, fsync directory)."""
        final = self.directory / f"{hold.hold_id}.json"
        data = (json.dumps(hold.to_json(), indent=1) + "\n").encode()
        try:
            replace_file(final, data, mode=0o600)
        except OSError as exc:
            raise KeystoreError(
                f"cannot write hold registry entry {final}: {exc.strerror}"
            ) from exc


# -- hold secrets ------------------------------------------------------------------------


class HoldSecrets:
    """The registry secret and the hold keys, wrapped by the master key, in ``<dir>``.

    Files: ``registry.key`` and ``<ID>.key`` (``{"format", "name", "created_at", "kek_id",
    "nonce", "wrapped"}``, mode 0600), ``<ID>.destroyed`` tombstones. The same scheme as
    the file keystore: AES-256-GCM under the master key with the name and creation time as
    associated data, atomic create by hard link, destroy by tombstone + overwrite + unlink.
    ``master`` may be None for destroy only (releasing a hold must work without it).
    """

    def __init__(
        self,
        directory: Path,
        master: MasterKey | None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.directory = Path(directory)
        self._master = master
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeystoreError(
                f"cannot create hold directory {self.directory}: {exc.strerror}"
            ) from exc

    def _aad(self, name: str, created_at: str) -> bytes:
        return f"cdranon hold secret v{_FORMAT}\x00{name}\x00{created_at}".encode()

    def _master_key(self) -> MasterKey:
        if self._master is None:
            raise MasterKeyError(
                f"hold secrets in {self.directory} need the master key: set CDRANON_MASTER_KEY"
            )
        return self._master

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{name}.{suffix}"

    def _read(self, name: str) -> bytes | None:
        tomb = self._path(name, "destroyed")
        if tomb.exists():
            raise KeyDestroyedError(_display(name))
        path = self._path(name, "key")
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise KeystoreError(f"cannot read hold secret file {path}: damaged?") from exc
        master = self._master_key()
        try:
            nonce = base64.b64decode(doc["nonce"])
            wrapped = base64.b64decode(doc["wrapped"])
            return master.aead().decrypt(nonce, wrapped, self._aad(name, doc["created_at"]))
        except InvalidTag as exc:
            raise MasterKeyError(
                f"the master key does not unwrap {path.name}: wrong CDRANON_MASTER_KEY?"
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise KeystoreError(f"hold secret file {path} is malformed: damaged?") from exc

    def _create(self, name: str) -> bytes:
        with self._lock:
            existing = self._read(name)
            if existing is not None:
                return existing
            master = self._master_key()
            secret = secrets.token_bytes(32)
            created_at = rfc3339(self._clock())
            nonce = secrets.token_bytes(12)
            body = {
                "format": _FORMAT,
                "name": name,
                "created_at": created_at,
                "kek_id": master.key_id,
                "nonce": base64.b64encode(nonce).decode(),
                "wrapped": base64.b64encode(
                    master.aead().encrypt(nonce, secret, self._aad(name, created_at))
                ).decode(),
            }
            path = self._path(name, "key")
            try:
                won = create_exclusive(path, (json.dumps(body) + "\n").encode(), mode=0o600)
            except OSError as exc:
                raise KeystoreError(f"cannot write hold secret {path}: {exc.strerror}") from exc
            if won:
                return secret
            again = self._read(name)
            if again is None:
                raise KeystoreError(f"hold secret {path} vanished while being created")
            return again

    def registry_secret(self) -> bytes:
        """The secret the registry's MSISDN MACs are keyed with (created on first use)."""
        return self._create(REGISTRY_SECRET_NAME)

    def create(self, hold_id: str) -> bytes:
        """Create the hold's key unless it exists; KeyDestroyedError if it was destroyed."""
        return self._create(check_hold_id(hold_id))

    def get(self, hold_id: str) -> bytes:
        """The hold's key; KeyDestroyedError if destroyed, KeyNotFoundError if never made."""
        secret = self._read(check_hold_id(hold_id))
        if secret is None:
            raise KeyNotFoundError(HOLD_KEY_PREFIX + hold_id)
        return secret

    def state(self, hold_id: str) -> str:
        """``active``, ``destroyed`` or ``absent`` (no master key needed)."""
        if self._path(hold_id, "destroyed").exists():
            return "destroyed"
        return "active" if self._path(hold_id, "key").exists() else "absent"

    def destroy(self, hold_id: str) -> bool:
        """Destroy the hold key beyond recovery from this directory; True if it existed.

        Tombstone first, then overwrite the key file in place, fsync, unlink. Idempotent.
        """
        check_hold_id(hold_id)
        with self._lock:
            tomb = self._path(hold_id, "destroyed")
            path = self._path(hold_id, "key")
            try:
                if not tomb.exists():
                    doc = {
                        "format": _FORMAT,
                        "name": hold_id,
                        "destroyed_at": rfc3339(self._clock()),
                    }
                    replace_file(tomb, (json.dumps(doc) + "\n").encode(), mode=0o600)
                existed = shred(path)
                # Temporary files of a racing or crashed create hold a wrapped key too.
                for debris in temp_files(path):
                    shred(debris)
            except OSError as exc:
                raise KeystoreError(
                    f"destroying hold key {HOLD_KEY_PREFIX}{hold_id} in {self.directory} failed: "
                    f"{exc.strerror or exc.__class__.__name__}; run it again (it is idempotent)"
                ) from exc
            return existed


def _display(name: str) -> str:
    return name if name == REGISTRY_SECRET_NAME else HOLD_KEY_PREFIX + name


# -- matching and re-sealing -------------------------------------------------------------


def msisdn_mac(registry_secret: bytes, value: str, *, field_name: str = "msisdn") -> str:
    """HMAC-SHA256 of the normalised number under the registry secret, as hex.

    RecordError (naming ``field_name``, never the value) if it is not a valid MSISDN.
    """
    normalised, _cc = check_msisdn(field_name, value)
    return hmac.digest(registry_secret, _MSISDN_TAG + normalised.encode(), "sha256").hex()


def hold_keys(hold_id: str, secret: bytes, month: str) -> MonthKeys:
    """The sealing keys of a hold's copies of ``month``, derived from the hold's secret."""
    kid = hold_key_id(hold_id, month)
    seal_root = hkdf(secret, _INFO_HOLD_SEAL + kid.encode())
    # MonthKeys wants a pseudonym HMAC too; a hold never computes pseudonyms.
    unused = HMAC(hkdf(secret, _INFO_HOLD_UNUSED + kid.encode()), hashes.SHA256())
    return MonthKeys(kid, month, f"hold-{hold_id}", seal_root, unused)


def new_hold(
    *,
    hold_id: str,
    reason: str,
    placed_by: str,
    placed_at: datetime,
    months: Sequence[str],
    accounts: Sequence[str],
    msisdns: Sequence[str],
    registry_secret: bytes | None,
) -> Hold:
    """Validate a hold request into a Hold; ConfigError saying which argument is wrong."""
    check_hold_id(hold_id)
    if not reason.strip():
        raise ConfigError("a hold needs --reason: why the records are preserved")
    if not placed_by.strip():
        raise ConfigError("a hold needs --by: who placed it")
    if not (months or accounts or msisdns):
        raise ConfigError(
            "a hold must name what it covers: at least one --month, --account or --msisdn"
        )
    for m in months:
        parse_month(m)
    macs: list[str] = []
    if msisdns:
        if registry_secret is None:
            raise ConfigError("holding an MSISDN needs the hold registry secret")
        for n, value in enumerate(msisdns, 1):
            try:
                macs.append(msisdn_mac(registry_secret, value, field_name=f"--msisdn #{n}"))
            except RecordError as exc:
                raise ConfigError(str(exc)) from None
    return Hold(
        hold_id=hold_id,
        reason=reason.strip(),
        placed_by=placed_by.strip(),
        placed_at=rfc3339(placed_at),
        months=tuple(sorted(set(months))),
        accounts=tuple(sorted(set(accounts))),
        msisdn_macs=tuple(sorted(set(macs))),
    )


@dataclass
class HoldCopy:
    """What one month key's deadline put into each hold: re-sealed records and counts."""

    key_id: str
    scanned: int = 0
    unreadable: int = 0
    records: dict[str, list[bytes]] = field(default_factory=dict)  # hold id -> records


def copy_held(
    records: Iterable[bytes],
    month_keys: MonthKeys,
    holds: Sequence[Hold],
    hold_secrets: Mapping[str, bytes],
    registry_secret: bytes | None,
    msisdn_fields: Sequence[str],
) -> HoldCopy:
    """Select the sealed records of ``month_keys`` that ``holds`` cover; re-seal each copy.

    Pure (no I/O). Records of other key ids (other classes of the month) are passed over.
    A covered record is unsealed, matched (account, normalised MSISDN's MAC), and its
    identifiers re-sealed under each covering hold's key; the copy names its hold key
    (``key_id = hold/<ID>``) and the month key it came from (``held_from``).
    """
    kid = month_keys.key_id
    out = HoldCopy(kid, records={h.hold_id: [] for h in holds})
    candidates = [h for h in holds if h.covers_month(month_keys.month)]
    if not candidates:
        return out
    unsealer = Unsealer(month_keys)
    month = month_keys.month
    sealers = {
        h.hold_id: BatchSealer(hold_keys(h.hold_id, hold_secrets[h.hold_id], month))
        for h in candidates
    }
    for raw in records:
        try:
            rec = orjson.loads(raw)
            blob = rec["sealed"]
            if blob_key_id(blob) != kid:
                continue
        except (orjson.JSONDecodeError, KeyError, TypeError, SealError):
            continue
        out.scanned += 1
        covering = [h for h in candidates if h.covers_account(rec.get("account_id"))]
        if not covering:
            continue
        cdr_id = str(rec.get("cdr_id"))
        try:
            idents = unsealer.unseal(blob, cdr_id)
        except SealError:
            out.unreadable += 1
            continue
        macs = _record_macs(idents, msisdn_fields, registry_secret)
        for h in covering:
            if h.msisdn_macs and not macs.intersection(h.msisdn_macs):
                continue
            copy = {k: v for k, v in rec.items() if k != "sealed"}
            copy["key_id"] = hold_key_id(h.hold_id, month)
            copy["held_from"] = kid
            copy["sealed"] = sealers[h.hold_id].seal(idents, cdr_id)
            out.records[h.hold_id].append(orjson.dumps(copy))
    return out


def _record_macs(
    idents: Mapping[str, object], msisdn_fields: Sequence[str], secret: bytes | None
) -> set[str]:
    macs: set[str] = set()
    if secret is None:
        return macs
    for f in msisdn_fields:
        value = idents.get(f)
        if isinstance(value, str):
            with contextlib.suppress(RecordError):
                macs.add(msisdn_mac(secret, value, field_name=f))
    return macs


def held_key_ids(lines: Iterable[bytes]) -> Iterator[str]:
    """The ``held_from`` key ids found in a hold store's records."""
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
            v = orjson.loads(line).get("held_from")
            if isinstance(v, str):
                yield v


def release(hold: Hold, *, by: str, now: datetime, destroy_after: datetime) -> Hold:
    """The released form of ``hold``; its key and store go at ``destroy_after``."""
    if not hold.active:
        raise ConfigError(f"hold {hold.hold_id} was already released at {hold.released_at}")
    if not by.strip():
        raise ConfigError("releasing a hold needs --by: who releases it")
    return replace(
        hold,
        released_at=rfc3339(now),
        released_by=by.strip(),
        destroy_after=rfc3339(max(now, destroy_after)),
    )
