"""What the server sends: events, error codes and close codes. Every event is encoded once,
whatever the number of recipients, and every one has a `type` and a `timestamp`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any

from ..settings import Settings


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (RFC 6455, section 7.4)."""

    GOING_AWAY = 1001  # reserved for a proxy or a browser tab; uvicorn sends 1012 when the server stops
    POLICY_VIOLATION = 1008  # invalid room name or unknown endpoint; the reason says which
    MESSAGE_TOO_BIG = 1009  # a frame above max_frame_bytes (sent by uvicorn)
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the server is shutting down: reconnect soon
    # The client stopped reading and its outbox overflowed, too many sockets from one address,
    # too many new rooms from one address, or too many rooms on the server.
    TRY_AGAIN_LATER = 1013
    KICKED = 4001  # an admin removed the client (an application code: 4000-4999)
    BANNED = 4003  # kicked from this room a while ago: the reason says until when
    RECONNECTING = 4100  # sent by a client that closes to reconnect at once: not a leave
    KEEPALIVE_TIMEOUT = 4408  # no pong came back in time: the connection is presumed dead


class ErrorCode:
    """The `code` field of `error` events: stable strings that clients can match on."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_MESSAGE = "invalid_message"
    MESSAGE_TOO_LONG = "message_too_long"
    INVALID_USERNAME = "invalid_username"
    UNSUPPORTED_FRAME = "unsupported_frame"
    INVALID_CLIENT_MSG_ID = "invalid_client_msg_id"
    INVALID_SINCE = "invalid_since"
    INVALID_BEFORE = "invalid_before"
    INVALID_SESSION = "invalid_session"
    HISTORY_UNAVAILABLE = "history_unavailable"
    BACKPLANE_UNAVAILABLE = "backplane_unavailable"
    RATE_LIMITED = "rate_limited"
    USERNAME_LOCKED = "username_locked"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A frame the server will not act on, and why."""

    code: str
    reason: str
    retry_after: float | None = None  # seconds, for rate_limited
    client_msg_id: str | None = None  # which message it was, when the client said

    def event(self) -> dict[str, Any]:
        event = error(self.code, self.reason)
        if self.retry_after is not None:
            event["retry_after"] = self.retry_after
        if self.client_msg_id is not None:
            event["client_msg_id"] = self.client_msg_id
        return event


def now() -> str:
    """ISO 8601 in UTC with an explicit offset, e.g. 2024-01-01T12:00:00.000000+00:00."""
    return datetime.now(timezone.utc).isoformat()


def encode(event: dict[str, Any]) -> str:
    """Serialize an event once; the same text goes to every recipient."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def welcome(room: str, client_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """The first event on a chat socket: a `system` line (as in the seed protocol) with
    `"kind": "welcome"`, the connection's `client_id`, and the limits a client checks early."""
    event: dict[str, Any] = {
        "type": "system",
        "kind": "welcome",
        "message": f"Welcome to room '{room}'!",
        "client_id": client_id,
        "timestamp": now(),
    }
    if settings is not None:
        event["limits"] = limits(settings)
    return event


def limits(settings: Settings) -> dict[str, float]:
    """What a client needs to pace itself and check its input before sending (0: no limit)."""
    return {
        "messages_per_second": settings.rate_messages,
        "messages_burst": settings.rate_messages_burst if settings.rate_messages else 0,
        "renames_per_second": settings.rate_renames,
        "renames_burst": settings.rate_renames_burst if settings.rate_renames else 0,
        "typing_per_second": settings.rate_typing,
        "message_chars": settings.max_message_chars,
        "username_chars": settings.max_username_chars,
        "room_chars": settings.max_room_chars,
    }


def presence(room: str, users: list[dict[str, Any]]) -> dict[str, Any]:
    """Everyone in the room: {client_id, username}, and `"away": true` for a member whose
    connection dropped a moment ago (it may be back within --leave-grace)."""
    return {"type": "presence", "room": room, "users": users, "timestamp": now()}


def user_joined(username: str, client_id: str) -> dict[str, Any]:
    return {
        "type": "user_joined",
        "username": username,
        "client_id": client_id,
        "message": f"{username} joined the room",
        "timestamp": now(),
    }


def user_left(username: str, client_id: str) -> dict[str, Any]:
    return {
        "type": "user_left",
        "username": username,
        "client_id": client_id,
        "message": f"{username} left the room",
        "timestamp": now(),
    }


def user_away(username: str, client_id: str) -> dict[str, Any]:
    """Its connection dropped without a goodbye (a reload, a lost network): `user_back` if it
    returns within --leave-grace, else `user_left`. Not a leave: a seed client ignores it."""
    return {"type": "user_away", "username": username, "client_id": client_id, "timestamp": now()}


def user_back(username: str, client_id: str) -> dict[str, Any]:
    """An away member is back (the same tab's ?session=, name and token): it never left."""
    return {"type": "user_back", "username": username, "client_id": client_id, "timestamp": now()}


def chat_message(
    username: str, text: str, client_id: str, client_msg_id: str | None = None
) -> dict[str, Any]:
    event = {
        "type": "message",
        "username": username,
        "message": text,
        "client_id": client_id,
        "timestamp": now(),
    }
    if client_msg_id is not None:
        event["client_msg_id"] = client_msg_id
    return event


def history(
    room: str, messages: list[dict[str, Any]], epoch: str, truncated: bool, reset: bool
) -> dict[str, Any]:
    return {
        "type": "history",
        "room": room,
        "messages": messages,
        "truncated": truncated,
        "epoch": epoch,
        "reset": reset,
        "timestamp": now(),
    }


def earlier_messages(room: str, messages: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    """The answer to `load_earlier`: older messages, oldest first; `complete`: none older is kept."""
    return {
        "type": "earlier_messages",
        "room": room,
        "messages": messages,
        "complete": complete,
        "timestamp": now(),
    }


def username_changed(old: str, new: str, client_id: str) -> dict[str, Any]:
    return {
        "type": "username_changed",
        "old_username": old,
        "new_username": new,
        "client_id": client_id,
        "message": f"{old} is now known as {new}",
        "timestamp": now(),
    }


def typing(username: str, client_id: str) -> dict[str, Any]:
    return {"type": "typing", "username": username, "client_id": client_id, "timestamp": now()}


def rooms_update(rooms: dict[str, dict[str, Any]], total_rooms: int | None = None) -> dict[str, Any]:
    """`rooms`: the busiest rooms, busiest first; `total_rooms`: how many there are in all."""
    total = len(rooms) if total_rooms is None else total_rooms
    return {"type": "rooms_update", "rooms": rooms, "total_rooms": total, "timestamp": now()}


def kicked(username: str, client_id: str, by: str) -> dict[str, Any]:
    return {
        "type": "system",
        "kind": "kicked",
        "message": f"{username} was removed from the room by {by}",
        "client_id": client_id,
        "timestamp": now(),
    }


def unbanned(username: str, by: str) -> dict[str, Any]:
    return {
        "type": "system",
        "kind": "unbanned",
        "message": f"{by} lifted the ban on {username}",
        "username": username,
        "timestamp": now(),
    }


def message_deleted(room: str, message_id: int) -> dict[str, Any]:
    return {"type": "message_deleted", "room": room, "id": message_id, "timestamp": now()}


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "timestamp": now()}
