"""Month keys: everything derived from one month secret with HKDF.

Hierarchy (all HKDF-SHA256 over the 32-byte month secret, distinct ``info`` labels):
- seal root  -> per-batch sealing subkeys (see service/sealing.py);
- pseudonym key -> HMAC-SHA256 pseudonyms (see service/pseudonyms.py).
Destroying the month secret destroys all of them: cryptographic erasure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.keystore.base import SECRET_BYTES, split_key_id

_INFO_SEAL_ROOT = b"cdranon/v1/seal-root"
_INFO_PSEUDONYM = b"cdranon/v1/pseudonym"


def hkdf(secret: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) from ``cryptography``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


@dataclass(eq=False, slots=True)
class MonthKeys:
    """The derived keys of one (month, retention class). Never logged or printed."""

    key_id: str
    month: str
    retention_class: str
    seal_root: bytes = field(repr=False)
    # A keyed HMAC object; pseudonyms copy it, which skips re-keying per identifier
    # (a one-shot HMAC costs ~4x a copy on OpenSSL 3: PERFORMANCE-NOTES.md).
    hmac_proto: HMAC = field(repr=False)
    # The same key as bytes, for the native transform (service/_native.c), which keys
    # OpenSSL's HMAC with it once per batch. Empty where no pseudonyms are made (holds).
    pseudonym_key: bytes = field(default=b"", repr=False)

    @classmethod
    def derive(cls, kid: str, secret: bytes) -> MonthKeys:
        """Derive a month's keys from its secret."""
        if len(secret) != SECRET_BYTES:
            raise ValueError("month secret must be 32 bytes")
        month, rclass = split_key_id(kid)
        seal_root = hkdf(secret, _INFO_SEAL_ROOT + b"/" + kid.encode())
        pkey = hkdf(secret, _INFO_PSEUDONYM + b"/" + kid.encode())
        return cls(kid, month, rclass, seal_root, HMAC(pkey, hashes.SHA256()), pkey)

    def __repr__(self) -> str:
        return f"MonthKeys({self.key_id!r})"
