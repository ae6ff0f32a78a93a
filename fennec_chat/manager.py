"""The room manager: Fennec's WebSocketManager plus usernames, a lobby and a fan-out no client can break."""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fennec import WebSocket, WebSocketManager

from . import protocol
from .backplane import Backplane, BackplaneUnavailable, LocalBackplane, RoomEvent, open_backplane
from .history import History, Stored, sender_digest
from .lobby import LOBBY_ROOMS, Lobby, room_list
from .outbox import Outbox
from .protocol import CloseCode, ErrorCode
from .settings import Settings

logger = logging.getLogger("fennec_chat")

MAX_IN_FLIGHT = 64  # a client's messages waiting for the history before its next one waits too
HELD_PER_OUTBOX_LIMIT = 8  # room events held for a newcomer, in outbox limits (2,048 by default)


@dataclass(eq=False, slots=True)
class Client:
    """What the manager knows about one open socket, beyond Fennec's id → socket map."""

    id: str
    outbox: Outbox
    username: str
    author: str | None  # whose client_msg_ids its messages carry: a token's user or a tab (None: this socket)
    room: str | None = None
    # While a newcomer's history is being read, room events wait here as (message id, text).
    held: list[tuple[int | None, str]] | None = None
    in_flight: int = 0  # messages sent but not yet stored
    author_digest: str | None = None  # what the history keeps of `author`, made on the first message


class ChatManager(WebSocketManager):
    """Tracks sockets, rooms and usernames, and delivers events without ever awaiting a client.

    Fennec's `WebSocketManager.broadcast` awaits each socket in turn while iterating a live
    set, so one slow or vanished client stalls or breaks everyone's delivery. Here every
    delivery is a non-blocking append to the recipient's `Outbox`, over a snapshot of the
    recipients, and a client that falls too far behind is closed instead of waited for.

    Room events go out through the backplane and come back to `_deliver_room_event`: on one
    process at once, with Redis after a round trip that puts every process in the same order.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()  # connections: id → WebSocket; rooms: name → set of ids (this process)
        self.settings = settings
        self.clients: dict[str, Client] = {}
        self.lobby = Lobby(settings.lobby_interval, self._room_list, self._deliver)
        self.backplane: Backplane = LocalBackplane(history=None)  # replaced by start()
        self._resyncing: asyncio.Task | None = None
        self._closing: dict[str, Outbox] = {}  # dropped by the server, close frame on its way

    @property
    def history(self) -> History | None:
        return self.backplane.history

    async def start(self) -> None:
        """Open the backplane (and through it the message history) the settings ask for."""
        self.backplane = open_backplane(self.settings)
        await self.backplane.start(
            self._deliver_room_event, self._lobby_changed, self._backplane_state_changed
        )

    # --- Connections (Fennec's API, extended) -------------------------------------------------

    async def connect(
        self, websocket: WebSocket, client_id: str | None = None, author: str | None = None
    ) -> str:
        """Register a socket. `author`: who its messages' client_msg_ids belong to (a token's
        user or a tab's session), if more than this one socket."""
        client_id = await super().connect(websocket, client_id)
        outbox = Outbox(websocket, self.settings.outbox_limit, self.settings.outbox_bytes)
        self.clients[client_id] = Client(client_id, outbox, default_username(client_id), author)
        return client_id

    async def disconnect(self, client_id: str) -> None:
        """Forget a client and tell its room it left: exactly once, whatever ended it.

        If the server closed it (kicked, flooding, too slow), wait a little for the close frame
        to go out: once the handler returns, uvicorn drops the connection without one.
        """
        self._drop(client_id)
        if (closing := self._closing.pop(client_id, None)) is not None:
            await closing.wait_closed(timeout=5)

    def is_connected(self, client_id: str) -> bool:
        return client_id in self.clients

    def join_room(self, client_id: str, room: str) -> None:
        """Add the client to the room. Its room events are held until `send_history`."""
        super().join_room(client_id, room)
        client = self.clients[client_id]
        client.room = room
        if self.history is not None:
            client.held = []
        self.backplane.join(room, client_id, client.username, first_here=len(self.rooms[room]) == 1)
        self._lobby_changed()

    def leave_room(self, client_id: str, room: str) -> None:
        super().leave_room(client_id, room)
        self.backplane.leave(room, client_id, last_here=room not in self.rooms)
        self._lobby_changed()

    # --- Usernames ----------------------------------------------------------------------------

    def username(self, client_id: str) -> str:
        return self.clients[client_id].username

    def rename(self, client_id: str, new_name: str) -> str:
        """Set a client's username and return the old one."""
        client = self.clients[client_id]
        old_name, client.username = client.username, new_name
        if client.room is not None:
            self.backplane.rename(client.room, client_id, new_name)
            self._lobby_changed()
        return old_name

    async def members(self, room: str) -> list[dict[str, str]]:
        """Everyone in `room` (on every process) as {client_id, username}, ordered by name."""
        await self.backplane.ready(room)
        everyone = await self.backplane.members(room)
        everyone.update({cid: self.clients[cid].username for cid in self.rooms.get(room, ())})
        users = [{"client_id": cid, "username": name} for cid, name in everyone.items()]
        return sorted(users, key=lambda user: (user["username"].casefold(), user["client_id"]))

    # --- History ------------------------------------------------------------------------------

    async def publish(self, room: str, event: dict[str, Any], sender: str) -> None:
        """Number and store a chat message, then send it to everyone in the room.

        Storing first means a client that reconnects with ?since= finds every message anyone
        saw; the backplane sends a room's messages in id order. The sender does not wait for
        the commit (its next messages can share it) unless it has many in flight.
        """
        client = self.clients.get(sender)
        if client is None:
            author = sender_digest(f"client:{sender}")
        else:
            if client.author_digest is None:
                client.author_digest = sender_digest(client.author or f"client:{sender}")
            author = client.author_digest
        stored = self.backplane.publish_message(room, event, author)
        stored.add_done_callback(functools.partial(self._after_publish, sender, event))
        if client is not None:
            client.in_flight += 1
            if client.in_flight > MAX_IN_FLIGHT:
                await asyncio.wait([stored])

    def _after_publish(self, sender: str, event: dict[str, Any], stored: asyncio.Future[Stored]) -> None:
        if (client := self.clients.get(sender)) is not None:
            client.in_flight -= 1
        problem = stored.exception() if not stored.cancelled() else asyncio.CancelledError()
        if problem is not None:
            if isinstance(problem, BackplaneUnavailable):
                error = protocol.error(
                    ErrorCode.BACKPLANE_UNAVAILABLE, "the chat is reconnecting; send it again"
                )
            else:
                logger.error("could not store a message: %r", problem)
                error = protocol.error(ErrorCode.HISTORY_UNAVAILABLE, "the message could not be stored")
            if "client_msg_id" in event:
                error["client_msg_id"] = event["client_msg_id"]
            self._deliver(protocol.encode(error), (sender,))
        elif stored.result().duplicate:
            # A resend of a message we already have: only the sender hears of it, as its receipt.
            self._deliver(stored.result().text, (sender,))

    async def send_history(self, client_id: str, room: str, since: int | None, epoch: str | None) -> None:
        """Send `history`, then release the room events held since `join_room`.

        The client joined the room before the history was read, so nothing published meanwhile
        is missed; messages that are both in the history and held are sent once.
        """
        client = self.clients.get(client_id)
        if client is None or client.held is None or self.history is None:
            return
        await self.backplane.ready(room)
        settings = self.settings
        try:
            if since is None:
                page = await self.history.recent(room, settings.history_on_join)
            else:
                page = await self.history.since(room, since, epoch, settings.history_resume_max)
        except Exception as problem:
            logger.error("could not read the history of room %s: %r", room, problem)
            page = None
        if self.clients.get(client_id) is not client:
            return  # it left while we were reading
        held, client.held = client.held, None
        if page is None:
            error = protocol.error(ErrorCode.HISTORY_UNAVAILABLE, "history could not be read")
            self._deliver(protocol.encode(error), (client_id,))
            newest_sent = 0
        else:
            event = protocol.history(room, page.messages, page.epoch, page.truncated, page.reset)
            self._deliver(protocol.encode(event), (client_id,))
            if page.messages:
                newest_sent = page.messages[-1]["id"]
            elif since is not None and not page.reset:
                newest_sent = since
            else:
                newest_sent = 0
        for message_id, text in held:
            if message_id is None or message_id > newest_sent:
                self._deliver(text, (client_id,))

    # --- Delivery (Fennec's API, made safe) ---------------------------------------------------

    async def send_message(self, client_id: str, message: str) -> None:
        self._deliver(message, (client_id,))

    async def send_json(self, client_id: str, data: Any) -> None:
        self._deliver(protocol.encode(data), (client_id,))

    async def broadcast(self, message: str, room: str | None = None, exclude: str | None = None) -> None:
        if room is None:  # everyone on this process
            self._deliver(message, [cid for cid in self.clients if cid != exclude])
        else:
            self.backplane.publish(RoomEvent(room, message, exclude=exclude))

    async def broadcast_json(self, data: Any, room: str | None = None, exclude: str | None = None) -> None:
        await self.broadcast(protocol.encode(data), room, exclude)

    def _deliver_room_event(self, event: RoomEvent) -> None:
        """The backplane hands a room event back: give it to this process's members of the room."""
        recipients = [cid for cid in self.rooms.get(event.room, ()) if cid != event.exclude]
        self._deliver(event.text, recipients, room_event=True, message_id=event.message_id)
        if event.kick is not None and event.kick in self.rooms.get(event.room, ()):
            self._drop(event.kick, close=(CloseCode.KICKED, "kicked"), discard=False)

    # --- Moderation ---------------------------------------------------------------------------

    async def kick(self, room: str, target: str, by: str) -> protocol.Rejection | None:
        """Remove a client from the room, on whichever process it is: the room gets a system
        line, the client a close frame (4001, "kicked"), and then its user_left."""
        members = {user["client_id"]: user["username"] for user in await self.members(room)}
        if target not in members:
            return protocol.Rejection(ErrorCode.NOT_FOUND, "nobody with that client_id is in this room")
        notice = protocol.encode(protocol.kicked(members[target], target, by))
        self.backplane.publish(RoomEvent(room, notice, kick=target))
        return None

    async def close(self, client_id: str, code: int, reason: str) -> None:
        """Close a client's socket (after what is already queued for it) and forget it."""
        self._drop(client_id, close=(code, reason), discard=False)

    def _deliver(
        self, text: str, recipients: Iterable[str], room_event: bool = False, message_id: int | None = None
    ) -> None:
        """Append one encoded event to each recipient's outbox; close the ones that overflow.

        `recipients` must be a snapshot: dropping a client below changes the live sets. Room
        events wait, with their `message_id`, for clients still catching up on history.
        """
        clients = self.clients
        limit = self.settings.outbox_limit
        data = text.encode()  # once for everyone: written straight to the sockets that have room
        overflowed = []
        for client_id in recipients:
            client = clients.get(client_id)
            if client is None:
                continue
            if room_event and client.held is not None:
                client.held.append((message_id, text))
                # Held while its history is read: our delay, not the client's. When a whole
                # room reconnects at once (after a restart), each newcomer's history waits
                # behind everyone else's and meanwhile gets everyone's user_joined.
                if len(client.held) > HELD_PER_OUTBOX_LIMIT * limit:
                    overflowed.append(client)
            elif not client.outbox.put(text, data):
                overflowed.append(client)
        for client in overflowed:
            reason = f"too slow: more than {limit} events waiting"
            self._drop(client.id, close=(CloseCode.TRY_AGAIN_LATER, reason))

    def _drop(self, client_id: str, close: tuple[int, str] | None = None, discard: bool = True) -> None:
        client = self.clients.pop(client_id, None)
        if client is None:
            return
        self.connections.pop(client_id, None)
        self.lobby.watchers.discard(client_id)
        if close is None:
            client.outbox.stop()
        else:
            client.outbox.close(*close, discard=discard)
            self._closing[client_id] = client.outbox
        if client.room is not None:
            self.leave_room(client_id, client.room)
            left = protocol.encode(protocol.user_left(client.username, client_id))
            self.backplane.publish(RoomEvent(client.room, left))

    def _backplane_state_changed(self, connected: bool, reset_rooms: set[str]) -> None:
        """Redis went away (tell everyone) or came back (refresh everyone's view)."""
        chat_clients = [client for client in self.clients.values() if client.room is not None]
        if not connected:
            error = protocol.error(
                ErrorCode.BACKPLANE_UNAVAILABLE, "lost contact with the other chat servers; reconnecting"
            )
            self._deliver(protocol.encode(error), [client.id for client in chat_clients])
            return
        rooms = {client.room for client in chat_clients if client.room is not None}
        self._resyncing = asyncio.create_task(self._resync(rooms, reset_rooms))

    async def _resync(self, rooms: set[str], reset_rooms: set[str]) -> None:
        """Everyone here gets a fresh `presence` (and, where the history was replaced, a `history`
        with reset: true) after the backplane was away; presence again a heartbeat later, once
        the other processes have re-announced their clients too."""
        await self._send_presence_and_resets(rooms, reset_rooms)
        await asyncio.sleep(self.settings.redis_heartbeat)
        await self._send_presence_and_resets(rooms & set(self.rooms), set())

    async def _send_presence_and_resets(self, rooms: set[str], reset_rooms: set[str]) -> None:
        for room in rooms:
            presence = protocol.encode(protocol.presence(room, await self.members(room)))
            local = tuple(self.rooms.get(room, ()))
            self._deliver(presence, local)
            if room in reset_rooms and self.history is not None:
                page = await self.history.recent(room, self.settings.history_on_join)
                event = protocol.history(room, page.messages, page.epoch, page.truncated, reset=True)
                self._deliver(protocol.encode(event), local)

    # --- Lobby --------------------------------------------------------------------------------

    async def watch_lobby(self, client_id: str) -> None:
        """Send the room list now, and again after every change."""
        self.lobby.watchers.add(client_id)
        await self.send_rooms_update(client_id)

    async def send_rooms_update(self, client_id: str) -> None:
        """The room list as it is (or a moment ago: a fresh one follows if it changed)."""
        self._deliver(await self.lobby.current(), (client_id,))

    async def _room_list(self) -> dict[str, Any]:
        """The busiest rooms on every process, as a `rooms_update` event."""
        listed = await self.backplane.busiest_rooms(LOBBY_ROOMS)
        if listed is None:  # this process alone
            busiest = heapq.nlargest(LOBBY_ROOMS, self.rooms.items(), key=lambda item: len(item[1]))
            return room_list(((room, self._names(ids)) for room, ids in busiest), len(self.rooms))
        # Our own newest members may not have reached the backplane yet.
        rooms = [
            (room, {**members, **self._names(self.rooms.get(room, ()))}) for room, members in listed.rooms
        ]
        return room_list(rooms, listed.total)

    def _names(self, client_ids: Iterable[str]) -> dict[str, str]:
        return {cid: self.clients[cid].username for cid in client_ids if cid in self.clients}

    def _lobby_changed(self) -> None:
        self.lobby.changed()

    # --- Health and shutdown ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "rooms": len(self.rooms),
            "chat_clients": len(self.clients) - len(self.lobby.watchers),
            "lobby_clients": len(self.lobby.watchers),
            "queued_events": sum(client.outbox.queued for client in self.clients.values()),
            "backplane": self.backplane.state(),
        }

    async def shutdown(self) -> None:
        """Release everything (uvicorn has already closed every socket by now)."""
        self.lobby.cancel()
        for client_id in list(self.clients):
            self._drop(client_id)
        await self.backplane.close()


def default_username(client_id: str) -> str:
    return f"User-{client_id[:8]}"
