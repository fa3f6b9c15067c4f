"""The field and retention policy: defaults, every validation error, operator additions."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.errors import ConfigError, PolicyError
from service.policy import DEFAULT_CLASS, Policy, load_policy, parse_policy
from service.sealing import Unsealer
from tests.unit.core_helpers import cdr, make_transformer, now_ms, raw

DEFAULT_BILLING = (
    "cdr_id",
    "event_time",
    "account_id",
    "channel",
    "direction",
    "sender_id",
    "status",
    "parts",
    "duration_s",
    "price",
    "currency",
    "route_id",
    "mcc",
    "mnc",
    "country",
)
DEFAULT_IDENTIFIERS = {"msisdn": "msisdn", "imsi": "imsi", "imei": "imei", "email": "email"}


def _doc(**sections: Any) -> dict[str, Any]:
    """A policy document with the default fields, plus the given top-level sections."""
    doc: dict[str, Any] = {
        "fields": {"billing": list(DEFAULT_BILLING), "identifiers": dict(DEFAULT_IDENTIFIERS)}
    }
    doc.update(copy.deepcopy(sections))
    return doc


def _error(doc: dict[str, Any]) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, "test")
    return str(info.value)


# --- the packaged defaults -------------------------------------------------------------


def test_packaged_defaults_load() -> None:
    p = load_policy()
    assert p.billing_fields == DEFAULT_BILLING
    assert p.identifier_fields == DEFAULT_IDENTIFIERS
    assert p.source == "<packaged defaults>"
    assert p.timezone_name == "UTC"
    assert p.email_domain is False
    assert p.future_tolerance_seconds == 86400
    assert (p.default_class.name, p.default_class.identifier_months) == (DEFAULT_CLASS, 12)
    assert p.default_class.billing_years == 10
    assert p.classes == {DEFAULT_CLASS: p.default_class}
    assert p.class_by_country == {}
    assert {"310", "334", "302"} <= p.three_digit_mnc_mccs
    assert "234" not in p.three_digit_mnc_mccs
    assert (p.max_identifier_months, p.max_billing_years) == (12, 10)


def test_packaged_file_round_trips_through_load_policy(tmp_path: Path) -> None:
    # The packaged TOML is also a valid operator file (the docs say: copy and edit it).
    text = resources.files("service").joinpath("data/policy.toml").read_text("utf-8")
    path = tmp_path / "policy.toml"
    path.write_text(text, "utf-8")
    p = load_policy(path)
    d = load_policy()
    assert (p.billing_fields, p.identifier_fields, p.classes) == (
        d.billing_fields,
        d.identifier_fields,
        d.classes,
    )
    assert p.source == str(path)


def test_minimal_document_uses_defaults() -> None:
    p = parse_policy({"fields": {"billing": ["cdr_id", "event_time", "account_id"]}}, "m")
    assert p.identifier_fields == {}
    assert p.default_class.identifier_months == 12
    assert p.default_class.billing_years == 10
    assert p.three_digit_mnc_mccs == frozenset()


# --- validation errors: each names the key and what was expected ------------------------


@pytest.mark.parametrize("missing", ["cdr_id", "event_time", "account_id"])
def test_required_billing_field_missing(missing: str) -> None:
    doc = _doc()
    doc["fields"]["billing"].remove(missing)
    msg = _error(doc)
    assert "fields.billing" in msg
    assert f"required field {missing!r}" in msg


@pytest.mark.parametrize(
    ("fields", "key", "expected"),
    [
        (5, "[fields]", "a table"),
        ({"billing": "cdr_id"}, "fields.billing", "a list of field names"),
        ({"billing": ["cdr_id", 5]}, "fields.billing", "a list of field names"),
        ({}, "fields.billing", "a list of field names"),
        (
            {"billing": [*DEFAULT_BILLING, "cdr_id"]},
            "fields.billing",
            "no duplicates",
        ),
        (
            {"billing": list(DEFAULT_BILLING), "identifiers": ["msisdn"]},
            "[fields.identifiers]",
            "a table of field = kind",
        ),
    ],
)
def test_fields_shape_errors(fields: object, key: str, expected: str) -> None:
    msg = _error({"fields": fields})
    assert key in msg
    assert f"expected {expected}" in msg


@pytest.mark.parametrize("kind", ["phone", "MSISDN", "", 5, True])
def test_unknown_identifier_kind(kind: object) -> None:
    doc = _doc()
    doc["fields"]["identifiers"]["called"] = kind
    msg = _error(doc)
    assert "fields.identifiers.called" in msg
    assert "expected one of email, imei, imsi, msisdn, opaque" in msg


@pytest.mark.parametrize(
    "kind",
    [
        ["msisdn"],
        {"kind": "msisdn"},
    ],
)
def test_identifier_kind_of_another_toml_type(kind: object) -> None:
    # A list or table is not hashable: still a PolicyError, not a TypeError.
    doc = _doc()
    doc["fields"]["identifiers"]["called"] = kind
    assert "fields.identifiers.called" in _error(doc)


def test_field_in_two_classes() -> None:
    doc = _doc()
    doc["fields"]["billing"].append("msisdn")
    msg = _error(doc)
    assert "['msisdn']" in msg
    assert "expected each field in one class only" in msg


@pytest.mark.parametrize(
    "name",
    [
        *("month", "key_id", "sealed", "msisdn_cc", "imsi_plmn", "imei_tac", "email_domain"),
        *("x_pseudonym", "msisdn_pseudonym"),
    ],
)
@pytest.mark.parametrize("where", ["billing", "identifiers"])
def test_reserved_output_names(name: str, where: str) -> None:
    doc = _doc()
    if where == "billing":
        doc["fields"]["billing"].append(name)
    else:
        doc["fields"]["identifiers"][name] = "opaque"
    msg = _error(doc)
    assert f"field {name!r}" in msg
    assert "expected a name the service does not add itself" in msg


@pytest.mark.parametrize(
    "name",
    ["has space", "1st", "dash-ed", "", "a" * 65, "é", "x\n"],
)
def test_field_names_must_be_plain(name: str) -> None:
    doc = _doc()
    doc["fields"]["billing"].append(name)
    msg = _error(doc)
    assert f"field {name!r}" in msg
    assert "expected a plain field name" in msg


@pytest.mark.parametrize(
    ("kind", "generated"),
    [("msisdn", "called_cc"), ("imsi", "called_plmn"), ("imei", "called_tac")],
)
def test_billing_field_may_not_take_a_generalised_name(kind: str, generated: str) -> None:
    # Else the transform would overwrite that billing value in the sanitised view.
    doc = _doc()
    doc["fields"]["identifiers"]["called"] = kind
    doc["fields"]["billing"].append(generated)
    msg = _error(doc)
    assert generated in msg
    assert "expected" in msg


@pytest.mark.parametrize(
    ("generalise", "key", "expected"),
    [
        (5, "[generalise]", "a table"),
        ({"email_domain": "yes"}, "generalise.email_domain", "true or false"),
        ({"email_domain": 1}, "generalise.email_domain", "true or false"),
        (
            {"imsi_three_digit_mnc_mccs": ["31"]},
            "generalise.imsi_three_digit_mnc_mccs",
            "a list of 3-digit MCC strings",
        ),
        (
            {"imsi_three_digit_mnc_mccs": [310]},
            "generalise.imsi_three_digit_mnc_mccs",
            "a list of 3-digit MCC strings",
        ),
        (
            {"imsi_three_digit_mnc_mccs": "310"},
            "generalise.imsi_three_digit_mnc_mccs",
            "a list of 3-digit MCC strings",
        ),
    ],
)
def test_generalise_errors(generalise: object, key: str, expected: str) -> None:
    msg = _error(_doc(generalise=generalise))
    assert key in msg
    assert f"expected {expected}" in msg


@pytest.mark.parametrize(
    ("retention", "key", "expected"),
    [
        (5, "[retention]", "a table"),
        ({"identifier_months": -1}, "retention.identifier_months", "an integer from 0 to 1200"),
        ({"identifier_months": 1201}, "retention.identifier_months", "an integer from 0 to 1200"),
        ({"identifier_months": 12.0}, "retention.identifier_months", "an integer from 0 to 1200"),
        ({"identifier_months": True}, "retention.identifier_months", "an integer from 0 to 1200"),
        ({"identifier_months": "12"}, "retention.identifier_months", "an integer from 0 to 1200"),
        ({"billing_years": -1}, "retention.billing_years", "an integer from 0 to 100"),
        ({"billing_years": 101}, "retention.billing_years", "an integer from 0 to 100"),
        (
            {"future_tolerance_seconds": -5},
            "retention.future_tolerance_seconds",
            "an integer from 0 to 31622400",
        ),
        (
            {"future_tolerance_seconds": 366 * 86400 + 1},
            "retention.future_tolerance_seconds",
            "an integer from 0 to 31622400",
        ),
        ({"timezone": 5}, "retention.timezone", "an IANA zone name"),
        ({"jurisdictions": []}, "[retention.jurisdictions]", "a table of tables"),
    ],
)
def test_retention_errors(retention: object, key: str, expected: str) -> None:
    msg = _error(_doc(retention=retention))
    assert key in msg
    assert f"expected {expected}" in msg


def test_month_and_year_bounds_are_inclusive() -> None:
    p = parse_policy(_doc(retention={"identifier_months": 1200, "billing_years": 0}), "t")
    assert (p.default_class.identifier_months, p.default_class.billing_years) == (1200, 0)
    p = parse_policy(_doc(retention={"identifier_months": 0, "billing_years": 100}), "t")
    assert (p.default_class.identifier_months, p.default_class.billing_years) == (0, 100)


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "Europe", "", "../../etc/passwd"])
def test_bad_timezone_is_a_config_error(tz: str) -> None:
    with pytest.raises(ConfigError, match=r"expected an IANA name") as info:
        parse_policy(_doc(retention={"timezone": tz}), "t")
    assert repr(tz) in str(info.value)


def test_bad_timezone_names_the_policy_key() -> None:
    assert "retention.timezone" in _error(_doc(retention={"timezone": "Mars/Olympus_Mons"}))


def test_timezone_other_than_utc() -> None:
    p = parse_policy(_doc(retention={"timezone": "Europe/Paris"}), "t")
    assert p.timezone_name == "Europe/Paris"
    assert str(p.tz) == "Europe/Paris"


def _juris(**tables: Any) -> dict[str, Any]:
    return _doc(retention={"jurisdictions": tables})


@pytest.mark.parametrize(
    "name",
    ["IT", "it ", "has space", "x" * 33, "-it", "it\n", "ít"],
)
def test_bad_jurisdiction_name(name: str) -> None:
    msg = _error(_juris(**{name: {"countries": ["IT"]}}))
    assert f"retention.jurisdictions.{name}" in msg
    assert "expected a name of a-z, 0-9, '_', '-' (<= 32)" in msg


def test_jurisdiction_may_not_be_called_default() -> None:
    msg = _error(_juris(default={"countries": ["IT"]}))
    assert "retention.jurisdictions.default" in msg
    assert "expected a name other than 'default'" in msg


def test_jurisdiction_must_be_a_table() -> None:
    msg = _error(_juris(it=24))
    assert "retention.jurisdictions.it" in msg
    assert "expected a table" in msg


@pytest.mark.parametrize(
    "countries",
    [None, [], "IT", ["it"], ["ITA"], ["I"], [""], [39], ["IT", "uk"], ["\u0130T"]],
)
def test_jurisdiction_countries_invalid(countries: object) -> None:
    table: dict[str, Any] = {"identifier_months": 24}
    if countries is not None:
        table["countries"] = countries
    msg = _error(_juris(it=table))
    assert "retention.jurisdictions.it.countries" in msg
    assert 'expected a non-empty list of ISO 3166-1 alpha-2 codes ("IT")' in msg


def test_country_in_two_jurisdictions() -> None:
    msg = _error(_juris(it={"countries": ["IT", "SM"]}, sm={"countries": ["SM"]}))
    assert "retention.jurisdictions.sm.countries" in msg
    assert "expected SM in one jurisdiction only" in msg


def test_country_twice_in_one_jurisdiction() -> None:
    msg = _error(_juris(it={"countries": ["IT", "IT"]}))
    assert "expected IT in one jurisdiction only" in msg


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ({"identifier_months": 1201}, "identifier_months", "an integer from 0 to 1200"),
        ({"identifier_months": -3}, "identifier_months", "an integer from 0 to 1200"),
        ({"billing_years": 101}, "billing_years", "an integer from 0 to 100"),
        ({"billing_years": "10"}, "billing_years", "an integer from 0 to 100"),
    ],
)
def test_jurisdiction_periods_out_of_range(table: dict[str, Any], key: str, expected: str) -> None:
    msg = _error(_juris(it={"countries": ["IT"], **table}))
    assert f"retention.jurisdictions.it.{key}" in msg
    assert f"expected {expected}" in msg


# --- files -------------------------------------------------------------------------------


def test_load_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
[fields]
billing = ["cdr_id", "event_time", "account_id", "country", "campaign_id"]
[fields.identifiers]
msisdn = "msisdn"
[retention]
identifier_months = 6
[retention.jurisdictions.it]
countries = ["IT", "SM", "VA"]
identifier_months = 24
""",
        "utf-8",
    )
    p = load_policy(path)
    assert p.source == str(path)
    assert p.billing_fields[-1] == "campaign_id"
    assert p.default_class.identifier_months == 6
    it = p.classes["it"]
    assert (it.identifier_months, it.billing_years) == (24, 10)
    assert p.max_identifier_months == 24


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[fields\nbilling = oops\n", "utf-8")
    with pytest.raises(PolicyError, match=rf"policy file {re.escape(str(path))} is not valid TOML"):
        load_policy(path)


def test_json_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_bytes(orjson.dumps({"fields": {"billing": ["cdr_id"]}}))
    with pytest.raises(PolicyError, match="is not valid TOML"):
        load_policy(path)


def test_binary_file_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"\xff\xfe[fields]\n")
    with pytest.raises(PolicyError, match="policy file"):
        load_policy(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(PolicyError, match=r"cannot read policy file .*nope\.toml: No such file"):
        load_policy(path)


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory: unreadable as a file whoever runs the test (root ignores mode bits).
    with pytest.raises(PolicyError, match=r"cannot read policy file .*: Is a directory"):
        load_policy(tmp_path)


def test_valid_toml_bad_policy_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[fields]\nbilling = ["cdr_id", "event_time"]\n', "utf-8")
    with pytest.raises(PolicyError, match=r"fields\.billing: expected to include .*'account_id'"):
        load_policy(path)


# --- what the policy does to records -----------------------------------------------------


def _operator_policy() -> Policy:
    doc = _doc()
    doc["fields"]["billing"].append("campaign_id")
    doc["fields"]["identifiers"]["called_msisdn"] = "msisdn"
    return parse_policy(doc, "operator")


def test_added_billing_field_is_kept_unchanged_in_both_views(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path, _operator_policy())
    values: list[object] = ["spring-2026", 17, None, {"nested": [1, 2]}, 3.5]
    r = tf.transform(
        [raw(cdr(cdr_id=f"c{i}", campaign_id=v)) for i, v in enumerate(values)], now_ms()
    )
    assert not r.rejected
    for view in (r.sealed, r.sanitised):
        assert [orjson.loads(o.value)["campaign_id"] for o in view] == values


def test_added_billing_field_is_dropped_under_the_defaults(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path)
    r = tf.transform([raw(cdr(campaign_id="spring-2026"))], now_ms())
    for o in (*r.sealed, *r.sanitised):
        assert b"campaign_id" not in o.value
        assert b"spring-2026" not in o.value


def test_added_identifier_field_is_sealed_and_pseudonymised(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path, _operator_policy())
    called = "+33 6 12 34 56 78"
    r = tf.transform(
        [
            raw(cdr(cdr_id="a", called_msisdn=called)),
            raw(cdr(cdr_id="b", called_msisdn="0033612345678")),
        ],
        now_ms(),
    )
    assert not r.rejected
    san = [orjson.loads(o.value) for o in r.sanitised]
    sealed = [orjson.loads(o.value) for o in r.sealed]
    for doc in san:
        assert doc["called_msisdn_cc"] == "+33"
        assert re.fullmatch(r"[0-9a-f]{32}", doc["called_msisdn_pseudonym"])
        assert "called_msisdn" not in doc
        # Not the caller's pseudonym: a different number.
        assert doc["called_msisdn_pseudonym"] != doc["msisdn_pseudonym"]
    # One number in two spellings: one pseudonym.
    assert san[0]["called_msisdn_pseudonym"] == san[1]["called_msisdn_pseudonym"]
    for doc in sealed:
        assert "called_msisdn" not in doc
        assert "called_msisdn_pseudonym" not in doc
    for o in (*r.sealed, *r.sanitised):
        for spelling in (b"612345678", b"33612345678", b"+33 6 12"):
            assert spelling not in o.value
    u = Unsealer(tf.keyring.get(sealed[0]["key_id"], create=False))
    assert u.unseal(sealed[0]["sealed"], "a")["called_msisdn"] == called
    assert u.unseal(sealed[1]["sealed"], "b")["called_msisdn"] == "0033612345678"


def test_added_identifier_field_is_validated(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path, _operator_policy())
    r = tf.transform([raw(cdr(called_msisdn="12345"))], now_ms())
    assert [(x.reason, x.field) for x in r.rejected] == [("invalid_value", "called_msisdn")]
    assert "12345" not in r.rejected[0].message


def test_unknown_fields_never_reach_any_output(tmp_path: Path) -> None:
    tf = make_transformer(tmp_path)
    secret_values = {
        "text": "meet me at 5 SECRET-1",
        "called_msisdn": "+33612345678",
        "Msisdn": "+447700900999",
        "location": {"lat": 51.5, "cell": "SECRET-2"},
        "imsi_2": "SECRET-3",
        "msisdn_pseudonym": "SECRET-4",
        "month": "SECRET-5",
    }
    rec = cdr(**secret_values)
    r = tf.transform([raw(rec)], now_ms())
    assert not r.rejected
    sealed = orjson.loads(r.sealed[0].value)
    san = orjson.loads(r.sanitised[0].value)
    for name in secret_values:
        if name not in ("msisdn_pseudonym", "month"):  # the service sets those itself
            assert name not in sealed
            assert name not in san
    assert san["month"] == sealed["month"] == "2026-10"
    for o in (r.sealed[0], r.sanitised[0]):
        for needle in (b"SECRET", b"meet me", b"33612345678", b"447700900999", b"51.5"):
            assert needle not in o.value
    # Nor inside the sealed blob: it holds exactly the policy's identifier fields.
    opened = Unsealer(tf.keyring.get(sealed["key_id"], create=False)).unseal(
        sealed["sealed"], sealed["cdr_id"]
    )
    assert set(opened) == {"msisdn", "imsi", "imei"}


# --- retention classes by country --------------------------------------------------------


def test_class_for_by_country() -> None:
    p = parse_policy(
        _juris(
            it={"countries": ["IT", "SM", "VA"], "identifier_months": 24},
            de={"countries": ["DE"], "billing_years": 6},
        ),
        "t",
    )
    assert p.class_for("IT").name == "it"
    assert p.class_for("SM") is p.class_for("VA") is p.classes["it"]
    assert p.class_for("IT").identifier_months == 24
    assert p.class_for("IT").billing_years == 10  # inherited from [retention]
    de = p.class_for("DE")
    assert (de.name, de.identifier_months, de.billing_years) == ("de", 12, 6)
    for other in ("GB", "it", "ITA", "", None, 39, ["IT"]):
        assert p.class_for(other) is p.default_class
    assert p.max_identifier_months == 24
    assert p.max_billing_years == 10
    assert set(p.classes) == {"default", "it", "de"}


def test_jurisdiction_inherits_changed_defaults() -> None:
    p = parse_policy(
        _doc(
            retention={
                "identifier_months": 6,
                "billing_years": 7,
                "jurisdictions": {"it": {"countries": ["IT"]}},
            }
        ),
        "t",
    )
    assert (p.classes["it"].identifier_months, p.classes["it"].billing_years) == (6, 7)
