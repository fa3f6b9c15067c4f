"""Month topics: their names, their ``retention.ms``, and creating them (idempotent, cached).

Names, with the default prefix ``cdr``: ``cdr.raw`` (input), ``cdr.sealed.YYYY-MM``,
``cdr.sanitised.YYYY-MM``, ``cdr.rejected``.

Why ``retention.ms = deadline - start of month + grace``
---------------------------------------------------------
Kafka's time-based retention deletes a whole log segment once its *newest* record
timestamp is more than ``retention.ms`` in the past. Every record in a month topic carries
its event time as timestamp (``message.timestamp.type=CreateTime``), so every timestamp t
in the topic of month M lies in ``[start(M), end(M))``, and a segment whose newest
timestamp is t is deleted at ``t + retention.ms``. With ``retention.ms = D - start(M) + g``
(D the deadline, g the grace):

- never early: t >= start(M), so deletion happens at or after D + g: no record is dropped
  before its deadline, even a segment holding only the month's first hour;
- late by at most one month: t < end(M), so deletion happens before D + (end(M) - start(M)) + g.

The deadline itself is kept exactly by the retention controller (it destroys the month key,
which makes every sealed copy unreadable, then deletes the topic); broker retention is the
defence in depth that still fires if the controller is down. A shorter ``retention.ms``
(``D - end(M)``) would delete the early segments of a month up to a month before their
deadline, breaking the promise that data stays available until then.

``cdr.rejected`` holds raw input, identifiers included, whose event time cannot be trusted
(it failed validation); its records carry the time of rejection, and it is kept no longer
than the policy's identifier window from then (``rejected_retention_days`` to shorten).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

from service.errors import KafkaFatalError
from service.logs import log_event
from service.months import (
    add_months,
    billing_until,
    identifiers_until,
    month_of,
    month_start,
    now_utc,
    to_ms,
)

if TYPE_CHECKING:
    # Annotations only: the transform pulls in the whole core, which topics.py has no use for.
    from service.config import Settings
    from service.transform import Transformer

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
_LOG = logging.getLogger("cdranon.topics")


@dataclass(frozen=True, slots=True)
class TopicNames:
    """Topic names under one prefix."""

    prefix: str = "cdr"

    @property
    def raw(self) -> str:
        """The default input topic."""
        return f"{self.prefix}.raw"

    @property
    def rejected(self) -> str:
        """Input that failed validation, byte for byte."""
        return f"{self.prefix}.rejected"

    @property
    def audit(self) -> str:
        """The tamper-evident audit log (one partition)."""
        return f"{self.prefix}.audit"

    def sealed(self, month: str) -> str:
        """Billing fields + identifiers sealed under the month key."""
        return f"{self.prefix}.sealed.{month}"

    def sanitised(self, month: str) -> str:
        """Billing fields + month-keyed pseudonyms + generalised parts."""
        return f"{self.prefix}.sanitised.{month}"

    def sealed_pattern(self) -> str:
        """Regex subscription for every sealed month topic (librdkafka's POSIX syntax)."""
        return rf"^{re.escape(self.prefix)}\.sealed\.[0-9]{{4}}-[0-9]{{2}}$"

    def sanitised_pattern(self) -> str:
        """Regex subscription for every sanitised month topic (POSIX syntax)."""
        return rf"^{re.escape(self.prefix)}\.sanitised\.[0-9]{{4}}-[0-9]{{2}}$"


def sealed_retention_ms(
    month: str, identifier_months: int, grace_ms: int = HOUR_MS, tz: tzinfo = UTC
) -> int:
    """Sealed topic ``retention.ms``: identifier deadline - month start + grace."""
    start = to_ms(month_start(month, tz))
    return to_ms(identifiers_until(month, identifier_months, tz)) - start + grace_ms


def sanitised_retention_ms(
    month: str, billing_years: int, grace_ms: int = HOUR_MS, tz: tzinfo = UTC
) -> int:
    """Sanitised topic ``retention.ms``: billing deadline - month start + grace."""
    start = to_ms(month_start(month, tz))
    return to_ms(billing_until(month, billing_years, tz)) - start + grace_ms


def rejected_retention_ms(identifier_months: int, days: float | None = None) -> int:
    """Rejected topic ``retention.ms``: ``days`` if given, else 30 days per identifier month."""
    if days is not None:
        return int(days * DAY_MS)
    return identifier_months * 30 * DAY_MS


def topic_config(retention_ms: int, future_tolerance_ms: int) -> dict[str, str]:
    """Topic-level configs of every output topic."""
    return {
        "cleanup.policy": "delete",
        "retention.ms": str(retention_ms),
        "retention.bytes": "-1",
        # The event time is the record timestamp: retention follows the communication's month.
        "message.timestamp.type": "CreateTime",
        # Late records are the point of month topics; accept any past timestamp.
        "message.timestamp.before.max.ms": str(2**63 - 1),
        # Kafka 4 refuses timestamps more than 1 h ahead by default; the transform accepts
        # future_tolerance ahead, and a refused record would abort every retry of its batch.
        "message.timestamp.after.max.ms": str(future_tolerance_ms + HOUR_MS),
    }


def months_ahead(now: datetime, ahead: int, tz: tzinfo = UTC) -> list[str]:
    """The current month and the ``ahead`` next ones, as YYYY-MM."""
    y, m = (int(p) for p in month_of(now, tz).split("-"))
    out = []
    for n in range(ahead + 1):
        y2, m2 = add_months(y, m, n)
        out.append(f"{y2:04d}-{m2:02d}")
    return out


class TopicManager:
    """Creates output topics on demand and ahead of time; remembers which exist.

    Creation is idempotent (TOPIC_ALREADY_EXISTS is success: replicas race here). The
    cache only grows; a topic deleted by the retention controller is never needed again,
    because its month is past the deadline and the transform strips or rejects it.
    """

    def __init__(
        self,
        admin: AdminClient,
        names: TopicNames,
        *,
        identifier_months: int,
        billing_years: int,
        partitions: int,
        replication_factor: int,
        grace_ms: int,
        future_tolerance_ms: int,
        rejected_retention_days: float | None = None,
        tz: tzinfo = UTC,
        timeout_s: float = 30.0,
        on_created: Callable[[str], None] | None = None,
    ) -> None:
        self._admin = admin
        self.names = names
        self._identifier_months = identifier_months
        self._billing_years = billing_years
        self._partitions = partitions
        self._rf = replication_factor
        self._grace_ms = grace_ms
        self._future_ms = future_tolerance_ms
        self._rejected_days = rejected_retention_days
        self._tz = tz
        self._timeout_s = timeout_s
        self._on_created = on_created
        self._known: set[str] = set()

    def retention_ms(self, topic: str) -> int:
        """The retention.ms an output topic is created with."""
        if topic == self.names.rejected:
            return rejected_retention_ms(self._identifier_months, self._rejected_days)
        month = topic.rsplit(".", 1)[-1]
        if topic == self.names.sealed(month):
            return sealed_retention_ms(month, self._identifier_months, self._grace_ms, self._tz)
        if topic == self.names.sanitised(month):
            return sanitised_retention_ms(month, self._billing_years, self._grace_ms, self._tz)
        raise ValueError(f"{topic!r} is not an output topic of prefix {self.names.prefix!r}")

    def ensure(self, topics: Iterable[str]) -> None:
        """Create whichever of ``topics`` are not known to exist; KafkaException on failure."""
        missing = sorted(set(topics) - self._known)
        if not missing:
            return
        new = [
            NewTopic(
                t,
                num_partitions=self._partitions,
                replication_factor=self._rf,
                config=topic_config(self.retention_ms(t), self._future_ms),
            )
            for t in missing
        ]
        futures = self._admin.create_topics(new, request_timeout=self._timeout_s)
        for topic, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    if err.code() in (
                        KafkaError.TOPIC_AUTHORIZATION_FAILED,
                        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                        KafkaError.POLICY_VIOLATION,
                        KafkaError.INVALID_CONFIG,
                        KafkaError.INVALID_REPLICATION_FACTOR,
                    ):
                        raise KafkaFatalError(
                            f"cannot create topic {topic}: {err.str()}; create it by hand or "
                            "grant the CREATE permission and check [topics] settings"
                        ) from None
                    raise
            else:
                log_event(
                    _LOG,
                    "topic_created",
                    topic=topic,
                    retention_ms=self.retention_ms(topic),
                    partitions=self._partitions,
                )
                if self._on_created is not None:
                    self._on_created(topic)
            self._known.add(topic)

    def ensure_months(self, sealed: Iterable[str], sanitised: Iterable[str]) -> None:
        """Make sure the sealed topics of the ``sealed`` months and the sanitised ones exist."""
        self.ensure(
            [self.names.sealed(m) for m in sealed] + [self.names.sanitised(m) for m in sanitised]
        )

    def precreate(self, ahead: int, now: datetime | None = None) -> list[str]:
        """Create the rejected topic and this and the next ``ahead`` months' topics.

        Returns the months covered.
        """
        months = months_ahead(now or now_utc(), ahead, self._tz)
        self.ensure([self.names.rejected])
        self.ensure_months(months, months)
        return months


def topic_manager(
    settings: Settings,
    transformer: Transformer,
    admin: AdminClient,
    on_created: Callable[[str], None] | None = None,
) -> TopicManager:
    """The TopicManager of the configured prefix, partitions and retention.

    Every engine builds it here, so the confluent and Faust engines create the same topics
    with the same ``retention.ms``: the retention windows come from the transformer's
    policy and time zone, the rest from ``[topics]`` and ``[kafka] topic_prefix``.
    """
    return TopicManager(
        admin,
        TopicNames(settings.kafka.topic_prefix),
        identifier_months=transformer.policy.max_identifier_months,
        billing_years=transformer.policy.max_billing_years,
        partitions=settings.topics.partitions,
        replication_factor=settings.topics.replication_factor,
        grace_ms=int(settings.topics.retention_grace_hours * HOUR_MS),
        future_tolerance_ms=transformer.future_tolerance_ms,
        rejected_retention_days=settings.topics.rejected_retention_days,
        tz=transformer.tz,
        on_created=on_created,
    )
