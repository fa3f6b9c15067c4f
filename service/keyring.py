"""The processor's in-memory cache of month keys, in front of a keystore.

The keystore is asked once per month key and process, then again every ``recheck_s``
seconds: a key destroyed by the retention controller leaves every processor's cache within
that bound (default 60 s), after which its month's records are stripped, never sealed
under a destroyed key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from service.errors import KeyDestroyedError, KeyNotFoundError
from service.keystore.base import Keystore
from service.monthkeys import MonthKeys


class Keyring:
    """Month keys by key id, derived once and cached; thread-safe."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        recheck_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_created: Callable[[str], None] | None = None,
    ) -> None:
        """``on_created(kid)`` runs after this keyring created a month secret (the audit
        event ``key.created``); if it raises, the key is not handed out and the call is
        retried on the next ``get`` of that key id, so a creation is never left unreported
        by a live process. In a creation race between replicas more than one may report."""
        self.keystore = keystore
        self._on_created = on_created
        self._unreported: set[str] = set()
        self._recheck_s = recheck_s
        self._clock = clock
        self._keys: dict[str, tuple[MonthKeys, float]] = {}
        self._lock = threading.Lock()

    def get(self, kid: str, *, create: bool = True) -> MonthKeys:
        """The month keys of ``kid``, creating the secret if absent and ``create``.

        Raises KeyDestroyedError if it was destroyed, KeyNotFoundError if absent and not
        ``create``, KeystoreUnavailableError if the keystore cannot be reached.
        """
        now = self._clock()
        hit = self._keys.get(kid)
        if hit is not None and now - hit[1] < self._recheck_s:
            return hit[0]
        with self._lock:
            hit = self._keys.get(kid)
            if hit is not None:
                try:
                    still = self.keystore.get(kid)
                except KeyDestroyedError:
                    del self._keys[kid]
                    raise
                if still is None:
                    del self._keys[kid]
                    raise KeyNotFoundError(kid)
                self._keys[kid] = (hit[0], now)
                return hit[0]
            secret = self.keystore.get(kid)
            if secret is None:
                if not create:
                    raise KeyNotFoundError(kid)
                secret = self.keystore.create_if_absent(kid)
                if self._on_created is not None:
                    self._unreported.add(kid)
            if kid in self._unreported and self._on_created is not None:
                self._on_created(kid)
                self._unreported.discard(kid)
            keys = MonthKeys.derive(kid, secret)
            self._keys[kid] = (keys, now)
            return keys

    def forget(self, kid: str) -> None:
        """Drop a key from the cache (the retention controller destroyed it)."""
        with self._lock:
            self._keys.pop(kid, None)

    def __len__(self) -> int:
        return len(self._keys)
