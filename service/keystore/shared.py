"""Wrapped month secrets that every replica can read, and the keystore built on them.

A month secret lives only *wrapped*: encrypted under a key-encryption key (KEK) that never
leaves its home (the master key in the process's memory, or a per-month key inside an
HSM: see pkcs11.py). A **wrapper** does the wrapping; a **store** keeps the wrapped
records where replicas can read them:

- ``DirectoryStore``: one JSON file per key id in a directory (local, or a filesystem
  with atomic ``link`` shared by the replicas of one machine);
- ``TopicStore``: the compacted Kafka topic ``cdr.keys``, for replicas on many machines.

``WrappedKeystore(wrapper, store)`` is the keystore (base.Keystore) made of the two.

How a create-if-absent race ends with ONE secret per key id
-----------------------------------------------------------
Every writer generates its own candidate (a KEK for pkcs11, a fresh secret, a wrap) and
asks the store to publish it *if no record exists*. The store picks exactly one:

- directory: the candidate is written under a temporary name and hard-linked to the final
  name; ``link`` fails if the name exists, so the first link wins (service/durable.py);
- topic: every write of a key id goes through a transactional producer whose
  ``transactional.id`` is derived from the key id. Kafka allows one live producer per
  transactional id: a writer that initialises it fences (aborts) any earlier writer's
  open transaction. The writer then reads the topic to its end (read_committed); only if
  the key id has no record does it produce and commit. Of two overlapping writers the
  fenced one cannot commit; a later writer sees the earlier commit when it reads. So at
  most one record per key id is ever committed, which also survives log compaction
  (compaction keeps the *last* record of a key: a "first record wins" rule alone would
  not). Readers still adopt the first record they see for a key id, as a second guard.

Every writer then adopts the winner's record; losers discard their candidate (and its
KEK). Destruction writes a permanent ``destroyed`` marker first (from then on nothing can
read or create the key), then has the wrapper destroy the KEK (pkcs11), then removes the
wrapped record (a null tombstone on the topic; shredding the file in a directory).

The topic store, in detail: topic ``cdr.keys``, one partition (a total order),
``cleanup.policy=compact``. Record key = key id, value = JSON (format, key_id, backend,
kek_id, nonce, wrapped, created_at); a destroyed key id gets a record with key
``destroyed/<key id>`` (created_at, destroyed_at; never removed, it holds no secret) and
then a null value for the key id. A background thread follows the topic into memory. A
reader that has not caught up with the end of the topic within ``max_lag_s`` (default
10 s) refuses to answer (KeystoreUnavailableError: processing pauses) rather than serve a
key that may have been destroyed meanwhile. A destroyed key therefore leaves this view
within ``max_lag_s``, and a processor's Keyring, which asks again every ``recheck_s``
(60 s), within ``recheck_s + max_lag_s``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic
from cryptography.exceptions import InvalidTag

from service.durable import create_exclusive, shred, temp_files
from service.errors import (
    KeyDestroyedError,
    KeystoreError,
    KeystoreUnavailableError,
    MasterKeyError,
)
from service.keystore.base import SECRET_BYTES, KeyInfo, KeyState, split_key_id
from service.keystore.master import MasterKey

FORMAT_VERSION: Final = 1
DEFAULT_TOPIC: Final = "cdr.keys"
DESTROYED_PREFIX: Final = "destroyed/"
DEFAULT_MAX_LAG_S: Final = 10.0

log = logging.getLogger("cdranon.keystore")


def utc_now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with a ``Z`` (second precision)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrappedRecord:
    """One month secret, wrapped. Holds no plaintext; its repr shows no ciphertext either."""

    key_id: str
    backend: str  # the wrapper's name: "file" (master key) or "pkcs11"
    kek_id: str  # which KEK wrapped it: master key fingerprint, or the HSM object's CKA_ID
    nonce: bytes
    wrapped: bytes
    created_at: str

    def __repr__(self) -> str:
        return f"WrappedRecord({self.key_id!r}, backend={self.backend!r}, kek={self.kek_id})"

    def to_json(self) -> bytes:
        """The record as the JSON stored in files and on the topic."""
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "key_id": self.key_id,
                "backend": self.backend,
                "kek_id": self.kek_id,
                "nonce": base64.b64encode(self.nonce).decode("ascii"),
                "wrapped": base64.b64encode(self.wrapped).decode("ascii"),
                "created_at": self.created_at,
            },
            sort_keys=True,
        ).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> WrappedRecord:
        """Parse a stored record; KeystoreError naming ``where`` if it is malformed."""
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
                raise ValueError("format")
            fields = {k: doc[k] for k in ("key_id", "backend", "kek_id", "created_at")}
            if not all(isinstance(v, str) for v in fields.values()):
                raise ValueError("types")
            split_key_id(fields["key_id"])
            return cls(
                nonce=base64.b64decode(doc["nonce"], validate=True),
                wrapped=base64.b64decode(doc["wrapped"], validate=True),
                **fields,
            )
        except (KeyError, TypeError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise KeystoreError(
                f"wrapped key record in {where} is malformed (expected format "
                f"{FORMAT_VERSION}): damaged or not written by cdranon"
            ) from exc


@dataclass(frozen=True, slots=True)
class Destroyed:
    """The marker of a destroyed key id: when it was created and destroyed."""

    key_id: str
    created_at: str | None
    destroyed_at: str | None

    def to_json(self) -> bytes:
        """The marker as stored."""
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "key_id": self.key_id,
                "created_at": self.created_at,
                "destroyed_at": self.destroyed_at,
            },
            sort_keys=True,
        ).encode("ascii")

    @classmethod
    def from_json(cls, kid: str, raw: bytes | None) -> Destroyed:
        """Parse a marker leniently: a damaged marker still means destroyed."""
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        c, d = doc.get("created_at"), doc.get("destroyed_at")
        return cls(kid, c if isinstance(c, str) else None, d if isinstance(d, str) else None)


Entry = WrappedRecord | Destroyed


class WrappedStore(Protocol):
    """Where wrapped records live. Implementations are thread-safe."""

    where: str

    def lookup(self, kid: str) -> Entry | None:
        """The record, the destroyed marker, or None. KeystoreUnavailableError if unsure."""
        ...

    def publish_first(self, record: WrappedRecord) -> WrappedRecord:
        """Store ``record`` unless its key id has one; return the record that won.

        Raises KeyDestroyedError if the key id is (or becomes) destroyed.
        """
        ...

    def mark_destroyed(self, marker: Destroyed) -> None:
        """Write the permanent destroyed marker (idempotent; an existing one is kept)."""
        ...

    def drop_wrapped(self, kid: str) -> None:
        """Remove the wrapped record of a destroyed key id (idempotent)."""
        ...

    def entries(self) -> list[Entry]:
        """Every record and marker, sorted by key id."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


class Wrapper(Protocol):
    """Wraps month secrets under a KEK it never reveals. Implementations are thread-safe."""

    backend: str

    def new_kek(self, kid: str) -> str:
        """A KEK for a new candidate secret of ``kid``; its id."""
        ...

    def wrap(self, kid: str, kek_id: str, secret: bytes, created_at: str) -> WrappedRecord:
        """The wrapped record of ``secret``."""
        ...

    def unwrap(self, record: WrappedRecord) -> bytes:
        """The secret of a record (MasterKeyError/KeystoreError if it does not unwrap)."""
        ...

    def discard(self, kid: str, kek_id: str) -> None:
        """Forget the KEK of a candidate that lost the race (nothing to do for a master key)."""
        ...

    def destroy(self, kid: str) -> bool:
        """Destroy every KEK of ``kid`` and verify; True if one existed."""
        ...

    def close(self) -> None:
        """Release sessions."""
        ...


def wrap_aad(backend: str, kid: str, kek_id: str, created_at: str) -> bytes:
    """Associated data binding a wrap to its key id, KEK and creation time."""
    parts = (f"cdranon wrapped v{FORMAT_VERSION}", backend, kid, kek_id, created_at)
    return "\x00".join(parts).encode()


# -- the master-key wrapper (the file backend's KEK, usable with a shared store) -----------


class MasterKeyWrapper:
    """Month secrets wrapped by the master key with AES-256-GCM, in this process.

    ``master`` may be None for administration (list, destroy): those never need the KEK.
    """

    backend = "file"

    def __init__(self, master: MasterKey | None) -> None:
        self._master = master

    def _require(self) -> MasterKey:
        if self._master is None:
            raise MasterKeyError(
                "the keystore was opened without a master key: set CDRANON_MASTER_KEY to "
                "read or create month secrets"
            )
        return self._master

    def new_kek(self, kid: str) -> str:
        """The master key's fingerprint: every month shares the one KEK."""
        return self._require().key_id

    def wrap(self, kid: str, kek_id: str, secret: bytes, created_at: str) -> WrappedRecord:
        """AES-256-GCM under the master key, random 96-bit nonce (a few wraps a month)."""
        master = self._require()
        nonce = secrets.token_bytes(12)
        blob = master.aead().encrypt(nonce, secret, wrap_aad(self.backend, kid, kek_id, created_at))
        return WrappedRecord(kid, self.backend, kek_id, nonce, blob, created_at)

    def unwrap(self, record: WrappedRecord) -> bytes:
        """The secret; MasterKeyError naming the key ids if the master key does not fit."""
        master = self._require()
        aad = wrap_aad(record.backend, record.key_id, record.kek_id, record.created_at)
        try:
            secret = master.aead().decrypt(record.nonce, record.wrapped, aad)
        except InvalidTag:
            if record.kek_id != master.key_id:
                raise MasterKeyError(
                    f"the master key does not unwrap {record.key_id}: wrong CDRANON_MASTER_KEY? "
                    f"(wrapped under master key id {record.kek_id}, the current one is "
                    f"{master.key_id})"
                ) from None
            raise MasterKeyError(
                f"the master key does not unwrap {record.key_id}: the record was damaged "
                "or tampered with"
            ) from None
        if len(secret) != SECRET_BYTES:
            raise KeystoreError(f"the wrapped secret of {record.key_id} has the wrong length")
        return secret

    def discard(self, kid: str, kek_id: str) -> None:
        """Nothing to discard: the master key is shared by every month."""

    def destroy(self, kid: str) -> bool:
        """No per-month KEK: destruction is the record's removal (see docs)."""
        return False

    def close(self) -> None:
        """Nothing held."""


# -- the keystore ---------------------------------------------------------------------------


class WrappedKeystore:
    """A keystore (base.Keystore) of a wrapper and a store of wrapped records."""

    def __init__(
        self,
        wrapper: Wrapper,
        store: WrappedStore,
        *,
        clock: Callable[[], str] = utc_now_rfc3339,
    ) -> None:
        self.wrapper = wrapper
        self.store = store
        self.backend = wrapper.backend
        self._clock = clock
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"WrappedKeystore({self.backend}, {self.store.where})"

    def get(self, kid: str) -> bytes | None:
        """The month secret, None if never created; KeyDestroyedError if destroyed."""
        split_key_id(kid)
        entry = self.store.lookup(kid)
        if entry is None:
            return None
        if isinstance(entry, Destroyed):
            raise KeyDestroyedError(kid, entry.destroyed_at)
        return self.wrapper.unwrap(entry)

    def create_if_absent(self, kid: str) -> bytes:
        """Create the month secret unless it exists; every racing caller gets the winner's."""
        split_key_id(kid)
        with self._lock:
            existing = self.get(kid)
            if existing is not None:
                return existing
            kek_id = self.wrapper.new_kek(kid)
            try:
                secret = os.urandom(SECRET_BYTES)
                mine = self.wrapper.wrap(kid, kek_id, secret, self._clock())
                winner = self.store.publish_first(mine)
            except BaseException:
                # Our candidate never became the record: its KEK must not linger.
                with contextlib.suppress(KeystoreError):
                    self.wrapper.discard(kid, kek_id)
                raise
            if winner == mine:
                log.info("created month key %s (%s, %s)", kid, self.backend, self.store.where)
                return secret
            self.wrapper.discard(kid, kek_id)
            return self.wrapper.unwrap(winner)

    def destroy(self, kid: str) -> bool:
        """Destroy the month secret for good; True if it existed. Idempotent.

        Order: the destroyed marker (nothing can read or re-create the key from here on),
        the KEK (pkcs11: C_DestroyObject, verified from a fresh session), the wrapped record.
        """
        split_key_id(kid)
        with self._lock:
            entry = self.store.lookup(kid)
            if isinstance(entry, Destroyed):
                marker = entry
            else:
                created = entry.created_at if entry is not None else None
                marker = Destroyed(kid, created, self._clock())
                self.store.mark_destroyed(marker)
            kek_existed = self.wrapper.destroy(kid)
            self.store.drop_wrapped(kid)
            existed = isinstance(entry, WrappedRecord) or kek_existed
            if existed:
                log.info("destroyed month key %s (%s, %s)", kid, self.backend, self.store.where)
            return existed

    def list(self) -> list[KeyInfo]:
        """Every key id the store knows, active or destroyed, sorted."""
        out = []
        for e in self.store.entries():
            if isinstance(e, Destroyed):
                out.append(
                    KeyInfo(
                        e.key_id, KeyState.DESTROYED, e.created_at, e.destroyed_at, self.backend
                    )
                )
            else:
                out.append(KeyInfo(e.key_id, KeyState.ACTIVE, e.created_at, None, e.backend))
        return out

    def close(self) -> None:
        """Close the store and the wrapper."""
        self.store.close()
        self.wrapper.close()


# -- the directory store --------------------------------------------------------------------

_DIR_NAME = re.compile(r"^(\d{4}-\d{2})\.([a-z0-9][a-z0-9_-]{0,31})\.(wrapped|destroyed)$")


class DirectoryStore:
    """Wrapped records as files ``<month>.<class>.wrapped`` / ``.destroyed`` (0600, dir 0700)."""

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        self.directory = Path(directory)
        self.where = str(self.directory)
        self._lock = threading.RLock()
        try:
            if create:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeystoreError(f"cannot create key directory {self.directory}: {exc}") from exc
        if not self.directory.is_dir():
            raise KeystoreError(f"key directory {self.directory} does not exist")

    def _path(self, kid: str, kind: str) -> Path:
        month, cls = split_key_id(kid)
        return self.directory / f"{month}.{cls}.{kind}"

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeystoreUnavailableError(f"cannot read {path}: {exc.strerror}") from exc

    def lookup(self, kid: str) -> Entry | None:
        """Read the files now: a destroy by another process is seen at once."""
        tomb = self._path(kid, "destroyed")
        raw = self._read(tomb)
        if raw is not None:
            return Destroyed.from_json(kid, raw)
        path = self._path(kid, "wrapped")
        raw = self._read(path)
        if raw is None:
            # A destroy may have completed between our two reads.
            raw_tomb = self._read(tomb)
            return Destroyed.from_json(kid, raw_tomb) if raw_tomb is not None else None
        return WrappedRecord.from_json(raw, where=str(path))

    def publish_first(self, record: WrappedRecord) -> WrappedRecord:
        """Hard-link the record into place unless one exists; the winner."""
        kid = record.key_id
        path = self._path(kid, "wrapped")
        with self._lock:
            try:
                create_exclusive(path, record.to_json(), mode=0o600)
            except OSError as exc:
                raise KeystoreError(f"cannot write {path}: {exc.strerror}") from exc
            winner = self.lookup(kid)
            if isinstance(winner, Destroyed):
                # A destroy ran while we linked: a destroyed month must not keep a record.
                self.drop_wrapped(kid)
                raise KeyDestroyedError(kid, winner.destroyed_at)
            if winner is None:
                raise KeystoreError(f"{path} vanished while being created")
            return winner

    def mark_destroyed(self, marker: Destroyed) -> None:
        """Link the marker file into place (an existing marker is kept)."""
        try:
            create_exclusive(self._path(marker.key_id, "destroyed"), marker.to_json(), mode=0o600)
        except OSError as exc:
            raise KeystoreError(
                f"cannot write the destroyed marker of {marker.key_id}: {exc.strerror}; "
                "run the destroy again"
            ) from exc

    def drop_wrapped(self, kid: str) -> None:
        """Overwrite the record's bytes in place, fsync, unlink (and racing temp files)."""
        path = self._path(kid, "wrapped")
        shred(path)
        for debris in temp_files(path):
            shred(debris)

    def entries(self) -> list[Entry]:
        """Every record and marker in the directory, sorted by key id."""
        found: dict[str, Entry] = {}
        for name in sorted(os.listdir(self.directory)):
            m = _DIR_NAME.match(name)
            if not m:
                continue
            kid = f"{m.group(1)}/{m.group(2)}"
            if m.group(3) == "destroyed":
                found[kid] = Destroyed.from_json(kid, self._read(self.directory / name))
            elif kid not in found:
                raw = self._read(self.directory / name)
                if raw is not None:
                    found[kid] = WrappedRecord.from_json(raw, where=name)
        return [found[k] for k in sorted(found)]

    def close(self) -> None:
        """Nothing held open."""


# -- the topic store (cdr.keys) ---------------------------------------------------------------


# How long one wait for new key records may block. Short waits wake the follower (and
# take the GIL from the processor's transform) often for nothing: records are rare, and
# a sync() request is answered within one wait.
_FOLLOW_POLL_S = 0.5


def _flush_quietly(producer: Producer) -> None:
    """Flush a per-key-id producer before dropping it. A producer fenced by another
    writer raises here; the outcome was already decided by its commit (or not), and the
    caller's retry loop must see that, not this error."""
    try:
        producer.flush(5)
    except KafkaException as exc:
        log.info("key record producer not flushed: %s", _kafka_reason(exc))


def _kafka_reason(exc: BaseException) -> str:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err: KafkaError = exc.args[0]
        return f"{err.name()}: {err.str()}"
    return str(exc) or exc.__class__.__name__


class TopicStore:
    """Wrapped records on the compacted topic ``cdr.keys``, followed into memory.

    ``config`` is extra librdkafka configuration (security settings) for every client.
    The constructor creates the topic if missing and reads it to its end (``ready_timeout_s``).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = DEFAULT_TOPIC,
        *,
        config: dict[str, str] | None = None,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        ready_timeout_s: float = 30.0,
        create_topic: bool = True,
        publish_timeout_s: float = 30.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.publish_timeout_s = publish_timeout_s
        self.topic = topic
        self.where = f"kafka topic {topic}"
        self.max_lag_s = max_lag_s
        self._base: dict[str, str | int | float | bool] = {
            "bootstrap.servers": bootstrap,
            **(config or {}),
        }
        self._tp = TopicPartition(topic, 0)
        self._active: dict[str, WrappedRecord] = {}
        self._destroyed: dict[str, Destroyed] = {}
        self._cond = threading.Condition()
        self._fresh_as_of = -1.0  # monotonic time up to which the view is complete
        self._sync_wanted = False
        self._error: str | None = None
        self._stop = threading.Event()
        if create_topic:
            self._ensure_topic()
        self._consumer = Consumer(
            {
                **self._base,
                "group.id": f"cdranon-keys-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        self._consumer.assign([TopicPartition(topic, 0, 0)])
        self._thread = threading.Thread(target=self._follow, name="cdr.keys-reader", daemon=True)
        self._thread.start()
        try:
            self.sync(ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"TopicStore({self.bootstrap!r}, {self.topic!r})"

    # -- topic and follower ---------------------------------------------------------------

    def _ensure_topic(self) -> None:
        admin = AdminClient(self._base)
        try:
            md = admin.list_topics(timeout=15)
        except KafkaException as exc:
            raise KeystoreUnavailableError(
                f"cannot reach Kafka at {self.bootstrap} for {self.topic}: {_kafka_reason(exc)}"
            ) from exc
        if self.topic in md.topics:
            return
        rf = min(3, max(1, len(md.brokers)))
        new = NewTopic(
            self.topic,
            num_partitions=1,
            replication_factor=rf,
            config={
                "cleanup.policy": "compact",
                # Roll and clean often, so a removed wrapped record leaves the log soon.
                "segment.ms": "3600000",
                "min.cleanable.dirty.ratio": "0.01",
                "min.insync.replicas": str(min(2, rf)),
            },
        )
        fut = admin.create_topics([new], operation_timeout=15)[self.topic]
        try:
            fut.result(30)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            raise KeystoreError(f"cannot create topic {self.topic}: {_kafka_reason(exc)}") from exc

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        k = key.decode("utf-8", errors="replace")
        if k.startswith(DESTROYED_PREFIX):
            kid = k[len(DESTROYED_PREFIX) :]
            if value is None:
                return  # markers are permanent; a null for one is ignored
            self._destroyed[kid] = Destroyed.from_json(kid, value)
            self._active.pop(kid, None)
            return
        if value is None:
            self._active.pop(k, None)
            return
        if k in self._destroyed or k in self._active:
            return  # first record wins; nothing revives a destroyed key
        try:
            rec = WrappedRecord.from_json(value, where=f"{self.topic} key {k}")
        except KeystoreError as exc:
            log.warning("%s", exc)
            return
        if rec.key_id == k:
            self._active[k] = rec

    def _follow(self) -> None:
        target: int | None = None
        asked_at = 0.0
        last_check = 0.0
        while not self._stop.is_set():
            try:
                msgs = self._consumer.consume(500, timeout=_FOLLOW_POLL_S)
                with self._cond:
                    for m in msgs:
                        err = m.error()
                        if err is not None:
                            if err.fatal():
                                self._error = err.str()
                            continue
                        self._apply(m.key(), m.value())
                now = time.monotonic()
                with self._cond:
                    wanted = self._sync_wanted
                if target is None and (wanted or now - last_check >= 1.0):
                    asked_at = time.monotonic()
                    _, hi = self._consumer.get_watermark_offsets(self._tp, timeout=5, cached=False)
                    target, last_check = hi, asked_at
                if target is not None:
                    pos = self._consumer.position([self._tp])[0].offset
                    if target <= 0 or pos >= target:
                        with self._cond:
                            self._fresh_as_of = asked_at
                            self._sync_wanted = False
                            self._error = None
                            self._cond.notify_all()
                        target = None
            except KafkaException as exc:
                # Broker unreachable: the view stops being fresh and readers pause.
                with self._cond:
                    self._error = _kafka_reason(exc)
                target = None
                self._stop.wait(0.5)

    def sync(self, timeout_s: float = 30.0) -> None:
        """Wait until the view holds everything committed before this call."""
        start = time.monotonic()
        deadline = start + timeout_s
        with self._cond:
            self._sync_wanted = True
            while self._fresh_as_of < start:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    why = f" ({self._error})" if self._error else ""
                    raise KeystoreUnavailableError(
                        f"could not read {self.topic} on {self.bootstrap} to its end within "
                        f"{timeout_s:g} s{why}; retrying"
                    )
                self._cond.wait(min(remaining, 0.2))

    def _fresh(self) -> None:
        with self._cond:
            lag = time.monotonic() - self._fresh_as_of
        if lag > self.max_lag_s:
            why = f": {self._error}" if self._error else ""
            raise KeystoreUnavailableError(
                f"the view of {self.topic} is {lag:.0f} s behind (bound {self.max_lag_s:g} s)"
                f"{why}; not using keys that may have been destroyed meanwhile"
            )

    # -- WrappedStore ---------------------------------------------------------------------

    def lookup(self, kid: str) -> Entry | None:
        """From the in-memory view; KeystoreUnavailableError if it is older than max_lag_s."""
        self._fresh()
        with self._cond:
            return self._destroyed.get(kid) or self._active.get(kid)

    def _transactional(self, kid: str) -> Producer:
        # One transactional id per (topic, key id): a new writer fences every older one.
        producer = Producer(
            {
                **self._base,
                "transactional.id": f"cdranon-keys.{self.topic}.{kid}",
                "transaction.timeout.ms": 10000,
                "enable.idempotence": True,
                "acks": "all",
            }
        )
        try:
            producer.init_transactions(30)
        except KafkaException as exc:
            raise KeystoreUnavailableError(
                f"cannot write {self.topic} for {kid}: {_kafka_reason(exc)}"
            ) from exc
        return producer

    def _commit(self, producer: Producer, records: list[tuple[str, bytes | None]]) -> bool:
        """Produce ``records`` in one transaction; False if it did not commit."""
        try:
            producer.begin_transaction()
            for k, v in records:
                producer.produce(self.topic, key=k.encode(), value=v)
            producer.commit_transaction(30)
            return True
        except KafkaException as exc:
            log.info(
                "key record transaction on %s did not commit: %s", self.topic, _kafka_reason(exc)
            )
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(10)
            return False

    def publish_first(self, record: WrappedRecord) -> WrappedRecord:
        """Commit ``record`` unless the key id has one (fenced per key id); the winner.

        Two writers can fence each other in turn; each retries after a random pause until
        a record is committed (by anyone) or ``publish_timeout_s`` passes.
        """
        kid = record.key_id
        deadline = time.monotonic() + self.publish_timeout_s
        while True:
            producer = self._transactional(kid)
            try:
                self.sync()
                current = self.lookup(kid)
                if current is None:
                    self._commit(producer, [(kid, record.to_json())])
                    self.sync()
                    current = self.lookup(kid)
            finally:
                _flush_quietly(producer)
            if isinstance(current, Destroyed):
                raise KeyDestroyedError(kid, current.destroyed_at)
            if current is not None:
                return current
            if time.monotonic() > deadline:
                raise KeystoreUnavailableError(
                    f"no record of {kid} committed to {self.topic} within "
                    f"{self.publish_timeout_s:g} s (writers fencing each other, or the broker "
                    "failing); retrying"
                )
            time.sleep(0.05 + secrets.randbelow(250) / 1000)

    def mark_destroyed(self, marker: Destroyed) -> None:
        """Commit the marker (fencing any writer of this key id); wait until it is seen."""
        producer = self._transactional(marker.key_id)
        try:
            if not self._commit(producer, [(DESTROYED_PREFIX + marker.key_id, marker.to_json())]):
                raise KeystoreError(
                    f"could not write the destroyed marker of {marker.key_id} to {self.topic}; "
                    "run the destroy again"
                )
        finally:
            _flush_quietly(producer)
        self.sync()

    def drop_wrapped(self, kid: str) -> None:
        """A null tombstone for the key id: compaction removes the wrapped record."""
        producer = self._transactional(kid)
        try:
            if not self._commit(producer, [(kid, None)]):
                raise KeystoreError(
                    f"could not write the tombstone of {kid} to {self.topic}; run the destroy again"
                )
        finally:
            _flush_quietly(producer)
        self.sync()

    def entries(self) -> list[Entry]:
        """Every record and marker of the view, sorted by key id."""
        self._fresh()
        with self._cond:
            merged: dict[str, Entry] = {**self._active, **self._destroyed}
        return [merged[k] for k in sorted(merged)]

    def close(self) -> None:
        """Stop following and close the consumer."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)
        with contextlib.suppress(RuntimeError, KafkaException):
            self._consumer.close()


def topic_store_from_url(url: str, *, config: dict[str, str] | None = None) -> TopicStore:
    """``kafka://HOST:PORT[,HOST:PORT...][/TOPIC]`` -> a TopicStore (topic cdr.keys by default)."""
    rest = url.partition("://")[2]
    bootstrap, _, topic = rest.partition("/")
    if not bootstrap:
        raise KeystoreError(f"invalid store URL {url!r}: expected kafka://HOST:PORT[/TOPIC]")
    return TopicStore(bootstrap, topic.strip("/") or DEFAULT_TOPIC, config=config)


__all__ = [
    "DEFAULT_MAX_LAG_S",
    "DEFAULT_TOPIC",
    "DESTROYED_PREFIX",
    "Destroyed",
    "DirectoryStore",
    "MasterKeyWrapper",
    "TopicStore",
    "WrappedKeystore",
    "WrappedRecord",
    "WrappedStore",
    "Wrapper",
    "topic_store_from_url",
    "utc_now_rfc3339",
]
