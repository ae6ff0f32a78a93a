"""A room's history in Redis: a stream capped at the retention, with ids 0-1, 0-2, …

Messages are appended by the APPEND script through the backplane's ordered command queue, so a
message is numbered, stored and published in one step; every key of a room expires
`--history-days` after its last message.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from .history import History, RoomState, Stored
from .protocol import encode
from .redis_scripts import APPEND, NEW_EPOCH, ROOM_STATE, RedisKeys
from .settings import Settings

# Queue one command on the backplane's ordered pipeline; the future gets its reply.
Send = Callable[..., "asyncio.Future[Any] | None"]


class RedisHistory(History):
    def __init__(self, settings: Settings, keys: RedisKeys, send: Send, reader: Callable[[], Any]) -> None:
        """`send` queues a command in publishing order; `reader()` is the client for reads."""
        self.keys = keys
        self.send = send
        self.reader = reader
        self.retention = settings.history_retention
        self.ttl_ms = int(settings.history_days * 86_400_000)  # 0: keep for good

    async def start(self) -> None:
        pass  # the backplane owns the connections

    async def close(self) -> None:
        pass

    def append(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        keys = [
            self.keys.room(room, what) for what in ("stream", "last_id", "epoch", "client_msg_ids", "events")
        ]
        # A client_msg_id is its sender's own: Mallory's "msg-2" cannot shadow Alice's.
        client_msg_id = event.get("client_msg_id")
        dedupe_key = f"{sender}:{client_msg_id}" if client_msg_id else ""
        args = [encode(event), dedupe_key, self.retention, secrets.token_hex(8), self.ttl_ms]
        script = self.keys.script(APPEND)
        reply = self.send(lambda pipe: pipe.eval(script, len(keys), *keys, *args), want_result=True)
        assert reply is not None
        stored: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()

        def unpack(done: asyncio.Future) -> None:
            if done.exception() is not None:
                stored.set_exception(done.exception())
                return
            metrics.history_commit_seconds.observe(time.perf_counter() - started)
            duplicate, text = done.result()[0], done.result()[1]
            stored.set_result(Stored(json.loads(text), text, duplicate=bool(duplicate)))

        reply.add_done_callback(unpack)
        return stored

    async def delete(self, room: str, message_id: int) -> bool:
        return bool(await self.reader().xdel(self.keys.room(room, "stream"), f"0-{message_id}"))

    async def room_state(self, room: str) -> RoomState:
        """The room's epoch (made, with its expiry, on first use) and its last message id."""
        keys = [self.keys.room(room, "last_id"), self.keys.room(room, "epoch")]
        epoch, last_id = await self.reader().eval(ROOM_STATE, 2, *keys, secrets.token_hex(8), self.ttl_ms)
        return RoomState(epoch, int(last_id))

    async def new_epoch(self, room: str, seen: str) -> RoomState:
        """Start the room's history over under a new epoch, if it is still `seen` (the first
        process to notice makes it; the others find it made)."""
        keys = [self.keys.room(room, "last_id"), self.keys.room(room, "epoch")]
        epoch, last_id = await self.reader().eval(NEW_EPOCH, 2, *keys, seen, secrets.token_hex(8))
        return RoomState(epoch, int(last_id))

    async def messages(self, room: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        entries = await self.reader().xrevrange(
            self.keys.room(room, "stream"), "+", f"(0-{after_id}", count=limit
        )
        return [json.loads(fields["e"]) for _, fields in reversed(entries)]

    async def before(self, room: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        entries = await self.reader().xrevrange(
            self.keys.room(room, "stream"), f"(0-{before_id}", "-", count=limit
        )
        return [json.loads(fields["e"]) for _, fields in reversed(entries)]
