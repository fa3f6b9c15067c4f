""" "Original form": digests of the retained (billing) fields and Merkle roots over them.

Canonical encoding of a record's billing fields, the bytes the digest is taken over:
- the billing fields exactly as received (the sanitised view keeps them unchanged), and
  nothing the service added (month, key_id, generalised parts, pseudonyms, the digest,
  the leaf tag);
- one JSON object, keys sorted by code point (= UTF-8 byte order), no whitespace;
- numbers as orjson writes them: integers in decimal, floats in their shortest
  round-trip form (0.0425, 1e+16); strings as UTF-8 with JSON's minimal escapes;
- no Unicode normalisation: "original form" means the exact characters received, so
  two inputs that differ only in normalisation keep different digests.
digest = SHA-256(canonical bytes), written as 64 hex digits in ``billing_digest``.

Per batch and month stream, the writer signs the RFC 6962 Merkle root of the batch's
digests (service/merkle.py) into the audit log: ``cdranon process`` names the line range
of the month file; ``cdranon run`` names the batch, and each sanitised record carries its
leaf as its last field, ``"integrity_leaf":"<batch>/<index>"``, since concurrent
processors interleave in a partition (the transform writes it, as cheap as the digest;
a Kafka header per record cost the processor ~2 us a record). ``cdranon verify``
recomputes the digests and the roots (service/verify.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256
from typing import Any

import orjson

from service.identifiers import general_field
from service.policy import Policy

DIGEST_FIELD = "billing_digest"
# A sanitised record's place in its batch's tree ("<batch>/<index>"), written by the
# transform for ``cdranon run`` (service/kafka/runner.py); not in batch-mode files.
LEAF_FIELD = "integrity_leaf"


def added_fields(policy: Policy) -> frozenset[str]:
    """The names the service adds to a sanitised record under this policy; every other
    field of a sanitised record is a billing field as received."""
    names = {"month", "key_id", DIGEST_FIELD, LEAF_FIELD}
    for field, kind in policy.identifier_fields.items():
        names.add(field + "_pseudonym")
        gen = general_field(field, kind)
        if gen is not None:
            names.add(gen)
    return frozenset(names)


def canonical(billing: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a record's billing fields (see the module docstring)."""
    return orjson.dumps(billing, option=orjson.OPT_SORT_KEYS)


def digest(billing: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical bytes, hex."""
    return sha256(canonical(billing)).hexdigest()


def billing_part(sanitised: Mapping[str, Any], added: frozenset[str]) -> dict[str, Any]:
    """The billing fields of a sanitised record: all but what the service added."""
    return {k: v for k, v in sanitised.items() if k not in added}


_LEAF_KEY = b',"' + LEAF_FIELD.encode() + b'":"'


def parse_leaf(tag: bytes | str | None) -> tuple[str, int] | None:
    """``"<batch>/<index>"`` -> (batch, index), or None if malformed."""
    if tag is None:
        return None
    text = tag.decode("ascii", "replace") if isinstance(tag, bytes) else tag
    batch, sep, index = text.rpartition("/")
    if not sep or not batch or not index.isdigit():
        return None
    return batch, int(index)


def leaf_of(value: bytes) -> tuple[str, int] | None:
    """The leaf a sanitised record names in its ``integrity_leaf`` field, or None.

    Found by its bytes, without parsing the record (verify reads millions): a JSON string
    cannot hold an unescaped quote, so ``,"integrity_leaf":"`` only ever starts a key.
    The last one counts; a record that names it twice fails its digest check anyway
    (a repeated key, service/verify.py), and a tag moved or mangled finds no slot.
    """
    at = value.rfind(_LEAF_KEY)
    if at < 0:
        return None
    start = at + len(_LEAF_KEY)
    end = value.find(b'"', start)
    return parse_leaf(value[start:end]) if end > 0 else None
