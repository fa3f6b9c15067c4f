"""Sealing identifiers: one AEAD blob per record, bound to the record.

Construction (blob format version 1):
- Per batch, a random 128-bit salt; the batch subkey is
  HKDF-SHA256(seal_root, salt, info="cdranon/v1/seal-batch"); records in the batch are
  sealed with AES-256-GCM under that subkey with a counter nonce (32 zero bits + a 64-bit
  counter from 1), so nonces never repeat under one subkey.
- Associated data: "cdranon/v1" | key id (names the month and class) | cdr_id. A blob
  moved to another record or month does not authenticate.
- Blob = base64(0x01 | len(key id) | key id | salt(16) | nonce(12) | ciphertext+tag(16)).
  The key id in the clear lets a reader find the key; it is authenticated through the AAD.

Bound (stated in docs/crypto.md): GCM's limits apply per subkey, and each subkey seals one
batch (< 2^32 records). Subkeys collide only if two batches draw the same salt: with q
batches per month key, probability <= q^2 / 2^129. At 10^11 records per month in batches
of one record (worst case), q = 10^11 gives < 2^-55 (1.5e-17); at 10k-record batches,
q = 10^7 gives < 2^-82. A random-nonce GCM under one month key would pass NIST's 2^-32
bound after ~2^32 records, half a day at 100k records/s.
"""

from __future__ import annotations

import binascii
import os
from binascii import b2a_base64

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from orjson import dumps

from service.errors import ConfigError, SealError
from service.keystore.base import split_key_id
from service.monthkeys import MonthKeys, hkdf

VERSION = 1
_INFO_BATCH = b"cdranon/v1/seal-batch"
_AAD_PREFIX = b"cdranon/v1\x00"
_SALT = 16
_NONCE = 12
_TAG = 16
_MAX_PER_BATCH = 2**32 - 1


def aad_for(kid: str, cdr_id: str) -> bytes:
    """The associated data that binds a blob to its record and month key."""
    return _AAD_PREFIX + kid.encode() + b"\x00" + cdr_id.encode()


def batch_material(keys: MonthKeys) -> tuple[bytes, bytes, bytes]:
    """(subkey, blob header, AAD prefix) for a new sealing batch under a fresh random salt.

    BatchSealer seals with them; the native transform (service/_native.c) takes them
    as bytes and seals the same way with OpenSSL. Each caller draws its own salt, so two
    sealers of one month in one batch never share a subkey (nor a nonce).
    """
    salt = os.urandom(_SALT)
    subkey = hkdf(keys.seal_root, _INFO_BATCH, salt=salt)
    kid = keys.key_id.encode()
    return subkey, bytes((VERSION, len(kid))) + kid + salt, _AAD_PREFIX + kid + b"\x00"


class BatchSealer:
    """Seals the records of one batch under a fresh subkey of one month."""

    __slots__ = ("_aad_prefix", "_aead", "_counter", "_header", "key_id")

    def __init__(self, keys: MonthKeys) -> None:
        subkey, self._header, self._aad_prefix = batch_material(keys)
        self._aead = AESGCM(subkey)
        self._counter = 0
        self.key_id = keys.key_id

    def seal(self, identifiers: dict[str, object], cdr_id: str) -> str:
        """Seal a record's identifiers (field -> value as received); returns base64 text."""
        return self.seal_b64(dumps(identifiers), cdr_id).decode()

    def seal_b64(self, plaintext: bytes, cdr_id: str) -> bytes:
        """Seal the JSON object of a record's identifiers; returns the blob as base64
        bytes (ASCII), ready to splice into a JSON document without another copy."""
        n = self._counter = self._counter + 1
        if n > _MAX_PER_BATCH:
            raise SealError("too many records in one sealing batch (limit 2^32 - 1)")
        nonce = n.to_bytes(12, "big")  # 32 zero bits + the 64-bit counter
        ct = self._aead.encrypt(nonce, plaintext, self._aad_prefix + cdr_id.encode())
        return b2a_base64(self._header + nonce + ct, newline=False)


def blob_key_id(blob: str) -> str:
    """The key id a blob names, without decrypting it."""
    raw = _decode(blob)
    return _split(raw)[0]


def _decode(blob: object) -> bytes:
    if not isinstance(blob, str):
        raise SealError("sealed blob must be a string")
    try:
        return binascii.a2b_base64(blob, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or ValueError for non-ASCII text
        raise SealError("sealed blob is not valid base64") from exc


def _split(raw: bytes) -> tuple[str, bytes, bytes, bytes]:
    if len(raw) < 2 or raw[0] != VERSION:
        raise SealError(f"unsupported sealed blob version (expected {VERSION})")
    n = raw[1]
    head = 2 + n
    if len(raw) < head + _SALT + _NONCE + _TAG:
        raise SealError("sealed blob is truncated")
    try:
        kid = raw[2:head].decode("ascii")
        split_key_id(kid)
    except (UnicodeDecodeError, ConfigError):
        # Checked here so one corrupt blob fails its own record, not the whole run.
        raise SealError("sealed blob has a malformed key id") from None
    salt = raw[head : head + _SALT]
    nonce = raw[head + _SALT : head + _SALT + _NONCE]
    return kid, salt, nonce, raw[head + _SALT + _NONCE :]


class Unsealer:
    """Opens blobs of one month key; caches batch subkeys by salt (reads go batch-wise)."""

    def __init__(self, keys: MonthKeys) -> None:
        self._keys = keys
        self._subkeys: dict[bytes, AESGCM] = {}

    def unseal(self, blob: str, cdr_id: str) -> dict[str, object]:
        """The identifiers sealed in ``blob`` for record ``cdr_id``; SealError if it fails."""
        kid, salt, nonce, ct = _split(_decode(blob))
        if kid != self._keys.key_id:
            raise SealError(f"blob is sealed under {kid}, not {self._keys.key_id}")
        aead = self._subkeys.get(salt)
        if aead is None:
            if len(self._subkeys) > 4096:
                self._subkeys.clear()
            aead = self._subkeys[salt] = AESGCM(hkdf(self._keys.seal_root, _INFO_BATCH, salt=salt))
        try:
            plain = aead.decrypt(nonce, ct, aad_for(kid, cdr_id))
        except InvalidTag as exc:
            raise SealError(
                "sealed blob does not authenticate for this record (altered, or moved from "
                "another record or month)"
            ) from exc
        value = orjson.loads(plain)
        if not isinstance(value, dict):
            raise SealError("sealed blob does not hold an identifier object")
        return value
