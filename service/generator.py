"""Realistic synthetic CDRs, deterministic by seed: the input the demo, tests and load tests use.

A pure iterator (no I/O): each item is one JSON object as UTF-8 bytes, as the ``cdr.raw``
topic carries it. The traffic looks like a messaging platform's: a few hundred customer
accounts send SMS, voice, chat and e-mail to a pool of subscribers (default 50k) in a
dozen countries, so identifiers repeat across records as in real traffic. Identifiers
are valid: MSISDNs pass libphonenumber's ``is_valid_number`` for their country, IMSIs
start with the subscriber's home MCC+MNC, IMEIs carry a real-looking TAC and a correct
Luhn check digit.

Time runs forward through the listed months (record *i* of *n* sits at *i/n* of the
span), so a stream touches every month in order; ``late_ratio`` of the records carry an
event time from an older listed month (or earlier in the first month). ``event_time`` is
RFC 3339 with ``Z`` mostly, ~10% with the country's UTC offset, ~2% integer epoch millis;
whatever the form, the instant lies in a listed month (UTC).

``malformed_ratio`` of the records are broken in one of five ways (see
``MALFORMED_KINDS``) that a validating consumer must reject.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson
import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from service.errors import ConfigError
from service.months import add_months, month_start, parse_month, to_ms

MALFORMED_KINDS = (
    "bad_json",
    "missing_cdr_id",
    "invalid_msisdn",
    "bad_imei_luhn",
    "bad_event_time",
)
CHANNELS = ("sms", "voice", "chat", "email")

# (ISO 3166 alpha-2, weight, home MCC, MNCs, UTC offset in minutes (standard time)).
# MCCs 310 (US) and 334 (MX) use three-digit MNCs.
_COUNTRIES: tuple[tuple[str, int, str, tuple[str, ...], int], ...] = (
    ("GB", 20, "234", ("10", "15", "20", "30", "33"), 0),
    ("US", 15, "310", ("260", "410", "120", "150"), -300),
    ("FR", 12, "208", ("01", "10", "15", "20"), 60),
    ("DE", 12, "262", ("01", "02", "03", "07"), 60),
    ("IN", 12, "404", ("10", "20", "45", "92"), 330),
    ("BR", 8, "724", ("05", "06", "10", "31"), -180),
    ("ES", 5, "214", ("01", "03", "07"), 60),
    ("IT", 5, "222", ("01", "10", "88"), 60),
    ("NL", 4, "204", ("04", "08", "16"), 60),
    ("NG", 3, "621", ("20", "30", "60"), 60),
    ("ZA", 2, "655", ("01", "07", "10"), 120),
    ("MX", 2, "334", ("020", "050", "090"), -360),
)
# Type Allocation Codes (first 8 IMEI digits) of widely sold handset models.
_TACS = (
    "35332811",
    "35391805",
    "35290611",
    "35674108",
    "35925406",
    "86891603",
    "35407115",
    "01326300",
    "35875708",
    "35209900",
)
_CURRENCIES = (("EUR", 45), ("USD", 25), ("GBP", 20), ("CHF", 4), ("INR", 3), ("BRL", 3))
_BRANDS = (
    "ACME",
    "NORDBANK",
    "PARCELGO",
    "VERIFY",
    "RIDEO",
    "SHOPLY",
    "MEDIBOOK",
    "AIRLINK",
    "FOODIE",
    "TAXIMO",
    "INFO",
    "ALERTS",
)
_FIRST = ("alex", "sam", "maria", "li", "omar", "anna", "jean", "priya", "lucas", "ngozi")
_LAST = ("smith", "martin", "muller", "silva", "kumar", "rossi", "jansen", "okafor", "garcia")
_DOMAINS = ("gmail.com", "outlook.com", "yahoo.fr", "web.de", "orange.fr", "hotmail.co.uk")
_TEXTS = (
    "Your verification code is {n}",
    "Your parcel {n} is out for delivery today",
    "Reminder: appointment tomorrow, reply C to cancel. Ref {n}",
    "Payment of {n} cents received, thank you",
    "Your driver is arriving. Trip {n}",
)
_STATUS = {
    "sms": (("delivered", 86), ("undelivered", 5), ("failed", 4), ("expired", 3), ("rejected", 2)),
    "voice": (("answered", 70), ("no_answer", 15), ("busy", 8), ("failed", 7)),
    "chat": (("delivered", 80), ("read", 12), ("failed", 8)),
    "email": (("delivered", 90), ("bounced", 6), ("failed", 4)),
}
# Base price per SMS part / voice minute / chat message / e-mail, by channel.
_BASE_PRICE = {"sms": 0.035, "voice": 0.012, "chat": 0.006, "email": 0.0008}
_BAD_EVENT_TIMES = (
    "2026-13-01T00:00:00Z",
    "2026-10-05T25:61:00Z",
    "31/10/2026 10:00",
    "not a time",
    "",
)
_TABLE = 1000  # resolution of the weighted lookup tables


def _table(weighted: Sequence[tuple[str, int]]) -> tuple[str, ...]:
    """A lookup table for weighted choice by one ``random()`` call (faster than choices)."""
    total = sum(w for _, w in weighted)
    out: list[str] = []
    for value, w in weighted:
        out.extend([value] * round(_TABLE * w / total))
    while len(out) < _TABLE:
        out.append(weighted[0][0])
    return tuple(out[:_TABLE])


_CHANNEL_TABLE = _table((("sms", 60), ("voice", 20), ("chat", 12), ("email", 8)))
_STATUS_TABLES = {ch: _table(w) for ch, w in _STATUS.items()}
_COUNTRY_TABLE = _table([(c[0], c[1]) for c in _COUNTRIES])
_COUNTRY_BY_CODE = {c[0]: c for c in _COUNTRIES}
_CURRENCY_TABLE = _table(_CURRENCIES)


# Luhn: a digit's contribution in a doubled position.
_LUHN_DOUBLED = {str(d): (2 * d - 9 if d > 4 else 2 * d) for d in range(10)}


def luhn_check_digit(digits: str) -> str:
    """The Luhn check digit to append to ``digits`` (as for an IMEI's 15th digit)."""
    # Once the check digit is appended, the payload's last digit sits in a doubled place.
    total = sum(_LUHN_DOUBLED[c] for c in digits[-1::-2]) + sum(map(int, digits[-2::-2]))
    return str(-total % 10)


@dataclass(slots=True)
class _Subscriber:
    country: str
    calling_code: int
    national: int
    msisdn: str
    mcc: str
    mnc: str
    imsi: str
    imei: str
    email: str
    utc_offset_min: int
    _spaced: str | None = None

    def msisdn_spaced(self) -> str:
        # Formatting is slow-ish and rare (5% of records), so do it once, on demand.
        if self._spaced is None:
            number = phonenumbers.PhoneNumber(
                country_code=self.calling_code, national_number=self.national
            )
            self._spaced = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
        return self._spaced


@dataclass(frozen=True, slots=True)
class _Account:
    account_id: str
    currency: str
    sender_ids: tuple[str, ...]
    price_factor: float


@dataclass(frozen=True, slots=True)
class GeneratedCdr:
    """One generated record with what the generator knows about it."""

    value: bytes
    key: bytes
    """The account id, UTF-8: the Kafka message key."""
    event_ms: int
    """The instant ``event_time`` denotes (epoch ms), before any corruption."""
    malformed: str | None = None
    """Which of MALFORMED_KINDS was applied, or None for a valid record."""
    late: bool = False


@dataclass(frozen=True, slots=True)
class _MsisdnTemplate:
    calling_code: int
    prefix: str
    free_digits: int
    example: int
    mobile: re.Pattern[str]


def _msisdn_template(region: str) -> _MsisdnTemplate:
    example = phonenumbers.example_number_for_type(region, PhoneNumberType.MOBILE)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if (
        example is None
        or example.country_code is None
        or example.national_number is None
        or metadata is None
        or metadata.mobile is None
        or metadata.mobile.national_number_pattern is None
    ):
        raise ConfigError(f"libphonenumber has no mobile numbering plan for {region}")
    nat = str(example.national_number)
    # NANP numbers: keep the area code, randomise the rest (about 80% are then valid).
    keep = 3 if example.country_code == 1 else max(1, len(nat) - 6)
    return _MsisdnTemplate(
        calling_code=example.country_code,
        prefix=nat[:keep],
        free_digits=len(nat) - keep,
        example=int(nat),
        # libphonenumber's own mobile pattern for the region, compiled once: the check
        # is_valid_number makes, at a fraction of its per-call cost.
        mobile=re.compile(metadata.mobile.national_number_pattern),
    )


class _World:
    """Subscribers and accounts, built lazily and deterministically from the seed."""

    def __init__(self, seed: int, subscribers: int, accounts: int) -> None:
        self._seed = seed
        self._subs: list[_Subscriber | None] = [None] * subscribers
        self._templates = {c[0]: _msisdn_template(c[0]) for c in _COUNTRIES}
        rng = random.Random(f"{seed}/accounts")  # noqa: S311 - synthetic data, seeded on purpose
        self.accounts = tuple(self._account(rng, i) for i in range(accounts))

    @staticmethod
    def _account(rng: random.Random, i: int) -> _Account:
        brands = rng.sample(_BRANDS, k=rng.randint(1, 3))
        return _Account(
            account_id=f"ACC-{100000 + i * 37 + rng.randrange(37):06d}",
            currency=_CURRENCY_TABLE[int(rng.random() * _TABLE)],
            sender_ids=tuple(brands),
            price_factor=round(rng.uniform(0.7, 1.3), 3),
        )

    @property
    def n_subscribers(self) -> int:
        return len(self._subs)

    def subscriber(self, i: int) -> _Subscriber:
        sub = self._subs[i]
        if sub is None:
            sub = self._subs[i] = self._make_subscriber(i)
        return sub

    def _make_subscriber(self, i: int) -> _Subscriber:
        # One RNG per subscriber: subscriber i is the same whatever order records touch it.
        rng = random.Random(f"{self._seed}/subscriber/{i}")  # noqa: S311 - synthetic data, seeded on purpose
        code, _, mcc, mncs, offset = _COUNTRY_BY_CODE[_COUNTRY_TABLE[int(rng.random() * _TABLE)]]
        tpl = self._templates[code]
        national = tpl.example
        for _ in range(50):
            cand = tpl.prefix + f"{rng.randrange(10**tpl.free_digits):0{tpl.free_digits}d}"
            if tpl.mobile.fullmatch(cand):
                national = int(cand)
                break
        mnc = mncs[int(rng.random() * len(mncs))]
        msin_len = 15 - len(mcc) - len(mnc)
        serial = f"{rng.randrange(10**6):06d}"
        tac = _TACS[int(rng.random() * len(_TACS))]
        email = (
            f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{rng.randrange(100)}@{rng.choice(_DOMAINS)}"
        )
        return _Subscriber(
            country=code,
            calling_code=tpl.calling_code,
            national=national,
            msisdn=f"+{tpl.calling_code}{national}",
            mcc=mcc,
            mnc=mnc,
            imsi=mcc + mnc + f"{rng.randrange(10**msin_len):0{msin_len}d}",
            imei=tac + serial + luhn_check_digit(tac + serial),
            email=email,
            utc_offset_min=offset,
        )


def _spans(months: Sequence[str], now: datetime | None) -> list[tuple[int, int]]:
    """(start_ms, end_ms) of each listed month in UTC, the last one cut at ``now``."""
    if not months:
        raise ConfigError("generate needs at least one month (YYYY-MM)")
    spans: list[tuple[int, int]] = []
    for m in months:
        y, mo = parse_month(m)
        ny, nm = add_months(y, mo, 1)
        spans.append((to_ms(month_start(m)), to_ms(month_start(f"{ny:04d}-{nm:02d}"))))
    if sorted(set(spans)) != spans:
        raise ConfigError("months must be listed in increasing order, without repeats")
    if now is not None:
        now_ms = to_ms(now)
        spans = [(s, min(e, now_ms)) for s, e in spans if s < now_ms]
        if not spans:
            raise ConfigError("every listed month starts after now: nothing to generate")
    return spans


def _fmt_time(ms: int, offset_min: int, with_ms: bool) -> str:
    """RFC 3339: the instant ``ms`` written in local time at ``offset_min`` from UTC."""
    secs, milli = divmod(ms + offset_min * 60_000, 1000)
    t = time.gmtime(secs)
    frac = f".{milli:03d}" if with_ms else ""
    if offset_min == 0:
        zone = "Z"
    else:
        sign = "+" if offset_min > 0 else "-"
        h, m = divmod(abs(offset_min), 60)
        zone = f"{sign}{h:02d}:{m:02d}"
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
        f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}{frac}{zone}"
    )


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1 (a fraction of the records)")


def iter_generated(
    count: int,
    *,
    months: Sequence[str],
    seed: int = 0,
    malformed_ratio: float = 0.0,
    late_ratio: float = 0.0,
    subscribers: int = 50_000,
    accounts: int = 400,
    now: datetime | None = None,
) -> Iterator[GeneratedCdr]:
    """Generate ``count`` CDRs with their Kafka key and what was done to them.

    ``months``: YYYY-MM, increasing; event times fall in them (UTC). ``now``: if given, no
    event time is later than it. Same arguments, same records, byte for byte.
    """
    if count < 0:
        raise ConfigError("count must be 0 or more")
    if subscribers < 1 or accounts < 1:
        raise ConfigError("subscribers and accounts must be at least 1")
    _check_ratio("malformed_ratio", malformed_ratio)
    _check_ratio("late_ratio", late_ratio)
    spans = _spans(months, now)
    world = _World(seed, subscribers, accounts)
    return _records(count, spans, world, seed, malformed_ratio, late_ratio)


def generate_cdrs(
    count: int,
    *,
    months: Sequence[str],
    seed: int = 0,
    malformed_ratio: float = 0.0,
    late_ratio: float = 0.0,
    subscribers: int = 50_000,
    accounts: int = 400,
    now: datetime | None = None,
) -> Iterator[bytes]:
    """``count`` CDRs as JSON bytes, one object each; see :func:`iter_generated`."""
    for cdr in iter_generated(
        count,
        months=months,
        seed=seed,
        malformed_ratio=malformed_ratio,
        late_ratio=late_ratio,
        subscribers=subscribers,
        accounts=accounts,
        now=now,
    ):
        yield cdr.value


def _records(  # noqa: PLR0912, PLR0915  # one flat loop: the generator must be fast
    count: int,
    spans: list[tuple[int, int]],
    world: _World,
    seed: int,
    malformed_ratio: float,
    late_ratio: float,
) -> Iterator[GeneratedCdr]:
    rng = random.Random(f"{seed}/records")  # noqa: S311 - synthetic data, seeded on purpose
    # Locals: this loop runs hundreds of thousands of times.
    rand = rng.random
    randrange = rng.randrange
    getrandbits = rng.getrandbits
    dumps = orjson.dumps
    n_subs = world.n_subscribers
    accounts = world.accounts
    n_acc = len(accounts)
    sub_of = world.subscriber
    lengths = [e - s for s, e in spans]
    total_ms = sum(lengths)
    for i in range(count):
        # Where the stream "is" now: position i/count along the concatenated months.
        pos = int(total_ms * i / count) if count else 0
        k = 0
        while k < len(lengths) - 1 and pos >= lengths[k]:
            pos -= lengths[k]
            k += 1
        start, end = spans[k]
        # Pipelines deliver a little after the event: up to a minute of jitter back.
        event_ms = max(start, min(end - 1, start + pos - int(rand() * 60_000)))
        late = late_ratio > 0 and rand() < late_ratio
        if late:
            if k > 0:
                s, e = spans[int(rand() * k)]
                event_ms = s + int(rand() * (e - s))
            else:
                event_ms = start + int(rand() * (event_ms - start + 1))
        kind: str | None = None
        if malformed_ratio > 0 and rand() < malformed_ratio:
            kind = MALFORMED_KINDS[int(rand() * len(MALFORMED_KINDS))]

        account = accounts[int(n_acc * rand() ** 1.5)]
        sub = sub_of(int(n_subs * rand() ** 2))  # a heavy head: some subscribers recur a lot
        channel = _CHANNEL_TABLE[int(rand() * _TABLE)]
        if kind in ("invalid_msisdn", "bad_imei_luhn"):
            channel = "sms"  # these need a record that carries the identifier
        status = _STATUS_TABLES[channel][int(rand() * _TABLE)]

        h = f"{getrandbits(128):032x}"
        r = rand()
        if r < 0.02:
            event_time: str | int = event_ms
        else:
            with_ms = rand() < 0.7
            if not with_ms:
                event_ms -= event_ms % 1000  # so event_ms is exactly what the text says
            offset = sub.utc_offset_min if r < 0.12 else 0
            event_time = _fmt_time(event_ms, offset, with_ms)
        sender = account.sender_ids[int(rand() * len(account.sender_ids))]
        rec: dict[str, object] = {
            "cdr_id": f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}",
            "event_time": event_time,
            "account_id": account.account_id,
            "channel": channel,
            "direction": "mo" if rand() < 0.15 else "mt",
            "sender_id": sender,
            "status": status,
        }
        base = _BASE_PRICE[channel] * account.price_factor
        if channel == "sms":
            parts = 1 if rand() < 0.8 else (2 if rand() < 0.75 else 3)
            rec["parts"] = parts
            price = base * parts
        elif channel == "voice":
            duration = int(rand() ** 2 * 900) + 1 if status == "answered" else 0
            rec["duration_s"] = duration
            price = base * max(1, (duration + 59) // 60)
        else:
            price = base
        rec["price"] = round(price, 4)
        rec["currency"] = account.currency
        rec["route_id"] = f"rt-{sub.country.lower()}-{sub.mcc}{sub.mnc}-{1 + int(rand() * 3)}"
        rec["mcc"] = sub.mcc
        rec["mnc"] = sub.mnc
        rec["country"] = sub.country
        if channel == "email":
            rec["email"] = sub.email
        else:
            rec["msisdn"] = sub.msisdn_spaced() if rand() < 0.05 else sub.msisdn
            if channel != "chat":
                rec["imsi"] = sub.imsi
                if rand() < 0.8 or kind == "bad_imei_luhn":
                    rec["imei"] = sub.imei
        if channel in ("sms", "chat") and rand() < 0.3:
            template = _TEXTS[int(rand() * len(_TEXTS))]
            rec["text"] = template.format(n=randrange(100000, 999999))

        if kind == "missing_cdr_id":
            del rec["cdr_id"]
        elif kind == "invalid_msisdn":
            if rand() < 0.5:  # too short to be any number
                rec["msisdn"] = f"+{sub.calling_code}{str(sub.national)[:3]}"
            else:  # national form with a trunk zero, not international
                rec["msisdn"] = f"0{sub.national}"
        elif kind == "bad_imei_luhn":
            good = sub.imei
            rec["imei"] = good[:14] + str((int(good[14]) + 1 + randrange(9)) % 10)
        elif kind == "bad_event_time":
            rec["event_time"] = _BAD_EVENT_TIMES[int(rand() * len(_BAD_EVENT_TIMES))]

        value = dumps(rec)
        if kind == "bad_json":
            # A strict prefix of a JSON object is never valid JSON.
            value = value[: 1 + int(rand() * (len(value) - 2))]
        yield GeneratedCdr(
            value=value,
            key=account.account_id.encode(),
            event_ms=event_ms,
            malformed=kind,
            late=late,
        )
