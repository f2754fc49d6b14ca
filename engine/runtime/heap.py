"""Garbage-collector settings for a long-running engine (`engine run`).

CPython's default (collect the young generation every 700 net allocations) promotes whatever is in
flight at that moment: a parsed 60-resource Bundle is a few thousand containers, so with eight
senders each young collection moved units still being processed to the old generation, and a
full collection (every heap object, the fhir.resources model classes included: 0.1-0.2 s each,
during which nothing else runs) followed about every 25 Bundles, freeing nothing. Measured with
benchmarks/medrec.py: nine full collections, ~0.7 s, in 48,000 resources. Collecting the young
generation every 10,000 allocations lets units die young, and freezing what start-up loaded
(modules, models, configuration: alive until exit) keeps it out of every later collection.
Reference cycles are still collected; only later.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

YOUNG_THRESHOLD = 10_000  # net allocations between young collections (CPython's default: 700)


def settle() -> None:
    """Once the engine has started: what is alive now lives until exit."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
