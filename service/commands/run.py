"""``cdranon run``: the stream processor (Kafka in, month topics out, exactly once)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from service.config import Settings, load_settings
from service.errors import ConfigError, KafkaFatalError
from service.kafka.runner import Runner
from service.keyring import Keyring
from service.keystore import open_keystore
from service.logs import log_event, log_exception, setup_logging
from service.metrics import Metrics, MetricsServer, serve
from service.months import zone
from service.policy import load_policy
from service.transform import Transformer

_LOG = logging.getLogger("cdranon.run")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (default: $CDRANON_CONFIG); CDRANON_* variables override the file."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help="settings TOML (default: $CDRANON_CONFIG); CDRANON_* environment variables "
        "override it, e.g. CDRANON_KAFKA__BOOTSTRAP_SERVERS",
    )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="anonymise the input topic into month topics, exactly once",
        description="Consume the input topic (cdr.raw) as a consumer-group member, write "
        "cdr.sealed.YYYY-MM, cdr.sanitised.YYYY-MM and cdr.rejected in one Kafka "
        "transaction per batch, serve Prometheus metrics. Stops cleanly on SIGTERM/SIGINT.",
    )
    add_config_flag(p)
    p.add_argument(
        "--engine",
        choices=("confluent", "faust"),
        default="confluent",
        help="confluent: confluent-kafka, exactly once (default); faust: a faust-streaming "
        "worker, at least once (needs the 'faust' extra; docs/faust.md)",
    )
    p.set_defaults(func=run)


def build_transformer(settings: Settings) -> Transformer:
    """The transform wired to the policy and keystore the settings name (either engine)."""
    policy = load_policy(settings.policy)
    keyring = Keyring(open_keystore(settings.keystore.url), recheck_s=settings.keystore.recheck_s)
    return Transformer(
        policy,
        keyring,
        tz=zone(settings.timezone) if settings.timezone else None,
        future_tolerance_s=settings.future_tolerance_s,
        integrity=settings.integrity.enabled,
    )


def build_runner(settings: Settings, metrics: Metrics) -> Runner:
    """A Runner wired to the policy, keystore and transform the settings name."""
    return Runner(settings, build_transformer(settings), metrics)


def start_metrics(settings: Settings, metrics: Metrics) -> MetricsServer | None:
    """Serve /metrics as configured; ConfigError if the port cannot be bound."""
    if not settings.metrics.enabled:
        return None
    try:
        server = serve(metrics.registry, settings.metrics.host, settings.metrics.port)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.metrics.host}:{settings.metrics.port} "
            f"({exc.strerror}): set [metrics] port (CDRANON_METRICS__PORT) or enabled = false"
        ) from None
    log_event(_LOG, "metrics_serving", url=f"http://{settings.metrics.host}:{server.port}/metrics")
    return server


def _run_faust(settings: Settings, metrics: Metrics) -> int:
    from service.faust_engine import run_faust  # noqa: PLC0415 - optional extra

    transformer = build_transformer(settings)
    server = start_metrics(settings, metrics)
    try:
        return run_faust(settings, transformer, metrics)
    finally:
        if server is not None:
            server.close()


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    setup_logging(settings.logging.level)
    log_event(_LOG, "settings", **settings.shown())
    metrics = Metrics()
    if getattr(args, "engine", "confluent") == "faust":
        return _run_faust(settings, metrics)
    runner = build_runner(settings, metrics)
    server = start_metrics(settings, metrics)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log_event(_LOG, "stop_requested", signal=signal.Signals(signum).name)
        runner.request_stop()
        # A second signal interrupts at once (KeyboardInterrupt: exit 130).
        signal.signal(signum, signal.default_int_handler)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner.run()
    except KafkaFatalError as exc:
        log_exception(_LOG, "fatal", exc)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if server is not None:
            server.close()
    if not runner.clean_exit:
        # A Kafka call is still blocked on a helper thread (the broker did not answer within
        # batch.stop_grace_s, or a stuck producer was replaced): librdkafka's destructors
        # would wait for it at interpreter exit. Nothing is left to save: the open
        # transaction is the broker's to abort, and the logs are flushed here.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    return 0
