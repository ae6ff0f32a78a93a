"""The room manager: Fennec's WebSocketManager with usernames, a lobby and a fan-out no client
can break. Room events go out through the backplane and come back to `deliver_room_event`: on
one process at once, with Redis after a round trip that puts every process in the same order.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from fennec import WebSocket

from . import metrics, protocol
from .backplane import Backplane, LocalBackplane, Member, RoomEvent, open_backplane
from .connection import Connection
from .fennec_fixes import FanOutManager
from .frames import text_frame
from .gate import ANONYMOUS, Identity
from .history import History
from .leave_grace import Away, session_digest
from .lobby import LOBBY_ROOMS, Lobby, room_list
from .outbox import Outbox
from .protocol import CloseCode, ErrorCode, default_username
from .room_history import RoomHistory
from .room_moderation import Moderation, RoomModeration
from .settings import Settings

logger = logging.getLogger("fennec_chat")

NO_CLOSE_FRAME = 1006  # what RFC 6455 calls a connection that ended without a close frame
HELD_PER_OUTBOX_LIMIT = 8  # room events held for a newcomer, in outbox limits (2,048 by default)


class Stage(enum.Enum):
    NEW = "new"  # connected, in no room (yet, or ever: a lobby watcher)
    CATCHING_UP = "catching up"  # in a room, its history being read: room events are held
    LIVE = "live"  # in a room, events delivered as they come


@dataclass(eq=False, slots=True)
class Client:
    """What the manager knows about one open socket, beyond Fennec's id → socket map."""

    id: str
    outbox: Outbox
    username: str
    author: str | None  # whose client_msg_ids its messages carry: a token's user or a tab (None: this socket)
    room: str | None = None
    stage: Stage = Stage.NEW
    held: list[tuple[int | None, str]] | tuple[()] = ()  # (message id, event) while CATCHING_UP
    in_flight: int = 0  # messages sent but not yet stored
    author_digest: str | None = None  # what the history keeps of `author`, made on the first message

    @property
    def catching_up(self) -> bool:
        return self.stage is Stage.CATCHING_UP

    def go_live(self) -> list[tuple[int | None, str]] | tuple[()]:
        """The events held while catching up; from now on they are delivered as they come."""
        held, self.held, self.stage = self.held, (), Stage.LIVE
        return held


class ChatManager(FanOutManager):
    """Sockets, rooms and usernames, and a delivery that never awaits a client: every event is
    a non-blocking append to the recipient's `Outbox`, over a snapshot of the recipients, and a
    client that falls too far behind is closed instead of waited for."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()  # connections: id → WebSocket; rooms: name → set of ids (this process)
        self.settings = settings
        self.clients: dict[str, Client] = {}
        self.lobby = Lobby(settings.lobby_interval, self._room_list, self._deliver)
        self.backplane: Backplane = LocalBackplane(history=None)  # replaced by start()
        self.room_history = RoomHistory(self)
        self.room_moderation = RoomModeration(self)
        self._awaiting_close_frame: dict[str, Outbox] = {}  # dropped by the server, close frame on its way
        self._away: dict[str, tuple[Away, asyncio.TimerHandle]] = {}  # client_id → its grace, held here
        self._counting_rooms: asyncio.Task | None = None  # for --metrics-port

    @property
    def history(self) -> History | None:
        return self.backplane.history

    async def start(self) -> None:
        """Open the backplane (and through it the message history) the settings ask for."""
        self.backplane = open_backplane(self.settings)
        await self.backplane.start(self)
        if self.settings.metrics_port:
            metrics.enable()
            self._counting_rooms = asyncio.create_task(metrics.count_rooms_forever(self.backplane.room_count))

    # --- Connections (Fennec's API, extended) -------------------------------------------------

    def connected(
        self,
        websocket: WebSocket,
        room: str = "",
        identity: Identity | None = None,
        session: str | None = None,
        username: str = "",
    ) -> Connection:
        """The socket of a member of `room` (`identity`: from its token; `session`: its tab;
        `username`: the name it asks for, "" for none), or of a lobby watcher (no room)."""
        return Connection(self, websocket, room, identity or ANONYMOUS, session, username)

    async def connect(
        self,
        websocket: WebSocket,
        client_id: str | None = None,
        author: str | None = None,
        username: str = "",
    ) -> str:
        """Register a socket. `author`: who its messages' client_msg_ids belong to (a token's
        user or a tab's session), if more than this one socket."""
        client_id = await super().connect(websocket, client_id)
        # The gate has read what it needs of the request's headers (gate.py); an idle
        # connection need not keep them (about 1.5 KiB).
        websocket.scope["headers"] = []
        outbox = Outbox(websocket, self.settings.outbox_limit, self.settings.outbox_bytes)
        name = username or default_username(client_id)
        self.clients[client_id] = Client(client_id, outbox, name, author)
        return client_id

    async def disconnect(
        self,
        client_id: str,
        session: str | None = None,
        identity: Identity = ANONYMOUS,
        close_code: int | None = None,
    ) -> None:
        """Forget a client and tell its room it left: exactly once, whatever ended it. With
        `session` (its tab may be back: a reload), it stays in the room, away, for --leave-grace.
        `close_code`: the client's, if it sent a close frame.

        If the server closed it (kicked, flooding, too slow), wait a little for the close frame
        to go out: once the handler returns, uvicorn drops the connection without one.
        """
        self._drop(client_id, away=(session, identity.username or "") if session else None)
        if (closing := self._awaiting_close_frame.pop(client_id, None)) is not None:
            close_code = closing.close_code
            await closing.wait_closed(timeout=5)
        metrics.closes.labels(str(int(close_code or NO_CLOSE_FRAME))).inc()

    def is_connected(self, client_id: str) -> bool:
        return client_id in self.clients

    def join_room(self, client_id: str, room: str) -> None:
        """Add the client to the room. Its room events are held until `send_history`."""
        super().join_room(client_id, room)
        client = self.clients[client_id]
        client.room = room
        if self.history is not None:
            client.stage, client.held = Stage.CATCHING_UP, []
        else:
            client.stage = Stage.LIVE
        self.backplane.join(room, client_id, client.username, first_here=len(self.rooms[room]) == 1)
        self.lobby.changed()

    def leave_room(self, client_id: str, room: str) -> None:
        super().leave_room(client_id, room)
        self.backplane.leave(room, client_id, last_here=room not in self.rooms)
        self.lobby.changed()

    # --- Usernames ----------------------------------------------------------------------------

    def username(self, client_id: str) -> str:
        return self.clients[client_id].username

    def rename(self, client_id: str, new_name: str) -> str:
        """Set a client's username and return the old one."""
        client = self.clients[client_id]
        old_name, client.username = client.username, new_name
        if client.room is not None:
            self.backplane.rename(client.room, client_id, new_name)
            self.lobby.changed()
        return old_name

    async def members(self, room: str) -> list[dict[str, Any]]:
        """Everyone in `room` (on every process) as {client_id, username} (and `"away": true`
        for a member that may be back in a moment), ordered by name."""
        await self.backplane.ready(room)
        everyone = await self.backplane.members(room)
        everyone.update((cid, Member(name)) for cid, name in self._names(self.rooms.get(room, ())).items())
        users: list[dict[str, Any]] = []
        for client_id, member in everyone.items():
            user: dict[str, Any] = {"client_id": client_id, "username": member.username}
            if member.away:
                user["away"] = True
            users.append(user)
        return sorted(users, key=lambda user: (user["username"].casefold(), user["client_id"]))

    def _names(self, client_ids: Iterable[str]) -> dict[str, str]:
        return {cid: self.clients[cid].username for cid in client_ids if cid in self.clients}

    # --- Messages: stored, numbered, then delivered (room_history.py) -------------------------

    async def publish(self, room: str, event: dict[str, Any], sender: str) -> None:
        await self.room_history.publish(room, event, sender)

    async def listening(self, room: str) -> None:
        """Wait until this process hears the room's events (with Redis: its subscription is
        confirmed): from then on, every message stored reaches the room's members live."""
        await self.backplane.ready(room)

    async def send_history(self, client_id: str, room: str, since: int | None, epoch: str | None) -> None:
        await self.room_history.send_history(client_id, room, since, epoch)

    async def send_earlier(self, client_id: str, room: str, before: int) -> None:
        """Answer `load_earlier`: the messages below `before`, to this client alone."""
        await self.room_history.send_earlier(client_id, room, before)

    # --- Delivery -----------------------------------------------------------------------------

    def _publish_to_room(self, room: str, text: str, exclude: str | None) -> None:
        self.backplane.publish(RoomEvent(room, text, exclude=exclude))

    def deliver_room_event(self, event: RoomEvent) -> None:
        """The backplane hands a room event back: give it to this process's members of the room."""
        started = perf_counter()
        recipients = [cid for cid in self.rooms.get(event.room, ()) if cid != event.exclude]
        self._deliver(event.text, recipients, room_event=True, message_id=event.message_id)
        metrics.broadcast_seconds.observe(perf_counter() - started)
        if event.kick is not None and event.kick in self.rooms.get(event.room, ()):
            self._drop(event.kick, close=(CloseCode.KICKED, "kicked"), discard=False)

    def _deliver(
        self, text: str, recipients: Collection[str], room_event: bool = False, message_id: int | None = None
    ) -> None:
        """Append one encoded event to each recipient's outbox; close the ones that overflow.

        `recipients` must be a snapshot: dropping a client below changes the live sets. Room
        events wait, with their `message_id`, for clients still catching up on history.
        """
        clients = self.clients
        limit = self.settings.outbox_limit
        frame = text_frame(text.encode())  # once for everyone: the same bytes for every socket
        overflowed = []
        catching_up = Stage.CATCHING_UP  # a local: an enum member through its class is slow
        for client_id in recipients:
            client = clients.get(client_id)
            if client is None:
                continue
            if room_event and client.stage is catching_up:
                client.held.append((message_id, text))  # type: ignore[union-attr]
                # Held while its history is read: our delay, not the client's. When a whole
                # room reconnects at once (after a restart), each newcomer's history waits
                # behind everyone else's and meanwhile gets everyone's user_joined.
                if len(client.held) > HELD_PER_OUTBOX_LIMIT * limit:
                    overflowed.append(client)
            elif not client.outbox.put(text, frame):
                overflowed.append(client)
        metrics.deliveries.inc(len(recipients) - len(overflowed))
        for client in overflowed:
            reason = f"too slow: more than {limit} events waiting"
            self._drop(client.id, close=(CloseCode.TRY_AGAIN_LATER, reason))
        if overflowed:
            metrics.outbox_overflows.inc(len(overflowed))

    def _drop(
        self,
        client_id: str,
        close: tuple[int, str] | None = None,
        discard: bool = True,
        away: tuple[str, str] | None = None,
    ) -> None:
        """Forget a client: close it (`close`) or not (it is gone), and announce its leave, or
        (`away`: its tab's session and token user) keep it in its room, away, for a while."""
        client = self.clients.pop(client_id, None)
        if client is None:
            return
        self.connections.pop(client_id, None)
        self.lobby.watchers.discard(client_id)
        if close is None:
            client.outbox.stop()
        else:
            client.outbox.close(*close, discard=discard)
            self._awaiting_close_frame[client_id] = client.outbox
        if client.room is None:
            return
        if away is not None and self.settings.leave_grace and client.stage is Stage.LIVE:
            self._go_away(client, client.room, *away)
        else:
            self.leave_room(client_id, client.room)
            left = protocol.encode(protocol.user_left(client.username, client_id))
            self.backplane.publish(RoomEvent(client.room, left))

    # --- A reload is not a leave (leave_grace.py) ---------------------------------------------

    async def come_back(
        self, room: str, session: str | None, identity: Identity, username: str
    ) -> str | None:
        """The client_id of the away member a connection with these continues, or None."""
        if not (room and session and self.settings.leave_grace):
            return None
        digest = session_digest(session)
        client_id = await self.backplane.come_back(room, digest, username, identity.username or "")
        if client_id is None:
            return None
        if (held := self._away.pop(client_id, None)) is not None:  # its grace was held here
            held[1].cancel()
        return client_id

    def _go_away(self, client: Client, room: str, session: str, identity: str) -> None:
        """Keep a dropped member in the room, away; it leaves when its grace ends without it."""
        mark = secrets.token_hex(6)
        away = Away(room, client.id, client.username, session_digest(session), identity, mark)
        FanOutManager.leave_room(self, client.id, room)  # Fennec's: nothing is delivered to it
        self.backplane.go_away(away, self.settings.leave_grace, last_here=room not in self.rooms)
        gone = protocol.encode(protocol.user_away(client.username, client.id))
        self.backplane.publish(RoomEvent(room, gone))
        if (earlier := self._away.pop(client.id, None)) is not None:
            earlier[1].cancel()
        timer = asyncio.get_running_loop().call_later(self.settings.leave_grace, self._grace_over, away)
        self._away[client.id] = (away, timer)

    def _grace_over(self, away: Away) -> None:
        if (held := self._away.get(away.client_id)) is not None and held[0] is away:
            del self._away[away.client_id]
        left = protocol.encode(protocol.user_left(away.username, away.client_id))
        self.backplane.end_grace(away.room, away.client_id, away.mark, left)
        self.lobby.changed()

    # --- Moderation ---------------------------------------------------------------------------

    async def moderate(self, room: str, command: Moderation, by: str) -> protocol.Rejection | None:
        """An admin's kick, unban or deletion (the caller checked the role; room_moderation.py):
        what went wrong, if anything."""
        return await self.room_moderation.apply(room, command, by)

    async def close(self, client_id: str, code: int, reason: str) -> None:
        """Close a client's socket (after what is already queued for it) and forget it."""
        self._drop(client_id, close=(code, reason), discard=False)

    # --- The backplane's news (backplane.Listener) --------------------------------------------

    def lobby_changed(self) -> None:
        self.lobby.changed()

    def backplane_lost(self) -> None:
        """Redis went away: everyone in a room hears of it."""
        error = protocol.error(
            ErrorCode.BACKPLANE_UNAVAILABLE, "lost contact with the other chat servers; reconnecting"
        )
        in_rooms = [client.id for client in self.clients.values() if client.room is not None]
        self._deliver(protocol.encode(error), in_rooms)

    async def backplane_back(self, rooms: set[str], reset_rooms: set[str]) -> None:
        await self.room_history.start_over(rooms, reset_rooms)

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

    # --- Health and shutdown ------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """For /health: ok or degraded (the backplane is away), and counts of this process."""
        backplane = self.backplane.state()
        return {
            "tasks": len(asyncio.all_tasks()),
            "status": "ok" if backplane["connected"] else "degraded",
            "ws_protocol": self.settings.ws_protocol,  # "stock" when the fast one could not be used
            "connections": len(self.connections),
            "rooms": len(self.rooms),
            "chat_clients": len(self.clients) - len(self.lobby.watchers),
            "lobby_clients": len(self.lobby.watchers),
            "queued_events": sum(client.outbox.queued for client in self.clients.values()),
            "backplane": backplane,
        }

    async def shutdown(self) -> None:
        """Release everything (uvicorn has already closed every socket by now). Members kept
        away stay so in Redis: another process ends their grace, or continues them."""
        self.lobby.cancel()
        if self._counting_rooms is not None:
            self._counting_rooms.cancel()
        for _, timer in self._away.values():
            timer.cancel()
        self._away.clear()
        for client_id in list(self.clients):
            self._drop(client_id)
        await self.backplane.close()
