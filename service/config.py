"""The one settings object of cdranon: a TOML file, overridden by ``CDRANON_`` environment.

Precedence, highest first: environment variables (``CDRANON_`` prefix, nested sections
joined with ``__``: ``CDRANON_BATCH__MAX_RECORDS=5000``), the TOML file given with
``--config`` (or ``CDRANON_CONFIG``), the defaults below. The result is frozen.

Any librdkafka setting can be passed through ``[kafka.librdkafka]`` (both clients),
``[kafka.consumer]`` or ``[kafka.producer]``. Keys may be written with dots (quoted in
TOML) or with underscores, which become dots, so that environment variables can carry
them: ``CDRANON_KAFKA__LIBRDKAFKA__SASL_PASSWORD`` is ``sasl.password``. Values whose key
names a secret (passwords, private keys, tokens) are held as ``SecretStr`` and masked
whenever the settings are shown or logged. Settings that exactly-once processing depends
on (``enable.auto.commit``, ``isolation.level``, ``transactional.id``...) are refused in
the pass-through: the runner owns them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.errors import ConfigError
from service.keystore import default_keystore_url
from service.months import zone

CONFIG_ENV = "CDRANON_CONFIG"
MASK = "**********"

# librdkafka keys whose values are secrets: masked when shown, never logged.
_SECRET_KEY = re.compile(r"(password|secret|token|\.pem$|oauthbearer\.config|credentials)")
# Keys exactly-once depends on; the runner sets them and a pass-through may not.
_RESERVED_KEYS = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "group.instance.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "isolation.level",
        "transactional.id",
        "enable.idempotence",
        "transaction.timeout.ms",
        "statistics.interval.ms",
        # The runner's rebalance handling assumes cooperative-sticky (see runner.py).
        "partition.assignment.strategy",
    }
)
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
# Topic names go into the signed audit log (integrity roots name their topic), whose guard
# refuses any value with a run of 10+ digits (service/audit.py: it could be a phone number,
# an IMSI or an IMEI). Refused here, at start, instead of at the first batch.
_LONG_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])\d{10,}(?![0-9A-Za-z])")
_DIGIT_RUN_REASON = (
    "a run of 10 or more digits: topic names are written to the audit log, which refuses "
    "anything that looks like a phone number, IMSI or IMEI; put a letter in it"
)
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

LibrdkafkaConf = dict[str, str | SecretStr]


def _librdkafka_conf(raw: object) -> LibrdkafkaConf:
    """Normalise a pass-through table: dotted lower-case keys, string values, secrets wrapped."""
    if not isinstance(raw, dict):
        raise ValueError("expected a table of librdkafka settings (key = value)")
    out: LibrdkafkaConf = {}
    for k, v in raw.items():
        key = str(k).strip().lower().replace("_", ".")
        if key in _RESERVED_KEYS:
            raise ValueError(
                f"librdkafka setting {key!r} is managed by cdranon (exactly-once depends on it); "
                "use the matching [kafka] setting or remove it"
            )
        if isinstance(v, SecretStr):
            value = v.get_secret_value()
        elif isinstance(v, bool):
            value = "true" if v else "false"
        elif isinstance(v, str | int | float):
            value = str(v)
        else:
            raise ValueError(f"librdkafka setting {key!r}: expected a string, number or boolean")
        out[key] = SecretStr(value) if _SECRET_KEY.search(key) else value
    return out


def plain_conf(conf: LibrdkafkaConf) -> dict[str, str]:
    """The pass-through table with secrets revealed: only for handing to librdkafka."""
    return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in conf.items()}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Brokers, topic names, group and transaction identity, and librdkafka pass-through."""

    bootstrap_servers: str = Field(default="127.0.0.1:9092", min_length=1)
    topic_prefix: str = "cdr"
    # Default: "<topic_prefix>.raw".
    input_topic: str | None = None
    group_id: str = Field(default="cdranon", min_length=1)
    # Stable identity of this replica (a StatefulSet pod name, a host name). When set, it
    # becomes group.instance.id (static membership) and the transactional.id suffix, so a
    # restarted replica takes over at once: init_transactions aborts its predecessor's open
    # transaction instead of waiting for transaction_timeout_ms, and no rebalance waits for
    # session_timeout_ms. Unset: a random transactional.id per process; still exactly once,
    # because KIP-447 fences zombies by consumer-group generation, not by transactional.id.
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,100}$")
    transactional_id_prefix: str = Field(default="cdranon", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000, le=900_000)
    session_timeout_ms: int = Field(default=45_000, ge=1_000, le=3_600_000)
    # librdkafka statistics (consumer lag per partition); 0 turns them off.
    statistics_interval_ms: int = Field(default=5_000, ge=0, le=86_400_000)
    librdkafka: LibrdkafkaConf = Field(default_factory=dict)
    consumer: LibrdkafkaConf = Field(default_factory=dict)
    producer: LibrdkafkaConf = Field(default_factory=dict)

    @field_validator("librdkafka", "consumer", "producer", mode="before")
    @classmethod
    def _passthrough(cls, v: object) -> LibrdkafkaConf:
        return _librdkafka_conf(v)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _TOPIC_PREFIX.match(v):
            raise ValueError("expected 1-200 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
        if _LONG_DIGIT_RUN.search(v):
            raise ValueError(_DIGIT_RUN_REASON)
        return v

    @field_validator("input_topic")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        if v is not None and not _TOPIC_NAME.match(v):
            raise ValueError("expected a Kafka topic name (A-Z, a-z, 0-9, '.', '_', '-')")
        if v is not None and _LONG_DIGIT_RUN.search(v):
            raise ValueError(_DIGIT_RUN_REASON)
        return v

    @property
    def input_topic_name(self) -> str:
        """The topic the processor reads."""
        return self.input_topic or f"{self.topic_prefix}.raw"


class BatchSettings(_Section):
    """A batch (one transaction) closes at ``max_records`` or after ``max_wait_ms``."""

    max_records: int = Field(default=10_000, ge=1, le=1_000_000)
    max_wait_ms: int = Field(default=100, ge=1, le=60_000)
    # Commit batch N (send offsets + commit, blocking network calls) on a helper thread
    # while batch N+1 is transformed: the transaction stays one per batch, strictly in order.
    pipeline: bool = True
    # After SIGTERM, how long the open batch may take to commit (or abort) while Kafka does
    # not answer. Past it the processor exits without committing: the broker aborts the
    # transaction and the batch's offsets stay uncommitted, so its successor reads it again.
    # Keep it below the supervisor's kill deadline (terminationGracePeriodSeconds: 60).
    stop_grace_s: float = Field(default=30.0, ge=1, le=3600)


class TopicsSettings(_Section):
    """How month topics are created. Retention itself follows from the policy's deadlines."""

    partitions: int = Field(default=3, ge=1, le=10_000)
    # -1: the broker's default.replication.factor.
    replication_factor: int = Field(default=-1, ge=-1, le=100)
    # Added to every computed retention.ms: absorbs clock skew between broker and policy.
    retention_grace_hours: float = Field(default=1.0, ge=0, le=24 * 31)
    # cdr.rejected holds raw input (identifiers included): kept no longer than this from
    # receipt. Default (unset): the policy's longest identifier window.
    rejected_retention_days: float | None = Field(default=None, gt=0, le=3_660)
    # Month topics are also created this many months ahead (0: on demand only).
    precreate_months_ahead: int = Field(default=1, ge=0, le=24)

    @field_validator("replication_factor")
    @classmethod
    def _rf(cls, v: int) -> int:
        if v == 0:
            raise ValueError("expected -1 (the broker's default) or at least 1")
        return v


class KeystoreSettings(_Section):
    """Where month secrets live (a keystore URL) and how long the cache trusts a key."""

    # Default: file://${CDRANON_HOME:-~/.local/share/cdranon}/keys, as `cdranon keys` uses.
    url: str = Field(default_factory=lambda: default_keystore_url(os.environ), min_length=1)
    # A cached month key is re-checked against the store this often, so a destroyed key
    # leaves every processor's memory within a bounded time.
    recheck_s: float = Field(default=60.0, gt=0, le=3_600)


class MetricsSettings(_Section):
    """The Prometheus endpoint (``/metrics``)."""

    enabled: bool = True
    # Loopback by default; set 0.0.0.0 in a container so Prometheus can scrape it.
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65_535)


class RetrySettings(_Section):
    """Back-off while the keystore or the broker is unavailable (consumption paused)."""

    backoff_initial_s: float = Field(default=0.5, gt=0, le=60)
    backoff_max_s: float = Field(default=30.0, gt=0, le=3_600)


class LoggingSettings(_Section):
    """Structured JSON logs on stderr, one line per event."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class AuditSettings(_Section):
    """Where audit events go and what signs them (docs/audit.md)."""

    # file:///PATH, kafka://HOST:PORT/TOPIC, or kafka:TOPIC (brokers and security from
    # [kafka]). None: file://${CDRANON_HOME:-~/.local/share/cdranon}/audit/audit.jsonl.
    target: str | None = Field(default=None, min_length=1)
    # Ed25519 private key (PEM, or the 32-byte seed as base64/hex). The environment variable
    # CDRANON_AUDIT_SIGNING_KEY (or CDRANON_AUDIT_SIGNING_KEY_FILE) overrides both of these.
    # Neither set: dev mode, a generated key beside the log, with a warning.
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None
    # Further public keys `cdranon audit verify` trusts (earlier, rotated signing keys).
    public_key_files: tuple[Path, ...] = ()
    # This process's chain; None: <host>:<pid>. Give long-lived services a stable name.
    writer: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:@/+-]{1,128}$")


class RetentionSettings(_Section):
    """The retention controller: pass interval, leadership, legal holds (docs/retention.md)."""

    # Seconds between passes of `cdranon retention watch`.
    interval_s: float = Field(default=3_600.0, ge=1, le=86_400)
    # Consumer group whose single-partition lease topic elects the one active controller.
    group_id: str = Field(default="cdranon-retention", pattern=r"^[A-Za-z0-9._-]{1,200}$")
    # Where the hold registry lives in broker mode: the compacted <prefix>.holds topic, or
    # JSON files in hold_dir (below). Hold secrets are always in hold_dir.
    hold_store: Literal["kafka", "file"] = "kafka"
    # Where hold secrets (wrapped by the master key) and the file hold registry live. None:
    # <keystore dir>/holds/ of a file:// keystore; required with a pkcs11:// or kafka://
    # keystore, which has no directory of its own to put them beside.
    hold_dir: Path | None = None
    # Keys (and topics) of this month and this many next months exist ahead of time.
    lead_months: int = Field(default=1, ge=0, le=24)
    # Releasing a hold destroys its key and store at once; with this, not before the latest
    # identifier deadline of the months it names, if that is later.
    release_at_original_deadline: bool = False


class IntegritySettings(_Section):
    """ "Original form" (docs/integrity.md): billing digests and signed Merkle roots."""

    # A billing_digest in every sanitised record, and one signed integrity.root event per
    # batch and month topic, written to the audit topic in the batch's own transaction.
    enabled: bool = True
    # The audit topic the roots go to; None: <prefix>.audit. Signed with the [audit] key.
    audit_topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$")


class Settings(BaseSettings):
    """Every setting of cdranon. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="CDRANON_",
        env_nested_delimiter="__",
        case_sensitive=False,
        frozen=True,
        extra="forbid",
    )

    # The field/retention policy file; None: the packaged defaults (12 months / 10 years).
    policy: Path | None = None
    # Reference zone of months and deadlines (IANA name); None: the policy's (UTC by default).
    timezone: str | None = None
    # Records dated further ahead than this are rejected; None: the policy's (one day).
    future_tolerance_s: int | None = Field(default=None, ge=0, le=366 * 86_400)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    topics: TopicsSettings = Field(default_factory=TopicsSettings)
    # NoDecode: CDRANON_KEYSTORE is the keystore URL (as for `cdranon keys`), not JSON.
    keystore: Annotated[KeystoreSettings, NoDecode] = Field(default_factory=KeystoreSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    integrity: IntegritySettings = Field(default_factory=IntegritySettings)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            zone(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("keystore", mode="before")
    @classmethod
    def _keystore_url(cls, v: object) -> object:
        if isinstance(v, str):
            return orjson.loads(v) if v.lstrip().startswith("{") else {"url": v.strip()}
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it. No .env
        # files and no secrets directory: one file and the environment, nothing implicit.
        return (env_settings, init_settings)

    def shown(self) -> dict[str, Any]:
        """The effective settings as plain data, every secret masked."""
        data: dict[str, Any] = self.model_dump(mode="json")
        data["keystore"]["url"] = mask_url(self.keystore.url)
        return data


def mask_url(url: str) -> str:
    """Hide a password in ``scheme://user:password@host`` and any query string."""
    masked = re.sub(r"(://[^/:@]*:)[^/@]*@", rf"\g<1>{MASK}@", url)
    return re.sub(r"\?.*$", f"?{MASK}", masked)


def _describe(exc: ValidationError) -> str:
    # Built from loc and msg only: pydantic's own text repeats the input value, which may
    # be a secret.
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = "CDRANON_" + "__".join(str(p) for p in err["loc"]).upper()
        parts.append(f"{loc}: {err['msg']} (from the config file or {env})")
    return "; ".join(parts)


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file; ConfigError naming the file if it is missing or malformed."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(path: Path | None = None) -> Settings:
    """The effective settings: ``path`` (or ``$CDRANON_CONFIG``) overridden by the environment.

    Raises ConfigError naming each bad setting, never echoing its value.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    data = read_toml(path) if path is not None else {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid settings{where}: {_describe(exc)}") from None
