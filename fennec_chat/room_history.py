"""The history as members meet it: a message is numbered and stored before anyone sees it; a
newcomer gets what was said before it joined, then everything live, with no gap and nothing
twice; after the store was replaced, everyone starts over."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from . import protocol
from .backplane import BackplaneUnavailable
from .history import Stored, sender_digest
from .protocol import ErrorCode

if TYPE_CHECKING:
    from .manager import ChatManager, Client

logger = logging.getLogger("fennec_chat")

MAX_IN_FLIGHT = 64  # a client's messages waiting for the history before its next one waits too


class RoomHistory:
    """The manager's history side (`manager.publish`, `manager.send_history`)."""

    def __init__(self, manager: ChatManager) -> None:
        self.manager = manager

    async def publish(self, room: str, event: dict[str, Any], sender: str) -> None:
        """Number and store a chat message, then send it to everyone in the room.

        Storing first means a client that reconnects with ?since= finds every message anyone
        saw; the backplane sends a room's messages in id order. The sender does not wait for
        the commit (its next messages can share it) unless it has many in flight.
        """
        client = self.manager.clients.get(sender)
        stored = self.manager.backplane.publish_message(room, event, self._author(sender, client))
        stored.add_done_callback(functools.partial(self._after_publish, sender, event))
        if client is not None:
            client.in_flight += 1
            if client.in_flight > MAX_IN_FLIGHT:
                await asyncio.wait([stored])

    @staticmethod
    def _author(client_id: str, client: Client | None) -> str:
        """What the history keeps of who sent it: a digest of the token's user or the tab
        (or of this socket alone), made once per client."""
        if client is None:
            return sender_digest(f"client:{client_id}")
        if client.author_digest is None:
            client.author_digest = sender_digest(client.author or f"client:{client_id}")
        return client.author_digest

    def _after_publish(self, sender: str, event: dict[str, Any], stored: asyncio.Future[Stored]) -> None:
        manager = self.manager
        if (client := manager.clients.get(sender)) is not None:
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
            manager._deliver(protocol.encode(error), (sender,))
        elif stored.result().duplicate:
            # A resend of a message we already have: only the sender hears of it, as its receipt.
            manager._deliver(stored.result().text, (sender,))

    async def send_history(self, client_id: str, room: str, since: int | None, epoch: str | None) -> None:
        """Send `history`, then release the room events held since `join_room`.

        The client joined the room before the history was read, so nothing published meanwhile
        is missed; messages that are both in the history and held are sent once.
        """
        manager = self.manager
        client = manager.clients.get(client_id)
        history = manager.history
        if client is None or not client.catching_up or history is None:
            return
        await manager.backplane.ready(room)
        settings = manager.settings
        try:
            if since is None:
                page = await history.recent(room, settings.history_on_join)
            else:
                page = await history.since(room, since, epoch, settings.history_resume_max)
        except Exception as problem:
            logger.error("could not read the history of room %s: %r", room, problem)
            page = None
        if manager.clients.get(client_id) is not client:
            return  # it left while we were reading
        held = client.go_live()
        if page is None:
            error = protocol.error(ErrorCode.HISTORY_UNAVAILABLE, "history could not be read")
            manager._deliver(protocol.encode(error), (client_id,))
            newest_sent = 0
        else:
            event = protocol.history(room, page.messages, page.epoch, page.truncated, page.reset)
            manager._deliver(protocol.encode(event), (client_id,))
            if page.messages:
                newest_sent = page.messages[-1]["id"]
            elif since is not None and not page.reset:
                newest_sent = since
            else:
                newest_sent = 0
        for message_id, text in held:
            if message_id is None or message_id > newest_sent:
                manager._deliver(text, (client_id,))

    async def start_over(self, rooms: set[str], reset_rooms: set[str]) -> None:
        """After the backplane was away: a fresh `presence` for everyone here, and where the
        history was replaced, a `history` with `reset: true`."""
        manager = self.manager
        for room in rooms:
            presence = protocol.encode(protocol.presence(room, await manager.members(room)))
            here = tuple(manager.rooms.get(room, ()))
            manager._deliver(presence, here)
            if room in reset_rooms and manager.history is not None:
                page = await manager.history.recent(room, manager.settings.history_on_join)
                event = protocol.history(room, page.messages, page.epoch, page.truncated, reset=True)
                manager._deliver(protocol.encode(event), here)
