"""``cdranon deadlines``: when a record's identifiers and billing fields must be gone."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from service.commands.common import add_policy_flag, policy_from
from service.errors import ConfigError
from service.fields import COUNTRIES
from service.months import (
    billing_until,
    identifiers_until,
    month_of,
    month_of_ms,
    parse_rfc3339,
    rfc3339,
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "deadlines",
        help="print a record's month and deadlines as JSON",
        description="Print the calendar month of an event time and the instants from which "
        "its identifiers and its billing fields must be gone (RFC 3339, UTC).",
    )
    p.add_argument(
        "--event-time",
        required=True,
        metavar="TS",
        help="RFC 3339 time (2025-11-30T23:59:59Z, +01:00 offsets honoured) or epoch millis",
    )
    p.add_argument("--country", metavar="CC", default=None, help="ISO 3166-1 alpha-2 code")
    add_policy_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = policy_from(args)
    text: str = args.event_time
    try:
        if text.lstrip("-").isdigit():
            month = month_of_ms(int(text), policy.tz)
        else:
            month = month_of(parse_rfc3339(text), policy.tz)
    except ValueError:
        raise ConfigError(
            f"--event-time {text!r}: expected RFC 3339 (2025-11-30T23:59:59Z) or epoch millis"
        ) from None
    if args.country is not None and args.country not in COUNTRIES:
        raise ConfigError(f"--country {args.country!r}: expected an ISO 3166-1 alpha-2 code (GB)")
    rclass = policy.class_for(args.country)
    out = {
        "month": month,
        "retention_class": rclass.name,
        "identifiers_until": rfc3339(identifiers_until(month, rclass.identifier_months, policy.tz)),
        "billing_until": rfc3339(billing_until(month, rclass.billing_years, policy.tz)),
    }
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
