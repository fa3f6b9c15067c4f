"""What the transform returns: plain values the adapters (Kafka, files, Faust) write out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class OutRecord(NamedTuple):
    """One output record for a month topic or file.

    ``key`` is the account id (UTF-8): billing jobs aggregate per account.
    ``timestamp_ms`` is the event time, so the broker's time-based retention follows the
    communication's month, not the moment of processing.
    A NamedTuple because the transform makes two per record: the hot path builds them
    with ``tuple.__new__`` (C speed), which a dataclass's ``__init__`` cannot match.
    """

    source: int  # position of the source record in the input batch
    month: str  # YYYY-MM
    key: bytes
    timestamp_ms: int
    value: bytes  # one JSON object
    # Sanitised records: the hex SHA-256 of the billing fields as received (integrity
    # roots are computed over these); None on sealed records or with integrity off.
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input record that failed validation, kept byte for byte.

    ``reason`` is a stable, bounded code (metric label, header value); ``message`` says
    what was expected. Neither ever holds an identifier's value.
    """

    index: int
    reason: str
    field: str | None
    message: str
    original: bytes


@dataclass(slots=True)
class BatchResult:
    """The outcome of one batch: every input index appears in exactly one of
    ``sanitised`` (identifiable or stripped) or ``rejected``; ``sealed`` holds one record
    per identifiable (not stripped) input."""

    sealed: list[OutRecord] = field(default_factory=list)
    sanitised: list[OutRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # Records whose identifiers were stripped because their month is past its identifier
    # deadline: in ``sanitised`` without pseudonyms, not in ``sealed``.
    stripped: int = 0
    # The same, by reason (past_identifier_deadline, key_destroyed): bounded metric labels.
    stripped_reasons: dict[str, int] = field(default_factory=dict)
    # Key ids (YYYY-MM/class) the batch sealed under; the runner makes sure their topics exist.
    months: set[str] = field(default_factory=set)
    # Input records the Python path handled: all of them with the native path off, else
    # those it declined (unusual spellings, and every rejection). The rest went native.
    python_path: int = 0
    # With a leaf tag (service/integrity.py): per month, the sanitised records' RFC 6962
    # leaf hashes (32 bytes each) in the order of their integrity_leaf indexes.
    leaves: dict[str, bytearray] = field(default_factory=dict)
    leaf_tag: bytes | None = None  # the batch id in those leaves
