"""The transform's native path (service/_native.c): whether it runs, and its tables.

The C engine writes the common records (flat, printable ASCII, canonical numbers, every
check passed) byte for byte as the Python path in service/transform.py would, and
declines every other record to that path, which stays the reference. It is built at
install time (setup.py) and needs libcrypto; when it is missing, or
``CDRANON_NATIVE=0``, or the policy uses something the engine has no table for (a
reference zone other than UTC, a check it does not know), the Python path does
everything, with the same outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

from orjson import dumps

from service.fields import COUNTRIES, NATIVE_CHECK_CODES
from service.identifiers import CALLING_CODES
from service.policy import Policy, RetentionClass

_native: ModuleType | None
try:
    from service import _native  # type: ignore[attr-defined, no-redef, unused-ignore]
except ImportError:  # not built (no compiler or libcrypto at install): the Python path
    _native = None

ENV = "CDRANON_NATIVE"
# Value types by the bits the engine tests them with.
_TYPE_BITS = {str: 1, int: 2, float: 4, type(None): 8, bool: 16}
_ANY = 31
_KINDS = {"msisdn": 0, "imsi": 1, "imei": 2, "email": 3}
_OPAQUE = 4


def available() -> bool:
    """True when the extension is built and importable."""
    return _native is not None


def wanted() -> bool:
    """True unless CDRANON_NATIVE=0 (or false/no/off) turns the native path off."""
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


# digests(values, added names, digest field) -> (digests, leaf hashes, status, cdr_ids)
Digests = Callable[[Any, tuple[bytes, ...], bytes], tuple[list[Any], list[Any], bytes, list[Any]]]


def native_digests() -> Digests | None:
    """The native digest pass of verification (service/verify.py), or None when the
    extension is not built or CDRANON_NATIVE=0."""
    if _native is None or not wanted():
        return None
    fn: Digests = _native.digests
    return fn


def native_merkle() -> (
    tuple[Callable[[Sequence[bytes] | bytes | bytearray], bytes], Callable[[Sequence[str]], bytes]]
    | None
):
    """(merkle_root, merkle_root_of_hex) of the extension (service/merkle.py checks them
    against its Python reference), or None when not built or CDRANON_NATIVE=0.
    merkle_root takes the leaf hashes as a sequence or as one buffer, end to end."""
    if _native is None or not wanted():
        return None
    return _native.merkle_root, _native.merkle_root_of_hex


def openssl_version() -> str | None:
    """The libcrypto the extension was linked with (for `cdranon config` and bug reports)."""
    return None if _native is None else str(_native.OPENSSL_VERSION)


def key_fragment(name: str) -> bytes:
    """',"name":' as JSON: field names come from the policy file, so they are escaped.
    Both transform paths splice the outputs from such fragments."""
    return b"," + dumps(name) + b":"


def _types(allowed: frozenset[type] | None) -> int | None:
    if allowed is None:
        return _ANY
    bits = 0
    for t in allowed:
        bit = _TYPE_BITS.get(t)
        if bit is None:
            return None
        bits |= bit
    return bits


def build_engine(
    policy: Policy,
    spec: Mapping[str, tuple[int, Any, Any, str | None]],
    general: list[str],
    max_record_bytes: int,
    utc: bool,
) -> tuple[Any, list[RetentionClass]] | None:
    """The engine for a Transformer's field table, with the retention classes by the
    index the engine passes back; None when the native path is off or cannot apply.

    ``spec``: field -> (0 billing / 1 identifier, types / checker, check / kind, general
    field), as Transformer builds it; ``general``: the generalised fields in the order
    the sanitised view lists the absent ones.
    """
    if _native is None or not wanted() or not utc or len(general) > 8:
        return None
    specs = []
    for name, (cls, a, b, gen) in spec.items():
        if cls == 0:
            types = _types(a)
            check = NATIVE_CHECK_CODES.get(b, -1)
            if types is None or check < 0:
                return None
            specs.append((name.encode(), False, types, check, 0, False, -1, b"", b"", b"", b""))
        else:
            kind = str(b)
            specs.append(
                (
                    name.encode(),
                    True,
                    0,
                    0,
                    _KINDS.get(kind, _OPAQUE),
                    policy.email_domain,
                    general.index(gen) if gen is not None else -1,
                    kind.encode() + b"\x00",
                    key_fragment(gen) if gen is not None else b"",
                    key_fragment(name + "_pseudonym") + b'"',
                    dumps(name) + b":",
                )
            )
    absent = tuple(
        b"".join(key_fragment(g) + b"null" for i, g in enumerate(general) if not mask >> i & 1)
        for mask in range(1 << len(general))
    )
    classes = [policy.default_class]
    index: dict[str, int] = {}
    class_of: dict[str, int] = {}
    for code, rclass in policy.class_by_country.items():
        if not (len(code) == 2 and code.isascii() and code.isupper() and code.isalpha()):
            return None
        if rclass.name == policy.default_class.name:
            continue  # the engine's class 0
        if rclass.name not in index:
            index[rclass.name] = len(classes)
            classes.append(rclass)
        class_of[code] = index[rclass.name]
    if len(classes) > 255:
        return None
    engine = _native.Engine(
        tuple(specs),
        absent,
        sorted(COUNTRIES),
        class_of,
        sorted(CALLING_CODES),
        sorted(policy.three_digit_mnc_mccs),
        max_record_bytes,
    )
    return engine, classes
