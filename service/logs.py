"""Structured logs: one JSON object per line and per event, on stderr.

Every line has ``ts`` (RFC 3339 UTC), ``level``, ``logger``, ``event`` (a stable snake_case
name) and the event's fields. Callers pass counts, topics, partitions, offsets, months and
key ids, never a record's content: no identifier and no key material ever reaches a log.
Exceptions are rendered as their type, their message only when it is one of ours (our
messages name fields and settings, never values; see service.errors) or Kafka's, and the
stack as ``file:line`` frames, without messages from foreign code that might quote data.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from confluent_kafka import KafkaException

from service.errors import CdranonError

_FIELDS = "cdranon_fields"


class JsonFormatter(logging.Formatter):
    """Formats a LogRecord as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[
                :-6
            ]
            + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, _FIELDS, None)
        if fields:
            data.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            data["error_type"] = type(exc).__name__
            if isinstance(exc, CdranonError | KafkaException):
                data["error"] = str(exc)
            tb = traceback.extract_tb(exc.__traceback__)
            data["stack"] = [f"{f.filename}:{f.lineno}" for f in tb[-8:]]
        return orjson.dumps(data, default=str).decode()


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: object
) -> None:
    """Log one event with its fields (counts, topics, offsets: never record content)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


def log_exception(logger: logging.Logger, event: str, exc: BaseException, **fields: object) -> None:
    """Log an error event with the exception rendered safely (see the module docstring)."""
    logger.error(event, exc_info=(type(exc), exc, exc.__traceback__), extra={_FIELDS: fields})


class _JsonHandler(logging.StreamHandler[IO[str]]):
    """Our handler, told apart so that setup_logging can replace it."""


def setup_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Route the ``cdranon`` loggers to ``stream`` (stderr) as JSON lines; idempotent."""
    root = logging.getLogger("cdranon")
    for h in list(root.handlers):
        if isinstance(h, _JsonHandler):
            root.removeHandler(h)
    handler = _JsonHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
