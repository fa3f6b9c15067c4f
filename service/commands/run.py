"""``cdranon run``: the stream processor (Kafka in, month topics out, exactly once)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from service.config import Settings, load_settings
from service.errors import CdranonError, ConfigError, KafkaFatalError
from service.kafka.runner import Runner
from service.keyring import Keyring
from service.keystore import open_keystore
from service.logs import log_event, log_exception, setup_logging
from service.metrics import Metrics, MetricsServer, serve
from service.months import zone
from service.native import ENV as NATIVE_ENV
from service.native import available as native_available
from service.native import openssl_version
from service.native import wanted as native_wanted
from service.policy import load_policy
from service.runtime import tune_gc
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


def transform_path(transformer: Transformer) -> tuple[str, str]:
    """(path, why) of the transform, for the start-up log: a processor on the Python path
    alone runs at a fraction of the native path's rate (docs/benchmarks.md)."""
    if transformer.native:
        return "native", f"service._native with {openssl_version()}"
    if not native_available():
        return "python", "the extension service._native is not built (docs/operations.md)"
    if not native_wanted():
        return "python", f"{NATIVE_ENV}=0"
    return "python", (
        "the policy uses what the native path has no table for (a reference zone other "
        "than UTC, a check it does not know)"
    )


def build_runner(
    settings: Settings, metrics: Metrics, transformer: Transformer | None = None
) -> Runner:
    """A Runner wired to the policy, keystore and transform the settings name."""
    return Runner(settings, transformer or build_transformer(settings), metrics)


# New Kafka clients after a restartable fatal error (fenced after a pause, or by the static
# consumer's own rejoin across a broker restart): at most this many within the window,
# so two instances misconfigured with one instance_id cannot fence each other for ever.
CLIENT_RESTARTS = 5
CLIENT_RESTART_WINDOW_S = 600.0


class RestartBudget:
    """At most ``limit`` restarts within any ``window_s`` seconds."""

    def __init__(self, limit: int = CLIENT_RESTARTS, window_s: float = CLIENT_RESTART_WINDOW_S):
        self.limit = limit
        self.window_s = window_s
        self._times: list[float] = []

    def left(self, now: float) -> int:
        """Restarts still allowed at ``now``."""
        return self.limit - sum(1 for t in self._times if now - t < self.window_s)

    def take(self, now: float) -> bool:
        """Spend one restart at ``now`` (monotonic); False if the budget is used up."""
        self._times = [t for t in self._times if now - t < self.window_s]
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


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
    tune_gc()
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
    transformer = build_transformer(settings)
    path, detail = transform_path(transformer)
    log_event(_LOG, "transform", path=path, detail=detail)
    runner = build_runner(settings, metrics, transformer)
    server = start_metrics(settings, metrics)
    tune_gc()
    stopping: list[bool] = []  # appended to by the handler (a flag mypy can follow)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(True)
        log_event(_LOG, "stop_requested", signal=signal.Signals(signum).name)
        runner.request_stop()
        # A second signal interrupts at once (KeyboardInterrupt: exit 130).
        signal.signal(signum, signal.default_int_handler)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    budget = RestartBudget()
    # Runners given up on: kept referenced, since destroying clients with a call still
    # blocked on a helper thread can hang (the process then ends with os._exit below).
    retired: list[Runner] = []
    try:
        while True:
            try:
                runner.run()
                break
            except KafkaFatalError as exc:
                if not exc.restartable or stopping or not budget.take(time.monotonic()):
                    log_exception(_LOG, "fatal", exc)
                    raise
                # Kafka Streams does the same on a fencing: close dirty, rejoin. The open
                # transaction is aborted by the new producer's init_transactions (or by
                # the group generation), and the batch is read again from the committed
                # offsets.
                log_event(
                    _LOG,
                    "kafka_clients_restarting",
                    level=logging.ERROR,
                    error=str(exc),
                    restarts_left=budget.left(time.monotonic()),
                )
                metrics.client_restarts.inc()
                retired.append(runner)
                runner = build_runner(settings, metrics, transformer)
                if stopping:
                    runner.request_stop()
    except CdranonError as exc:
        if runner.clean_exit and all(r.clean_exit for r in retired):
            raise
        # The run ended on an error with a Kafka call still blocked on a helper thread (see
        # below): say why and leave now, rather than wait for librdkafka's destructors.
        print(f"cdranon: error: {exc}", file=sys.stderr)
        _exit_now(2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if server is not None:
            server.close()
    if not runner.clean_exit or any(not r.clean_exit for r in retired):
        # A Kafka call is still blocked on a helper thread (the broker did not answer within
        # batch.stop_grace_s, or a stuck producer was replaced): librdkafka's destructors
        # would wait for it at interpreter exit. Nothing is left to save: the open
        # transaction is the broker's to abort, and the logs are flushed here.
        _exit_now(0)
    return 0


def _exit_now(code: int) -> NoReturn:
    """Flush the logs and end the process without running librdkafka's destructors."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
