"""The field and retention policy: which fields are kept, how, and for how long.

The policy is data (service/data/policy.toml holds the defaults) so an operator can add a
billing field, an identifier field or a jurisdiction's retention period without code.
Loading validates everything once; the hot path then reads plain attributes.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import tzinfo
from importlib import resources
from pathlib import Path
from typing import Any

from service.errors import ConfigError, PolicyError
from service.months import zone

DEFAULT_CLASS = "default"
IDENTIFIER_KINDS = frozenset({"msisdn", "imsi", "imei", "email", "opaque"})
# Fields the service itself adds to its outputs: input fields may not take these names.
RESERVED_OUTPUT_FIELDS = frozenset(
    {
        "month",
        "key_id",
        "sealed",
        "msisdn_cc",
        "imsi_plmn",
        "imei_tac",
        "email_domain",
        "billing_digest",
        "integrity_leaf",
    }
)
# \Z, not $: "$" also matches before a trailing newline.
_CLASS_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_REQUIRED = ("cdr_id", "event_time", "account_id")


@dataclass(frozen=True, slots=True)
class RetentionClass:
    """One jurisdiction's periods; ``name`` is part of its month keys' ids."""

    name: str
    identifier_months: int
    billing_years: int


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with ``load_policy``."""

    billing_fields: tuple[str, ...]
    identifier_fields: dict[str, str]  # field name -> kind
    email_domain: bool
    three_digit_mnc_mccs: frozenset[str]
    timezone_name: str
    tz: tzinfo
    future_tolerance_seconds: int
    default_class: RetentionClass
    classes: dict[str, RetentionClass] = field(default_factory=dict)  # by name, default incl.
    class_by_country: dict[str, RetentionClass] = field(default_factory=dict)
    source: str = "<packaged defaults>"

    def class_for(self, country: object) -> RetentionClass:
        """The retention class of a record by its ``country`` field."""
        if isinstance(country, str):
            return self.class_by_country.get(country, self.default_class)
        return self.default_class

    @property
    def max_identifier_months(self) -> int:
        """The longest identifier period of any class (topic retention uses it)."""
        return max(c.identifier_months for c in self.classes.values())

    @property
    def max_billing_years(self) -> int:
        """The longest billing period of any class."""
        return max(c.billing_years for c in self.classes.values())


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise PolicyError(f"policy: {where}: expected {what}")


def _int(table: dict[str, Any], key: str, where: str, lo: int, hi: int, default: int) -> int:
    value = table.get(key, default)
    _expect(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        f"{where}.{key}",
        f"an integer from {lo} to {hi}",
    )
    return int(value)


def parse_policy(data: dict[str, Any], source: str) -> Policy:
    """Validate a policy document (the TOML's table) into a Policy."""
    fields = data.get("fields", {})
    _expect(isinstance(fields, dict), "[fields]", "a table")
    billing = fields.get("billing")
    _expect(
        isinstance(billing, list) and all(isinstance(f, str) for f in billing),
        "fields.billing",
        "a list of field names",
    )
    for name in _REQUIRED:
        _expect(name in billing, "fields.billing", f"to include the required field {name!r}")
    idents = fields.get("identifiers", {})
    _expect(isinstance(idents, dict), "[fields.identifiers]", "a table of field = kind")
    for name, kind in idents.items():
        _expect(
            isinstance(kind, str) and kind in IDENTIFIER_KINDS,
            f"fields.identifiers.{name}",
            "one of " + ", ".join(sorted(IDENTIFIER_KINDS)),
        )
    for name in [*billing, *idents]:
        _expect(bool(_FIELD_NAME.match(name)), f"field {name!r}", "a plain field name")
        _expect(
            name not in RESERVED_OUTPUT_FIELDS and not name.endswith("_pseudonym"),
            f"field {name!r}",
            "a name the service does not add itself",
        )
    generated = {f + suffix for f in idents for suffix in ("_cc", "_plmn", "_tac", "_domain")}
    clash = set(billing) & generated
    _expect(not clash, f"fields {sorted(clash)}", "billing names other than generated ones")
    both = set(billing) & set(idents)
    _expect(not both, f"fields {sorted(both)}", "each field in one class only")
    _expect(len(set(billing)) == len(billing), "fields.billing", "no duplicates")

    gen = data.get("generalise", {})
    _expect(isinstance(gen, dict), "[generalise]", "a table")
    email_domain = gen.get("email_domain", False)
    _expect(isinstance(email_domain, bool), "generalise.email_domain", "true or false")
    mccs = gen.get("imsi_three_digit_mnc_mccs", [])
    _expect(
        isinstance(mccs, list)
        and all(isinstance(m, str) and re.fullmatch(r"\d{3}", m) for m in mccs),
        "generalise.imsi_three_digit_mnc_mccs",
        "a list of 3-digit MCC strings",
    )

    ret = data.get("retention", {})
    _expect(isinstance(ret, dict), "[retention]", "a table")
    tz_name = ret.get("timezone", "UTC")
    _expect(isinstance(tz_name, str), "retention.timezone", "an IANA zone name")
    try:
        tz = zone(tz_name)
    except ConfigError:
        raise PolicyError(
            f"policy: retention.timezone: unknown zone {tz_name!r}: "
            "expected an IANA name such as UTC or Europe/Paris"
        ) from None
    default = RetentionClass(
        DEFAULT_CLASS,
        _int(ret, "identifier_months", "retention", 0, 1200, 12),
        _int(ret, "billing_years", "retention", 0, 100, 10),
    )
    tolerance = _int(ret, "future_tolerance_seconds", "retention", 0, 366 * 86400, 86400)
    classes = {DEFAULT_CLASS: default}
    by_country: dict[str, RetentionClass] = {}
    juris = ret.get("jurisdictions", {})
    _expect(isinstance(juris, dict), "[retention.jurisdictions]", "a table of tables")
    for name, table in juris.items():
        where = f"retention.jurisdictions.{name}"
        _expect(bool(_CLASS_NAME.match(name)), where, "a name of a-z, 0-9, '_', '-' (<= 32)")
        _expect(name != DEFAULT_CLASS, where, f"a name other than {DEFAULT_CLASS!r}")
        _expect(isinstance(table, dict), where, "a table")
        rc = RetentionClass(
            name,
            _int(table, "identifier_months", where, 0, 1200, default.identifier_months),
            _int(table, "billing_years", where, 0, 100, default.billing_years),
        )
        countries = table.get("countries")
        _expect(
            isinstance(countries, list)
            and len(countries) > 0
            and all(isinstance(c, str) and re.fullmatch(r"[A-Z]{2}", c) for c in countries),
            f"{where}.countries",
            'a non-empty list of ISO 3166-1 alpha-2 codes ("IT")',
        )
        for c in countries:
            _expect(c not in by_country, f"{where}.countries", f"{c} in one jurisdiction only")
            by_country[c] = rc
        classes[name] = rc
    return Policy(
        billing_fields=tuple(billing),
        identifier_fields=dict(idents),
        email_domain=email_domain,
        three_digit_mnc_mccs=frozenset(mccs),
        timezone_name=tz_name,
        tz=tz,
        future_tolerance_seconds=tolerance,
        default_class=default,
        classes=classes,
        class_by_country=by_country,
        source=source,
    )


def load_policy(path: Path | None = None) -> Policy:
    """Load and validate the policy file; None loads the packaged defaults."""
    if path is None:
        text = resources.files("service").joinpath("data/policy.toml").read_text("utf-8")
        source = "<packaged defaults>"
    else:
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise PolicyError(f"policy file {path} is not UTF-8 text (TOML)") from None
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {source} is not valid TOML: {exc}") from exc
    return parse_policy(data, source)
