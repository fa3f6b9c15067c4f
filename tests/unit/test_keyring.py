"""The keyring: caching in front of a real file keystore, rechecks, destruction, races."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from service.errors import KeyDestroyedError, KeyNotFoundError
from service.keyring import Keyring
from service.keystore.file import FileKeystore
from service.keystore.master import MasterKey
from service.monthkeys import MonthKeys
from service.pseudonyms import pseudonym

KID = "2026-10/default"


class CountingKeystore(FileKeystore):
    """The real file keystore, counting the calls the keyring makes."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, MasterKey(b"\x07" * 32, source="test"))
        self.calls: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._count_lock:
            self.calls[name] += 1

    def get(self, kid: str) -> bytes | None:
        self._count("get")
        return super().get(kid)

    def create_if_absent(self, kid: str) -> bytes:
        self._count("create_if_absent")
        return super().create_if_absent(kid)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> CountingKeystore:
    return CountingKeystore(tmp_path / "keys")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_creates_the_key_once_and_caches_it(store: CountingKeystore, clock: Clock) -> None:
    ring = Keyring(store, recheck_s=60, clock=clock)
    first = ring.get(KID)
    assert store.calls == Counter({"get": 1, "create_if_absent": 1})
    for step in range(59):
        clock.now += 1 if step else 0.5
        assert ring.get(KID) is first
    assert store.calls == Counter({"get": 1, "create_if_absent": 1})
    assert len(ring) == 1
    # What was cached is the stored secret's derivation.
    secret = store.get(KID)
    assert secret is not None
    fresh = MonthKeys.derive(KID, secret)
    assert pseudonym(first.hmac_proto, "imsi", "1") == pseudonym(fresh.hmac_proto, "imsi", "1")


def test_an_existing_key_is_read_not_created(store: CountingKeystore, clock: Clock) -> None:
    secret = store.create_if_absent(KID)
    store.calls.clear()
    keys = Keyring(store, clock=clock).get(KID, create=False)
    assert store.calls == Counter({"get": 1})
    assert keys.seal_root == MonthKeys.derive(KID, secret).seal_root


def test_rechecks_after_the_window(store: CountingKeystore, clock: Clock) -> None:
    ring = Keyring(store, recheck_s=60, clock=clock)
    first = ring.get(KID)
    clock.now += 60
    assert ring.get(KID) is first
    assert store.calls["get"] == 2
    # The recheck restarts the window.
    clock.now += 59
    assert ring.get(KID) is first
    assert store.calls["get"] == 2
    clock.now += 1
    assert ring.get(KID) is first
    assert store.calls["get"] == 3
    assert store.calls["create_if_absent"] == 1


def test_keys_are_cached_per_key_id(store: CountingKeystore, clock: Clock) -> None:
    ring = Keyring(store, clock=clock)
    a, b, c = ring.get(KID), ring.get("2026-09/default"), ring.get("2026-10/it")
    assert len({id(a), id(b), id(c)}) == 3
    assert (a.key_id, b.key_id, c.key_id) == (KID, "2026-09/default", "2026-10/it")
    assert len(ring) == 3
    assert store.calls["create_if_absent"] == 3


def test_destroyed_key_leaves_the_cache_at_the_next_recheck(
    store: CountingKeystore, clock: Clock
) -> None:
    ring = Keyring(store, recheck_s=60, clock=clock)
    first = ring.get(KID)
    assert store.destroy(KID)
    # Within the window the cached keys still serve: the documented bound.
    clock.now += 30
    assert ring.get(KID) is first
    clock.now += 30
    with pytest.raises(KeyDestroyedError) as info:
        ring.get(KID)
    assert info.value.key_id == KID
    assert len(ring) == 0
    # And it stays gone: no re-creation, every later call says destroyed.
    with pytest.raises(KeyDestroyedError):
        ring.get(KID)
    with pytest.raises(KeyDestroyedError):
        ring.get(KID, create=False)
    assert store.calls["create_if_absent"] == 1
    assert len(ring) == 0


def test_key_destroyed_before_first_use_is_never_created(
    store: CountingKeystore, clock: Clock
) -> None:
    store.create_if_absent(KID)
    store.destroy(KID)
    store.calls.clear()
    with pytest.raises(KeyDestroyedError):
        Keyring(store, clock=clock).get(KID)
    assert store.calls["create_if_absent"] == 0


def test_missing_key_without_create(store: CountingKeystore, clock: Clock) -> None:
    ring = Keyring(store, clock=clock)
    with pytest.raises(KeyNotFoundError) as info:
        ring.get(KID, create=False)
    assert info.value.key_id == KID
    assert store.calls == Counter({"get": 1})
    assert len(ring) == 0
    assert store.get(KID) is None  # nothing was created


def test_forget_drops_the_cached_key(store: CountingKeystore, clock: Clock) -> None:
    ring = Keyring(store, clock=clock)
    first = ring.get(KID)
    ring.forget(KID)
    ring.forget("2020-01/default")  # unknown: no error
    assert len(ring) == 0
    again = ring.get(KID)
    assert again is not first  # derived anew ...
    assert again.seal_root == first.seal_root  # ... from the same stored secret
    assert store.calls["create_if_absent"] == 1


def test_threads_racing_on_a_new_key_get_one_object(store: CountingKeystore) -> None:
    ring = Keyring(store, recheck_s=60)
    n = 8
    barrier = threading.Barrier(n)
    got: list[MonthKeys] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            keys = ring.get(KID)
            with lock:
                got.append(keys)
        except BaseException as exc:  # noqa: BLE001  # reported by the assertion below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(got) == n
    assert all(k is got[0] for k in got)
    assert store.calls["create_if_absent"] == 1
    assert len(ring) == 1


def test_threads_racing_on_many_keys(store: CountingKeystore) -> None:
    ring = Keyring(store, recheck_s=60)
    kids = [f"2026-{m:02d}/default" for m in range(1, 13)]
    barrier = threading.Barrier(8)
    seen: list[dict[str, MonthKeys]] = [{} for _ in range(8)]

    def worker(i: int) -> None:
        barrier.wait(timeout=10)
        for kid in kids[i % 3 :] + kids[: i % 3]:
            seen[i][kid] = ring.get(kid)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    for kid in kids:
        assert len({id(s[kid]) for s in seen}) == 1
    assert store.calls["create_if_absent"] == len(kids)
    assert len(ring) == len(kids)
