"""Audit events written inside the processor's Kafka transactions.

The processor signs one ``integrity.root`` event per batch and month topic (docs/
integrity.md). Written with the batch's records and input offsets in ONE transaction, a
root exists exactly when its records do: an aborted batch leaves neither, a crash after
the commit leaves both, and no root can be lost between commit and a later write.

The chain (writer, seq, prev) advances only when the transaction commits: events built
for an aborted transaction are discarded and the next attempt reuses their sequence
numbers. On start the writer resumes from its newest committed event in the topic.
Events are byte-for-byte those of service.audit, so ``cdranon audit verify`` checks them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from service.audit import ChainHead, SigningKey, build_event, find_topic_head, head_of
from service.months import now_utc

find_head = find_topic_head  # the newest committed event of a writer on the audit topic


class TxnAuditChain:
    """Builds signed, chained audit events for the current transaction."""

    def __init__(
        self,
        key: SigningKey,
        writer: str,
        head: ChainHead | None,
        *,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.key = key
        self.writer = writer
        self._committed = head
        self._pending = head
        self._clock = clock

    def event(self, event: str, *, actor: str, **details: Any) -> bytes:
        """The canonical bytes of the next event (pending until :meth:`committed`)."""
        raw = build_event(
            self.key,
            self.writer,
            self._pending,
            event,
            actor=actor,
            reason=None,
            details=details,
            now=self._clock(),
        )
        self._pending = head_of(raw)
        return raw

    def committed(self) -> None:
        """The transaction committed: its events are the chain now."""
        self._committed = self._pending

    def aborted(self) -> None:
        """The transaction aborted: forget its events."""
        self._pending = self._committed


__all__ = ["TxnAuditChain", "find_head"]
