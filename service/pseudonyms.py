"""Pseudonyms: truncated HMAC-SHA256 of a normalised identifier under the month's key.

Stable within a month (same month key), unlinkable across months (different keys), and
anonymous once the month secret is destroyed: without the key, nobody can hash the whole
number space to reverse them, which an unkeyed hash would allow in minutes.
The kind is part of the MAC input, so an IMSI and an MSISDN with the same digits differ.
128 bits (32 hex characters) keeps collisions negligible at 10^11 identifiers a month.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.hmac import HMAC

PSEUDONYM_BYTES = 16


def pseudonym(proto: HMAC, kind: str, normalised: str) -> str:
    """The pseudonym of ``normalised`` (of ``kind``) under the keyed HMAC ``proto``."""
    h = proto.copy()
    h.update(kind.encode() + b"\x00" + normalised.encode())
    return h.finalize()[:PSEUDONYM_BYTES].hex()
