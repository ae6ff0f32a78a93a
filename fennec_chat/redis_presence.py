"""Who is where, across processes: presence, the room list, the sockets per address, and the
heartbeats that tell a dead process's clients from live ones.

A hash per room (client_id → name and process), a sorted set of rooms by member count, a hash
per client address (process → sockets), and a heartbeat key per process. Every process checks
the others' heartbeats; when one stops, its clients are removed, their `user_left` published
and its seats given back, by one atomic script, so exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .backplane import BackplaneUnavailable, Member, RoomEvent, RoomList, Seats
from .leave_grace import Away
from .protocol import encode, now, user_joined
from .redis_scripts import (
    AWAY,
    COME_BACK,
    END_GRACE,
    JOIN,
    LEAVE,
    REAP,
    RELEASE_SEAT,
    RENAME,
    RESTATE_SEATS,
    TAKE_SEAT,
    RedisKeys,
)
from .settings import Settings

logger = logging.getLogger("fennec_chat")

SEATS_RESTATED_EVERY = 60.0  # seconds


class RedisPresence:
    """The presence half of `RedisBackplane` (a mixin: it uses the backplane's connections
    `_redis` and `_beats`, its ordered command queue `_send` and its `_connected` state)."""

    settings: Settings
    keys: RedisKeys
    process_id: str
    _redis: Any
    _beats: Any  # a connection of its own: a crowd's reads must not hold up our heartbeat
    _connected: bool
    _send: Callable[..., Any]
    _subscribe: Callable[[str], None]
    _unsubscribe: Callable[[str], None]
    publish: Callable[[RoomEvent], None]

    def _init_presence(self) -> None:
        self._local: dict[str, dict[str, str]] = {}  # room → {client_id: name} on this process
        self._seats = Seats()  # client address → sockets on this process
        self._reap_not_before = 0.0
        self._restate_at = time.monotonic() + SEATS_RESTATED_EVERY

    # --- Presence -------------------------------------------------------------------------

    def join(self, room: str, client_id: str, username: str, first_here: bool) -> None:
        self._local.setdefault(room, {})[client_id] = username
        if first_here:
            self._subscribe(room)
        self._register(room, client_id, username)

    def _register(self, room: str, client_id: str, username: str) -> None:
        member = json.dumps({"username": username, "process": self.process_id})
        keys = [self.keys.room(room, "members"), self.keys.rooms, self._mine("members"), self.keys.lobby]
        self._send(lambda pipe: pipe.eval(JOIN, 4, *keys, client_id, member, room))

    def leave(self, room: str, client_id: str, last_here: bool) -> None:
        self._local.get(room, {}).pop(client_id, None)
        if last_here:
            self._local.pop(room, None)
            self._unsubscribe(room)
        keys = [self.keys.room(room, "members"), self.keys.rooms, self._mine("members"), self.keys.lobby]
        self._send(lambda pipe: pipe.eval(LEAVE, 4, *keys, client_id, room))

    def rename(self, room: str, client_id: str, username: str) -> None:
        if client_id in self._local.get(room, {}):
            self._local[room][client_id] = username
        member = json.dumps({"username": username, "process": self.process_id})
        keys = [self.keys.room(room, "members"), self.keys.lobby]
        self._send(lambda pipe: pipe.eval(RENAME, 2, *keys, client_id, member))

    async def members(self, room: str) -> dict[str, Member]:
        try:
            raw = await self._redis.hgetall(self.keys.room(room, "members"))
        except (RedisError, OSError) as error:
            logger.warning("presence of %s unavailable: %s", room, error)
            return {}
        members = {}
        for client_id, text in raw.items():
            entry = json.loads(text)
            members[client_id] = Member(entry["username"], away="away" in entry)
        return members

    # --- Away members (leave_grace.py): in Redis, so that any process may continue or end them

    def go_away(self, away: Away, grace: float, last_here: bool) -> None:
        room = away.room
        self._local.get(room, {}).pop(away.client_id, None)
        if last_here:
            self._local.pop(room, None)
            self._unsubscribe(room)
        entry = {"username": away.username, "process": self.process_id, "away": away.mark}
        entry.update(session=away.session, identity=away.identity)
        keys = [self.keys.room(room, "members"), self.keys.room(room, "away")]
        args = (away.client_id, json.dumps(entry), int(grace * 1000))
        self._send(lambda pipe: pipe.eval(AWAY, 2, *keys, *args))

    async def come_back(self, room: str, session: str, username: str, identity: str) -> str | None:
        # On the publishing connection, in order: after this process's own `go_away`.
        keys = [self.keys.room(room, "members"), self.keys.room(room, "away"), self._mine("members")]
        args = (session, username, identity, self.process_id, room, self.keys.prefix)
        returned = self._send(lambda pipe: pipe.eval(COME_BACK, 4, *keys, self.keys.lobby, *args), True)
        assert returned is not None
        try:
            return await returned or None
        except BackplaneUnavailable:
            return None  # Redis is away: it joins anew

    def end_grace(self, room: str, client_id: str, mark: str, left: str) -> None:
        keys = [self.keys.room(room, "members"), self.keys.lobby]
        args = (self.keys.prefix, room, client_id, mark, left)
        self._send(lambda pipe: pipe.eval(END_GRACE, 2, *keys, *args))

    async def busiest_rooms(self, limit: int) -> RoomList | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrevrange(self.keys.rooms, 0, limit - 1)
                pipe.zcard(self.keys.rooms)
                names, total = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self.keys.room(name, "members"))
                everyone = await pipe.execute()
        except (RedisError, OSError) as error:
            logger.warning("room list unavailable: %s", error)
            return RoomList([], 0)
        rooms = [
            (name, {client_id: json.loads(member)["username"] for client_id, member in members.items()})
            for name, members in zip(names, everyone, strict=True)
        ]
        return RoomList(rooms, total)

    async def room_count(self) -> int:
        try:
            return await self._redis.zcard(self.keys.rooms)
        except (RedisError, OSError):
            return len(self._local)  # Redis is away: what this process knows

    async def has_room(self, room: str) -> bool:
        try:
            return await self._redis.zscore(self.keys.rooms, room) is not None
        except (RedisError, OSError):
            return room in self._local

    def _announce_again(self) -> None:
        """After an outage (Redis may have restarted empty): our clients and seats, anew."""
        for room, members in self._local.items():
            for client_id, username in members.items():
                self._register(room, client_id, username)
        if self.settings.max_connections_per_ip:
            self._send(self._restate_seats())

    # --- Seats: the sockets one client address holds, on every process ---------------------

    async def take_seat(self, address: str, cap: int) -> bool:
        """Counted in Redis, so that a cap holds across processes; while Redis is away, each
        process holds the cap on its own."""
        if cap and self._seats[address] >= cap:  # this process's own count first: no round trip
            return False
        if cap and self._connected:
            keys = [self.keys.seats(address), self._mine("seats")]
            try:
                if not await self._redis.eval(TAKE_SEAT, 2, *keys, self.process_id, cap, address):
                    return False
            except (RedisError, OSError) as error:
                logger.warning("could not count a connection in Redis: %s", error)
        return self._seats.take(address, 0)  # counted here too, for restating after an outage

    def release_seat(self, address: str) -> None:
        self._seats.release(address)
        if self.settings.max_connections_per_ip:
            keys = [self.keys.seats(address), self._mine("seats")]
            self._send(lambda pipe: pipe.eval(RELEASE_SEAT, 2, *keys, self.process_id, address))

    def _restate_seats(self, *, leaving: bool = False) -> Callable[[Any], None]:
        """A pipeline step that replaces this process's seat counts in Redis with its own (or,
        `leaving`, with none): releases lost while Redis was away are forgotten with it."""
        counts = [] if leaving else [item for pair in self._seats.items() for item in pair]
        key = self._mine("seats")
        return lambda pipe: pipe.eval(RESTATE_SEATS, 1, key, self.process_id, self.keys.prefix, *counts)

    # --- Heartbeats and reaping -----------------------------------------------------------

    def _mine(self, what: str) -> str:
        return self.keys.process(self.process_id, what)

    async def _heartbeat_once(self) -> bool:
        """Say we are alive; False if our last heartbeat had already expired."""
        beat = self.settings.redis_heartbeat
        async with self._beats.pipeline(transaction=False) as pipe:
            pipe.set(self._mine("alive"), 1, px=int(3 * beat * 1000), get=True)
            pipe.sadd(self.keys.processes, self.process_id)
            was_alive, _ = await pipe.execute()
        return was_alive is not None

    async def _heartbeat_forever(self) -> None:
        # Only the heartbeat, on its own connection: reaping the others takes a round trip per
        # process, and a crowd's reads can fill the shared pool for seconds.
        while True:
            await asyncio.sleep(self.settings.redis_heartbeat)
            if not self._connected:
                continue
            try:
                if not await self._heartbeat_once():
                    await self._after_a_silence()
            except (RedisError, OSError) as error:
                logger.warning("heartbeat failed: %s", error)

    async def _after_a_silence(self) -> None:
        """Our heartbeat expired while we were alive (a pause of 3 heartbeats: an overloaded
        machine). If another process took us for dead meanwhile, it removed our members (their
        rooms heard them leave): list them again, so presence and the lobby are right, and
        tell their rooms they are back (as a join: they heard a leave)."""
        if self._local and not await self._redis.exists(self._mine("members")):
            logger.error(
                "this process was silent for over %g s and the others took it for dead: its members "
                "were announced as gone; listing them again",
                3 * self.settings.redis_heartbeat,
            )
            self._announce_again()
            for room, members in self._local.items():
                for client_id, username in members.items():
                    self.publish(RoomEvent(room, encode(user_joined(username, client_id)), exclude=client_id))

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.redis_heartbeat)
            if not self._connected:
                continue
            try:
                if time.monotonic() >= self._reap_not_before:
                    await self._reap_dead_processes()
                if self.settings.max_connections_per_ip and time.monotonic() >= self._restate_at:
                    # Now and then, in case a count went astray (a take whose caller vanished).
                    self._restate_at = time.monotonic() + SEATS_RESTATED_EVERY
                    self._send(self._restate_seats())
            except (RedisError, OSError) as error:
                logger.warning("could not check the other processes: %s", error)

    def _spare_the_others(self) -> None:
        """We were away: the others may not have seen our heartbeats either; reap nobody yet."""
        self._reap_not_before = time.monotonic() + 3 * self.settings.redis_heartbeat

    async def _reap_dead_processes(self) -> None:
        for process_id in await self._redis.smembers(self.keys.processes):
            if process_id == self.process_id:
                continue
            if await self._redis.exists(self.keys.process(process_id, "alive")):
                continue
            keys = [
                self.keys.processes,
                self.keys.process(process_id, "members"),
                self.keys.process(process_id, "alive"),
                self.keys.lobby,
            ]
            gone = await self._redis.eval(REAP, 4, *keys, process_id, now(), self.keys.prefix)
            if gone and gone > 0:
                logger.warning("process %s stopped answering: removed its %d clients", process_id, gone)
