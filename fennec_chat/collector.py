"""Python's garbage collector and many idle connections.

An idle connection is a few dozen objects that live as long as it does, and CPython's full
collection walks every tracked object. Measured with 19,500 idle connections in one process
(1.36 million objects): full collections grew to 0.9 s each, and a busy room beside them saw
a p99 of 805 ms. With 12,500 per worker on 8 workers sharing 2 cores they took 2.5 to 6.3 s,
long enough for uvicorn to kill workers that missed a health check and for Redis to take live
processes for dead. Each collection freed next to nothing: the server parts the reference
cycles of a closed connection itself (uvicorn_websocket.py, outbox.py), so what has lived a
while is nearly always still in use.

So every FREEZE_EVERY seconds the younger generations are collected and everything that
survives is moved out of the collector's reach (`gc.freeze`): full collections then walk only
what is new. Objects freed by reference counting are freed as always; the cost is that a
reference cycle which became garbage after it was frozen is never collected. The memory
benchmark's "left after a connect/close cycle" figure watches that.
"""

from __future__ import annotations

import asyncio
import gc

FREEZE_EVERY = 10.0  # seconds


class Freezer:
    """Collects the young generations and freezes the survivors, every `every` seconds."""

    def __init__(self, every: float = FREEZE_EVERY) -> None:
        self.every = every
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.every, self.freeze)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def freeze(self) -> None:
        gc.collect(1)  # what became garbage while young is freed, not frozen
        gc.freeze()
        self._timer = asyncio.get_running_loop().call_later(self.every, self.freeze)
