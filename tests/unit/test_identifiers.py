"""Identifier checks: normalisation, generalised parts, rejections, and no value in errors."""

from __future__ import annotations

from collections.abc import Callable

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import RecordError
from service.identifiers import (
    calling_code,
    check_imei,
    check_msisdn,
    check_opaque,
    checker_for,
    general_field,
    luhn_ok,
    make_check_email,
    make_check_imsi,
)
from service.policy import load_policy

THREE_DIGIT = load_policy().three_digit_mnc_mccs
check_imsi = make_check_imsi(THREE_DIGIT)
check_email = make_check_email(False)
check_email_domain = make_check_email(True)
Checker = Callable[[str, object], tuple[str, str | None]]


def _reason(check: Checker, value: object) -> tuple[str, str | None]:
    with pytest.raises(RecordError) as info:
        check("f", value)
    return info.value.reason, info.value.field


# --- MSISDN ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "+447700900123",
        "+44 7700 900123",
        "+44-7700-900-123",
        "+44 (7700) 900123",
        "(+44) 7700.900123",
        "+44/7700/900123",
        "+44\t7700900123",
        "00447700900123",
        "0044 7700 900123",
        "447700900123",
        "44 7700 900 123",
    ],
)
def test_msisdn_spellings_normalise_to_one_form(spelling: str) -> None:
    assert check_msisdn("msisdn", spelling) == ("+447700900123", "+44")


@pytest.mark.parametrize(
    ("value", "cc"),
    [
        ("+1 (202) 555-0143", "+1"),
        ("+7 912 345 6789", "+7"),
        ("+44 7700 900123", "+44"),
        ("+33 6 12 34 56 78", "+33"),
        ("+353 87 123 4567", "+353"),
        ("+880 1712-345678", "+880"),
        ("+234 803 123 4567", "+234"),
        ("+971 50 123 4567", "+971"),
        ("+8821 6123 4567", "+882"),  # international networks: a non-geographic code
    ],
)
def test_msisdn_calling_codes_of_one_two_three_digits(value: str, cc: str) -> None:
    norm, general = check_msisdn("msisdn", value)
    assert general == cc
    assert norm.startswith(cc)
    assert norm == "+" + "".join(c for c in value if c.isdigit())


def test_calling_codes_come_from_phonenumbers_metadata() -> None:
    codes = {str(c) for c in phonenumbers.COUNTRY_CODE_TO_REGION_CODE}
    assert {"1", "44", "353", "880"} <= codes
    for code in codes:
        # E.164 codes are prefix-free, so the first match is the right one for every code.
        assert calling_code(code + "7" * 10) == code
    for unassigned in ("999", "801", "0", ""):
        assert not {unassigned[:1], unassigned[:2], unassigned} & codes
        assert calling_code(unassigned + "000000000") is None


@pytest.mark.parametrize(
    "value",
    [
        "+4477009",  # 7 digits: too short
        "1234567",
        "+4477009001234567",  # 16 digits: too long
        "+044 7700 900123",  # leading 0 after the prefix (a trunk prefix, not E.164)
        "07700 900123",  # national format
        "0007700900123",
        "+999 1234 5678",  # no such calling code
        "+801 2345 6789",
        "+44 7700 9001\u0662\u0663",  # Arabic-Indic digits
        "+\uff14\uff147700900123",  # fullwidth digits
        "+44 7700 90012\u00b3",  # superscript three (str.isdigit() says yes)
        "+44 7700 9001ab",  # letters
        "+44 7700 900123 ext 5",
        "++447700900123",
        "+44+7700900123",
        "",
        "+",
        "00",
    ],
)
def test_msisdn_rejections(value: str) -> None:
    assert _reason(check_msisdn, value) == ("invalid_value", "f")


@pytest.mark.parametrize("value", [447700900123, None, 4.4, ["+447700900123"], b"+447700900123"])
def test_msisdn_wrong_type(value: object) -> None:
    assert _reason(check_msisdn, value) == ("wrong_type", "f")


# --- IMSI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "plmn"),
    [
        ("310150123456789", "310-150"),  # US: three-digit MNC
        ("334020123456789", "334-020"),  # MX: three-digit MNC
        ("234150000000001", "234-15"),  # GB: two-digit MNC
        ("20801123456789", "208-01"),  # 14 digits
        ("262011234567890", "262-01"),
    ],
)
def test_imsi_plmn(value: str, plmn: str) -> None:
    assert check_imsi("imsi", value) == (value, plmn)


def test_imsi_mnc_length_follows_the_policy_list() -> None:
    assert make_check_imsi(frozenset())("imsi", "310150123456789")[1] == "310-15"
    assert make_check_imsi(frozenset({"234"}))("imsi", "234150000000001")[1] == "234-150"


@pytest.mark.parametrize(
    "value",
    [
        "2341500000000",  # 13 digits
        "2341500000000012",  # 16 digits
        "23415000000000a",
        "234 150000000001",
        "23415000000000\u0661",
        "",
    ],
)
def test_imsi_rejections(value: str) -> None:
    assert _reason(check_imsi, value) == ("invalid_value", "f")


@pytest.mark.parametrize("value", [234150000000001, None])
def test_imsi_wrong_type(value: object) -> None:
    assert _reason(check_imsi, value) == ("wrong_type", "f")


# --- IMEI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tac"),
    [
        ("49015420323751", "49015420"),  # 14 digits: no check digit, no Luhn
        ("49015420323750", "49015420"),
        ("490154203237518", "49015420"),  # 15 digits, valid Luhn
        ("3567890123456789", "35678901"),  # 16 digits: IMEISV, no Luhn
        ("4901542032375100", "49015420"),
    ],
)
def test_imei_accepted_with_tac(value: str, tac: str) -> None:
    assert check_imei("imei", value) == (value, tac)


@pytest.mark.parametrize(
    "value",
    [
        "490154203237519",  # bad Luhn
        "490154203237510",
        "4901542032375",  # 13 digits
        "49015420323751800",  # 17 digits
        "49015420323751x",
        "49015420-3237518",
        "4901542032375\u0661\u0668",
    ],
)
def test_imei_rejections(value: str) -> None:
    assert _reason(check_imei, value) == ("invalid_value", "f")


def test_imei_luhn_message_says_luhn() -> None:
    with pytest.raises(RecordError, match="Luhn"):
        check_imei("imei", "490154203237519")


def _luhn_reference(digits: str) -> bool:
    # The textbook form: double every second digit from the right, sum the digits.
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@pytest.mark.parametrize(
    ("digits", "ok"),
    [("79927398713", True), ("79927398710", False), ("490154203237518", True), ("0", True)],
)
def test_luhn_known_values(digits: str, ok: bool) -> None:
    assert luhn_ok(digits) is ok


@settings(max_examples=500)
@given(st.text("0123456789", min_size=1, max_size=40))
def test_luhn_matches_the_reference(digits: str) -> None:
    assert luhn_ok(digits) == _luhn_reference(digits)


@settings(max_examples=200)
@given(st.text("0123456789", min_size=14, max_size=14))
def test_exactly_one_check_digit_completes_an_imei(body: str) -> None:
    good = [d for d in "0123456789" if luhn_ok(body + d)]
    assert len(good) == 1
    assert check_imei("imei", body + good[0]) == (body + good[0], body[:8])


# --- e-mail ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "norm", "domain"),
    [
        ("Jo@Example.org", "jo@example.org", "example.org"),
        ("jo.smith+tag@mail.example.co.uk", "jo.smith+tag@mail.example.co.uk", "example.co.uk"),
        ("UPPER@EXAMPLE.COM", "upper@example.com", "example.com"),
    ],
)
def test_email_lower_cased_with_domain(value: str, norm: str, domain: str) -> None:
    assert check_email("email", value) == (norm, None)
    got_norm, got_domain = check_email_domain("email", value)
    assert got_norm == norm
    assert got_domain is not None
    assert got_domain == value.rpartition("@")[2].lower()
    assert got_domain.endswith(domain)


@pytest.mark.parametrize(
    "value",
    [
        "not-an-address",
        "@example.org",
        "jo@",
        "jo@localhost",
        "jo@.example.org",
        "jo@example.org.",
        "jo smith@example.org",
        "jo@exa mple.org",
        "jo\n@example.org",
        "jo\x00@example.org",
        "a" * 65 + "@example.org",
        "jo@" + "a" * 250 + ".org",
        "",
    ],
)
def test_email_rejections(value: str) -> None:
    assert _reason(check_email, value) == ("invalid_value", "f")


# --- opaque and dispatch ---------------------------------------------------------------


def test_opaque() -> None:
    assert check_opaque("x", "anything at all") == ("anything at all", None)
    assert _reason(check_opaque, "") == ("invalid_value", "f")
    assert _reason(check_opaque, "a" * 257) == ("invalid_value", "f")
    assert _reason(check_opaque, 5) == ("wrong_type", "f")


def test_checker_for_and_general_field() -> None:
    def checker(kind: str) -> Checker:
        return checker_for(kind, three_digit_mnc_mccs=THREE_DIGIT, email_domain=True)

    assert checker("msisdn") is check_msisdn
    assert checker("imei") is check_imei
    assert checker("opaque") is check_opaque
    assert checker("imsi")("i", "310150123456789")[1] == "310-150"
    assert checker("email")("e", "a@B.org")[1] == "b.org"
    assert general_field("called_msisdn", "msisdn") == "called_msisdn_cc"
    assert general_field("imsi", "imsi") == "imsi_plmn"
    assert general_field("imei", "imei") == "imei_tac"
    assert general_field("email", "email") == "email_domain"
    assert general_field("ref", "opaque") is None


# --- no value in any error -------------------------------------------------------------

_CHECKERS: dict[str, Checker] = {
    "msisdn": check_msisdn,
    "imsi": check_imsi,
    "imei": check_imei,
    "email": check_email,
    "opaque": check_opaque,
}
# One failing input per failure path: the messages they give are all the messages there
# are. If a message depended on the value, a new value would give a message not seen here.
_CATALOGUE: dict[str, list[object]] = {
    "msisdn": [1, "12", "+99912345678"],
    "imsi": [1, "12"],
    "imei": [1, "12", "490154203237519"],
    "email": [1, "x"],
    "opaque": [1, ""],
}


def _messages(kind: str) -> set[str]:
    out = set()
    for value in _CATALOGUE[kind]:
        with pytest.raises(RecordError) as info:
            _CHECKERS[kind]("field_x", value)
        out.add(str(info.value))
    return out


_KNOWN = {kind: _messages(kind) for kind in _CHECKERS}

_values = st.one_of(
    st.text(max_size=40),
    st.text("0123456789+-() ", max_size=20),
    st.builds(lambda s: "+44" + s, st.text("0123456789x", max_size=16)),
    st.text("0123456789", min_size=13, max_size=17),
    st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=70), st.text(max_size=12)),
)


def test_catalogue_messages_name_the_field_and_no_value() -> None:
    for kind, messages in _KNOWN.items():
        assert messages, kind
        for m in messages:
            assert m.startswith("field 'field_x': ")
            for value in _CATALOGUE[kind]:
                if isinstance(value, str) and len(value) > 1:
                    assert value not in m


@settings(max_examples=400)
@given(kind=st.sampled_from(sorted(_CHECKERS)), value=_values)
def test_no_error_message_depends_on_the_value(kind: str, value: str) -> None:
    error: RecordError | None = None
    try:
        _CHECKERS[kind]("field_x", value)
    except RecordError as exc:
        error = exc
    if error is not None:
        assert str(error) in _KNOWN[kind], str(error)
        assert error.field == "field_x"
        assert error.reason in {"invalid_value", "wrong_type"}
