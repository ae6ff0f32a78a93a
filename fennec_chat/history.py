"""Message history: every chat message is numbered and stored before anyone sees it.

`History` is the small interface the room manager needs (append, recent N, since an id, before
an id);
`SQLiteHistory` is the embedded default. A message is broadcast only after its transaction
has committed, so a message any client received is in the history after a crash.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .settings import Settings


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as stored: with its `id`, encoded once for every recipient."""

    event: dict[str, Any]
    text: str
    duplicate: bool = False  # an earlier message had this client_msg_id; `event` is that one


@dataclass(frozen=True, slots=True)
class Page:
    """Some of a room's history, oldest first."""

    messages: list[dict[str, Any]]
    epoch: str
    truncated: bool  # older messages exist that are not in `messages`
    reset: bool = False  # the client's `since` belonged to another history: start over


@dataclass(frozen=True, slots=True)
class RoomState:
    epoch: str
    last_id: int


class History(ABC):
    """Where a room's messages are kept; ids increase by one per message within a room."""

    @abstractmethod
    async def start(self) -> None:
        """Open the store; raise with a clear message if it cannot be used."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the store."""

    @abstractmethod
    def append(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        """Number and store `event` (or find the earlier one `sender` sent with its client_msg_id:
        a client_msg_id is the sender's own, so nobody else's can shadow it). `sender` is kept
        as it is given: a `sender_digest`, never a secret.

        Returns at once; the future resolves once the message is stored. Futures resolve in
        the order of their appends, so callbacks added to them run in message id order.
        """

    def forget(self, room: str) -> None:  # noqa: B027 - most stores keep nothing in memory
        """Nobody is in `room` any more: drop what is kept in memory about it."""

    @abstractmethod
    async def room_state(self, room: str) -> RoomState:
        """The room's epoch (made on first use) and its last message id."""

    @abstractmethod
    async def messages(self, room: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` of the newest messages with an id above `after_id`, oldest first."""

    @abstractmethod
    async def before(self, room: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` of the newest messages with an id below `before_id`, oldest first."""

    @abstractmethod
    async def delete(self, room: str, message_id: int) -> bool:
        """Remove one message (an admin's `delete_message`); whether it was there. Its id is
        not given again: ids keep increasing."""

    async def earlier(self, room: str, before_id: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """What `load_earlier` asks for: up to `limit` messages below `before_id`, oldest first,
        and whether nothing older is retained (one more is read to tell)."""
        messages = await self.before(room, before_id, limit + 1)
        return messages[-limit:] if len(messages) > limit else messages, len(messages) <= limit

    async def recent(self, room: str, limit: int) -> Page:
        state = await self.room_state(room)
        return await self._page(room, state, after_id=0, limit=limit)

    async def since(self, room: str, after_id: int, epoch: str | None, limit: int) -> Page:
        """What a reconnecting client missed; `reset` if its position is not in this history."""
        state = await self.room_state(room)
        if after_id == 0 and state.last_id == 0:
            return Page([], state.epoch, truncated=False)  # an empty room is the same in any epoch
        if (epoch is not None and epoch != state.epoch) or after_id > state.last_id:
            page = await self._page(room, state, after_id=0, limit=limit)
            return Page(page.messages, page.epoch, page.truncated, reset=True)
        return await self._page(room, state, after_id=after_id, limit=limit)

    async def _page(self, room: str, state: RoomState, after_id: int, limit: int) -> Page:
        messages = await self.messages(room, after_id, limit) if limit > 0 else []
        first_kept = messages[0]["id"] if messages else state.last_id + 1
        # Anything between the client's position and the first message we send is a gap.
        truncated = first_kept > after_id + 1 and state.last_id > after_id
        return Page(messages, state.epoch, truncated)


def open_history(settings: Settings) -> History | None:
    """The history the settings ask for (not started yet), or None with --no-history."""
    if not settings.history:
        return None
    from .sqlite_history import SQLiteHistory  # the embedded default

    return SQLiteHistory(settings.db, settings.history_retention, settings.history_days)


def sender_digest(sender: str) -> str:
    """What is stored of a sender: enough to tell senders apart, nothing to impersonate one with
    (a sender key may be a tab's secret session id)."""
    return hashlib.sha256(sender.encode()).hexdigest()[:32]
