"""Who is where, across processes: presence, the room list, the sockets per address, and the
heartbeats that tell a dead process's clients from live ones.

A hash per room (client_id → name and process), a sorted set of rooms by member count, a hash
per client address (process → sockets), and a heartbeat key per process. Every process checks
the others' heartbeats; when one stops, its clients are removed and their `user_left` published
by one atomic script per room, so exactly once, and its seats are given back.

Each script touches the keys of one room (or one process, one address, the lobby) only, so that
on a Redis Cluster it runs on one shard: a change of a room's members is made in the room, then
its difference is added to the room list (`LOBBY`), then noted under the process that holds
the member (which a reaper reads), each in its own step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .backplane import BackplaneUnavailable, Member, RoomEvent, RoomList, Seats
from .leave_grace import Away
from .protocol import encode, now, user_joined
from .redis_connections import UNAVAILABLE
from .redis_scripts import (
    AWAY,
    COME_BACK,
    END_GRACE,
    FORGET,
    LOBBY,
    REAP_ROOM,
    RELEASE_SEAT,
    RENAME,
    TAKE_SEAT,
    UNLIST_EMPTY,
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
    _chore: Callable[[Any], None]
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

    def _register(self, room: str, client_id: str, username: str) -> asyncio.Future[int]:
        """List the member; the future says whether it was new there (1) or listed already (0)."""
        member = json.dumps({"username": username, "process": self.process_id})
        # Noted under this process first: should the process die next, a reaper finds the member.
        self._send(lambda pipe: pipe.sadd(self._mine("members"), self.keys.listed(room, client_id)))
        added = self._send(lambda pipe: pipe.hset(self.keys.room(room, "members"), client_id, member), True)
        assert added is not None
        self._count_change(room, added, 1)
        return added

    def leave(self, room: str, client_id: str, last_here: bool) -> None:
        self._local.get(room, {}).pop(client_id, None)
        if last_here:
            self._local.pop(room, None)
            self._unsubscribe(room)
        removed = self._send(lambda pipe: pipe.hdel(self.keys.room(room, "members"), client_id), True)
        assert removed is not None
        self._send(lambda pipe: pipe.srem(self._mine("members"), self.keys.listed(room, client_id)))
        self._count_change(room, removed, -1)

    def _count_change(self, room: str, changed: asyncio.Future, sign: int) -> None:
        """Once `changed` says how many members came (or went), the room list counts them."""

        def count(done: asyncio.Future) -> None:
            if done.exception() is None:  # else Redis is away: announced again when it is back
                self._lobby(room, sign * int(bool(done.result())))

        changed.add_done_callback(count)

    def _lobby(self, room: str, change: int) -> None:
        """Add `change` to the room's count in the room list and tell every process."""
        script, args = self.keys.script(LOBBY), (self.keys.rooms, room, change, self.keys.lobby)
        self._send(lambda pipe: pipe.eval(script, 1, *args))

    def rename(self, room: str, client_id: str, username: str) -> None:
        if client_id in self._local.get(room, {}):
            self._local[room][client_id] = username
        member = json.dumps({"username": username, "process": self.process_id})
        members = self.keys.room(room, "members")
        self._send(lambda pipe: pipe.eval(RENAME, 1, members, client_id, member))
        self._lobby(room, 0)

    async def members(self, room: str) -> dict[str, Member]:
        try:
            raw = await self._redis.hgetall(self.keys.room(room, "members"))
        except UNAVAILABLE as error:
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
        listed_anew = self._send(lambda pipe: pipe.eval(AWAY, 2, *keys, *args), True)
        assert listed_anew is not None
        self._count_change(room, listed_anew, 1)  # 0, unless a reaper had taken it meanwhile

    async def come_back(self, room: str, session: str, username: str, identity: str) -> str | None:
        # On the publishing connection, in order: after this process's own `go_away`.
        keys = [self.keys.room(room, "members"), self.keys.room(room, "away")]
        args = (session, username, identity, self.process_id)
        returned = self._send(lambda pipe: pipe.eval(COME_BACK, 2, *keys, *args), True)
        assert returned is not None
        try:
            taken = await returned
        except BackplaneUnavailable:
            return None  # Redis is away: it joins anew
        if not taken:
            return None
        client_id, holder = taken
        listed = self.keys.listed(room, client_id)
        self._send(lambda pipe: pipe.sadd(self._mine("members"), listed))
        if holder != self.process_id:
            self._send(lambda pipe: pipe.srem(self.keys.process(holder, "members"), listed))
        self._lobby(room, 0)
        return client_id

    def end_grace(self, room: str, client_id: str, mark: str, left: str) -> None:
        keys = [self.keys.room(room, "members"), self.keys.room(room, "away")]
        args = (self.keys.room(room, "events"), client_id, mark, left)
        ended = self._send(lambda pipe: pipe.eval(self.keys.script(END_GRACE), 2, *keys, *args), True)
        assert ended is not None

        def forget(done: asyncio.Future) -> None:
            holder = done.result() if done.exception() is None else None
            if holder:
                listed = self.keys.listed(room, client_id)
                self._send(lambda pipe: pipe.srem(self.keys.process(holder, "members"), listed))
                self._lobby(room, -1)

        ended.add_done_callback(forget)

    async def busiest_rooms(self, limit: int) -> RoomList | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrevrange(self.keys.rooms, 0, limit - 1, withscores=True)
                pipe.zcard(self.keys.rooms)
                listed, total = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for name, _ in listed:
                    pipe.hgetall(self.keys.room(name, "members"))
                everyone = await pipe.execute()
            for (name, count), members in zip(listed, everyone, strict=True):
                if not members:  # its last leave was counted on a shard that failed since
                    await self._redis.eval(UNLIST_EMPTY, 1, self.keys.rooms, name, count)
        except UNAVAILABLE as error:
            logger.warning("room list unavailable: %s", error)
            return RoomList([], 0)
        rooms = [
            (name, {client_id: json.loads(member)["username"] for client_id, member in members.items()})
            for (name, _), members in zip(listed, everyone, strict=True)
            if members
        ]
        return RoomList(rooms, total)

    async def room_count(self) -> int:
        try:
            return await self._redis.zcard(self.keys.rooms)
        except UNAVAILABLE:
            return len(self._local)  # Redis is away: what this process knows

    async def has_room(self, room: str) -> bool:
        try:
            return await self._redis.zscore(self.keys.rooms, room) is not None
        except UNAVAILABLE:
            return room in self._local

    def _announce_again(self) -> list[tuple[str, str, str, asyncio.Future[int]]]:
        """After an outage (Redis may have restarted empty, or another process took this one
        for dead): our clients and seats, anew. Each with whether it had to be listed again."""
        again = [
            (room, client_id, username, self._register(room, client_id, username))
            for room, members in self._local.items()
            for client_id, username in members.items()
        ]
        if self.settings.max_connections_per_ip:
            self._chore(self._restate_seats())
        return again

    # --- Seats: the sockets one client address holds, on every process ---------------------

    async def take_seat(self, address: str, cap: int) -> bool:
        """Counted in Redis, so that a cap holds across processes; while Redis is away, each
        process holds the cap on its own."""
        if cap and self._seats[address] >= cap:  # this process's own count first: no round trip
            return False
        if cap and self._connected:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.sadd(self._mine("seats"), address)  # noted first: a reaper finds it
                    pipe.eval(TAKE_SEAT, 1, self.keys.seats(address), self.process_id, cap)
                    _, taken = await pipe.execute()
                if not taken:
                    return False
            except UNAVAILABLE as error:
                logger.warning("could not count a connection in Redis: %s", error)
        return self._seats.take(address, 0)  # counted here too, for restating after an outage

    def release_seat(self, address: str) -> None:
        self._seats.release(address)
        if self.settings.max_connections_per_ip:
            seats = self.keys.seats(address)
            self._send(lambda pipe: pipe.eval(RELEASE_SEAT, 1, seats, self.process_id))

    async def _restate_seats(self, *, leaving: bool = False) -> None:
        """Replace this process's seat counts in Redis with its own (or, `leaving`, with none):
        releases lost while Redis was away are forgotten with it."""
        counts = {} if leaving else dict(self._seats.items())
        mine = self._mine("seats")
        with contextlib.suppress(*UNAVAILABLE):
            gone = set(await self._redis.smembers(mine)) - counts.keys()
            self._give_seats_back(self.process_id, gone)
            if gone:
                self._send(lambda pipe: pipe.srem(mine, *gone))
            for address, count in counts.items():
                seats = self.keys.seats(address)
                self._send(lambda pipe, seats=seats, count=count: pipe.hset(seats, self.process_id, count))
            if counts:
                self._send(lambda pipe: pipe.sadd(mine, *counts))

    def _give_seats_back(self, process_id: str, addresses: set[str]) -> None:
        for address in addresses:
            seats = self.keys.seats(address)
            self._send(lambda pipe, seats=seats: pipe.hdel(seats, process_id))

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
            except UNAVAILABLE as error:
                logger.warning("heartbeat failed: %s", error)

    async def _after_a_silence(self) -> None:
        """Our heartbeat expired while we were alive (a pause of 3 heartbeats: an overloaded
        machine). If another process took us for dead meanwhile, it removed our members (their
        rooms heard them leave): list them again, so presence and the lobby are right, and
        tell their rooms they are back (as a join: they heard a leave)."""
        returned = 0
        for room, client_id, username, added in self._announce_again():
            with contextlib.suppress(BackplaneUnavailable):
                if await added:  # it had been removed
                    returned += 1
                    self.publish(RoomEvent(room, encode(user_joined(username, client_id)), exclude=client_id))
        if returned:
            logger.error(
                "this process was silent for over %g s and the others took it for dead: %d of its "
                "members were announced as gone; listing them again",
                3 * self.settings.redis_heartbeat,
                returned,
            )

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
                    await self._restate_seats()
            except UNAVAILABLE as error:
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
            gone = await self._reap(process_id)
            if gone > 0:
                logger.warning("process %s stopped answering: removed its %d clients", process_id, gone)

    async def _reap(self, dead: str) -> int:
        """Remove a dead process's members, room by room (each room hears each leave once, even
        when two processes reap at once), then forget it and give its seats back; unless it is
        alive again meanwhile (only paused). An away member stays until its grace ends."""
        process_keys = [self.keys.process(dead, what) for what in ("alive", "members", "seats")]
        rooms: dict[str, list[str]] = {}
        for listed in await self._redis.smembers(process_keys[1]):
            room, _, client_id = listed.partition("|")
            rooms.setdefault(room, []).append(client_id)
        gone = kept = 0
        for room, client_ids in rooms.items():
            keys = [self.keys.room(room, "members"), self.keys.room(room, "away")]
            args = (self.keys.room(room, "events"), dead, now(), *client_ids)
            outcome = await self._redis.eval(self.keys.script(REAP_ROOM), 2, *keys, *args)
            left, kept = outcome.count(0), kept + outcome.count(1)
            if left:
                gone += left
                self._lobby(room, -left)
            taken = [client_id for client_id, o in zip(client_ids, outcome, strict=True) if o != 1]
            done = [self.keys.listed(room, client_id) for client_id in taken]
            if done:
                await self._redis.eval(FORGET, 3, *process_keys, "entries", *done)
        addresses = set(await self._redis.smembers(process_keys[2]))
        if await self._redis.eval(FORGET, 3, *process_keys, "seats" if kept else "all"):
            self._give_seats_back(dead, addresses)
            if not kept:
                await self._redis.srem(self.keys.processes, dead)
        return gone
