"""The history as members meet it: a message is numbered and stored before anyone sees it; a
newcomer gets what was said before it joined, then everything live, with no gap and nothing
twice; after the store was replaced, everyone starts over."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from . import metrics, protocol
from .backplane import BackplaneUnavailable
from .history import Page, Stored, sender_digest
from .protocol import ErrorCode

if TYPE_CHECKING:
    from .manager import ChatManager, Client

logger = logging.getLogger("fennec_chat")

MAX_IN_FLIGHT = 64  # a client's messages waiting for the history before its next one waits too
EARLIER_PAGE = 50  # messages in one answer to `load_earlier`


def resume_outcome(page: Page) -> str:
    """How a reconnection with ?since= went: `exact` (everything it missed), `truncated` (more
    than we keep or send: a gap) or `reset` (its position is not in this history)."""
    return "reset" if page.reset else "truncated" if page.truncated else "exact"


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
        else:
            metrics.messages.inc()

    async def send_history(self, client_id: str, room: str, since: int | None, epoch: str | None) -> None:
        """Send `history`: what was stored before the client joined; then, as live `message`
        events, everything stored since, each once and in id order.

        The client joined the room (and its room events have been held) before the history
        was read, so the read may also find messages stored after the join: those are cut from
        the history and reach the client as the live events they are. A client that ignores
        `history` (one written from the seed protocol) thus misses nothing said after its
        welcome.
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
            if page.messages:  # Redis: what was stored a moment ago arrives a moment later
                await manager.backplane.heard(room, page.messages[-1]["id"])
        except Exception as problem:
            logger.error("could not read the history of room %s: %r", room, problem)
            page = None
        if manager.clients.get(client_id) is not client:
            return  # it left while we were reading
        held = client.go_live()
        joined_after = next((message_id for message_id, _ in held if message_id is not None), None)
        already_seen = 0  # held messages the client has: with ?since=, the ones up to it
        if page is None:
            error = protocol.error(ErrorCode.HISTORY_UNAVAILABLE, "history could not be read")
            manager._deliver(protocol.encode(error), (client_id,))
        else:
            messages = page.messages
            if joined_after is not None:  # stored after the join: live events, not history
                messages = [message for message in messages if message["id"] < joined_after]
            event = protocol.history(room, messages, page.epoch, page.truncated, page.reset)
            manager._deliver(protocol.encode(event), (client_id,))
            if since is not None and not page.reset:
                already_seen = since
            if since is not None:
                metrics.resumes.labels(resume_outcome(page)).inc()
        for message_id, text in held:
            if message_id is None or message_id > already_seen:
                manager._deliver(text, (client_id,))

    async def send_earlier(self, client_id: str, room: str, before: int) -> None:
        """Answer `load_earlier`, to the asker alone: up to EARLIER_PAGE messages below `before`."""
        manager = self.manager
        if manager.history is None:
            answer = protocol.error(ErrorCode.HISTORY_UNAVAILABLE, "this server keeps no history")
        else:
            try:
                messages, complete = await manager.history.earlier(room, before, EARLIER_PAGE)
                answer = protocol.earlier_messages(room, messages, complete)
            except Exception as problem:
                logger.error("could not read the history of room %s: %r", room, problem)
                answer = protocol.error(ErrorCode.HISTORY_UNAVAILABLE, "history could not be read")
        manager._deliver(protocol.encode(answer), (client_id,))

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
