"""The runtime settings of the long-running commands (service/runtime.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from service.runtime import GEN0_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_start_up_objects_and_collects_rarely() -> None:
    survivor = {"made": ["before the loop"]}  # holds a container: tracked by the collector
    tune_gc()
    assert gc.get_threshold()[0] == GEN0_THRESHOLD
    assert gc.get_freeze_count() > 0
    # What existed at start-up is in the permanent generation: no collection walks it.
    assert gc.is_tracked(survivor)
    for generation in (0, 1, 2):
        assert all(survivor is not o for o in gc.get_objects(generation=generation))


@pytest.mark.usefixtures("restore_gc")
def test_cycles_made_after_tuning_are_still_collected() -> None:
    tune_gc()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone does not free it
    gc.collect()
    assert gone() is None
