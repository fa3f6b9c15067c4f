"""``cdranon generate``: realistic synthetic CDRs to a JSON Lines file or a Kafka topic.

Users load-test with it: ``--rate`` paces production with a token bucket, the records are
deterministic by ``--seed``, and ``--malformed-ratio`` / ``--late-ratio`` add the records a
real feed has (broken ones, and ones from earlier months).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic
from tqdm import tqdm

from service.commands.common import add_now_flag, now_from
from service.errors import CdranonError, ConfigError
from service.generator import GeneratedCdr, iter_generated
from service.months import add_months, month_of, parse_month

_PROGRESS_EVERY = 1000
_FLUSH_TIMEOUT_S = 120.0
_ADMIN_TIMEOUT_S = 30.0
_METADATA_TIMEOUT_S = 10.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate realistic synthetic CDRs (JSON Lines or a Kafka topic)",
        description="Generate CDRs deterministically from a seed: to a JSON Lines file "
        "(default: stdout) or, with --bootstrap, to a Kafka topic (key = account id). "
        "Prints a summary line.",
    )
    p.add_argument("--count", type=int, required=True, metavar="N", help="number of CDRs")
    months = p.add_mutually_exclusive_group()
    months.add_argument(
        "--months",
        metavar="YYYY-MM,...",
        help="event months, increasing, comma-separated (e.g. 2026-09,2026-10,2026-11)",
    )
    months.add_argument(
        "--months-back",
        type=int,
        metavar="K",
        help="the K months ending with the current one, event times up to now (default: 3)",
    )
    add_now_flag(p)
    p.add_argument("--seed", type=int, default=0, help="same seed, same records (default 0)")
    p.add_argument(
        "--malformed-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="fraction of broken records: bad JSON, no cdr_id, bad msisdn/IMEI/event_time",
    )
    p.add_argument(
        "--late-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="fraction of records whose event time is in an earlier listed month",
    )
    p.add_argument(
        "--subscribers", type=int, default=50_000, metavar="N", help="subscriber pool size"
    )
    p.add_argument("--accounts", type=int, default=400, metavar="N", help="customer accounts")
    p.add_argument(
        "--output", metavar="FILE|-", default=None, help="JSON Lines output (default: stdout)"
    )
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        default=None,
        help="produce to Kafka at this bootstrap address instead of writing a file",
    )
    p.add_argument("--topic", default="cdr.raw", help="Kafka topic (default cdr.raw)")
    p.add_argument(
        "--partitions",
        type=int,
        default=4,
        metavar="P",
        help="partitions if the topic must be created (default 4)",
    )
    p.add_argument(
        "--replication-factor",
        type=int,
        default=-1,
        metavar="RF",
        help="replication factor if the topic must be created (default: the broker's)",
    )
    p.add_argument(
        "--rate", type=float, default=None, metavar="N", help="records per second (default: max)"
    )
    p.add_argument(
        "-X",
        "--kafka-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka producer/admin setting, repeatable (e.g. -X security.protocol=SSL)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    p.set_defaults(func=run)


def _months(args: argparse.Namespace, now: datetime) -> tuple[list[str], datetime | None]:
    """The event months and the instant event times must not pass (None: whole months)."""
    if args.months:
        months = [m.strip() for m in args.months.split(",") if m.strip()]
        for m in months:
            try:
                parse_month(m)
            except ConfigError:
                raise ConfigError(f"--months: {m!r} is not a month, expected YYYY-MM") from None
        if not months:
            raise ConfigError("--months: expected YYYY-MM,YYYY-MM,...")
        return months, None
    back = 3 if args.months_back is None else args.months_back
    if back < 1:
        raise ConfigError("--months-back must be at least 1")
    y, m = parse_month(month_of(now))
    months = []
    for k in range(back - 1, -1, -1):
        yy, mm = add_months(y, m, -k)
        months.append(f"{yy:04d}-{mm:02d}")
    return months, now


def _kafka_config(args: argparse.Namespace) -> dict[str, str]:
    config: dict[str, str] = {}
    for item in args.kafka_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The item is not echoed: values may be secrets (SASL passwords).
            raise ConfigError("-X/--kafka-option expects KEY=VALUE, e.g. -X security.protocol=SSL")
        config[key.strip()] = value
    config["bootstrap.servers"] = args.bootstrap
    return config


class _TokenBucket:
    """Paces to ``rate`` per second, allowing bursts of a tenth of a second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 10)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def wait_s(self) -> float:
        """Take a token if there is one (0.0), else the seconds until there will be."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Any]:
    if args.no_progress or not sys.stderr.isatty():
        yield None
        return
    bar = tqdm(total=args.count, unit="rec", unit_scale=True, desc="generate", file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def _open_output(name: str | None) -> Iterator[IO[bytes]]:
    if name is None or name == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    try:
        f = Path(name).open("wb")  # noqa: SIM115  # closed below; the error must name the flag
    except OSError as exc:
        raise ConfigError(f"cannot write --output {name}: {exc.strerror}") from exc
    with f:
        yield f


def _ensure_topic(admin: AdminClient, args: argparse.Namespace) -> bool:
    """Create the topic if it is missing; True if this call created it."""
    try:
        md = admin.list_topics(timeout=_METADATA_TIMEOUT_S)
    except KafkaException as exc:
        raise CdranonError(
            f"cannot reach Kafka at {args.bootstrap} (no metadata within "
            f"{_METADATA_TIMEOUT_S:.0f}s): {exc.args[0] if exc.args else exc}; check "
            "--bootstrap and the -X security settings"
        ) from exc
    if args.topic in md.topics and md.topics[args.topic].error is None:
        return False
    if args.partitions < 1:
        raise ConfigError("--partitions must be at least 1")
    futures = admin.create_topics(
        [NewTopic(args.topic, args.partitions, args.replication_factor)],
        request_timeout=_ADMIN_TIMEOUT_S,
    )
    try:
        futures[args.topic].result(timeout=_ADMIN_TIMEOUT_S)
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False  # someone else created it in between: what we wanted
        raise CdranonError(f"could not create topic {args.topic}: {exc}") from exc
    return True


class _Delivery:
    """Counts failed deliveries (only errors are reported: delivery.report.only.error)."""

    def __init__(self) -> None:
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed += 1
            if self.first_error is None:
                self.first_error = err.str()


def _to_kafka(
    args: argparse.Namespace, records: Iterator[GeneratedCdr], bar: Any
) -> tuple[int, int, int, str]:
    config = _kafka_config(args)
    created = _ensure_topic(AdminClient(dict(config)), args)
    delivery = _Delivery()
    producer = Producer(
        {
            "linger.ms": 20,
            "compression.type": "lz4",
            "enable.idempotence": True,
            **config,
            "delivery.report.only.error": True,
            "on_delivery": delivery,
        }
    )
    bucket = _TokenBucket(args.rate) if args.rate else None
    produce, poll, topic = producer.produce, producer.poll, args.topic
    n = malformed = late = 0
    for cdr in records:
        if bucket is not None:
            while (wait := bucket.wait_s()) > 0:
                poll(wait)  # serve delivery reports while pacing
        while True:
            try:
                produce(topic, value=cdr.value, key=cdr.key)
                break
            except BufferError:
                poll(0.1)  # the local queue is full: wait for deliveries, never drop
        poll(0)
        n += 1
        malformed += cdr.malformed is not None
        late += cdr.late
        if bar is not None and n % _PROGRESS_EVERY == 0:
            bar.update(_PROGRESS_EVERY)
    remaining = producer.flush(_FLUSH_TIMEOUT_S)
    if remaining:
        raise CdranonError(
            f"{remaining} of {n} records were still undelivered to {topic} after "
            f"{_FLUSH_TIMEOUT_S:.0f}s; is the broker at {args.bootstrap} reachable?"
        )
    if delivery.failed:
        raise CdranonError(
            f"{delivery.failed} of {n} records could not be delivered to {topic}: "
            f"{delivery.first_error}"
        )
    where = f"topic {topic}{' (created)' if created else ''} at {args.bootstrap}"
    return n, malformed, late, where


def _to_file(
    args: argparse.Namespace, records: Iterator[GeneratedCdr], bar: Any
) -> tuple[int, int, int, str]:
    n = malformed = late = 0
    with _open_output(args.output) as out:
        write = out.write
        for cdr in records:
            write(cdr.value)
            write(b"\n")
            n += 1
            malformed += cdr.malformed is not None
            late += cdr.late
            if bar is not None and n % _PROGRESS_EVERY == 0:
                bar.update(_PROGRESS_EVERY)
    where = "stdout" if args.output in (None, "-") else str(args.output)
    return n, malformed, late, where


def run(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise ConfigError("--count must be 0 or more")
    if args.rate is not None and args.rate <= 0:
        raise ConfigError("--rate must be a positive number of records per second")
    if args.bootstrap and args.output:
        raise ConfigError("give --output (a file) or --bootstrap (Kafka), not both")
    if args.rate is not None and not args.bootstrap:
        raise ConfigError("--rate paces production to Kafka: it needs --bootstrap")
    if args.kafka_option and not args.bootstrap:
        raise ConfigError("-X/--kafka-option configures the Kafka producer: it needs --bootstrap")
    months, until = _months(args, now_from(args))
    records = iter_generated(
        args.count,
        months=months,
        seed=args.seed,
        malformed_ratio=args.malformed_ratio,
        late_ratio=args.late_ratio,
        subscribers=args.subscribers,
        accounts=args.accounts,
        now=until,
    )
    started = time.monotonic()
    with _progress(args) as bar:
        sink = _to_kafka if args.bootstrap else _to_file
        n, malformed, late, where = sink(args, records, bar)
        if bar is not None:
            bar.update(n - bar.n)
    elapsed = time.monotonic() - started
    span = months[0] if len(months) == 1 else f"{months[0]}..{months[-1]}"
    # The summary goes to stderr when the records themselves go to stdout.
    stream = sys.stderr if where == "stdout" else sys.stdout
    print(
        f"generated {n} CDRs ({malformed} malformed, {late} late) in {span}, seed "
        f"{args.seed} -> {where} in {elapsed:.1f}s ({n / max(elapsed, 1e-9):,.0f}/s)",
        file=stream,
    )
    return 0
