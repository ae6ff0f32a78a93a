"""The wire protocol: what clients may send, what the server sends back, and the checks between.

Everything a client sends passes through `parse_command`, which never raises: it returns either
a command to carry out or a `Rejection` to send back as an `error` event.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any

from .settings import Settings


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
    INVALID_SESSION = "invalid_session"
    HISTORY_UNAVAILABLE = "history_unavailable"
    BACKPLANE_UNAVAILABLE = "backplane_unavailable"
    RATE_LIMITED = "rate_limited"
    USERNAME_LOCKED = "username_locked"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"


# --- Commands: what a client may ask of a chat room ------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    text: str
    client_msg_id: str | None = None  # the sender's own id for it, to make resending safe


@dataclass(frozen=True, slots=True)
class SetUsername:
    username: str


@dataclass(frozen=True, slots=True)
class Typing:
    pass


@dataclass(frozen=True, slots=True)
class Kick:
    client_id: str  # whom an admin removes from the room


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


Command = SendMessage | SetUsername | Typing | Kick


def parse_command(frame: dict[str, Any], settings: Settings) -> Command | Rejection:
    """Turn one ASGI `websocket.receive` frame into a command, or say why it is not one."""
    text = frame.get("text")
    if text is None:
        return Rejection(ErrorCode.UNSUPPORTED_FRAME, "binary frames are not supported; send JSON text")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return Rejection(ErrorCode.INVALID_JSON, "the frame is not valid JSON")
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return Rejection(ErrorCode.INVALID_EVENT, 'expected a JSON object with a string "type"')

    kind = data["type"]
    if len(text) > ENVELOPE_CHARS and (too_big := _padding_problem(kind, len(text), settings)) is not None:
        return too_big
    if kind == "message":
        return _chat_message(data.get("message"), data.get("client_msg_id"), settings)
    if kind == "set_username":
        name = check_username(data.get("username"), settings)
        return name if isinstance(name, Rejection) else SetUsername(name)
    if kind == "typing":
        return Typing()
    if kind == "kick":
        target = data.get("client_id")
        if not isinstance(target, str) or not 1 <= len(target) <= 64:
            return Rejection(ErrorCode.INVALID_EVENT, 'kick needs the "client_id" of someone in the room')
        return Kick(target)
    return Rejection(ErrorCode.UNKNOWN_TYPE, 'unknown "type"; expected message, set_username, typing or kick')


# Rejections of frames the server could not even read as a command: these cost their full size
# from the sender's frame budget (see limits.py).
UNREADABLE = frozenset(
    {ErrorCode.INVALID_JSON, ErrorCode.INVALID_EVENT, ErrorCode.UNKNOWN_TYPE, ErrorCode.UNSUPPORTED_FRAME}
)
ENVELOPE_CHARS = 256  # "type", the field names, quotes and a few small extra fields
KICK_TARGET_CHARS = 64


def max_frame_chars(kind: str, settings: Settings) -> int | None:
    """The longest frame a command needs; None for types that are not commands. Every character
    of a field can take 12 in JSON (a \\uXXXX escape pair), hence the factor."""
    field_chars = {
        "message": settings.max_message_chars + 64,  # the message and a client_msg_id
        "set_username": settings.max_username_chars,
        "typing": 0,
        "kick": KICK_TARGET_CHARS,
    }.get(kind)
    return None if field_chars is None else ENVELOPE_CHARS + 12 * field_chars


def _padding_problem(kind: str, length: int, settings: Settings) -> Rejection | None:
    """Refuse a command padded beyond what it needs (whitespace or unknown fields): parsing
    and keeping it would cost the server more than the sender's frame budget accounts for."""
    limit = max_frame_chars(kind, settings)
    if limit is None or length <= limit:
        return None
    return Rejection(
        ErrorCode.INVALID_EVENT, f"a {kind} frame may be at most {limit} characters; this had {length}"
    )


# --- Validation ------------------------------------------------------------------------------

ROOM_NAME = re.compile(r"[A-Za-z0-9._-]+")
CLIENT_MSG_ID = re.compile(r"[!-~]{1,64}")
EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
MESSAGE_ID = re.compile(r"[0-9]{1,18}")
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
# Lone surrogates can arrive as JSON escapes ("\ud800") but cannot be encoded as UTF-8 again.
_SURROGATES = re.compile("[\ud800-\udfff]")
# Characters that reorder the text around them: a name could then display as someone else's.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Letters and symbols that render as blank space: a name made of them looks like nobody.
_BLANK_LOOKING = frozenset("\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")
# Format (Cf: zero-width, bidi marks, soft hyphen), private-use and surrogate code points, and
# separators. (Not unassigned ones: this Python's Unicode is older than the newest emoji.)
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp", "Zs"})
_JOINERS = frozenset("\u200c\u200d")  # zero width non-joiner and joiner
_SPACES = re.compile(r"[^\S\n\r\t\v\f\x1c-\x1f\x85\u2028\u2029]+")  # runs of Zs: spaces of any width
MAX_COMBINING_MARKS = 3  # per character: enough for Vietnamese, not for a tower of "zalgo"
RESERVED_NAMES = frozenset({"system", "server", "admin", "administrator", "moderator"})


def room_name_problem(room: str, settings: Settings) -> str | None:
    """Why `room` is not a valid room name, or None if it is."""
    if not ROOM_NAME.fullmatch(room) or len(room) > settings.max_room_chars:
        return f"invalid room name: use 1-{settings.max_room_chars} letters, digits, '-', '_' or '.'"
    return None


def check_username(name: object, settings: Settings, reserved_ok: bool = False) -> str | Rejection:
    """The username to use (trimmed, each run of spaces made one plain space), or why `name`
    cannot be one. `reserved_ok`: the name comes from the operator (a token)."""
    limit = settings.max_username_chars
    if not isinstance(name, str):
        return Rejection(ErrorCode.INVALID_USERNAME, "username must be a string")
    # Any kind of space (an ideographic one between family and given name) is a space.
    name = _SPACES.sub(" ", name).strip()
    if not 1 <= len(name) <= limit:
        return Rejection(ErrorCode.INVALID_USERNAME, f"username must be 1-{limit} characters")
    if _SURROGATES.search(name) or any(_is_control(ch) or ch in _BIDI_CONTROLS for ch in name):
        return Rejection(ErrorCode.INVALID_USERNAME, "username must not contain control characters")
    if any(_is_invisible(name, index) for index in range(len(name))):
        return Rejection(ErrorCode.INVALID_USERNAME, "username must not contain invisible characters")
    if _most_combining_marks(name) > MAX_COMBINING_MARKS:
        return Rejection(
            ErrorCode.INVALID_USERNAME, f"username may have at most {MAX_COMBINING_MARKS} accents per letter"
        )
    if not reserved_ok and " ".join(unicodedata.normalize("NFKC", name).casefold().split()) in RESERVED_NAMES:
        return Rejection(ErrorCode.INVALID_USERNAME, f"{name!r} is reserved: pick another name")
    return name


def _is_invisible(text: str, index: int) -> bool:
    ch = text[index]
    if ch in _JOINERS:
        # Inside a word or an emoji sequence (ශ්‍රී, Persian names, 👩‍💻) a joiner shapes what is
        # around it; at either end of a name, or beside a space, it is a ghost.
        before = unicodedata.category(text[index - 1])[0] if index > 0 else ""
        after = unicodedata.category(text[index + 1])[0] if index + 1 < len(text) else ""
        return not (before in ("L", "M", "S") and after in ("L", "S"))
    return ch in _BLANK_LOOKING or (ch != " " and unicodedata.category(ch) in _INVISIBLE_CATEGORIES)


def _most_combining_marks(text: str) -> int:
    """The longest run of combining marks (accents stacked on one character)."""
    longest = run = 0
    for ch in text:
        run = run + 1 if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me") else 0
        longest = max(longest, run)
    return longest


def _chat_message(message: object, client_msg_id: object, settings: Settings) -> SendMessage | Rejection:
    if client_msg_id is not None and not (
        isinstance(client_msg_id, str) and CLIENT_MSG_ID.fullmatch(client_msg_id)
    ):
        return Rejection(
            ErrorCode.INVALID_CLIENT_MSG_ID,
            "client_msg_id must be 1-64 printable ASCII characters, no spaces",
        )
    if not isinstance(message, str):
        return Rejection(ErrorCode.INVALID_MESSAGE, '"message" must be a string')
    text = message.strip().replace("\r\n", "\n")
    if not text:
        return Rejection(ErrorCode.INVALID_MESSAGE, "message is empty")
    if len(text) > settings.max_message_chars:
        return Rejection(
            ErrorCode.MESSAGE_TOO_LONG, f"message is longer than {settings.max_message_chars} characters"
        )
    if _SURROGATES.search(text) or any(_is_control(ch) and ch not in "\n\t" for ch in text):
        return Rejection(ErrorCode.INVALID_MESSAGE, "message must not contain control characters")
    return SendMessage(text, client_msg_id)


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """What a client asks for in its connect URL: ?username=NAME&since=ID&epoch=EPOCH&session=ID."""

    username: str | None = None  # join under this name instead of the default one
    session: str | None = None  # the tab's own id: its client_msg_ids are its own
    since: int | None = None  # resume after this message id...
    epoch: str | None = None  # ...of this history
    problems: tuple[Rejection, ...] = ()  # parameters that were ignored, and why


def parse_join(query: dict[str, str], settings: Settings) -> JoinRequest:
    username, since, epoch, session, problems = None, None, None, None, []
    if "session" in query:
        if SESSION_ID.fullmatch(query["session"]):
            session = query["session"]
        else:
            reason = "session must be 16-64 letters, digits, '-' or '_'"
            problems.append(Rejection(ErrorCode.INVALID_SESSION, reason))
    if "username" in query:
        checked = check_username(query["username"], settings)
        if isinstance(checked, Rejection):
            problems.append(checked)
        else:
            username = checked
    raw_since, raw_epoch = query.get("since"), query.get("epoch")
    if raw_since is not None:
        # ASCII digits only: str.isdigit() accepts '²', which int() then refuses.
        if MESSAGE_ID.fullmatch(raw_since) and (raw_epoch is None or EPOCH.fullmatch(raw_epoch)):
            since, epoch = int(raw_since), raw_epoch
        else:
            problems.append(
                Rejection(ErrorCode.INVALID_SINCE, "since must be a message id and epoch an epoch")
            )
    return JoinRequest(username, session, since, epoch, tuple(problems))


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


# --- Events: what the server sends -----------------------------------------------------------


def now() -> str:
    """ISO 8601 in UTC with an explicit offset, e.g. 2024-01-01T12:00:00.000000+00:00."""
    return datetime.now(timezone.utc).isoformat()


def encode(event: dict[str, Any]) -> str:
    """Serialize an event once; the same text goes to every recipient."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def welcome(room: str, client_id: str, settings: Settings | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "system",
        "message": f"Welcome to room '{room}'!",
        "client_id": client_id,
        "timestamp": now(),
    }
    if settings is not None:  # so that a client can pace itself (0: no limit)
        event["limits"] = {
            "messages_per_second": settings.rate_messages,
            "messages_burst": settings.rate_messages_burst if settings.rate_messages else 0,
        }
    return event


def presence(room: str, users: list[dict[str, str]]) -> dict[str, Any]:
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
        "message": f"{username} was removed from the room by {by}",
        "client_id": client_id,
        "timestamp": now(),
    }


def error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "timestamp": now()}
