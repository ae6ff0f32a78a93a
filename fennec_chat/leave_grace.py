"""A reload is not a leave: a member whose connection ended without a goodbye stays in its
room, shown away, for --leave-grace seconds; if its tab comes back meanwhile it continues under
its old client_id, and nobody sees it leave or join.

A browser closes with 1001 when a page reloads or a tab closes, and a lost network ends a
connection with no close frame at all (1006): both may be followed by the same tab a moment
later. A close with 1000 is a deliberate leave (the page sends it when it switches rooms) and is
announced at once, as is every close the server makes (kicked, flooding, too slow).

A returning tab proves itself with its ?session= id, a secret only that tab knows; the id, its
name and its token's user must all match the away member, so a guessed or reused id continues
nobody else and hides nobody's leave. Only a digest of the id is kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .protocol import CloseCode, default_username

NO_CLOSE_FRAME = 1006  # what the server sees when a connection simply stops


@dataclass(frozen=True, slots=True)
class Away:
    """A member whose connection dropped, kept in its room for a while in case it comes back."""

    room: str
    client_id: str
    username: str
    session: str  # a digest of the tab's ?session=
    identity: str  # the token's user ("" without a token)
    mark: str  # this absence's own: the timer of an earlier one ends nothing

    def continued_by(self, session: str, username: str, identity: str) -> bool:
        """Whether a connection with these may continue this member (`username` "": none asked)."""
        wanted = username or default_username(self.client_id)
        return (session, wanted, identity) == (self.session, self.username, self.identity)


def may_come_back(close_code: int | None, session: str | None, presence_outlives_process: bool) -> bool:
    """Whether a connection that ended so may be followed by the same tab: it named its tab, and
    it went away without a goodbye (1001, no close frame, no pong), said it is back at once
    (4100), or the server restarted (1012) while other processes can hold its place."""
    if session is None:
        return False  # a seed client: its leave is announced at once, as always
    if close_code in (
        CloseCode.GOING_AWAY,
        NO_CLOSE_FRAME,
        CloseCode.KEEPALIVE_TIMEOUT,
        CloseCode.RECONNECTING,  # the page's own, when it resumes to heal a gap
    ):
        return True
    return close_code == CloseCode.SERVICE_RESTART and presence_outlives_process


def session_digest(session: str) -> str:
    """What is kept of a tab's secret ?session= id."""
    return hashlib.sha256(b"fennec-chat session\n" + session.encode()).hexdigest()[:32]


class AwayBook:
    """The away members one process keeps in memory (the local backplane's), by client_id, by
    room and by (room, session): every question costs one lookup, whatever the number of rooms."""

    def __init__(self) -> None:
        self._by_id: dict[str, Away] = {}
        self._by_room: dict[str, dict[str, Away]] = {}
        self._by_session: dict[tuple[str, str], str] = {}  # (room, session) → client_id

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, away: Away) -> None:
        # A second away member of the same tab in the same room (a duplicated tab): the newest is
        # the one a return continues; the other still leaves when its own grace ends.
        self._by_id[away.client_id] = away
        self._by_room.setdefault(away.room, {})[away.client_id] = away
        self._by_session[away.room, away.session] = away.client_id

    def take(self, room: str, session: str, username: str, identity: str) -> Away | None:
        """The away member these continue, no longer away; None if there is none."""
        client_id = self._by_session.get((room, session))
        away = self._by_id.get(client_id) if client_id is not None else None
        if away is None or not away.continued_by(session, username, identity):
            return None
        return self.remove(away.client_id)

    def remove(self, client_id: str, mark: str = "") -> Away | None:
        """Forget an away member (only that absence, if `mark` says which); None if it is not away."""
        away = self._by_id.get(client_id)
        if away is None or (mark and away.mark != mark):
            return None
        del self._by_id[client_id]
        in_room = self._by_room[away.room]
        del in_room[client_id]
        if not in_room:
            del self._by_room[away.room]
        if self._by_session.get((away.room, away.session)) == client_id:
            del self._by_session[away.room, away.session]
        return away

    def in_room(self, room: str) -> list[Away]:
        return list(self._by_room.get(room, {}).values())

    def has_room(self, room: str) -> bool:
        return room in self._by_room
