"""``cdranon retention run|watch``: the retention controller (docs/retention.md).

Two modes, one pass:
- file mode, ``--out DIR``: the batch mode's output directory (``cdranon process``); keys
  from ``--keystore``, holds in ``retention.hold_dir`` (default ``<keystore dir>/holds/``
  of a file keystore). No leader is needed.
- broker mode (``--config FILE`` or ``$CDRANON_CONFIG``): month topics on the brokers,
  holds in the compacted ``cdr.holds`` topic; ``watch`` runs as one active instance among
  several, elected by the consumer-group protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from tqdm import tqdm

from service.audit import Auditor, parse_target, read_file_events, read_partition
from service.checkpoints import due_checkpoints
from service.commands.audit import add_audit_flag, configured_target, open_configured_auditor
from service.commands.common import (
    add_keystore_flag,
    add_now_flag,
    add_policy_flag,
    keystore_url,
    now_from,
    policy_from,
)
from service.commands.run import add_config_flag
from service.config import Settings, load_settings
from service.errors import ConfigError, KafkaFatalError
from service.holds import FileHoldRegistry, HoldRegistry, HoldSecrets
from service.kafka.clients import admin_config, kafka_error, passes
from service.kafka.retention_store import KafkaHoldRegistry, KafkaMonthStore, Lease
from service.kafka.topics import HOUR_MS, TopicManager, TopicNames
from service.keystore import MasterKey, keystore_directory, load_master_key, open_keystore
from service.logs import log_event, log_exception, setup_logging
from service.metrics import RetentionMetrics, serve
from service.months import now_utc, rfc3339, zone
from service.policy import load_policy
from service.retention import Controller, FileMonthStore, Report, Status, holds_dir

_LOG = logging.getLogger("cdranon.retention")
_PROBE_TIMEOUT_S = 5.0  # one metadata request while waiting for the broker at start


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="file mode: the `process` output directory (else broker mode from --config)",
    )
    add_config_flag(p)
    add_keystore_flag(p)
    add_policy_flag(p)
    add_audit_flag(p)


def register(subparsers: Any) -> None:
    """Add ``retention run`` and ``retention watch``."""
    ret = subparsers.add_parser(
        "retention",
        help="destroy month keys and delete month data at their deadlines; legal holds",
        description="The retention controller: creates next months' keys ahead of time, "
        "copies held records, destroys month keys past the identifier deadline, deletes "
        "sealed data then and sanitised data past the billing deadline. See docs/retention.md.",
    )
    sub = ret.add_subparsers(dest="retention_command", metavar="ACTION")
    sub.required = True

    run = sub.add_parser("run", help="one pass; exit 1 if any action failed")
    _add_mode_flags(run)
    add_now_flag(run)
    run.add_argument("--dry-run", action="store_true", help="say what would be done; do nothing")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=run_once)

    watch = sub.add_parser(
        "watch", help="a pass every retention.interval_s, as the one active instance"
    )
    _add_mode_flags(watch)
    watch.add_argument(
        "--interval", type=float, default=None, metavar="S", help="seconds between passes"
    )
    watch.add_argument(
        "--max-passes", type=int, default=None, metavar="N", help="stop after N passes (tests)"
    )
    watch.set_defaults(func=run_watch)


@dataclass
class Built:
    """A controller and what must be closed after it."""

    controller: Controller
    auditor: Auditor
    settings: Settings
    lease: Callable[[], Lease] | None = None
    # The audit events that hold the integrity roots, when the auditor writes to that same
    # log (month checkpoints are written there, see service/checkpoints.py).
    events: Callable[[], list[bytes]] | None = None

    def close(self) -> None:
        """Close the audit log and the keystore (an HSM session, a cdr.keys consumer)."""
        self.auditor.close()
        # Not every keystore holds anything open (the file one does not): no close() there.
        close = getattr(self.controller.keystore, "close", None)
        if callable(close):
            close()


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def build(args: argparse.Namespace, metrics: RetentionMetrics | None = None) -> Built:
    """The controller named by the flags (file mode with ``--out``, else broker mode)."""
    if args.out is not None and args.config is not None:
        raise ConfigError("give either --out DIR (file mode) or --config FILE (broker mode)")
    settings = _settings(args)
    if args.out is not None:
        return _build_file(args, settings, metrics)
    return _build_broker(args, settings, metrics)


def _scheme(url: str) -> str:
    return url.partition(":")[0].lower()


def hold_directory(settings: Settings, keystore_url_: str) -> Path:
    """Where hold secrets and the file hold registry live: ``retention.hold_dir``.

    Default: ``<keystore dir>/holds/`` beside a ``file://`` keystore. A ``pkcs11://`` or
    ``kafka://`` keystore has no directory to put them beside, so there the setting is
    required (ConfigError without it).
    """
    if settings.retention.hold_dir is not None:
        return settings.retention.hold_dir.expanduser()
    scheme = _scheme(keystore_url_)
    if scheme == "file":
        return holds_dir(keystore_directory(keystore_url_))
    raise ConfigError(
        f"retention.hold_dir is required with a {scheme}:// keystore: the directory of the "
        "legal-hold secrets (wrapped by the master key) and of the file hold registry; set "
        "[retention] hold_dir or CDRANON_RETENTION__HOLD_DIR (docs/retention.md)"
    )


def hold_master_key(keystore_url_: str) -> MasterKey:
    """The master key that wraps hold secrets (MasterKeyError if none is configured).

    Beside a ``file://`` keystore its dev mode applies as for month secrets (the same
    generated key). With any other keystore a configured key is required: replicas and
    the controller on other machines must unwrap the same hold secrets.
    """
    dev_dir = keystore_directory(keystore_url_) if _scheme(keystore_url_) == "file" else None
    return load_master_key(env=os.environ, dev_dir=dev_dir)


def _hold_secrets(settings: Settings, url: str) -> HoldSecrets:
    return HoldSecrets(hold_directory(settings, url), hold_master_key(url))


def _build_file(
    args: argparse.Namespace, settings: Settings, metrics: RetentionMetrics | None
) -> Built:
    policy = policy_from(args) if args.policy is not None else load_policy(settings.policy)
    url = keystore_url(args) if args.keystore else settings.keystore.url
    secrets = _hold_secrets(settings, url)
    keystore = open_keystore(url)
    # Like `process`: the batch mode's audit log is DIR/audit.jsonl unless configured.
    target = args.audit or settings.audit.target or f"file://{args.out.absolute()}/audit.jsonl"
    auditor = open_configured_auditor(settings, target=target)
    controller = Controller(
        policy=policy,
        keystore=keystore,
        store=FileMonthStore(args.out),
        registry=FileHoldRegistry(hold_directory(settings, url)),
        hold_secrets=secrets,
        auditor=auditor,
        metrics=metrics,
        lead_months=settings.retention.lead_months,
        create_stores=False,
        tz=zone(settings.timezone) if settings.timezone else None,
    )
    kind, where, _ = parse_target(target)
    events = (lambda: read_file_events(Path(where))[0]) if kind == "file" else None
    return Built(controller, auditor, settings, events=events)


def broker_parts(
    settings: Settings, policy_tz_months: tuple[int, int, Any]
) -> tuple[dict[str, Any], AdminClient, KafkaMonthStore]:
    """The librdkafka conf, an admin client and the month store of broker mode."""
    identifier_months, billing_years, tz = policy_tz_months
    conf = admin_config(settings)
    admin = AdminClient(conf)
    t = settings.topics
    topics = TopicManager(
        admin,
        TopicNames(settings.kafka.topic_prefix),
        identifier_months=identifier_months,
        billing_years=billing_years,
        partitions=t.partitions,
        replication_factor=t.replication_factor,
        grace_ms=int(t.retention_grace_hours * HOUR_MS),
        future_tolerance_ms=(settings.future_tolerance_s or 86_400) * 1000,
        rejected_retention_days=t.rejected_retention_days,
        tz=tz,
    )
    store = KafkaMonthStore(
        conf, admin, topics, partitions=t.partitions, replication_factor=t.replication_factor
    )
    return conf, admin, store


def registry_for(
    settings: Settings, conf: dict[str, Any], admin: AdminClient, keystore_url_: str
) -> HoldRegistry:
    """The hold registry of broker mode (``retention.hold_store``)."""
    if settings.retention.hold_store == "file":
        return FileHoldRegistry(hold_directory(settings, keystore_url_))
    return KafkaHoldRegistry(
        conf,
        admin,
        f"{settings.kafka.topic_prefix}.holds",
        replication_factor=settings.topics.replication_factor,
    )


def _build_broker(
    args: argparse.Namespace, settings: Settings, metrics: RetentionMetrics | None
) -> Built:
    policy = policy_from(args) if args.policy is not None else load_policy(settings.policy)
    tz = zone(settings.timezone) if settings.timezone else policy.tz
    url = keystore_url(args) if args.keystore else settings.keystore.url
    secrets = _hold_secrets(settings, url)  # before opening the HSM: config errors first
    keystore = open_keystore(url)
    conf, admin, store = broker_parts(
        settings, (policy.max_identifier_months, policy.max_billing_years, tz)
    )
    registry = registry_for(settings, conf, admin, url)
    auditor = open_configured_auditor(settings, target=args.audit)
    controller = Controller(
        policy=policy,
        keystore=keystore,
        store=store,
        registry=registry,
        hold_secrets=secrets,
        auditor=auditor,
        metrics=metrics,
        lead_months=settings.retention.lead_months,
        create_stores=True,
        tz=tz,
    )

    def lease() -> Lease:
        return Lease(
            conf,
            admin,
            f"{settings.kafka.topic_prefix}.retention-lease",
            settings.retention.group_id,
            replication_factor=settings.topics.replication_factor,
        )

    # Checkpoints go to the log that holds the processors' roots: only when the audit target
    # is that topic (otherwise `cdranon verify` still checks every batch root).
    roots_topic = settings.integrity.audit_topic or f"{settings.kafka.topic_prefix}.audit"
    kind, where, _ = parse_target(configured_target(settings, args.audit))
    events = None
    if kind == "kafka" and where == roots_topic:

        def events() -> list[bytes]:
            return [v or b"" for _, v in read_partition(conf, roots_topic, 0, None)]

    return Built(controller, auditor, settings, lease, events)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], Any] | None]:
    if not enabled or total == 0:
        yield None
        return
    bar = tqdm(total=total, unit="action", desc="retention", file=sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()


def print_report(report: Report, as_json: bool) -> None:
    """The pass report: what was done, skipped, failed; the compliance gauges."""
    if as_json:
        sys.stdout.write(orjson.dumps(report.as_dict()).decode() + "\n")
        return
    c = report.counts()
    head = "dry run" if report.dry_run else "retention pass"
    lines = [
        f"{head} as of {rfc3339(report.now)}: {c['done']} done, {c['skipped']} skipped, "
        f"{c['failed']} failed, {c['blocked']} blocked"
        + (f", {c['planned']} planned" if c["planned"] else "")
    ]
    for o in report.outcomes:
        a = o.action
        hold = f" (hold {a.hold_id})" if a.hold_id else ""
        lines.append(
            f"  {o.status.value:<8} {a.kind.value:<17} {a.target}{hold}: {o.detail or a.why}"
        )
    lines.extend(f"  note: {n}" for n in report.notes)
    lines.append(f"  seconds overdue: {report.overdue_seconds:.0f}")
    oldest = report.oldest_identifiable_month or "-"
    lines.append(f"  oldest identifiable month: {oldest}")
    if report.audit_error:
        lines.append(f"  AUDIT FAILED: {report.audit_error}")
    sys.stdout.write("\n".join(lines) + "\n")


def run_once(args: argparse.Namespace) -> int:
    """One pass; exit 0 if everything due was done, 1 if anything failed."""
    built = build(args)
    try:
        now = now_from(args)
        controller = built.controller
        show = not args.no_progress and sys.stderr.isatty()
        total = len(controller.plan(now).actions) if show else 0
        with _progress(show, total) as bar:
            report = controller.run_pass(now, dry_run=args.dry_run, progress=bar)
        if not args.dry_run:
            write_checkpoints(built, now)
    finally:
        built.close()
    print_report(report, args.json)
    return 0 if report.ok else 1


def wait_for_broker(settings: Settings, stop: threading.Event) -> bool:
    """Until the broker answers a metadata request: True then, False if ``stop`` is set
    first. A broker that is away (not started yet, restarting, unreachable) is waited for
    with the configured back-off, a ``broker_unavailable`` warning per attempt; an error
    that waiting cannot cure (authentication, configuration) ends the run.

    Broker mode opens the hold registry's and the audit log's topics at start: without
    this, a controller started before its broker (a fresh deployment) exited.
    """
    admin = AdminClient(admin_config(settings))
    delay = settings.retry.backoff_initial_s
    while not stop.is_set():
        try:
            admin.list_topics(timeout=_PROBE_TIMEOUT_S)
            return True
        except KafkaException as exc:
            err = kafka_error(exc)
            if not passes(err):
                raise KafkaFatalError(
                    f"the broker refused the retention controller: {err.str()}"
                ) from None
            log_event(
                _LOG,
                "broker_unavailable",
                level=logging.WARNING,
                during="start",
                code=err.name(),
                error=err.str(),
                retry_in_s=round(delay, 3),
            )
            stop.wait(delay)  # back-off, cut short by SIGTERM
            delay = min(delay * 2, settings.retry.backoff_max_s)
    return False


def run_watch(args: argparse.Namespace) -> int:
    """Passes every interval until SIGTERM/SIGINT; in broker mode only while leader."""
    metrics = RetentionMetrics()
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server = None
    built: Built | None = None
    lease: Lease | None = None
    try:
        settings = _settings(args)
        setup_logging(settings.logging.level)
        server = (
            serve(metrics.registry, settings.metrics.host, settings.metrics.port)
            if settings.metrics.enabled
            else None
        )
        if args.out is None and not wait_for_broker(settings, stop):
            return 0  # stopped before the broker came
        built = build(args, metrics)
        interval = args.interval if args.interval is not None else settings.retention.interval_s
        lease = built.lease() if built.lease is not None else None
        passes_done = 0
        while not stop.is_set():
            leader = lease.poll(1.0) if lease is not None else True
            if not leader:
                continue
            passes_done += _one_pass(built, lease)
            if args.max_passes is not None and passes_done >= args.max_passes:
                break
            # Wait for the interval, serving the group protocol meanwhile.
            waited = 0.0
            while waited < interval and not stop.is_set():
                step = min(1.0, interval - waited)
                if lease is not None:
                    lease.poll(step)
                else:
                    stop.wait(step)
                waited += step
    finally:
        if lease is not None:
            lease.close()
        if server is not None:
            server.close()
        if built is not None:
            built.close()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def write_checkpoints(built: Built, now: datetime) -> list[str]:
    """Append an ``integrity.checkpoint`` for every month closed since the last pass."""
    if built.events is None:
        return []
    done = []
    tz = built.controller.tz
    for month, details in due_checkpoints(built.events(), now, tz=tz).items():
        built.auditor.record(
            "integrity.checkpoint", actor="retention", reason="month closed", **details
        )
        log_event(_LOG, "integrity_checkpoint", month=month, roots=details["roots"])
        done.append(month)
    return done


def _one_pass(built: Built, lease: Lease | None) -> int:
    controller = built.controller

    def still_leader() -> bool:
        return lease.poll(0) if lease is not None else True

    try:
        now = now_utc()
        report = controller.run_pass(now, should_continue=still_leader)
        write_checkpoints(built, now)
    except Exception as exc:  # noqa: BLE001 - the loop survives a failed pass; next one retries
        log_exception(_LOG, "retention_pass_failed", exc)
        return 1
    log_event(
        _LOG,
        "retention_pass",
        level=logging.INFO if report.ok else logging.ERROR,
        **report.counts(),
        overdue_seconds=report.overdue_seconds,
        # counts() already holds the number failed; these are the actions, by name.
        failed_actions=[f"{o.action.name}" for o in report.outcomes if o.status is Status.FAILED],
    )
    return 1  # one pass done (the caller counts passes)


__all__ = [
    "broker_parts",
    "build",
    "hold_directory",
    "hold_master_key",
    "print_report",
    "register",
    "registry_for",
]
