"""End-user identifiers: validation, normalisation and the coarse generalised parts.

Each ``check_<kind>`` takes the raw input value and returns ``(normalised, general)``:
the normalised form is what the pseudonym is computed over (so that "+44 7700 900123" and
"00447700900123" get one pseudonym), ``general`` the non-personal part kept in the
sanitised view (country calling code, home network, device type), or None.
Errors raise RecordError naming the field and what was expected, never the value.
"""

from __future__ import annotations

from collections.abc import Callable

import phonenumbers

from service.errors import RecordError

# E.164 country calling codes from libphonenumber's metadata (the phonenumbers package):
# well kept, updated with the numbering plans, not a hand-written table.
CALLING_CODES = frozenset(str(cc) for cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
_MSISDN_STRIP = str.maketrans("", "", " -.()/\t")
_DIGITS = frozenset("0123456789")
# Luhn: the value of a digit in a doubled position.
_LUHN_DOUBLE = {str(d): (2 * d if d < 5 else 2 * d - 9) for d in range(10)}
_LUHN_SINGLE = {str(d): d for d in range(10)}

Checker = Callable[[str, object], tuple[str, str | None]]


def _ascii_digits(s: str) -> bool:
    # str.isdigit() also accepts '²' and other scripts' digits; identifiers are ASCII.
    return s.isascii() and s.isdigit()


def calling_code(digits: str) -> str | None:
    """The E.164 country calling code that prefixes ``digits`` (1 to 3 digits), or None."""
    for n in (1, 2, 3):
        if digits[:n] in CALLING_CODES:
            return digits[:n]
    return None


def check_msisdn(field: str, value: object) -> tuple[str, str | None]:
    """E.164-ish: optional '+' or '00', then 8-15 digits with a known calling code.

    Spaces, dashes, dots, slashes and parentheses are ignored. Normalised: '+' and digits.
    """
    if type(value) is not str:
        raise RecordError("wrong_type", field, "expected a string (E.164 phone number)")
    s = value if value[:1] == "+" and _ascii_digits(value[1:]) else value.translate(_MSISDN_STRIP)
    if s[:1] == "+":
        d = s[1:]
    elif s[:2] == "00":
        d = s[2:]
    else:
        d = s
    if not (8 <= len(d) <= 15 and _ascii_digits(d) and d[0] != "0"):
        raise RecordError(
            "invalid_value", field, "expected an international number: '+' or '00', 8-15 digits"
        )
    cc = calling_code(d)
    if cc is None:
        raise RecordError(
            "invalid_value", field, "number does not start with an E.164 country code"
        )
    return "+" + d, "+" + cc


def make_check_imsi(three_digit_mnc_mccs: frozenset[str]) -> Checker:
    """IMSI checker: 14-15 digits; general part = home network 'MCC-MNC'."""

    def check_imsi(field: str, value: object) -> tuple[str, str | None]:
        if type(value) is not str:
            raise RecordError("wrong_type", field, "expected a string of 14-15 digits (IMSI)")
        if not (14 <= len(value) <= 15 and _ascii_digits(value)):
            raise RecordError("invalid_value", field, "expected an IMSI of 14-15 digits")
        mcc = value[:3]
        mnc = value[3:6] if mcc in three_digit_mnc_mccs else value[3:5]
        return value, f"{mcc}-{mnc}"

    return check_imsi


def luhn_ok(digits: str) -> bool:
    """True if the decimal string passes the Luhn check (its last digit is the check digit)."""
    # map() over a dict's __getitem__ keeps the loop in C (3x a generator expression).
    total = sum(map(_LUHN_SINGLE.__getitem__, digits[-1::-2]))
    total += sum(map(_LUHN_DOUBLE.__getitem__, digits[-2::-2]))
    return total % 10 == 0


def check_imei(field: str, value: object) -> tuple[str, str | None]:
    """IMEI (14 digits, 15 with the Luhn check digit) or IMEISV (16); general part = TAC."""
    if type(value) is not str:
        raise RecordError("wrong_type", field, "expected a string of 14-16 digits (IMEI)")
    if not (14 <= len(value) <= 16 and _ascii_digits(value)):
        raise RecordError("invalid_value", field, "expected an IMEI of 14-16 digits")
    if len(value) == 15 and not luhn_ok(value):
        raise RecordError("invalid_value", field, "a 15-digit IMEI must pass the Luhn check")
    return value, value[:8]


def make_check_email(keep_domain: bool) -> Checker:
    """E-mail: local@domain, <= 254 characters; normalised to lower case."""

    def check_email(field: str, value: object) -> tuple[str, str | None]:
        if type(value) is not str:
            raise RecordError("wrong_type", field, "expected a string (e-mail address)")
        local, at, domain = value.rpartition("@")
        if (
            not at
            or not local
            or len(local) > 64
            or len(value) > 254
            or "." not in domain
            or domain.startswith(".")
            or domain.endswith(".")
            or not value.isprintable()
            or " " in value
        ):
            raise RecordError("invalid_value", field, "expected an e-mail address local@domain")
        norm = value.lower()
        return norm, (domain.lower() if keep_domain else None)

    return check_email


def check_opaque(field: str, value: object) -> tuple[str, str | None]:
    """Any other identifier: a non-empty string of at most 256 characters."""
    if type(value) is not str:
        raise RecordError("wrong_type", field, "expected a string")
    if not 0 < len(value) <= 256:
        raise RecordError("invalid_value", field, "expected 1-256 characters")
    return value, None


# The suffix of the generalised field each kind adds to the sanitised view:
# msisdn -> msisdn_cc, imsi -> imsi_plmn, imei -> imei_tac, email -> email_domain.
_GENERAL_SUFFIX = {"msisdn": "_cc", "imsi": "_plmn", "imei": "_tac", "email": "_domain"}


def general_field(field: str, kind: str) -> str | None:
    """The sanitised view's name for the generalised part of an identifier field."""
    suffix = _GENERAL_SUFFIX.get(kind)
    return field + suffix if suffix else None


def checker_for(kind: str, *, three_digit_mnc_mccs: frozenset[str], email_domain: bool) -> Checker:
    """The checker of an identifier kind, configured from the policy."""
    if kind == "msisdn":
        return check_msisdn
    if kind == "imsi":
        return make_check_imsi(three_digit_mnc_mccs)
    if kind == "imei":
        return check_imei
    if kind == "email":
        return make_check_email(email_domain)
    return check_opaque
