"""Lighter stand-ins for the parts of uvicorn's WebSocket protocol that every idle connection
carries (uvicorn_websocket.py uses them; uvicorn_contract.py lists what uvicorn calls on them)."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.datastructures import Headers

NO_HEADERS = Headers()  # never written to


class Writable:
    """The part of `asyncio.Event` uvicorn uses for `writable`: an Event keeps a deque of
    waiters (about 700 bytes) on every connection, and the only waiter is the app's `send`
    while the peer does not read. Set from the start, as uvicorn sets its Event."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = True
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)


class Inbox:
    """The part of `asyncio.Queue` uvicorn uses, for one reader: the ASGI app's `receive`."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)
