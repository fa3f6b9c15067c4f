"""The memory benchmark's verdict: flat, bounded (a cache filling to its budget), grows."""

from __future__ import annotations

from benchmarks.process_memory import verdict

MB = 1024  # verdict() takes kB


def test_flat_when_the_end_is_near_the_start() -> None:
    assert verdict(100 * MB, 110 * MB, 120 * MB) == "flat"


def test_bounded_when_the_rise_slows_down() -> None:
    # The shipped transform over 2M records: 117 -> 166 -> 189 MB.
    assert verdict(117 * MB, 166 * MB, 189 * MB) == "bounded"


def test_a_steady_leak_grows() -> None:
    # The same rise in both halves of the run: memory per record.
    assert verdict(100 * MB, 300 * MB, 500 * MB) == "grows"
    # A small steady leak above the slack still shows.
    assert verdict(100 * MB, 180 * MB, 260 * MB) == "grows"
