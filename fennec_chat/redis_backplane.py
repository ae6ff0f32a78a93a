"""Several chat processes sharing rooms, presence, the lobby and history through Redis.

Fan-out: one pub/sub channel per room. Every room event, this process's own included, is
published to Redis and delivered to local clients only when it comes back from the channel,
so every process delivers a room's events in the one order Redis gave them. A process
subscribes to a room's channel while it has clients in the room. Each event is encoded once
by its sender and delivered as received: one encoding per process.

Publishing goes through one connection, in order: commands queue up and go out in pipelines,
so many events share a round trip. A chat message is numbered, stored in the room's stream
and published by one Lua script, so ids, history and fan-out order always agree.

Presence: a hash per room (client_id → name and process) and a heartbeat key per process.
Every process checks the others' heartbeats; when one stops, its clients are removed and
their `user_left` is published, by one atomic script, so exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

try:
    import redis.asyncio as redis
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
    from redis.retry import Retry
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise RuntimeError("--redis-url needs redis-py: pip install 'fennec-chat[redis]'") from missing

from .backplane import Backplane, BackplaneUnavailable, Deliver, RoomEvent, RoomList, StateChanged
from .history import History, RoomState, Stored
from .protocol import encode, now
from .settings import Settings

logger = logging.getLogger("fennec_chat")

SEATS_RESTATED_EVERY = 60.0  # seconds

REDIS_OPTIONS: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": 2, "socket_timeout": 5}

# Number, store and publish one message. A client_msg_id its sender used before returns the
# original instead. Every key of the room's history lives `ttl` ms past its last message.
APPEND = """
local stream, last_id, epoch, client_msg_ids, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local event, client_msg_id, retention, new_epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ttl = tonumber(ARGV[5])
redis.call('SET', epoch, new_epoch, 'NX')
if client_msg_id ~= '' then
  local earlier = redis.call('ZSCORE', client_msg_ids, client_msg_id)
  if earlier then
    local entry = redis.call('XRANGE', stream, '0-' .. earlier, '0-' .. earlier)
    if #entry > 0 then return {1, entry[1][2][2]} end
  end
end
local id = redis.call('INCR', last_id)
-- The event arrives encoded without its id: put the id first ('{' + '"id":N,' + the rest).
local text = '{"id":' .. id .. ',' .. string.sub(event, 2)
redis.call('XADD', stream, 'MAXLEN', retention, '0-' .. id, 'e', text)
if client_msg_id ~= '' then
  redis.call('ZADD', client_msg_ids, id, client_msg_id)
  redis.call('ZREMRANGEBYSCORE', client_msg_ids, '-inf', id - retention)
end
if ttl > 0 then
  for _, key in ipairs({stream, last_id, epoch, client_msg_ids}) do redis.call('PEXPIRE', key, ttl) end
end
redis.call('PUBLISH', channel, id .. '\\t\\n' .. text)
return {0, text}
"""

# An epoch made for a room without messages expires too (a visit stores nothing for good).
ROOM_STATE = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'NX')
end
return {redis.call('GET', KEYS[2]), tonumber(redis.call('GET', KEYS[1]) or '0')}
"""

# Rooms with members are a sorted set scored by their member count: the lobby reads the busiest
# ones without looking at the others.
JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('HLEN', KEYS[1]), ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3] .. '|' .. ARGV[1])
redis.call('PUBLISH', KEYS[4], '')
"""

LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2] .. '|' .. ARGV[1])
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) else redis.call('ZADD', KEYS[2], left, ARGV[2]) end
redis.call('PUBLISH', KEYS[4], '')
"""

# Seats: the sockets each process holds for one client address (a hash: process → count).
TAKE_SEAT = """
local cap, total = tonumber(ARGV[2]), 0
for _, count in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(count) end
if cap > 0 and total >= cap then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# What this process holds, said anew: its old counts go (some releases may have been lost while
# Redis was away), the ones given (address, count, address, count, ...) are set.
RESTATE_SEATS = """
local mine, process, prefix = KEYS[1], ARGV[1], ARGV[2]
for _, address in ipairs(redis.call('SMEMBERS', mine)) do
  redis.call('HDEL', prefix .. 'seats:' .. address, process)
end
redis.call('DEL', mine)
for i = 3, #ARGV, 2 do
  redis.call('HSET', prefix .. 'seats:' .. ARGV[i], process, ARGV[i + 1])
  redis.call('SADD', mine, ARGV[i])
end
"""

RELEASE_SEAT = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
"""

RENAME = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], '')
end
"""

# Remove a dead process's clients from their rooms and tell each room they left.
REAP = """
local processes, members_of_dead, alive, rooms, lobby = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local dead, timestamp, prefix = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', alive) == 1 then return -1 end
local entries = redis.call('SMEMBERS', members_of_dead)
for _, entry in ipairs(entries) do
  local bar = string.find(entry, '|', 1, true)
  local room, client_id = string.sub(entry, 1, bar - 1), string.sub(entry, bar + 1)
  local members = prefix .. 'room:' .. room .. ':members'
  local member = redis.call('HGET', members, client_id)
  if member then
    redis.call('HDEL', members, client_id)
    local count = redis.call('HLEN', members)
    if count == 0 then redis.call('ZREM', rooms, room) else redis.call('ZADD', rooms, count, room) end
    local name = cjson.decode(member)['username']
    local left = cjson.encode({type = 'user_left', username = name, client_id = client_id,
                               message = name .. ' left the room', timestamp = timestamp})
    redis.call('PUBLISH', prefix .. 'room:' .. room .. ':events', '\\t\\n' .. left)
  end
end
redis.call('DEL', members_of_dead)
local seats_of_dead = prefix .. 'process:' .. dead .. ':seats'
for _, address in ipairs(redis.call('SMEMBERS', seats_of_dead)) do
  redis.call('HDEL', prefix .. 'seats:' .. address, dead)
end
redis.call('DEL', seats_of_dead)
redis.call('SREM', processes, dead)
redis.call('PUBLISH', lobby, '')
return #entries
"""


class RedisBackplane(Backplane):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.history = RedisHistory(self) if settings.history else None
        # Commands wait here to go out in order, in pipelines, on the writer connection.
        self._queue: deque[tuple[Callable[[Any], None], asyncio.Future | None]] = deque()
        self._queue_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._subscriptions: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (command, room), in order
        self._local: dict[str, dict[str, str]] = {}  # room → {client_id: name} on this process
        self._seats: Counter[str] = Counter()  # client address → sockets on this process
        self._ready: dict[str, asyncio.Future[None]] = {}  # room → subscribed to its channel
        self._epochs: dict[str, str] = {}  # room → the history epoch this process has seen
        self._last_ids: dict[str, int] = {}  # room → the newest message id delivered here
        self._caught_up_to: dict[str, int] = {}  # room → newest id delivered by the last catch-up
        self._pubsub: Any = None
        self._connected = False
        self._reap_not_before = 0.0
        self._restate_at = time.monotonic() + SEATS_RESTATED_EVERY
        self._tasks: list[asyncio.Task] = []
        self._deliver: Deliver = lambda event: None
        self._lobby_changed: Callable[[], None] = lambda: None
        self._state_changed: Callable[[bool, set[str]], None] = lambda connected, reset: None

    # --- Keys ---------------------------------------------------------------------------------

    def _room_key(self, room: str, what: str) -> str:
        return f"{self.prefix}room:{room}:{what}"

    def _process_key(self, process_id: str, what: str) -> str:
        return f"{self.prefix}process:{process_id}:{what}"

    @property
    def _lobby_channel(self) -> str:
        return f"{self.prefix}lobby"

    @property
    def _rooms_key(self) -> str:
        return f"{self.prefix}busy_rooms"  # room → members, on every process

    def _seat_keys(self, address: str) -> list[str]:
        return [f"{self.prefix}seats:{address}", self._process_key(self.process_id, "seats")]

    # --- Start and stop -----------------------------------------------------------------------

    async def start(
        self, deliver: Deliver, lobby_changed: Callable[[], None], state_changed: StateChanged
    ) -> None:
        self._deliver, self._lobby_changed, self._state_changed = deliver, lobby_changed, state_changed
        url = self.settings.redis_url
        self._redis = redis.from_url(url, **REDIS_OPTIONS)
        self._writer = self._new_writer()
        try:
            await self._redis.ping()
        except (RedisError, OSError) as error:
            raise RuntimeError(f"cannot reach Redis at {url}: {error}") from error
        self._connected = True
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="redis-writer"),
            asyncio.create_task(self._listen_forever(), name="redis-listener"),
            asyncio.create_task(self._heartbeat_forever(), name="redis-heartbeat"),
            asyncio.create_task(self._subscribe_forever(), name="redis-subscriptions"),
        ]

    async def close(self) -> None:
        if self.settings.max_connections_per_ip:
            self._send(self._restate_seats(leaving=True))  # the others will not reap us
        await self._flush()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._process_key(self.process_id, "alive"))
            await self._redis.srem(f"{self.prefix}processes", self.process_id)
        for client in (self._redis, self._writer):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _new_writer(self) -> Any:
        """The one connection that publishes, in order. It never retries on its own: a failed
        publish is reported to its sender, who may send again (client_msg_id makes that safe),
        while a silent retry could duplicate."""
        options = {**REDIS_OPTIONS, "retry": Retry(NoBackoff(), 0), "single_connection_client": True}
        return redis.from_url(self.settings.redis_url, **options)

    async def _flush(self, timeout: float = 3) -> None:
        """Wait (a little) for queued commands to go out."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    # --- Publishing, in order -----------------------------------------------------------------

    def _send(self, add: Callable[[Any], None], want_result: bool = False) -> asyncio.Future | None:
        """Queue one command (`add` puts it on a pipeline); its future gets the reply."""
        future = asyncio.get_running_loop().create_future() if want_result else None
        if not self._connected:
            if future is not None:
                future.set_exception(BackplaneUnavailable("Redis is unreachable"))
            return future
        self._queue.append((add, future))
        self._queue_ready.set()
        self._idle.clear()
        return future

    async def _write_forever(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
            await self._queue_ready.wait()
            self._queue_ready.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
                try:
                    pipe = self._writer.pipeline(transaction=False)
                    for add, _ in batch:
                        add(pipe)
                    replies = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError) as error:
                    self._lost(error)
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(BackplaneUnavailable(str(error)))
                    continue
                for (_, future), reply in zip(batch, replies, strict=True):
                    if isinstance(reply, Exception):
                        logger.error("Redis refused a command: %s", reply)
                    if future is None or future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(BackplaneUnavailable(str(reply)))
                    else:
                        future.set_result(reply)

    def publish(self, event: RoomEvent) -> None:
        # One header line (message id, exclude, kick: tab-separated), then the event.
        payload = f"\t{event.exclude or ''}\t{event.kick or ''}\n{event.text}"
        channel = self._room_key(event.room, "events")
        self._send(lambda pipe: pipe.publish(channel, payload))

    def publish_message(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        if self.history is None:
            self.publish(RoomEvent(room, encode(event)))
            done = asyncio.get_running_loop().create_future()
            done.set_result(Stored(event, encode(event)))
            return done
        return self.history.append(room, event, sender)

    # --- Presence -----------------------------------------------------------------------------

    def join(self, room: str, client_id: str, username: str, first_here: bool) -> None:
        self._local.setdefault(room, {})[client_id] = username
        if first_here:
            self._subscribe(room)
        self._register(room, client_id, username)

    def _register(self, room: str, client_id: str, username: str) -> None:
        member = json.dumps({"username": username, "process": self.process_id})
        keys = [
            self._room_key(room, "members"),
            self._rooms_key,
            self._process_key(self.process_id, "members"),
            self._lobby_channel,
        ]
        self._send(lambda pipe: pipe.eval(JOIN, 4, *keys, client_id, member, room))

    def leave(self, room: str, client_id: str, last_here: bool) -> None:
        members = self._local.get(room, {})
        members.pop(client_id, None)
        if last_here:
            self._local.pop(room, None)
            self._unsubscribe(room)
        keys = [
            self._room_key(room, "members"),
            self._rooms_key,
            self._process_key(self.process_id, "members"),
            self._lobby_channel,
        ]
        self._send(lambda pipe: pipe.eval(LEAVE, 4, *keys, client_id, room))

    def rename(self, room: str, client_id: str, username: str) -> None:
        if client_id in self._local.get(room, {}):
            self._local[room][client_id] = username
        member = json.dumps({"username": username, "process": self.process_id})
        keys = [self._room_key(room, "members"), self._lobby_channel]
        self._send(lambda pipe: pipe.eval(RENAME, 2, *keys, client_id, member))

    async def ready(self, room: str, timeout: float = 5) -> None:
        subscribed = self._ready.get(room)
        if subscribed is not None and not subscribed.done():
            # While Redis is away this may not happen soon: go on degraded rather than hang.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(subscribed), timeout)

    async def members(self, room: str) -> dict[str, str]:
        try:
            raw = await self._redis.hgetall(self._room_key(room, "members"))
        except (RedisError, OSError) as error:
            logger.warning("presence of %s unavailable: %s", room, error)
            return {}
        return {client_id: json.loads(member)["username"] for client_id, member in raw.items()}

    async def busiest_rooms(self, limit: int) -> RoomList | None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrevrange(self._rooms_key, 0, limit - 1)
                pipe.zcard(self._rooms_key)
                names, total = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._room_key(name, "members"))
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
            return await self._redis.zcard(self._rooms_key)
        except (RedisError, OSError):
            return len(self._local)  # Redis is away: what this process knows

    async def has_room(self, room: str) -> bool:
        try:
            return await self._redis.zscore(self._rooms_key, room) is not None
        except (RedisError, OSError):
            return room in self._local

    async def take_seat(self, address: str, cap: int) -> bool:
        """Counted in Redis, so that a cap holds across processes; while Redis is away, each
        process holds the cap on its own."""
        if cap and self._seats[address] >= cap:
            return False
        if cap and self._connected:
            try:
                if not await self._redis.eval(
                    TAKE_SEAT, 2, *self._seat_keys(address), self.process_id, cap, address
                ):
                    return False
            except (RedisError, OSError) as error:
                logger.warning("could not count a connection in Redis: %s", error)
        self._seats[address] += 1
        return True

    def release_seat(self, address: str) -> None:
        self._seats[address] -= 1
        if self._seats[address] <= 0:
            del self._seats[address]
        if self.settings.max_connections_per_ip:
            keys = self._seat_keys(address)
            self._send(lambda pipe: pipe.eval(RELEASE_SEAT, 2, *keys, self.process_id, address))

    def state(self) -> dict[str, Any]:
        return {"kind": "redis", "connected": self._connected}

    # --- Subscriptions and the listener -------------------------------------------------------

    def _subscribe(self, room: str) -> None:
        self._ready[room] = asyncio.get_running_loop().create_future()
        self._subscriptions.put_nowait(("subscribe", room))

    def _unsubscribe(self, room: str) -> None:
        self._ready.pop(room, None)
        for known in (self._last_ids, self._epochs, self._caught_up_to):
            known.pop(room, None)
        self._subscriptions.put_nowait(("unsubscribe", room))

    async def _subscribe_forever(self) -> None:
        """Send SUBSCRIBE and UNSUBSCRIBE in the order rooms were joined and left."""
        while True:
            command, room = await self._subscriptions.get()
            if self._pubsub is None:
                continue  # Redis is away; the listener subscribes to every room when it is back
            with contextlib.suppress(RedisError, OSError):  # the listener notices a lost connection
                await getattr(self._pubsub, command)(self._room_key(room, "events"))

    async def _listen_forever(self) -> None:
        delay = 0.5
        first = True
        while True:
            pubsub = self._redis.pubsub()
            try:
                rooms = list(self._ready)
                channels = [self._lobby_channel, *(self._room_key(room, "events") for room in rooms)]
                await pubsub.subscribe(*channels)
                # Events that arrive before every subscription is confirmed wait for the catch-up.
                early = await self._confirmations(pubsub, len(channels))
                self._pubsub = pubsub
                if not first:
                    await self._recover(rooms)
                first, delay = False, 0.5
                for message in early:
                    self._handle(message)
                while self._connected:  # a failed publish also ends this: start over, recover
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._handle(message)
                raise RedisError("publishing failed")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self._pubsub = None
                self._lost(error)
                with contextlib.suppress(Exception):  # connections to a Redis that went away are stale
                    await self._redis.connection_pool.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _confirmations(self, pubsub: Any, expected: int) -> list[dict[str, Any]]:
        """Read until `expected` subscriptions are confirmed; return the events seen meanwhile."""
        early = []
        while expected > 0:
            message = await pubsub.get_message(timeout=5.0)
            if message is None:
                raise RedisError("no confirmation of the subscriptions")
            if message["type"] == "subscribe":
                expected -= 1
            else:
                early.append(message)
        return early

    def _handle(self, message: dict[str, Any]) -> None:
        channel, data = message["channel"], message["data"]
        if message["type"] == "subscribe":
            room = self._room_of(channel)
            ready = self._ready.get(room) if room else None
            if ready is not None and not ready.done():
                ready.set_result(None)
            return
        if message["type"] != "message":
            return
        if channel == self._lobby_channel:
            self._lobby_changed()
            return
        room = self._room_of(channel)
        if room is None or room not in self._ready:
            return  # a late event for a room this process has left
        header, _, text = data.partition("\n")
        message_id_text, exclude, kick = [*header.split("\t"), "", ""][:3]
        message_id = int(message_id_text) if message_id_text else None
        if message_id is not None:
            if message_id <= self._caught_up_to.get(room, 0):
                return  # delivered already, by the catch-up after a reconnect
            self._last_ids[room] = max(message_id, self._last_ids.get(room, 0))
        self._deliver(RoomEvent(room, text, message_id, exclude or None, kick or None))

    def _room_of(self, channel: str) -> str | None:
        start, end = f"{self.prefix}room:", ":events"
        if channel.startswith(start) and channel.endswith(end):
            return channel[len(start) : -len(end)]
        return None

    def _lost(self, error: Exception) -> None:
        if not self._connected:
            return
        logger.error("lost Redis (%s); reconnecting", error)
        self._connected = False
        while self._queue:
            _, future = self._queue.popleft()
            if future is not None and not future.done():
                future.set_exception(BackplaneUnavailable(str(error)))
        self._state_changed(False, set())

    async def _recover(self, rooms: list[str]) -> None:
        """Back in touch with Redis: re-announce ourselves, then deliver what we missed."""
        with contextlib.suppress(RedisError, OSError):
            await self._writer.aclose()
        self._writer = self._new_writer()  # the old connection died with the old Redis
        await self._heartbeat_once()
        self._connected = True
        # Other processes may not have seen our heartbeat for a while; do not reap them either.
        self._reap_not_before = time.monotonic() + 3 * self.settings.redis_heartbeat
        for room, members in self._local.items():
            for client_id, username in members.items():
                self._register(room, client_id, username)
        if self.settings.max_connections_per_ip:
            self._send(self._restate_seats())
        reset: set[str] = set()
        self._caught_up_to.clear()
        if self.history is not None:
            for room in rooms:
                seen_epoch = self._epochs.get(room)
                state = await self.history.room_state(room)
                if seen_epoch is not None and seen_epoch != state.epoch:
                    reset.add(room)  # the store was wiped or replaced: clients start over
                    self._epochs[room] = state.epoch
                    self._caught_up_to[room] = self._last_ids[room] = state.last_id
                    continue
                if room not in self._last_ids:
                    continue  # nothing was delivered here yet: nothing to catch up on
                missed = await self.history.messages(
                    room, self._last_ids[room], self.settings.history_resume_max
                )
                for event in missed:
                    self._last_ids[room] = self._caught_up_to[room] = event["id"]
                    self._deliver(RoomEvent(room, encode(event), event["id"]))
        for room in rooms:
            ready = self._ready.get(room)
            if ready is not None and not ready.done():
                ready.set_result(None)
        logger.info("Redis is back")
        self._state_changed(True, reset)
        self._lobby_changed()

    def _restate_seats(self, *, leaving: bool = False) -> Callable[[Any], None]:
        """A pipeline step that replaces this process's seat counts in Redis with its own (or,
        `leaving`, with none)."""
        counts = (
            [] if leaving else [item for address, count in self._seats.items() for item in (address, count)]
        )
        key = self._process_key(self.process_id, "seats")
        return lambda pipe: pipe.eval(RESTATE_SEATS, 1, key, self.process_id, self.prefix, *counts)

    # --- Heartbeats and reaping ---------------------------------------------------------------

    async def _heartbeat_once(self) -> None:
        beat = self.settings.redis_heartbeat
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._process_key(self.process_id, "alive"), 1, px=int(3 * beat * 1000))
            pipe.sadd(f"{self.prefix}processes", self.process_id)
            await pipe.execute()

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.redis_heartbeat)
            if not self._connected:
                continue
            try:
                await self._heartbeat_once()
                if time.monotonic() >= self._reap_not_before:
                    await self._reap_dead_processes()
                if self.settings.max_connections_per_ip and time.monotonic() >= self._restate_at:
                    # Now and then, in case a count went astray (a take whose caller vanished).
                    self._restate_at = time.monotonic() + SEATS_RESTATED_EVERY
                    self._send(self._restate_seats())
            except (RedisError, OSError) as error:
                logger.warning("heartbeat failed: %s", error)

    async def _reap_dead_processes(self) -> None:
        for process_id in await self._redis.smembers(f"{self.prefix}processes"):
            if process_id == self.process_id:
                continue
            if await self._redis.exists(self._process_key(process_id, "alive")):
                continue
            keys = [
                f"{self.prefix}processes",
                self._process_key(process_id, "members"),
                self._process_key(process_id, "alive"),
                self._rooms_key,
                self._lobby_channel,
            ]
            gone = await self._redis.eval(REAP, 5, *keys, process_id, now(), self.prefix)
            if gone and gone > 0:
                logger.warning("process %s stopped answering: removed its %d clients", process_id, gone)


class RedisHistory(History):
    """A room's history in a Redis stream, capped at the retention, with ids 0-1, 0-2, …"""

    def __init__(self, backplane: RedisBackplane) -> None:
        self.backplane = backplane
        self.retention = backplane.settings.history_retention
        self.ttl_ms = int(backplane.settings.history_days * 86_400_000)  # 0: keep for good

    async def start(self) -> None:
        pass  # the backplane owns the connections

    async def close(self) -> None:
        pass

    def append(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        backplane = self.backplane
        keys = [
            backplane._room_key(room, "stream"),
            backplane._room_key(room, "last_id"),
            backplane._room_key(room, "epoch"),
            backplane._room_key(room, "client_msg_ids"),
            backplane._room_key(room, "events"),
        ]
        # A client_msg_id is its sender's own: Mallory's "msg-2" cannot shadow Alice's.
        client_msg_id = event.get("client_msg_id")
        dedupe_key = f"{sender}:{client_msg_id}" if client_msg_id else ""
        args = [encode(event), dedupe_key, self.retention, secrets.token_hex(8), self.ttl_ms]
        reply = backplane._send(lambda pipe: pipe.eval(APPEND, len(keys), *keys, *args), want_result=True)
        assert reply is not None
        stored: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()

        def unpack(done: asyncio.Future) -> None:
            if done.exception() is not None:
                stored.set_exception(done.exception())
                return
            duplicate, text = done.result()[0], done.result()[1]
            stored.set_result(Stored(json.loads(text), text, duplicate=bool(duplicate)))

        reply.add_done_callback(unpack)
        return stored

    async def room_state(self, room: str) -> RoomState:
        backplane = self.backplane
        keys = [backplane._room_key(room, "last_id"), backplane._room_key(room, "epoch")]
        epoch, last_id = await backplane._redis.eval(ROOM_STATE, 2, *keys, secrets.token_hex(8), self.ttl_ms)
        # Where this process would start catching up, should Redis go away for a while.
        backplane._epochs.setdefault(room, epoch)
        backplane._last_ids.setdefault(room, int(last_id))
        return RoomState(epoch, int(last_id))

    async def messages(self, room: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        entries = await self.backplane._redis.xrevrange(
            self.backplane._room_key(room, "stream"), "+", f"(0-{after_id}", count=limit
        )
        return [json.loads(fields["e"]) for _, fields in reversed(entries)]
