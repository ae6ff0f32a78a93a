"""Names: rooms, and the usernames people show one another (which must not render blank or
pretend to be someone else)."""

from __future__ import annotations

import re
import unicodedata

from ..settings import Settings
from .events import ErrorCode, Rejection

ROOM_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Lone surrogates can arrive as JSON escapes ("\ud800") but cannot be encoded as UTF-8 again.
SURROGATES = re.compile("[\ud800-\udfff]")
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
    if SURROGATES.search(name) or any(is_control(ch) or ch in _BIDI_CONTROLS for ch in name):
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


def is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def default_username(client_id: str) -> str:
    """The name of a member that gave none."""
    return f"User-{client_id[:8]}"
