"""Duplicate keys in JSON text: orjson keeps the last of duplicate keys, another parser may
keep the first, so a document with duplicates can be read two ways downstream. The
transform rejects such input; the verifier reports such a record as altered (the service
never writes one).
"""

from __future__ import annotations

import json
from typing import Any

WS_TO_SPACE = bytes.maketrans(b"\t\n\r", b"   ")


def surely_unique(raw: bytes, n_keys: int) -> bool:
    """True when ``raw`` (parsed into an object of ``n_keys`` keys) surely has no duplicate
    key at any level; False means: check with :func:`check_unique`.

    A key is a string, so it ends in a quote, and JSON allows only whitespace between it
    and its colon. Without whitespace before any colon, every key in the text (at any
    level, repeated or not, escaped or not) therefore adds one ``":`` to the count; other
    ``":`` (a string value starting with a colon, an escaped quote before a colon) only
    add more. So ``raw.count(b'":') == n_keys`` proves the text holds no more keys than
    the ``n_keys`` distinct top-level ones: none repeated, none nested. The exact check
    (json with a pairs hook) costs ~4 us. The transform inlines this test; this function
    is its reference.
    """
    # One pass for all four whitespace bytes: translate them to a space, then look for " :"
    # (four separate scans cost ~2 us on a typical CDR; this ~0.8 us).
    return raw.count(b'":') == n_keys and b" :" not in raw.translate(WS_TO_SPACE)


class DuplicateKeyError(ValueError):
    """An object in the text repeats a key (which one is not said: it is input)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise DuplicateKeyError("an object has a duplicate key")
    return out


def check_unique(raw: bytes) -> None:
    """DuplicateKeyError if any object in ``raw`` (valid JSON for orjson) repeats a key.

    Also raises what the stdlib parser raises where it refuses what orjson accepts:
    RecursionError (nesting past Python's recursion limit) or another ValueError (e.g. its
    integer digit limit).
    """
    json.loads(raw, object_pairs_hook=_no_duplicates)


def has_duplicate_keys(raw: bytes, n_keys: int) -> bool:
    """True if ``raw`` (parsed by orjson into an object of ``n_keys`` keys) repeats a key
    in any object, or cannot be checked (the stdlib parser refuses it)."""
    if surely_unique(raw, n_keys):
        return False
    try:
        check_unique(raw)
    except (RecursionError, ValueError):
        return True
    return False
