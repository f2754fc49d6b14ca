"""engine.runtime.heap: what start-up loaded is frozen, young collections come less often, and
reference cycles are still collected."""

from __future__ import annotations

import gc
import weakref

from engine.runtime import heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_settle_freezes_start_up_and_still_collects_cycles() -> None:
    before = gc.get_threshold()
    try:
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
        node = _Node()
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
