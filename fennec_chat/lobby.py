"""The lobby: the list of active rooms, for the sockets that watch it.

However many watchers, rooms and refresh requests there are, the list is built at most once per
`--lobby-interval`, encoded once, and every watcher gets the same text. It is bounded, too: the
busiest rooms only, with a count of all of them, so that one update stays small.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from . import protocol

logger = logging.getLogger("fennec_chat")

LOBBY_ROOMS = 100  # rooms listed, busiest first
LOBBY_USERNAMES = 50  # names listed per room (its "users" count is exact)

Members = dict[str, str]  # client_id → username


def room_list(rooms: Iterable[tuple[str, Members]], total: int) -> dict:
    """The `rooms_update` event for these rooms (at most LOBBY_ROOMS of them), busiest first."""
    busiest = sorted(
        ((room, members) for room, members in rooms if members), key=lambda item: (-len(item[1]), item[0])
    )
    listed = {
        room: {"users": len(members), "usernames": sorted(members.values())[:LOBBY_USERNAMES]}
        for room, members in busiest[:LOBBY_ROOMS]
    }
    return protocol.rooms_update(listed, max(total, len(listed)))


class Lobby:
    """Watchers of the room list, and the list itself, encoded once per change."""

    def __init__(
        self,
        interval: float,
        build: Callable[[], Awaitable[dict]],
        deliver: Callable[[str, tuple[str, ...]], None],
    ) -> None:
        self.watchers: set[str] = set()
        self._interval = interval
        self._build = build
        self._deliver = deliver
        self._text: str | None = None
        self._stale = True
        self._built_at = float("-inf")
        self._building: asyncio.Future[None] | None = None
        self._push = Throttle(interval, self._push_to_watchers)

    def changed(self) -> None:
        """Rooms, members or names changed somewhere: watchers get a new list soon."""
        self._stale = True
        if self.watchers:
            self._push.request()

    async def current(self) -> str:
        """The encoded list. Built afresh only when it is stale and was not built within the
        interval: otherwise the watchers get the fresh one pushed a moment later."""
        loop = asyncio.get_running_loop()
        if self._text is None or (self._stale and loop.time() - self._built_at >= self._interval):
            await self._rebuild()
        elif self._stale:
            self._push.request()
        return self._text if self._text is not None else protocol.encode(room_list([], 0))

    def cancel(self) -> None:
        self._push.cancel()

    async def _rebuild(self) -> None:
        if self._building is not None:  # one build at a time; the others wait for it
            await asyncio.shield(self._building)
            return
        self._building = asyncio.get_running_loop().create_future()
        try:
            self._stale = False
            self._built_at = asyncio.get_running_loop().time()
            self._text = protocol.encode(await self._build())
        except Exception:
            self._stale = True  # try again next time
            raise
        finally:
            self._building.set_result(None)
            self._building = None

    async def _push_to_watchers(self) -> None:
        if self.watchers:
            if self._stale or self._text is None:  # `current()` may have rebuilt it meanwhile
                await self._rebuild()
            if self._text is not None:
                self._deliver(self._text, tuple(self.watchers))


class Throttle:
    """Runs a coroutine soon after `request()`, at most once per `interval` seconds.

    Requests that arrive while one is pending are merged into it, so a burst of room changes
    becomes one `rooms_update` for the lobby.
    """

    def __init__(self, interval: float, callback: Callable[[], Awaitable[None]]) -> None:
        self._interval = interval
        self._callback = callback
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task | None = None
        self._last_run = float("-inf")

    def request(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_run + self._interval - loop.time())
            self._timer = loop.call_later(delay, self._run)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is not None:
            self._running.cancel()

    def _run(self) -> None:
        self._timer = None
        self._last_run = asyncio.get_running_loop().time()
        self._running = asyncio.create_task(self._call())

    async def _call(self) -> None:
        try:
            await self._callback()
        except Exception:
            logger.exception("lobby update failed")
        finally:
            self._running = None
