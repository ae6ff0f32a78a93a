"""Several chat processes sharing rooms, presence, the lobby and history through Redis.

Fan-out: one pub/sub channel per room (on a Redis Cluster, a sharded channel on the room's
shard: redis_connections.py). Every room event, this process's own included, is
published to Redis and delivered to local clients only when it comes back from the channel,
so every process delivers a room's events in the one order Redis gave them. A process
subscribes to a room's channel while it has clients in the room. Each event is encoded once
by its sender and delivered as received: one encoding per process.

Publishing goes through one connection, in order: commands queue up and go out in pipelines,
so many events share a round trip. The scripts are in redis_scripts.py, the history in
redis_history.py, presence and seats in redis_presence.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

try:
    from redis.exceptions import RedisError
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise RuntimeError("--redis-url needs redis-py: pip install 'fennec-chat[redis]'") from missing

from . import metrics
from .backplane import Backplane, BackplaneUnavailable, Listener, RoomEvent
from .bans import RedisBans
from .fennec_fixes import StartupError
from .history import Stored
from .protocol import encode
from .redis_connections import UNAVAILABLE, Connections
from .redis_history import RedisHistory
from .redis_presence import RedisPresence
from .redis_scripts import RedisKeys
from .settings import Settings

logger = logging.getLogger("fennec_chat")


class RedisBackplane(RedisPresence, Backplane):
    presence_outlives_process = True  # a stopped process's members can be continued elsewhere

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections = Connections(settings.redis_url)  # one server, or a cluster (by URL)
        self.keys = RedisKeys(settings.redis_prefix, cluster=self.connections.cluster)
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.history = (
            RedisHistory(settings, self.keys, self._send, lambda: self._redis) if settings.history else None
        )
        self.bans = RedisBans(
            lambda room, username: self.keys.room(room, f"ban:{username}"), lambda: self._redis
        )
        self._init_presence()
        # Commands wait here to go out in order, in pipelines, on the writer connection.
        self._queue: deque[tuple[Callable[[Any], None], asyncio.Future | None]] = deque()
        self._queue_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._subscriptions: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (command, room), in order
        self._ready: dict[str, asyncio.Future[None]] = {}  # room → subscribed to its channel
        # room → SUBSCRIBEs sent on the current connection and not yet confirmed. Only the last
        # one's confirmation makes the room ready: what came before it was heard on an earlier
        # subscription, after which a message may have been missed while unsubscribed.
        self._unconfirmed: Counter[str] = Counter()
        # Where each room stands here, to catch up from after an outage.
        self._epochs: dict[str, str] = {}  # room → the history epoch this process has seen
        self._last_ids: dict[str, int] = {}  # room → the newest message id delivered here
        self._caught_up_to: dict[str, int] = {}  # room → newest id delivered by the last catch-up
        self._pubsub: Any = None
        self._connected = False
        self._tasks: list[asyncio.Task] = []
        self._chores: set[asyncio.Task] = set()  # short ones: noting a room's position, a resync
        self._listener: Listener | None = None

    # --- Start and stop -----------------------------------------------------------------------

    async def start(self, listener: Listener) -> None:
        self._listener = listener
        url = self.settings.redis_url
        self._redis = self.connections.reads  # presence, history, the lobby: a bounded pool
        try:
            await self._redis.ping()
            self._writer = self.connections.own()  # publishes, in order
            self._beats = self.connections.own()  # the heartbeat, never held up by a crowd
        except UNAVAILABLE as error:
            raise StartupError(f"cannot reach Redis at {url} (--redis-url): {error}") from error
        self._connected = True
        await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="redis-writer"),
            asyncio.create_task(self._listen_forever(), name="redis-listener"),
            asyncio.create_task(self._heartbeat_forever(), name="redis-heartbeat"),
            asyncio.create_task(self._reap_forever(), name="redis-reaper"),
            asyncio.create_task(self._subscribe_forever(), name="redis-subscriptions"),
        ]

    async def close(self) -> None:
        if self.settings.max_connections_per_ip:
            await self._restate_seats(leaving=True)  # the others will not reap us
        await self._flush()
        for task in [*self._tasks, *self._chores]:
            task.cancel()
        with contextlib.suppress(*UNAVAILABLE):
            # Still listed: the others reap what is left (members kept away when uvicorn closed
            # their sockets, 1012), once each one's grace ends, unless its tab is back first.
            await self._redis.delete(self._mine("alive"))
        for client in (self._redis, self._writer, self._beats):
            with contextlib.suppress(*UNAVAILABLE):
                await client.aclose()

    async def _flush(self, timeout: float = 3) -> None:
        """Wait (a little) for queued commands to go out."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    def _chore(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

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
                    started = time.perf_counter()
                    replies = await pipe.execute(raise_on_error=False)
                    metrics.backplane_publish_seconds.observe(time.perf_counter() - started)
                except UNAVAILABLE as error:
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
        channel, command = self.keys.room(event.room, "events"), self.keys.publish
        self._send(lambda pipe: pipe.execute_command(command, channel, payload))

    def publish_message(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        if self.history is None:
            self.publish(RoomEvent(room, encode(event)))
            done = asyncio.get_running_loop().create_future()
            done.set_result(Stored(event, encode(event)))
            return done
        return self.history.append(room, event, sender)

    async def ready(self, room: str, timeout: float = 5) -> None:
        subscribed = self._ready.get(room)
        if subscribed is not None and not subscribed.done():
            # While Redis is away this may not happen soon: go on degraded rather than hang.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(subscribed), timeout)

    async def heard(self, room: str, message_id: int, timeout: float = 0.5) -> None:
        # A message stored before we subscribed never comes; `_note_position` counts those.
        deadline = asyncio.get_running_loop().time() + timeout
        while self._last_ids.get(room, 0) < message_id and room in self._ready:
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.002)

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
            if command == "subscribe":
                self._unconfirmed[room] += 1
            with contextlib.suppress(*UNAVAILABLE):  # the listener notices a lost connection
                await getattr(self._pubsub, command)(self.keys.room(room, "events"))

    async def _note_position(self, room: str) -> None:
        """Where the room's history stands as we start receiving its events: should Redis go
        away for a while, this process catches up from there."""
        if self.history is None:
            return
        with contextlib.suppress(*UNAVAILABLE):
            state = await self.history.room_state(room)
            if room in self._ready:  # still here
                self._epochs.setdefault(room, state.epoch)
                self._last_ids.setdefault(room, state.last_id)

    async def _listen_forever(self) -> None:
        failures = 0
        first = True
        while True:
            pubsub = self.connections.subscriber()
            try:
                rooms = list(self._ready)
                channels = [self.keys.lobby, *(self.keys.room(room, "events") for room in rooms)]
                await pubsub.subscribe(*channels)
                # Events that arrive before every subscription is confirmed wait for the catch-up.
                early = await self._confirmations(pubsub, len(channels))
                self._unconfirmed.clear()
                self._pubsub = pubsub
                for room in self._ready.keys() - set(rooms):  # joined while we were subscribing
                    self._subscriptions.put_nowait(("subscribe", room))
                if not first:
                    await self._recover(rooms)
                first, failures = False, 0
                for message in early:
                    self._handle(message)
                while self._connected:  # a failed publish also ends this: start over, recover
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._handle(message)
                raise RedisError("publishing failed")
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as error:
                self._pubsub = None
                self._lost(error)
                await self.connections.forget_stale()
                # Every 0.5 s for the first 3 s (a cluster's replica takes over in 2-3 s), then
                # doubling up to 10 s.
                await asyncio.sleep(min(10.0, 0.5 * 2 ** max(0, failures - 5)))
                failures += 1
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
        assert self._listener is not None
        channel, data = message["channel"], message["data"]
        if message["type"] == "subscribe":
            room = self.keys.room_of(channel)
            if room is None or not self._confirmed(room):
                return
            ready = self._ready.get(room)
            if ready is not None and not ready.done():
                ready.set_result(None)
                self._chore(self._note_position(room))
            return
        if message["type"] != "message":
            return
        if channel == self.keys.lobby:
            self._listener.lobby_changed()
            return
        room = self.keys.room_of(channel)
        ready = self._ready.get(room) if room is not None else None
        if room is None or ready is None or not ready.done():
            # A late event for a room this process has left, or an early one: heard on the
            # subscription before the room was left and joined again. Redis sends nothing
            # while unsubscribed, so delivering it could leave a gap after it; the newcomers'
            # history, read once the room is ready, has it instead.
            return
        header, _, text = data.partition("\n")
        message_id_text, exclude, kick = [*header.split("\t"), "", ""][:3]
        message_id = int(message_id_text) if message_id_text else None
        if message_id is not None:
            if message_id <= self._caught_up_to.get(room, 0):
                return  # delivered already, by the catch-up after a reconnect
            self._last_ids[room] = max(message_id, self._last_ids.get(room, 0))
        self._listener.deliver_room_event(RoomEvent(room, text, message_id, exclude or None, kick or None))

    def _confirmed(self, room: str) -> bool:
        """Count one confirmed SUBSCRIBE for `room`; whether it was the last one sent."""
        self._unconfirmed[room] -= 1
        if self._unconfirmed[room] > 0:
            return False
        del self._unconfirmed[room]
        return True

    def _lost(self, error: Exception) -> None:
        if not self._connected:
            return
        logger.error("lost Redis (%s); reconnecting", error)
        self._connected = False
        metrics.backplane_up.set(0)
        while self._queue:
            _, future = self._queue.popleft()
            if future is not None and not future.done():
                future.set_exception(BackplaneUnavailable(str(error)))
        if self._listener is not None:
            self._listener.backplane_lost()

    async def _recover(self, rooms: list[str]) -> None:
        """Back in touch with Redis: re-announce ourselves, then deliver what we missed."""
        assert self._listener is not None
        for old in (self._writer, self._beats):
            with contextlib.suppress(*UNAVAILABLE):
                await old.aclose()
        self._writer = self.connections.own()  # the old connections died with the old Redis
        self._beats = self.connections.own()
        await self._heartbeat_once()
        self._connected = True
        self._spare_the_others()
        self._announce_again()
        reset: set[str] = set()
        self._caught_up_to.clear()
        if self.history is not None:
            for room in rooms:
                seen_epoch = self._epochs.get(room)
                state = await self.history.room_state(room)
                if seen_epoch == state.epoch and state.last_id < self._last_ids.get(room, 0):
                    # Redis came back with older data (a snapshot, a lagging replica): the ids
                    # after its last one would be given again to other messages. Not the same
                    # history any more: a new epoch, and clients start over.
                    logger.error("Redis lost the newest messages of room %s: its history starts over", room)
                    state = await self.history.new_epoch(room, state.epoch)
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
                    self._listener.deliver_room_event(RoomEvent(room, encode(event), event["id"]))
        for room in rooms:
            ready = self._ready.get(room)
            if ready is not None and not ready.done():
                ready.set_result(None)
        logger.info("Redis is back")
        metrics.backplane_up.set(1)
        self._chore(self._refresh_views(set(rooms), reset))
        self._listener.lobby_changed()

    async def _refresh_views(self, rooms: set[str], reset: set[str]) -> None:
        """Everyone here gets a fresh view after the outage; presence again a heartbeat later,
        once the other processes have re-announced their clients too."""
        assert self._listener is not None
        await self._listener.backplane_back(rooms, reset)
        await asyncio.sleep(self.settings.redis_heartbeat)
        await self._listener.backplane_back(rooms & set(self._local), set())
