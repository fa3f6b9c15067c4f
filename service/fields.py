"""Checks for the billing fields named in the default policy.

Billing fields are kept exactly as received, so the checks only decide whether a record
is acceptable; they never rewrite a value. Fields an operator adds to the policy have no
check (any JSON value is kept). Each check is (allowed types, value check or None).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import phonenumbers

from service.errors import RecordError

NoneType = type(None)
ValueCheck = Callable[[str, object], None]

# ISO 3166-1 alpha-2 regions from libphonenumber's metadata (well kept, includes the
# territories that have numbering plans); "001" (non-geographic) is not a country.
COUNTRIES = frozenset(r for r in phonenumbers.SUPPORTED_REGIONS if len(r) == 2)
_CURRENCY = re.compile(r"[A-Z]{3}")
_MCC = frozenset(f"{i:03d}" for i in range(1000))
_MNC = frozenset(f"{i:02d}" for i in range(100)) | _MCC


def check_cdr_id(field: str, v: object) -> None:
    if not v or len(v) > 128:  # type: ignore[arg-type]  # only called on str
        raise RecordError("invalid_value", field, "expected 1-128 characters")


def check_account(field: str, v: object) -> None:
    if type(v) is str and not 0 < len(v) <= 256:
        raise RecordError("invalid_value", field, "expected 1-256 characters or an integer")


def check_non_negative(field: str, v: object) -> None:
    if v < 0:  # type: ignore[operator]  # only called on int/float
        raise RecordError("invalid_value", field, "expected a number >= 0")


def _currency(field: str, v: object) -> None:
    if not isinstance(v, str) or not _CURRENCY.fullmatch(v):
        raise RecordError("invalid_value", field, "expected an ISO 4217 code such as EUR")


def _mcc(field: str, v: object) -> None:
    if v not in _MCC:
        raise RecordError("invalid_value", field, "expected a 3-digit mobile country code")


def _mnc(field: str, v: object) -> None:
    if v not in _MNC:
        raise RecordError("invalid_value", field, "expected a 2- or 3-digit mobile network code")


def _country(field: str, v: object) -> None:
    if v not in COUNTRIES:
        raise RecordError("invalid_value", field, "expected an ISO 3166-1 alpha-2 code such as GB")


_STR: frozenset[type] = frozenset({str})
_OPT_STR: frozenset[type] = frozenset({str, NoneType})
_OPT_INT: frozenset[type] = frozenset({int, NoneType})
_OPT_NUM: frozenset[type] = frozenset({int, float, NoneType})
_ACCOUNT: frozenset[type] = frozenset({str, int})

# field -> (allowed types, value check applied to non-null values)
BILLING_CHECKS: dict[str, tuple[frozenset[type], ValueCheck | None]] = {
    "cdr_id": (_STR, check_cdr_id),
    "account_id": (_ACCOUNT, check_account),
    "channel": (_OPT_STR, None),
    "direction": (_OPT_STR, None),
    "sender_id": (_OPT_STR, None),
    "status": (_OPT_STR, None),
    "parts": (_OPT_INT, check_non_negative),
    "duration_s": (_OPT_NUM, check_non_negative),
    # No value check: orjson rejects NaN, Infinity and overflowing numbers on input.
    "price": (_OPT_NUM, None),
    "currency": (_OPT_STR, _currency),
    "route_id": (_OPT_STR, None),
    "mcc": (_OPT_STR, _mcc),
    "mnc": (_OPT_STR, _mnc),
    "country": (_OPT_STR, _country),
}

# Checks whose values come from small sets (codes): the transform remembers the value
# combinations that passed, so repeated ones are not checked again.
MEMO_CHECKED = frozenset({"currency", "mcc", "mnc", "country"})

EXPECTED_TYPE = {
    _STR: "a string",
    _OPT_STR: "a string or null",
    _OPT_INT: "an integer or null",
    _OPT_NUM: "a number or null",
    _ACCOUNT: "a string or an integer",
}

# The codes service/_native.c knows the value checks by (service/native.py passes them);
# a check missing here keeps the native path off, so every record takes the Python path.
NATIVE_CHECK_CODES: dict[ValueCheck | None, int] = {
    None: 0,
    check_cdr_id: 1,
    check_account: 2,
    check_non_negative: 3,
    _currency: 4,
    _mcc: 5,
    _mnc: 6,
    _country: 7,
}
