"""What a client may ask of a chat room, and the checks between its frames and the server.

Everything a client sends passes through `parse_command`, which never raises: it returns either
a command to carry out or a `Rejection` to send back as an `error` event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..settings import Settings
from .events import ErrorCode, Rejection
from .names import SURROGATES, check_username, is_control

CLIENT_MSG_ID = re.compile(r"[!-~]{1,64}")
EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
MESSAGE_ID = re.compile(r"[0-9]{1,18}")
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


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
    verb = "kick"


@dataclass(frozen=True, slots=True)
class LoadEarlier:
    before: int  # the messages with an id below this one, newest 50 of them


@dataclass(frozen=True, slots=True)
class Unban:
    username: str  # whom an admin lets back into the room before their ban ends
    verb = "unban"


@dataclass(frozen=True, slots=True)
class DeleteMessage:
    message_id: int  # the message an admin removes from the history and from every screen
    verb = "delete messages"


Command = SendMessage | SetUsername | Typing | Kick | LoadEarlier | Unban | DeleteMessage


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
    if kind == "load_earlier":
        return _load_earlier(data.get("before"))
    if kind == "unban":
        name = check_username(data.get("username"), settings, reserved_ok=True)
        return name if isinstance(name, Rejection) else Unban(name)
    if kind == "delete_message":
        message_id = data.get("id")
        if type(message_id) is not int or not 1 <= message_id < 10**MESSAGE_ID_CHARS:
            return Rejection(ErrorCode.INVALID_EVENT, '"id" must be a message id: a positive integer')
        return DeleteMessage(message_id)
    return Rejection(
        ErrorCode.UNKNOWN_TYPE,
        'unknown "type"; expected message, set_username, typing, kick, load_earlier, unban or delete_message',
    )


# Rejections of frames the server could not even read as a command: these cost their full size
# from the sender's frame budget (see limits.py).
UNREADABLE = frozenset(
    {ErrorCode.INVALID_JSON, ErrorCode.INVALID_EVENT, ErrorCode.UNKNOWN_TYPE, ErrorCode.UNSUPPORTED_FRAME}
)
ENVELOPE_CHARS = 256  # "type", the field names, quotes and a few small extra fields
KICK_TARGET_CHARS = 64
MESSAGE_ID_CHARS = 18  # a message id: up to 18 digits, as ?since= allows


def max_frame_chars(kind: str, settings: Settings) -> int | None:
    """The longest frame a command needs; None for types that are not commands. Every character
    of a field can take 12 in JSON (a \\uXXXX escape pair), hence the factor."""
    field_chars = {
        "message": settings.max_message_chars + 64,  # the message and a client_msg_id
        "set_username": settings.max_username_chars,
        "typing": 0,
        "kick": KICK_TARGET_CHARS,
        "load_earlier": MESSAGE_ID_CHARS,
        "unban": settings.max_username_chars,
        "delete_message": MESSAGE_ID_CHARS,
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
    if SURROGATES.search(text) or any(is_control(ch) and ch not in "\n\t" for ch in text):
        return Rejection(ErrorCode.INVALID_MESSAGE, "message must not contain control characters")
    return SendMessage(text, client_msg_id)


def _load_earlier(before: object) -> LoadEarlier | Rejection:
    # A JSON integer, as ?since= is read: no bool (True is an int in Python), no float, no string.
    if type(before) is not int or not 1 <= before < 10**MESSAGE_ID_CHARS:
        return Rejection(ErrorCode.INVALID_BEFORE, '"before" must be a message id: a positive integer')
    return LoadEarlier(before)


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
