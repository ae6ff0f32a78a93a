"""Long-lived objects are moved out of the garbage collector's reach, young garbage is not
(fennec_chat/collector.py). Run in the test's own process: it is Python's own collector."""

from __future__ import annotations

import asyncio
import gc
import weakref

from fennec_chat.collector import Freezer


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


async def test_survivors_are_frozen_and_young_cycles_are_collected_first():
    gc.unfreeze()
    survivors = [Node() for _ in range(1000)]
    cycle_a, cycle_b = Node(), Node()
    cycle_a.other, cycle_b.other = cycle_b, cycle_a  # garbage once dropped: only gc frees it
    gone = weakref.ref(cycle_a)
    del cycle_a, cycle_b
    freezer = Freezer(every=0.05)
    await freezer.start()
    try:
        await asyncio.sleep(0.2)
        assert gc.get_freeze_count() >= len(survivors)
        assert all(gc.is_tracked(node) for node in survivors[:3])
        assert gone() is None  # collected before the freeze, not frozen with the survivors
    finally:
        await freezer.stop()
        gc.unfreeze()
