"""One socket's life as the manager sees it: registered on the way in (under its old client_id
if its tab is back within --leave-grace), greeted into its room, its frames read, and forgotten
on the way out, with how it ended deciding whether its room hears a leave now or only after the
grace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fennec import WebSocket

from . import metrics, protocol
from .fennec_fixes import incoming
from .gate import Identity
from .leave_grace import may_come_back

if TYPE_CHECKING:
    from .manager import ChatManager


class Connection:
    """`async with manager.connected(...) as me`: a socket registered on the way in and
    forgotten on the way out; if it was in a room, the room hears `user_left` exactly once,
    whatever ended it (a close, a crash, too slow, kicked), or, if its tab may be back (a
    reload), `user_away` now and `user_left` only once --leave-grace has passed without it."""

    __slots__ = (
        "client_id", "close_code", "identity", "manager", "returning", "room", "session",
        "username", "websocket",
    )  # fmt: skip

    def __init__(
        self,
        manager: ChatManager,
        websocket: WebSocket,
        room: str,
        identity: Identity,
        session: str | None,
        username: str,
    ) -> None:
        self.manager, self.websocket, self.room = manager, websocket, room
        self.identity, self.session, self.username = identity, session, username
        self.client_id = ""
        self.returning = False  # its tab is back within --leave-grace: it continues its old self
        self.close_code: int | None = None  # how the client closed, once it has

    async def __aenter__(self) -> Connection:
        # Whose client_msg_ids its messages carry: the token's user, else the tab, else itself.
        if self.identity.username:
            author: str | None = f"user:{self.identity.username}"
        else:
            author = f"session:{self.session}" if self.session else None
        old_id = await self.manager.come_back(self.room, self.session, self.identity, self.username)
        self.returning = old_id is not None
        self.client_id = await self.manager.connect(self.websocket, old_id, author, self.username)
        metrics.connections.labels(self.endpoint).inc()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        metrics.connections.labels(self.endpoint).dec()
        outlives = self.manager.backplane.presence_outlives_process
        if may_come_back(self.close_code, self.session, outlives):
            await self.manager.disconnect(self.client_id, self.session, self.identity, self.close_code)
        else:
            await self.manager.disconnect(self.client_id, close_code=self.close_code)

    async def enter_room(self, join: protocol.JoinRequest) -> bool:
        """Join the room and tell the newcomer where it is; then tell the room. False: it is gone."""
        manager, client_id, room = self.manager, self.client_id, self.room
        manager.join_room(client_id, room)  # Fennec's; room events are held until its history is out
        await manager.listening(room)  # (with Redis: subscribed) all said after the welcome comes live
        await manager.send_json(client_id, protocol.welcome(room, client_id, manager.settings))
        await manager.send_json(client_id, protocol.presence(room, await manager.members(room)))
        # What was said before it joined (or just what it missed), then live events: no gap, no repeat.
        await manager.send_history(client_id, room, join.since, join.epoch)
        for problem in join.problems:
            await manager.send_json(client_id, problem.event())
        if not manager.is_connected(client_id):
            return False  # dropped meanwhile: more events piled up than its outbox may hold
        arrival = protocol.user_back if self.returning else protocol.user_joined  # back: it never left
        event = arrival(manager.username(client_id), client_id)
        await manager.broadcast_json(event, room=room, exclude=client_id)
        return True

    @property
    def endpoint(self) -> str:
        return "chat" if self.room else "lobby"

    def frames(self) -> AsyncIterator[dict[str, Any]]:
        """The client's frames (raw: fennec_fixes.incoming) until it closes or is dropped."""
        return incoming(self.websocket, self.is_open, self._closed_with)

    def _closed_with(self, code: int) -> None:
        self.close_code = code

    def is_open(self) -> bool:
        """False once the server has dropped it (too slow, kicked, flooding)."""
        return self.client_id in self.manager.clients
