"""Process-wide settings of the Python runtime for the long-running commands.

The garbage collector: the transform allocates several dicts per record, so with the
default thresholds (a generation-0 pass every 700 container allocations, older
generations every 10 of those) a collection runs every few records and the older passes
walk every long-lived object (policy, plans, the pseudonym cache). Measured on the core
transform here: 4-12% of its CPU (benchmarks/transform_bench.py, 2026-11). The records
themselves form no reference cycles, so collecting rarely loses nothing:

- ``gc.freeze()`` once start-up is done moves what exists then (modules, settings,
  clients) into the permanent generation: never walked again;
- generation 0 is collected every 50,000 allocations instead of 700 (a batch's garbage
  is freed by reference counting as it goes; what is left are the rare cycles).
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000
GEN1_THRESHOLD = 20
GEN2_THRESHOLD = 100


def tune_gc() -> None:
    """Freeze what exists now and collect rarely (call after start-up, before the loop)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
