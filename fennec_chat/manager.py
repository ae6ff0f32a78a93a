"""The room manager: Fennec's WebSocketManager plus usernames, a lobby and a fan-out no client can break."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fennec import WebSocket, WebSocketManager

from . import protocol
from .outbox import Outbox
from .protocol import CloseCode
from .settings import Settings


@dataclass(eq=False, slots=True)
class Client:
    """What the manager knows about one open socket, beyond Fennec's id → socket map."""

    id: str
    outbox: Outbox
    username: str
    room: str | None = None


class ChatManager(WebSocketManager):
    """Tracks sockets, rooms and usernames, and delivers events without ever awaiting a client.

    Fennec's `WebSocketManager.broadcast` awaits each socket in turn while iterating a live
    set, so one slow or vanished client stalls or breaks everyone's delivery. Here every
    delivery is a non-blocking append to the recipient's `Outbox`, over a snapshot of the
    recipients, and a client that falls too far behind is closed instead of waited for.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()  # connections: id → WebSocket; rooms: name → set of ids
        self.settings = settings
        self.clients: dict[str, Client] = {}
        self.lobby_watchers: set[str] = set()
        self._lobby_push = Throttle(settings.lobby_interval, self._push_rooms_update)

    # --- Connections (Fennec's API, extended) -------------------------------------------------

    async def connect(self, websocket: WebSocket, client_id: str | None = None) -> str:
        client_id = await super().connect(websocket, client_id)
        outbox = Outbox(websocket, self.settings.outbox_limit)
        self.clients[client_id] = Client(client_id, outbox, default_username(client_id))
        return client_id

    async def disconnect(self, client_id: str) -> None:
        """Forget a client and tell its room it left: exactly once, whatever ended it."""
        self._drop(client_id)

    def is_connected(self, client_id: str) -> bool:
        return client_id in self.clients

    def join_room(self, client_id: str, room: str) -> None:
        super().join_room(client_id, room)
        self.clients[client_id].room = room
        self._lobby_changed()

    def leave_room(self, client_id: str, room: str) -> None:
        super().leave_room(client_id, room)
        self._lobby_changed()

    # --- Usernames ----------------------------------------------------------------------------

    def username(self, client_id: str) -> str:
        return self.clients[client_id].username

    def rename(self, client_id: str, new_name: str) -> str:
        """Set a client's username and return the old one."""
        client = self.clients[client_id]
        old_name, client.username = client.username, new_name
        if client.room is not None:
            self._lobby_changed()
        return old_name

    def members(self, room: str) -> list[dict[str, str]]:
        """Everyone in `room` as {client_id, username}, ordered by name."""
        users = [
            {"client_id": cid, "username": self.clients[cid].username} for cid in self.rooms.get(room, ())
        ]
        return sorted(users, key=lambda user: (user["username"].casefold(), user["client_id"]))

    # --- Delivery (Fennec's API, made safe) ---------------------------------------------------

    async def send_message(self, client_id: str, message: str) -> None:
        self._deliver(message, (client_id,))

    async def send_json(self, client_id: str, data: Any) -> None:
        self._deliver(protocol.encode(data), (client_id,))

    async def broadcast(self, message: str, room: str | None = None, exclude: str | None = None) -> None:
        recipients = self.rooms.get(room, ()) if room else self.clients
        self._deliver(message, [cid for cid in recipients if cid != exclude])

    async def broadcast_json(self, data: Any, room: str | None = None, exclude: str | None = None) -> None:
        await self.broadcast(protocol.encode(data), room, exclude)

    def _deliver(self, text: str, recipients: Iterable[str]) -> None:
        """Append one encoded event to each recipient's outbox; close the ones that overflow.

        `recipients` must be a snapshot: dropping a client below changes the live sets.
        """
        clients = self.clients
        overflowed = [
            client
            for client_id in recipients
            if (client := clients.get(client_id)) is not None and not client.outbox.put(text)
        ]
        for client in overflowed:
            reason = f"too slow: more than {self.settings.outbox_limit} events waiting"
            self._drop(client.id, close=(CloseCode.TRY_AGAIN_LATER, reason))

    def _drop(self, client_id: str, close: tuple[int, str] | None = None) -> None:
        client = self.clients.pop(client_id, None)
        if client is None:
            return
        self.connections.pop(client_id, None)
        self.lobby_watchers.discard(client_id)
        if close is None:
            client.outbox.stop()
        else:
            client.outbox.close(*close)
        if client.room is not None:
            self.leave_room(client_id, client.room)
            left = protocol.user_left(client.username, client_id)
            self._deliver(protocol.encode(left), tuple(self.rooms.get(client.room, ())))

    # --- Lobby --------------------------------------------------------------------------------

    async def watch_lobby(self, client_id: str) -> None:
        """Send the room list now, and again after every change."""
        self.lobby_watchers.add(client_id)
        await self.send_rooms_update(client_id)

    async def send_rooms_update(self, client_id: str) -> None:
        await self.send_json(client_id, protocol.rooms_update(self.rooms_summary()))

    def rooms_summary(self) -> dict[str, dict[str, Any]]:
        return {
            room: {"users": len(ids), "usernames": sorted(self.clients[cid].username for cid in ids)}
            for room, ids in sorted(self.rooms.items())
        }

    def _lobby_changed(self) -> None:
        if self.lobby_watchers:
            self._lobby_push.request()

    def _push_rooms_update(self) -> None:
        if self.lobby_watchers:
            update = protocol.encode(protocol.rooms_update(self.rooms_summary()))
            self._deliver(update, tuple(self.lobby_watchers))

    # --- Health and shutdown ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self.connections),
            "rooms": len(self.rooms),
            "chat_clients": len(self.clients) - len(self.lobby_watchers),
            "lobby_clients": len(self.lobby_watchers),
            "queued_events": sum(client.outbox.queued for client in self.clients.values()),
        }

    async def shutdown(self) -> None:
        """Release everything (uvicorn has already closed every socket by now)."""
        self._lobby_push.cancel()
        for client_id in list(self.clients):
            self._drop(client_id)


def default_username(client_id: str) -> str:
    return f"User-{client_id[:8]}"


class Throttle:
    """Runs a callback soon after `request()`, at most once per `interval` seconds.

    Requests that arrive while one is pending are merged into it, so a burst of room changes
    becomes one `rooms_update` for the lobby.
    """

    def __init__(self, interval: float, callback: Callable[[], None]) -> None:
        self._interval = interval
        self._callback = callback
        self._timer: asyncio.TimerHandle | None = None
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

    def _run(self) -> None:
        self._timer = None
        self._last_run = asyncio.get_running_loop().time()
        self._callback()
