"""The backplane: how a room's events reach every member of the room, in one order.

The manager hands each room event to the backplane and delivers what the backplane hands back
to its own clients. `LocalBackplane`, the default, is this process alone. `RedisBackplane`
(fennec_chat/redis_backplane.py) lets several processes share rooms, presence and history.
"""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .bans import Bans, MemoryBans, SQLiteBans
from .history import History, Stored, open_history
from .leave_grace import Away, AwayBook
from .protocol import encode
from .settings import Settings


@dataclass(frozen=True, slots=True)
class RoomEvent:
    """An encoded event for everyone in `room` but `exclude`."""

    room: str
    text: str
    message_id: int | None = None  # set for chat messages stored in the history
    exclude: str | None = None  # a client_id that must not receive it
    kick: str | None = None  # a client_id to close (4001) once everyone has the event


class Member(NamedTuple):
    """One member of a room, as presence shows it."""

    username: str
    away: bool = False  # its connection dropped a moment ago: it may be back (leave_grace.py)


class BackplaneUnavailable(Exception):
    """The backplane cannot carry events right now (it is reconnecting)."""


class Listener(Protocol):
    """What the backplane tells the room manager."""

    def deliver_room_event(self, event: RoomEvent) -> None:
        """A room event, in the room's one order: give it to this process's members."""

    def lobby_changed(self) -> None:
        """Rooms, members or names changed somewhere."""

    def backplane_lost(self) -> None:
        """The backplane is away: events cannot cross processes until it is back."""

    async def backplane_back(self, rooms: set[str], reset_rooms: set[str]) -> None:
        """The backplane is back: refresh what the members of `rooms` see (presence; a new
        `history` for `reset_rooms`, whose history was replaced meanwhile)."""


@dataclass(frozen=True, slots=True)
class RoomList:
    """The busiest rooms (name → {client_id: username}), busiest first, and how many there are."""

    rooms: list[tuple[str, dict[str, str]]]
    total: int


class Backplane(ABC):
    """Carries room events between the processes that serve a room, in one order for all."""

    history: History | None
    bans: Bans  # who may not come back to which room (bans.py)
    presence_outlives_process = False  # whether others can hold this process's members when it stops

    @abstractmethod
    async def start(self, listener: Listener) -> None:
        """Connect. From now on every room event comes back to `listener`, in order."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect, after the events already published have gone out."""

    @abstractmethod
    def publish(self, event: RoomEvent) -> None:
        """Send a room event (not a chat message) to every member of its room."""

    @abstractmethod
    def publish_message(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        """Store a chat message (when there is a history), then send it to the room.

        The future resolves once it is stored; a duplicate (a client_msg_id that `sender`
        used before) is not sent to the room again: the future's `Stored.duplicate` tells.
        """

    # Presence: who is in which room. The manager knows its own clients; these tell the
    # backplane, so that other processes know them too.

    @abstractmethod
    def join(self, room: str, client_id: str, username: str, first_here: bool) -> None:
        """A client of this process joined `room` (the first one here if `first_here`)."""

    @abstractmethod
    def leave(self, room: str, client_id: str, last_here: bool) -> None:
        """A client of this process left `room` (the last one here if `last_here`)."""

    @abstractmethod
    def rename(self, room: str, client_id: str, username: str) -> None:
        """A client of this process changed its name."""

    # Away members (leave_grace.py): still in the room's presence, until their grace ends.

    @abstractmethod
    def go_away(self, away: Away, grace: float, last_here: bool) -> None:
        """A client of this process dropped without a goodbye: keep it in presence, away."""

    @abstractmethod
    async def come_back(self, room: str, session: str, username: str, identity: str) -> str | None:
        """The client_id of the away member a new connection with these continues (it is no
        longer away from now on), or None. Atomic: two returning connections never both win."""

    @abstractmethod
    def end_grace(self, room: str, client_id: str, mark: str, left: str) -> None:
        """The member is gone after all: if it is still away (in absence `mark`; "": any),
        remove it and send the room `left` (its user_left), exactly once."""

    @abstractmethod
    async def ready(self, room: str) -> None:
        """Wait until this process receives `room`'s events."""

    @abstractmethod
    async def heard(self, room: str, message_id: int) -> None:
        """Wait (briefly) until every message up to `message_id` that this process will ever
        hear of has reached it. In one process a message is stored and delivered in one step,
        so it has; Redis delivers a message stored a moment ago a moment later."""

    @abstractmethod
    async def members(self, room: str) -> dict[str, Member]:
        """client_id → member, of the room's members that other processes have and of its
        away members (this process's own live members are the manager's to add)."""

    @abstractmethod
    async def busiest_rooms(self, limit: int) -> RoomList | None:
        """The `limit` rooms with the most members on every process, or None when this process
        is the only one (the manager knows its own rooms)."""

    @abstractmethod
    async def room_count(self) -> int:
        """Rooms with members, on every process."""

    @abstractmethod
    async def has_room(self, room: str) -> bool:
        """Whether `room` has members on any process."""

    # Seats: the sockets one client address holds, on every process.

    @abstractmethod
    async def take_seat(self, address: str, cap: int) -> bool:
        """Count one more socket for `address`, unless it holds `cap` already (0: no cap)."""

    @abstractmethod
    def release_seat(self, address: str) -> None:
        """Give back a seat taken by `take_seat`."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """For /health: what kind of backplane this is, and whether it works."""


class Seats(Counter[str]):
    """Client address → the sockets it holds on this process (a cap's local count)."""

    def take(self, address: str, cap: int) -> bool:
        if cap and self[address] >= cap:
            return False
        self[address] += 1
        return True

    def release(self, address: str) -> None:
        self[address] -= 1
        if self[address] <= 0:
            del self[address]


class LocalBackplane(Backplane):
    """One process: events go straight back to the manager, messages once they are stored.

    A room's other events wait behind its messages still being stored, in one queue per room,
    so that a room's events keep the order in which they happened (a message, then its author's
    rename). The queue is drained in order as messages are stored: an event never waits in a
    callback of its own, where a later event could overtake it.
    """

    def __init__(self, history: History | None) -> None:
        self.history = history
        # In the history's file if there is one (they outlive a restart), else in memory.
        opened = getattr(history, "opened", None)
        self.bans = SQLiteBans(opened) if opened is not None else MemoryBans()
        # room → what waits, in order: a message being stored (its future) or another event.
        self._waiting: dict[str, deque[asyncio.Future[Stored] | RoomEvent]] = {}
        self._delivered: dict[str, int] = {}  # room → newest id delivered, while more wait
        self._deliver: Callable[[RoomEvent], None] = lambda event: None
        self._rooms: set[str] = set()  # rooms with members, connected or away
        self._connected_rooms: set[str] = set()  # rooms with members connected
        self._away = AwayBook()
        self._seats = Seats()

    async def start(self, listener: Listener) -> None:
        self._deliver = listener.deliver_room_event
        if self.history is not None:
            await self.history.start()
        if isinstance(self.bans, SQLiteBans):
            self.bans.create()

    async def close(self) -> None:
        if self.history is not None:
            await self.history.close()

    def publish(self, event: RoomEvent) -> None:
        waiting = self._waiting.get(event.room)
        if waiting is None:
            self._deliver(event)
        else:
            waiting.append(event)

    def publish_message(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        if self.history is None:
            stored = Stored(event, encode(event))
            self._deliver(RoomEvent(room, stored.text))
            done = asyncio.get_running_loop().create_future()
            done.set_result(stored)
            return done
        storing = self.history.append(room, event, sender)
        self._waiting.setdefault(room, deque()).append(storing)
        storing.add_done_callback(functools.partial(self._drain, room))
        return storing

    # One process: the manager's own clients are everyone.

    def join(self, room: str, client_id: str, username: str, first_here: bool) -> None:
        self._rooms.add(room)
        self._connected_rooms.add(room)

    def leave(self, room: str, client_id: str, last_here: bool) -> None:
        if last_here:
            self._connected_rooms.discard(room)
            self._close_if_empty(room)

    def _close_if_empty(self, room: str) -> None:
        if room not in self._connected_rooms and not self._away.has_room(room):
            self._rooms.discard(room)
            if self.history is not None:
                self.history.forget(room)

    def go_away(self, away: Away, grace: float, last_here: bool) -> None:
        self._away.add(away)
        if last_here:
            self._connected_rooms.discard(away.room)  # the room stays: its away member is in it

    async def come_back(self, room: str, session: str, username: str, identity: str) -> str | None:
        away = self._away.take(room, session, username, identity)
        if away is None:
            return None
        self._close_if_empty(room)  # until it joins again, a moment from now
        return away.client_id

    def end_grace(self, room: str, client_id: str, mark: str, left: str) -> None:
        if self._away.remove(client_id, mark) is not None:
            self.publish(RoomEvent(room, left))  # after the room's messages still being stored
            self._close_if_empty(room)

    def rename(self, room: str, client_id: str, username: str) -> None:
        pass

    async def ready(self, room: str) -> None:
        pass

    async def heard(self, room: str, message_id: int) -> None:
        # A read sees what is committed; a committed message is delivered by the callback of
        # its future, a moment later (the same turn of the loop, or the next).
        for _ in range(1000):
            if room not in self._waiting or self._delivered.get(room, 0) >= message_id:
                return
            await asyncio.sleep(0)

    async def members(self, room: str) -> dict[str, Member]:
        return {away.client_id: Member(away.username, away=True) for away in self._away.in_room(room)}

    async def busiest_rooms(self, limit: int) -> RoomList | None:
        return None

    async def room_count(self) -> int:
        return len(self._rooms)

    async def has_room(self, room: str) -> bool:
        return room in self._rooms

    async def take_seat(self, address: str, cap: int) -> bool:
        return self._seats.take(address, cap)

    def release_seat(self, address: str) -> None:
        self._seats.release(address)

    def state(self) -> dict[str, Any]:
        return {"kind": "local", "connected": True}

    def _drain(self, room: str, upto: asyncio.Future[Stored] | None = None) -> None:
        """Deliver what waits in the room's queue, in order: up to the message `upto`, whose
        storing just finished (its sender's receipt for a resend, a callback of its own, comes
        right after it), then, a moment later, the events that followed it, up to the next
        message."""
        waiting = self._waiting.get(room)
        while waiting:
            item = waiting[0]
            if not isinstance(item, RoomEvent) and (upto is None or not item.done()):
                break
            waiting.popleft()
            if isinstance(item, RoomEvent):
                self._deliver(item)
                continue
            if not item.cancelled() and item.exception() is None:  # else the sender hears of it
                stored = item.result()
                if not stored.duplicate:
                    self._delivered[room] = stored.event["id"]
                    self._deliver(RoomEvent(room, stored.text, message_id=stored.event["id"]))
            if item is upto:
                break
        if not waiting:
            self._waiting.pop(room, None)
            self._delivered.pop(room, None)
        elif upto is not None and isinstance(waiting[0], RoomEvent):
            asyncio.get_running_loop().call_soon(self._drain, room)


def open_backplane(settings: Settings) -> Backplane:
    """The backplane the settings ask for (not started yet)."""
    if settings.redis_url:
        from .redis_backplane import RedisBackplane  # only needs redis-py when asked for

        return RedisBackplane(settings)
    return LocalBackplane(open_history(settings))
