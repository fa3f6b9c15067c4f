"""The small interface every keystore backend implements.

A key id names one month secret: ``YYYY-MM/<retention class>`` (``2025-11/default``).
The secret is 32 random bytes; everything else (sealing keys, pseudonym keys) is derived
from it, so destroying it destroys all of them (cryptographic erasure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from service.errors import ConfigError

SECRET_BYTES = 32
_KEY_ID = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])/([a-z0-9][a-z0-9_-]{0,31})\Z")


class KeyState(StrEnum):
    ACTIVE = "active"
    DESTROYED = "destroyed"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a keystore may say about a key: never the secret itself."""

    key_id: str
    state: KeyState
    created_at: str | None  # RFC 3339 UTC
    destroyed_at: str | None  # RFC 3339 UTC, when state is DESTROYED
    backend: str


def key_id(month: str, retention_class: str) -> str:
    """The key id of ``(month, retention class)``; validates both parts."""
    kid = f"{month}/{retention_class}"
    if not _KEY_ID.match(kid):
        raise ConfigError(
            f"invalid key id {kid!r}: expected YYYY-MM/<class>, class of a-z, 0-9, '_' or '-'"
        )
    return kid


def split_key_id(kid: str) -> tuple[str, str]:
    """``"2025-11/default"`` -> ``("2025-11", "default")``; raises ConfigError if malformed."""
    m = _KEY_ID.match(kid)
    if not m:
        raise ConfigError(f"invalid key id {kid!r}: expected YYYY-MM/<class>")
    return f"{m.group(1)}-{m.group(2)}", m.group(3)


@runtime_checkable
class Keystore(Protocol):
    """Month secrets: get, create-if-absent, destroy, list. Implementations are thread-safe."""

    backend: str

    def get(self, kid: str) -> bytes | None:
        """The secret, or None if it was never created.

        Raises KeyDestroyedError if it was destroyed, KeystoreUnavailableError if the
        store cannot be reached now.
        """
        ...

    def create_if_absent(self, kid: str) -> bytes:
        """Atomically create the secret unless it exists; return the one that won.

        Replicas race here; exactly one secret per key id survives. Raises
        KeyDestroyedError if the key was already destroyed (it is never re-created).
        """
        ...

    def destroy(self, kid: str) -> bool:
        """Destroy the secret beyond recovery; True if it existed. Leaves a tombstone."""
        ...

    def list(self) -> list[KeyInfo]:
        """Every key id known, active or destroyed, sorted by key id."""
        ...
