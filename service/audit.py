"""The tamper-evident audit log: signed, hash-chained JSON events (``cdr.audit`` or a file).

Every key creation and destruction, topic or file deletion, legal hold, unseal run,
retention pass and integrity root is one event. Several writers (processors, the retention
controller, CLI runs) append to one log; each writer keeps its own chain::

    {"version": 1, "writer": W, "seq": n, "time": T, "event": E, "actor": A,
     "reason": R|null, "details": {...}, "prev": H(previous event of W), "key_id": K,
     "sig": Ed25519(canonical bytes of all the above)}

Canonical bytes are ``orjson.dumps(obj, option=OPT_SORT_KEYS)``: keys sorted, no spaces,
UTF-8, shortest round-trip floats. A stored event IS its canonical encoding (with ``sig``),
one per line; ``prev`` is the hex SHA-256 of those stored bytes; the first event of a
chain has ``prev`` = 64 zeros. :func:`verify` checks every byte (the stored form must be
exactly canonical), every signature, and every chain (gapless ``seq``, matching ``prev``,
non-decreasing ``time``), and names the first bad event. docs/audit.md has the design and
what a hash chain alone cannot detect (truncation of a writer's newest events).

Details must never hold identifiers or key material: the log lives longer than any month
key. :func:`check_free_text` refuses text that looks like an MSISDN, IMSI, IMEI or email.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from service.errors import AuditError, AuditUnavailableError, AuditWriteError, ConfigError

VERSION: Final = 1
GENESIS: Final = "0" * 64
ENV_SIGNING_KEY: Final = "CDRANON_AUDIT_SIGNING_KEY"
ENV_SIGNING_KEY_FILE: Final = "CDRANON_AUDIT_SIGNING_KEY_FILE"
DEV_KEY_NAME: Final = "audit-signing.key"
DEV_PUBLIC_KEY_NAME: Final = "audit-signing.pub"
DEFAULT_TOPIC: Final = "cdr.audit"
SEED_BYTES: Final = 32

# The event names of this version. verify() accepts any well-formed name, so a newer
# writer's events still verify under an older verifier.
EVENTS: Final = (
    "key.created",
    "key.destroyed",
    "topic.deleted",
    "file.deleted",
    "hold.placed",
    "hold.released",
    "hold.copied",
    "unseal",
    "retention.pass",
    "integrity.root",
    "integrity.checkpoint",
)

_FIELDS: Final = frozenset(
    {"version", "writer", "seq", "time", "event", "actor", "reason", "details", "prev"}
    | {"key_id", "sig"}
)
_WRITER = re.compile(r"^[A-Za-z0-9._:@/+-]{1,128}$")
_EVENT = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*){0,3}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_KEY_ID = re.compile(r"^ed25519:[0-9a-f]{16}$")
# Fixed width, so that string order is time order.
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"

# Identifier-looking text: long digit runs (MSISDN 8-15, IMSI 15, IMEI 15-16 digits) once
# the separators people type are removed, and anything shaped like an email address.
_DIGIT_SEPARATORS = re.compile(r"(?<=\d)[ \-.()/]+(?=\d)")
_LONG_NUMBER = re.compile(r"(?<![0-9A-Za-z])\+?\d{9,}(?![0-9A-Za-z])")
_DETAIL_NUMBER = re.compile(r"(?<![0-9A-Za-z])\+?\d{10,}(?![0-9A-Za-z])")
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[A-Za-z]{2,}")

log = logging.getLogger("cdranon.audit")

_EXPECTED_KEY = (
    f"expected an Ed25519 private key: PEM (PKCS#8), or its {SEED_BYTES}-byte seed as "
    "base64 or hex; generate one with "
    '`python -c "from service.audit import generate_signing_key as g; print(g())"`'
)


# --------------------------------------------------------------------------- keys


def public_key_id(public_key: Ed25519PublicKey) -> str:
    """``ed25519:`` + 16 hex digits of SHA-256 over the raw public key: names, not secret."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo), the form to publish for verifiers."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


class SigningKey:
    """An Ed25519 signing key. Its repr names its source and public key id, never the key."""

    __slots__ = ("_private", "key_id", "public_key", "source")

    def __init__(self, private: Ed25519PrivateKey, *, source: str) -> None:
        self._private = private
        self.public_key = private.public_key()
        self.key_id = public_key_id(self.public_key)
        self.source = source

    @classmethod
    def generate(cls, *, source: str = "generated") -> SigningKey:
        """A fresh random key (tests, dev mode)."""
        return cls(Ed25519PrivateKey.generate(), source=source)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(id={self.key_id}, source={self.source!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy the key into places nobody audits.
        raise TypeError("a SigningKey cannot be pickled")


def generate_signing_key() -> str:
    """A fresh signing key: its seed as base64, the form ``CDRANON_AUDIT_SIGNING_KEY`` takes."""
    return base64.b64encode(secrets.token_bytes(SEED_BYTES)).decode("ascii")


def _decode_key_bytes(text: str, size: int) -> bytes | None:
    t = "".join(text.split())
    if len(t) == 2 * size:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(t)
    if t:
        padded = t + "=" * (-len(t) % 4)
        alphabet = b"-_" if ("-" in t or "_" in t) else b"+/"
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(padded, altchars=alphabet, validate=True)
            if len(raw) == size:
                return raw
    return None


def parse_signing_key_text(text: str, *, source: str) -> SigningKey:
    """A SigningKey from PEM, or base64/hex of the seed; AuditError (without the text) if not."""
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError):
            raise AuditError(
                f"the audit signing key from {source} is malformed: {_EXPECTED_KEY}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"the audit signing key from {source} is not Ed25519: {_EXPECTED_KEY}")
        return SigningKey(key, source=source)
    raw = _decode_key_bytes(text, SEED_BYTES)
    if raw is None:
        # Never echo the value: it is, or is close to, a secret.
        raise AuditError(f"the audit signing key from {source} is malformed: {_EXPECTED_KEY}")
    return SigningKey(Ed25519PrivateKey.from_private_bytes(raw), source=source)


def _read_signing_key_file(path: Path) -> SigningKey:
    source = f"key file {path}"
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AuditError(
            f"audit signing key file {path} does not exist: set {ENV_SIGNING_KEY_FILE} to an "
            f"existing file or {ENV_SIGNING_KEY} to the key itself"
        ) from None
    except OSError as exc:
        raise AuditError(f"cannot read audit signing key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "audit signing key file %s is readable by group or others (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    if len(data) == SEED_BYTES:
        return SigningKey(Ed25519PrivateKey.from_private_bytes(data), source=source)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise AuditError(f"audit signing key file {path} is malformed: {_EXPECTED_KEY}") from None
    return parse_signing_key_text(text, source=source)


def _write_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` unless it exists (temp + link: replicas agree on one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _dev_signing_key(dev_dir: Path) -> SigningKey:
    path = dev_dir / DEV_KEY_NAME
    try:
        dev_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = False
        if not path.exists():
            created = _write_exclusive(path, (generate_signing_key() + "\n").encode(), 0o600)
        key = _read_signing_key_file(path)
        pub = dev_dir / DEV_PUBLIC_KEY_NAME
        if not pub.exists():
            _write_exclusive(pub, public_key_pem(key.public_key).encode(), 0o644)
    except OSError as exc:
        raise AuditError(
            f"cannot write the dev audit signing key in {dev_dir}: {exc.strerror}"
        ) from None
    log.warning(
        "audit log in DEV MODE: %s signing key %s (public key %s, id %s); anyone who can "
        "read it can forge audit events. Set %s or %s in production.",
        "generated" if created else "using",
        path,
        dev_dir / DEV_PUBLIC_KEY_NAME,
        key.key_id,
        ENV_SIGNING_KEY,
        ENV_SIGNING_KEY_FILE,
    )
    return key


def load_signing_key(
    *,
    env: Mapping[str, str],
    key_file: Path | None = None,
    dev_dir: Path | None = None,
    text: str | None = None,
) -> SigningKey:
    """Find the audit signing key; first match wins.

    1. ``CDRANON_AUDIT_SIGNING_KEY`` (PEM, or the 32-byte seed as base64 or hex);
    2. ``CDRANON_AUDIT_SIGNING_KEY_FILE``;
    3. ``text`` (the ``audit.signing_key`` setting), then ``key_file``
       (``audit.signing_key_file``);
    4. dev mode (``dev_dir`` given): ``<dev_dir>/audit-signing.key``, generated 0600 on first
       use with its public key beside it, and a WARNING each time.

    Raises AuditError if none is configured or the configured one is malformed (the
    message never contains the value).
    """
    value = env.get(ENV_SIGNING_KEY, "")
    if value.strip():
        return parse_signing_key_text(value, source=f"environment variable {ENV_SIGNING_KEY}")
    env_file = env.get(ENV_SIGNING_KEY_FILE, "").strip()
    if env_file:
        return _read_signing_key_file(Path(env_file).expanduser())
    if text is not None and text.strip():
        return parse_signing_key_text(text, source="setting audit.signing_key")
    if key_file is not None:
        return _read_signing_key_file(key_file.expanduser())
    if dev_dir is not None:
        return _dev_signing_key(dev_dir)
    raise AuditError(
        f"no audit signing key configured: set {ENV_SIGNING_KEY} (or {ENV_SIGNING_KEY_FILE}, "
        "or audit.signing_key_file in the config file)"
    )


def parse_public_key(data: bytes, *, source: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, 32 raw bytes, or their base64/hex text."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise AuditError(f"public key {source} is not a valid PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise AuditError(f"public key {source} is not an Ed25519 key")
        return key
    raw: bytes | None = data if len(data) == 32 else None
    if raw is None:
        with contextlib.suppress(UnicodeDecodeError):
            raw = _decode_key_bytes(data.decode("ascii"), 32)
    if raw is None:
        raise AuditError(
            f"public key {source} is malformed: expected PEM, or 32 bytes raw, base64 or hex"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a file (see :func:`parse_public_key`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read public key file {path}: {exc.strerror}") from None
    return parse_public_key(data, source=str(path))


# ---------------------------------------------------------------------- encoding


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical encoding: orjson, keys sorted, no spaces, UTF-8."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def event_hash(raw: bytes) -> str:
    """Hex SHA-256 of a stored event (its canonical bytes, ``sig`` included)."""
    return hashlib.sha256(raw).hexdigest()


def format_time(dt: datetime) -> str:
    """An event time: RFC 3339 UTC, always with microseconds (fixed width)."""
    return dt.astimezone(UTC).strftime(_TIME_FORMAT)


def check_free_text(text: str, *, what: str = "text") -> None:
    """Raise ConfigError if ``text`` looks like it holds an identifier (number or email).

    Free text typed by people (``--reason``) ends up in a log kept for years: a subscriber
    number in it would outlive the month key that protects it everywhere else. The message
    names the problem, never the text.
    """
    squeezed = _DIGIT_SEPARATORS.sub("", text)
    if _LONG_NUMBER.search(squeezed) or _EMAIL.search(text):
        raise ConfigError(
            f"{what} looks like it contains a phone number, IMSI, IMEI or email address; "
            "the audit log must never hold identifiers: refer to a case or ticket number"
        )


def _check_details(value: Any, path: str = "details") -> None:
    if isinstance(value, str):
        if _DETAIL_NUMBER.search(value) or _EMAIL.search(value):
            raise AuditError(f"audit {path} looks like an identifier; details must never hold one")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditError(f"audit {path}: keys must be strings")
            _check_details(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_details(v, f"{path}[{i}]")
    elif isinstance(value, float) and value != value:  # noqa: PLR0124 - NaN test
        raise AuditError(f"audit {path}: NaN cannot be encoded canonically")


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest event of one writer: what its next event continues from."""

    seq: int
    hash: str
    time: str


def _head_of(raw: bytes) -> tuple[str, ChainHead]:
    ev = orjson.loads(raw)
    return ev["writer"], ChainHead(ev["seq"], event_hash(raw), ev["time"])


def head_of(raw: bytes) -> ChainHead:
    """The chain head a stored event makes (its seq, hash and time)."""
    return _head_of(raw)[1]


def build_event(
    key: SigningKey,
    writer: str,
    head: ChainHead | None,
    event: str,
    *,
    actor: str,
    reason: str | None,
    details: Mapping[str, Any],
    now: datetime,
) -> bytes:
    """The canonical bytes of the signed event that continues ``head`` (None: seq 1).

    Pure: writes nothing. For writers that put events into their own Kafka transactions;
    everyone else uses :meth:`Auditor.record`. Raises AuditError / ConfigError for an
    invalid name, an empty actor, identifier-looking reason or details, or details that
    are not canonical JSON.
    """
    if not _EVENT.match(event):
        raise AuditError(f"invalid audit event name {event!r}")
    if not isinstance(actor, str) or not actor.strip():
        raise AuditError("an audit event needs an actor (who did it)")
    if reason is not None:
        check_free_text(reason, what="the reason")
    _check_details(details)
    when = format_time(now)
    if head is not None and when < head.time:
        when = head.time  # a clock stepping back must not break the order
    body: dict[str, Any] = {
        "version": VERSION,
        "writer": writer,
        "seq": 1 if head is None else head.seq + 1,
        "time": when,
        "event": event,
        "actor": actor,
        "reason": reason,
        "details": dict(details),
        "prev": GENESIS if head is None else head.hash,
        "key_id": key.key_id,
    }
    try:
        signed = canonical(body)
    except TypeError as exc:
        raise AuditError(f"audit details are not JSON-encodable: {exc}") from None
    if canonical(orjson.loads(signed)) != signed:
        raise AuditError("audit details do not survive a JSON round trip unchanged")
    body["sig"] = key.sign(signed).hex()
    return canonical(body)


# ------------------------------------------------------------------------- sinks


MakeEvent = Callable[[ChainHead | None], bytes]


class _Sink(Protocol):
    target: str

    def append(self, make: MakeEvent, *, sync: bool) -> bytes: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _writer_marker(writer: str) -> bytes:
    # "writer" sorts last among the fields, so a canonical event ENDS with this marker;
    # a "writer" key inside details cannot be mistaken for it.
    return b'"writer":' + orjson.dumps(writer) + b"}"


class _FileSink:
    """One JSON line per event, appended under an exclusive ``flock``.

    The lock makes appends from several processes whole lines, and lets a process notice
    that another process appended events of the same writer (then it continues from the
    newest one instead of forking the chain).
    """

    def __init__(self, path: Path, writer: str) -> None:
        self.target = f"file://{path}"
        self._path = path
        self._writer = writer
        self._marker = _writer_marker(writer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from None
        self._end = 0
        self._dirty = False  # written with sync=False and not fdatasync'ed since
        self._head: ChainHead | None = None
        with self._locked():
            self._catch_up()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Read what was appended since ``_end`` (all of it at open) for our writer's head."""
        size = os.fstat(self._fd).st_size
        if size == self._end:
            return
        if self._end == 0:
            self._head = self._scan_backwards(size)
        else:
            data = os.pread(self._fd, size - self._end, self._end)
            self._head = self._last_in(data.split(b"\n"), self._head)
        self._end = size

    def _last_in(self, lines: list[bytes], head: ChainHead | None) -> ChainHead | None:
        for line in lines:
            if line.endswith(self._marker):
                head = self._parse_own(line)
        return head

    def _parse_own(self, line: bytes) -> ChainHead:
        try:
            writer, head = _head_of(line)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise AuditError(
                f"audit log {self._path} holds a damaged event of writer {self._writer}: "
                "run `cdranon audit verify`; refusing to extend a broken chain"
            ) from None
        if writer != self._writer:  # the marker appeared inside another field
            raise AuditError(f"audit log {self._path}: ambiguous writer marker")
        return head

    def _scan_backwards(self, size: int) -> ChainHead | None:
        # The newest event of this writer is usually near the end: read backwards in
        # growing blocks instead of parsing a log that may hold millions of events.
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            raise AuditError(
                f"audit log {self._path} does not end with a newline (a torn write or a "
                "truncated file): run `cdranon audit verify`; refusing to append to it"
            )
        block = 64 * 1024
        end = size
        tail = b""
        while end > 0:
            start = max(0, end - block)
            chunk = os.pread(self._fd, end - start, start) + tail
            lines = chunk.split(b"\n")
            # The first piece may be a partial line unless we reached the start.
            tail = lines[0] if start > 0 else b""
            whole = lines[1:] if start > 0 else lines
            for line in reversed(whole):
                if line.endswith(self._marker):
                    return self._parse_own(line)
            end = start
            block = min(block * 2, 16 * 1024 * 1024)
        return None

    def append(self, make: MakeEvent, *, sync: bool) -> bytes:
        with self._locked():
            self._catch_up()
            raw = make(self._head)
            line = raw + b"\n"
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(0, f"short write ({written} of {len(line)} bytes)")
                self._dirty = True
                if sync:
                    os.fdatasync(self._fd)
                    self._dirty = False
            except OSError as exc:
                raise AuditWriteError(
                    f"cannot write audit log {self._path}: {exc.strerror}"
                ) from None
            _, self._head = _head_of(raw)
            self._end = os.fstat(self._fd).st_size
            return raw

    def flush(self) -> None:
        if not self._dirty:
            return
        try:
            os.fdatasync(self._fd)
            self._dirty = False
        except OSError as exc:
            raise AuditWriteError(f"cannot sync audit log {self._path}: {exc.strerror}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class _KafkaSink:
    """Events on a single-partition topic, by an idempotent producer with ``acks=all``.

    At open the partition is read backwards from its end until this writer's newest event
    is found (read_committed). Each synchronous append flushes and checks its delivery; a
    failed delivery poisons the sink (the chain would have a gap), so every later append
    raises until the auditor is reopened, which re-reads the head from the topic.
    """

    def __init__(
        self, conf: Mapping[str, str], topic: str, writer: str, *, timeout_s: float
    ) -> None:
        from confluent_kafka import Producer  # noqa: PLC0415 - the file target needs no Kafka

        self.target = f"kafka:{topic}"
        self._topic = topic
        self._writer = writer
        self._timeout_s = timeout_s
        self._conf = dict(conf)
        self._error: str | None = None
        self._pending = 0
        ensure_audit_topic(self._conf, topic, timeout_s=timeout_s)
        self._head = self._find_head()
        self._producer = Producer(
            {
                **self._conf,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
                "message.timeout.ms": int(timeout_s * 1000),
                "client.id": f"cdranon-audit-{writer}"[:200],
            }
        )

    def _find_head(self) -> ChainHead | None:
        return find_topic_head(self._conf, self._topic, self._writer, timeout_s=self._timeout_s)

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        self._pending -= 1
        if err is not None and self._error is None:
            self._error = str(err)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise AuditWriteError(
                f"audit event not written to topic {self._topic}: {self._error}; the chain of "
                f"writer {self._writer} may have a gap: reopen the audit log"
            )

    def append(self, make: MakeEvent, *, sync: bool) -> bytes:
        self._raise_if_failed()
        raw = make(self._head)
        try:
            self._pending += 1
            self._producer.produce(
                self._topic,
                value=raw,
                key=self._writer.encode(),
                partition=0,
                on_delivery=self._on_delivery,
            )
        except BufferError:
            self._pending -= 1
            raise AuditWriteError(f"audit producer queue full for topic {self._topic}") from None
        except Exception as exc:  # noqa: BLE001 - KafkaException and kin: not written
            self._pending -= 1
            raise AuditWriteError(f"audit event not written to {self._topic}: {exc}") from None
        _, self._head = _head_of(raw)
        self._producer.poll(0)
        if sync:
            self.flush()
        return raw

    def flush(self) -> None:
        remaining = self._producer.flush(self._timeout_s)
        if remaining and self._error is None:
            self._error = f"{remaining} event(s) still undelivered after {self._timeout_s}s"
        self._raise_if_failed()

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


def find_topic_head(
    conf: Mapping[str, str], topic: str, writer: str, *, timeout_s: float = 30.0
) -> ChainHead | None:
    """The newest committed event of ``writer`` on the (single-partition) audit topic.

    Reads backwards from the end in growing ranges (read_committed), so a writer that
    wrote recently is found without reading the whole log. None: the writer never wrote.
    Raises AuditUnavailableError if the topic cannot be read right now (worth retrying),
    a plain AuditError if that event is damaged (never extend a broken chain).
    """
    marker = _writer_marker(writer)
    low, high = _watermarks(conf, topic, timeout_s)
    step = 256
    end = high
    while end > low:
        start = max(low, end - step)
        newest: bytes | None = None
        for _, value in read_partition(conf, topic, start, end, timeout_s):
            if value is not None and value.endswith(marker):
                newest = value
        if newest is not None:
            try:
                found, head = _head_of(newest)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                found, head = "", None
            if found != writer or head is None:
                raise AuditError(
                    f"audit topic {topic} holds a damaged event of writer {writer}: "
                    "run `cdranon audit verify`; refusing to extend a broken chain"
                )
            return head
        end = start
        step = min(step * 4, 1_000_000)
    return None


def ensure_audit_topic(conf: Mapping[str, str], topic: str, *, timeout_s: float = 30.0) -> None:
    """Create the audit topic if missing (1 partition, kept forever); check it if present.

    One partition gives the log one order; ``retention.ms=-1`` and ``cleanup.policy=delete``
    because compaction by writer key, or time retention, would delete history. Raises
    AuditUnavailableError if the broker does not answer (worth retrying), a plain AuditError
    otherwise (not authorised, wrong partition count).
    """
    from confluent_kafka import KafkaException  # noqa: PLC0415
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415
    from confluent_kafka.cimpl import NewTopic  # noqa: PLC0415

    admin = AdminClient(dict(conf))
    try:
        md = admin.list_topics(topic=topic, timeout=timeout_s)
        tm = md.topics.get(topic)
        if tm is None or tm.error is not None:
            fut = admin.create_topics(
                [
                    NewTopic(
                        topic,
                        num_partitions=1,
                        replication_factor=-1,
                        config={"retention.ms": "-1", "cleanup.policy": "delete"},
                    )
                ],
                operation_timeout=timeout_s,
                request_timeout=timeout_s,
            )[topic]
            try:
                fut.result(timeout=timeout_s)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
            _await_leader(admin, topic, timeout_s)
            return
    except KafkaException as exc:
        raise _kafka_failure(f"cannot open audit topic {topic}", exc) from None
    if len(tm.partitions) != 1:
        raise AuditError(
            f"audit topic {topic} has {len(tm.partitions)} partitions; it needs exactly 1 "
            "(one order for the whole log)"
        )


def _await_leader(admin: Any, topic: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tm = admin.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
        if (
            tm is not None
            and tm.error is None
            and all(p.leader >= 0 for p in tm.partitions.values())
        ):
            return
        time.sleep(0.05)  # metadata propagation, bounded by the deadline
    raise AuditUnavailableError(
        f"audit topic {topic} has no leader after {timeout_s}s", code="LEADER_NOT_AVAILABLE"
    )


def _kafka_failure(what: str, exc: Exception) -> AuditError:
    """AuditUnavailableError if ``exc`` is a Kafka error that passes (broker down, timed out,
    leader moving), a plain AuditError if retrying cannot cure it (not authorised, no such
    topic)."""
    from confluent_kafka import KafkaError  # noqa: PLC0415

    from service.kafka.clients import passes  # noqa: PLC0415

    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError) and passes(err):
        return AuditUnavailableError(f"{what}: {exc}", code=err.name())
    return AuditError(f"{what}: {exc}")


def _consumer(conf: Mapping[str, str]) -> Any:
    from confluent_kafka import Consumer  # noqa: PLC0415

    return Consumer(
        {
            **conf,
            "group.id": f"cdranon-audit-reader-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )


def _watermarks(conf: Mapping[str, str], topic: str, timeout_s: float) -> tuple[int, int]:
    from confluent_kafka import KafkaException, TopicPartition  # noqa: PLC0415

    c = _consumer(conf)
    try:
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout_s)
    except KafkaException as exc:
        raise _kafka_failure(f"cannot read audit topic {topic}", exc) from None
    finally:
        c.close()
    return int(low), int(high)


def read_partition(
    conf: Mapping[str, str], topic: str, start: int, end: int | None, timeout_s: float = 30.0
) -> list[tuple[int, bytes | None]]:
    """(offset, value) of partition 0 of ``topic`` from ``start`` up to ``end`` (exclusive).

    ``end`` None: the high watermark at the call. Raises AuditUnavailableError if the
    broker cannot be reached or the end is not reached within ``timeout_s`` (the broker is
    away, or a transaction on the topic is still open); a plain AuditError if the broker
    says the partition ends before ``end`` (the log lost records) or refuses the read.
    """
    from confluent_kafka import KafkaError, KafkaException, TopicPartition  # noqa: PLC0415

    if end is None:
        _, end = _watermarks(conf, topic, timeout_s)
    out: list[tuple[int, bytes | None]] = []
    if end <= start:
        return out
    c = _consumer(conf)
    deadline = time.monotonic() + timeout_s
    try:
        c.assign([TopicPartition(topic, 0, start)])
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _not_reached(c, topic, end, timeout_s)
            msg = c.poll(min(0.5, remaining))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    # read_committed: EOF at the last stable offset; past the end we want
                    # means done (control markers take offsets too).
                    if (msg.offset() or 0) >= end - 1 or _position(c, topic) >= end:
                        return out
                    continue
                raise KafkaException(err)
            off = msg.offset() or 0
            if off >= end:
                return out
            out.append((off, msg.value()))
            if off == end - 1:
                return out
    except KafkaException as exc:
        raise _kafka_failure(f"cannot read audit topic {topic}", exc) from None
    finally:
        c.close()


def _not_reached(c: Any, topic: str, end: int, timeout_s: float) -> AuditError:
    """Why a read did not reach ``end`` in time: the log lost records, or it is unavailable.

    ``end`` came from the broker (its watermark, or a log read before). If the partition is
    now shorter, records were lost (a truncating leader election, a re-created topic) and
    waiting cannot cure it. Otherwise the broker is away, or a transaction on the topic is
    still open: the high watermark of the last fetch response is compared, not the last
    stable offset, so an open transaction's records count as there. No response at all
    leaves it at -1: unavailable.
    """
    from confluent_kafka import KafkaException, TopicPartition  # noqa: PLC0415

    try:
        _, high = c.get_watermark_offsets(TopicPartition(topic, 0), cached=True)
    except KafkaException:
        high = -1
    if high is not None and 0 <= high < end:
        return AuditError(
            f"audit topic {topic} ends at offset {high}, before offset {end} that it held: "
            "records were lost (a truncated or re-created topic); run `cdranon audit verify`"
        )
    return AuditUnavailableError(
        f"reading audit topic {topic}: offset {end} not reached within {timeout_s}s",
        code="_TIMED_OUT",
    )


def _position(c: Any, topic: str) -> int:
    from confluent_kafka import TopicPartition  # noqa: PLC0415

    pos = c.position([TopicPartition(topic, 0)])[0].offset
    return int(pos) if pos is not None and pos >= 0 else -1


# ----------------------------------------------------------------------- auditor


def default_writer() -> str:
    """``<host>:<pid>``: unique among running processes, so two never share a chain.

    Long-lived services should pass a stable name (``processor-<instance>``,
    ``retention``) so their chain continues across restarts.
    """
    host = socket.gethostname().split(".")[0][:60] or "host"
    return f"{host}:{os.getpid()}"


class Auditor:
    """Appends signed, hash-chained events for one writer. Thread-safe."""

    def __init__(
        self,
        sink: _Sink,
        signing_key: SigningKey,
        writer: str,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._sink = sink
        self._key = signing_key
        self.writer = writer
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._closed = False

    @property
    def target(self) -> str:
        """Where events go (``file:///...`` or ``kafka:TOPIC``)."""
        return self._sink.target

    @property
    def key_id(self) -> str:
        """The public key id events are signed under."""
        return self._key.key_id

    def record(
        self,
        event: str,
        *,
        actor: str,
        reason: str | None = None,
        sync: bool = True,
        **details: Any,
    ) -> dict[str, Any]:
        """Append one signed, chained event and return it (with ``sig``).

        ``details`` are JSON values describing the action: key ids, months, topics,
        counts, never an identifier or key material. With ``sync`` (the default) the
        event is durable when this returns (file: fdatasync; Kafka: acknowledged by all
        in-sync replicas); ``sync=False`` batches, and :meth:`flush` makes durable.
        Raises AuditWriteError if it could not be written: the caller must not report
        the action as done.
        """

        # Built under the log's lock (after catching up with other processes); if it
        # raises, nothing is written.
        def make(head: ChainHead | None) -> bytes:
            return build_event(
                self._key,
                self.writer,
                head,
                event,
                actor=actor,
                reason=reason,
                details=details,
                now=self._clock(),
            )

        with self._lock:
            if self._closed:
                raise AuditError(f"audit log {self.target} is closed")
            raw = self._sink.append(make, sync=sync)
        out: dict[str, Any] = orjson.loads(raw)
        return out

    def flush(self) -> None:
        """Make every event recorded so far durable; AuditWriteError if one was not."""
        with self._lock:
            self._sink.flush()

    def close(self) -> None:
        """Flush and release the target. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._sink.flush()
            finally:
                self._sink.close()

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def parse_target(target: str) -> tuple[str, str, str | None]:
    """``file:///p`` -> ("file", "/p", None); ``kafka://H:P/topic`` -> ("kafka", topic, "H:P");
    ``kafka:topic`` -> ("kafka", topic, None). ConfigError otherwise."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        if path:
            return "file", path, None
    if sep and scheme == "kafka":
        if rest.startswith("//"):
            host, _, topic = rest[2:].partition("/")
            if host and topic:
                return "kafka", topic, host
        elif rest:
            return "kafka", rest, None
    raise ConfigError(
        f"invalid audit target {target!r}: expected file:///PATH, kafka://HOST:PORT/TOPIC "
        "or kafka:TOPIC (with bootstrap.servers in the Kafka settings)"
    )


def open_auditor(
    target: str,
    *,
    signing_key: SigningKey | None = None,
    writer: str | None = None,
    kafka_conf: Mapping[str, str] | None = None,
    clock: Callable[[], datetime] | None = None,
    timeout_s: float = 30.0,
) -> Auditor:
    """Open the audit log at ``target`` for appending as ``writer``; resume its chain.

    ``signing_key`` None: :func:`load_signing_key` from the environment, in dev mode
    beside a file target (or under ``$CDRANON_HOME/audit`` for Kafka). ``writer`` None:
    :func:`default_writer`. Raises ConfigError (target), AuditError (unreadable or damaged
    log, topic with more than one partition).
    """
    kind, where, bootstrap = parse_target(target)
    writer = writer or default_writer()
    if not _WRITER.match(writer):
        raise ConfigError(
            f"invalid audit writer name {writer!r}: 1-128 of A-Z a-z 0-9 . _ : @ / + -"
        )
    if kind == "file":
        path = Path(where).expanduser()
        key = signing_key or load_signing_key(env=os.environ, dev_dir=path.parent)
        return Auditor(_FileSink(path, writer), key, writer, clock=clock)
    conf = dict(kafka_conf or {})
    if bootstrap:
        conf["bootstrap.servers"] = bootstrap
    if not conf.get("bootstrap.servers"):
        raise ConfigError(f"audit target {target}: no bootstrap.servers given")
    key = signing_key or load_signing_key(env=os.environ, dev_dir=default_audit_dir(os.environ))
    sink = _KafkaSink(conf, where, writer, timeout_s=timeout_s)
    return Auditor(sink, key, writer, clock=clock)


def default_audit_dir(env: Mapping[str, str]) -> Path:
    """``${CDRANON_HOME:-~/.local/share/cdranon}/audit``: the dev key and default file log."""
    home = env.get("CDRANON_HOME", "").strip() or "~/.local/share/cdranon"
    return Path(home).expanduser().absolute() / "audit"


def default_audit_target(env: Mapping[str, str]) -> str:
    """``file://`` + the default audit directory + ``/audit.jsonl``."""
    return "file://" + str(default_audit_dir(env) / "audit.jsonl")


# ------------------------------------------------------------------------ verify


@dataclass(frozen=True, slots=True)
class Problem:
    """The first bad event: its 0-based position in the log and why."""

    index: int
    reason: str
    writer: str | None = None
    seq: int | None = None

    def describe(self) -> str:
        """One line: ``event #N (writer W, seq S): why``."""
        who = ""
        if self.writer is not None:
            who = f" (writer {self.writer}" + (f", seq {self.seq})" if self.seq else ")")
        return f"event #{self.index + 1}{who}: {self.reason}"


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify` found: counts, every writer's head, and the first problem."""

    events: int = 0
    heads: dict[str, ChainHead] = field(default_factory=dict)
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        """True when every event and chain checked out."""
        return self.problem is None


def _keys_by_id(
    public_keys: Iterable[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey],
) -> dict[str, Ed25519PublicKey]:
    if isinstance(public_keys, Mapping):
        return dict(public_keys)
    return {public_key_id(k): k for k in public_keys}


def _check_shape(ev: Any) -> str | None:  # noqa: PLR0911, PLR0912 - one rule, one reason
    if not isinstance(ev, dict):
        return "not a JSON object"
    if set(ev) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(ev)), sorted(set(ev) - _FIELDS)
        return f"wrong fields (missing {missing}, unexpected {extra})"
    if ev["version"] != VERSION or isinstance(ev["version"], bool):
        return f"unsupported version {ev['version']!r}"
    if not isinstance(ev["writer"], str) or not _WRITER.match(ev["writer"]):
        return "malformed writer"
    if type(ev["seq"]) is not int or ev["seq"] < 1:
        return "malformed seq"
    if not isinstance(ev["time"], str) or not _TIME.match(ev["time"]):
        return "malformed time"
    try:
        datetime.strptime(ev["time"], _TIME_FORMAT)
    except ValueError:
        return "malformed time"
    if not isinstance(ev["event"], str) or not _EVENT.match(ev["event"]):
        return "malformed event name"
    if not isinstance(ev["actor"], str) or not ev["actor"]:
        return "malformed actor"
    if ev["reason"] is not None and not isinstance(ev["reason"], str):
        return "malformed reason"
    if not isinstance(ev["details"], dict):
        return "malformed details"
    if not isinstance(ev["prev"], str) or not _HEX64.match(ev["prev"]):
        return "malformed prev"
    if not isinstance(ev["key_id"], str) or not _KEY_ID.match(ev["key_id"]):
        return "malformed key_id"
    if not isinstance(ev["sig"], str) or not _HEX128.match(ev["sig"]):
        return "malformed sig"
    return None


def _check_event(  # noqa: PLR0911 - one rule, one reason
    raw: bytes, ev: dict[str, Any], keys: Mapping[str, Ed25519PublicKey], head: ChainHead | None
) -> str | None:
    """Why one well-shaped event is bad (encoding, signature, chain), or None."""
    if canonical(ev) != raw:
        return "not in canonical encoding (bytes altered)"
    key = keys.get(ev["key_id"])
    if key is None:
        return f"signed under unknown key {ev['key_id']} (forged, or a key not configured)"
    body = {k: v for k, v in ev.items() if k != "sig"}
    try:
        key.verify(bytes.fromhex(ev["sig"]), canonical(body))
    except InvalidSignature:
        return "signature does not verify (altered or forged)"
    want_seq = 1 if head is None else head.seq + 1
    if ev["seq"] != want_seq:
        return (
            f"seq {ev['seq']} where {want_seq} was expected "
            "(an event is missing, inserted, duplicated or out of order)"
        )
    if ev["prev"] != (GENESIS if head is None else head.hash):
        return "prev does not match the hash of the writer's previous event"
    if head is not None and ev["time"] < head.time:
        return "time earlier than the writer's previous event"
    return None


def _check_anchors(
    anchors: Mapping[str, ChainHead], seen: Mapping[str, Mapping[int, str]], report: VerifyReport
) -> Problem | None:
    last = max(report.events - 1, 0)
    for writer, anchor in anchors.items():
        found = seen.get(writer, {}).get(anchor.seq)
        if found is None:
            head = report.heads.get(writer)
            have = f"ends at seq {head.seq}" if head else "is absent"
            return Problem(
                last,
                f"chain of writer {writer} {have} but the anchor has seq {anchor.seq} "
                "(newest events truncated)",
                writer,
                anchor.seq,
            )
        if found != anchor.hash:
            return Problem(
                last,
                f"event seq {anchor.seq} of writer {writer} differs from the anchor (rewritten)",
                writer,
                anchor.seq,
            )
    return None


def verify(
    events: Iterable[bytes],
    public_keys: Iterable[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey],
    *,
    anchors: Mapping[str, ChainHead] | None = None,
) -> VerifyReport:
    """Check every event's bytes, signature and chain; stop at the first bad one.

    ``events``: the stored events in log order (file lines without the newline, or topic
    values). ``public_keys``: the trusted keys (a mapping from key id, or an iterable).
    ``anchors``: heads recorded earlier (a previous report's ``heads``, kept elsewhere):
    each writer's chain must still contain that exact event, which detects truncation of
    newest events and rewriting since then. The report's ``problem`` names the first bad
    event; position is 0-based in ``events``.
    """
    keys = _keys_by_id(public_keys)
    report = VerifyReport()
    heads = report.heads
    seen: dict[str, dict[int, str]] = {w: {} for w in (anchors or {})}
    for index, raw in enumerate(events):
        report.events = index + 1
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError:
            report.problem = Problem(index, "not valid JSON (damaged, inserted or spliced)")
            return report
        why = _check_shape(ev)
        if why is None:
            why = _check_event(raw, ev, keys, heads.get(ev["writer"]))
        if why is not None:
            writer = ev.get("writer") if isinstance(ev, dict) else None
            seq = ev.get("seq") if isinstance(ev, dict) else None
            report.problem = Problem(
                index,
                why,
                writer if isinstance(writer, str) else None,
                seq if type(seq) is int else None,
            )
            return report
        h = ChainHead(ev["seq"], event_hash(raw), ev["time"])
        heads[ev["writer"]] = h
        if ev["writer"] in seen:
            seen[ev["writer"]][h.seq] = h.hash
    if anchors:
        report.problem = _check_anchors(anchors, seen, report)
    return report


def split_lines(data: bytes) -> tuple[list[bytes], bool]:
    """The events of an audit file's bytes (lines without newlines), and whether the data
    ends cleanly: ``False`` means the last line has no newline (a torn write or a
    truncated file)."""
    if not data:
        return [], True
    lines = data.split(b"\n")
    clean = lines[-1] == b""
    if clean:
        lines.pop()
    return lines, clean


def read_file_events(path: Path) -> tuple[list[bytes], bool]:
    """:func:`split_lines` of the file at ``path``; AuditError if it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    return split_lines(data)


def verify_bytes(
    data: bytes,
    public_keys: Iterable[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey],
    *,
    anchors: Mapping[str, ChainHead] | None = None,
) -> VerifyReport:
    """:func:`verify` over the bytes of an audit file, also requiring the final newline."""
    lines, clean = split_lines(data)
    report = verify(lines, public_keys, anchors=anchors)
    if report.ok and not clean:
        report.problem = Problem(
            len(lines) - 1, "no newline after the last event (torn write or truncated file)"
        )
    return report


def verify_file(
    path: Path,
    public_keys: Iterable[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey],
    *,
    anchors: Mapping[str, ChainHead] | None = None,
) -> VerifyReport:
    """:func:`verify_bytes` over the file at ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    return verify_bytes(data, public_keys, anchors=anchors)


def anchors_to_json(heads: Mapping[str, ChainHead]) -> bytes:
    """Heads as JSON (writer -> {seq, hash, time}), to keep and pass back as anchors."""
    return orjson.dumps(
        {w: {"seq": h.seq, "hash": h.hash, "time": h.time} for w, h in sorted(heads.items())},
        option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
    )


def anchors_from_json(data: bytes, *, source: str) -> dict[str, ChainHead]:
    """Parse :func:`anchors_to_json` output; AuditError naming ``source`` if malformed."""
    try:
        raw = orjson.loads(data)
        return {
            str(w): ChainHead(int(v["seq"]), str(v["hash"]), str(v["time"])) for w, v in raw.items()
        }
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise AuditError(
            f"anchor file {source} is malformed: expected {{writer: {{seq, hash, time}}}}"
        ) from None


__all__ = [
    "DEFAULT_TOPIC",
    "ENV_SIGNING_KEY",
    "ENV_SIGNING_KEY_FILE",
    "EVENTS",
    "GENESIS",
    "VERSION",
    "Auditor",
    "ChainHead",
    "Problem",
    "SigningKey",
    "VerifyReport",
    "anchors_from_json",
    "anchors_to_json",
    "build_event",
    "canonical",
    "check_free_text",
    "default_audit_dir",
    "default_audit_target",
    "default_writer",
    "ensure_audit_topic",
    "event_hash",
    "find_topic_head",
    "format_time",
    "generate_signing_key",
    "head_of",
    "load_public_key",
    "load_signing_key",
    "open_auditor",
    "parse_public_key",
    "parse_signing_key_text",
    "parse_target",
    "public_key_id",
    "public_key_pem",
    "read_file_events",
    "read_partition",
    "split_lines",
    "verify",
    "verify_bytes",
    "verify_file",
]
