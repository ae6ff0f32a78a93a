"""Bans: a kick keeps the kicked user (its token's name) out of that room for --kick-ban
seconds. Kept where the rest of the chat's state is, so that they survive a restart and hold on
every process: in the history's SQLite file, in Redis, or (with --no-history on one process)
in memory only.
"""

from __future__ import annotations

import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    room     TEXT NOT NULL,
    username TEXT NOT NULL,
    until    REAL NOT NULL,            -- unix time the ban ends
    PRIMARY KEY (room, username)
) WITHOUT ROWID;
"""


class Bans(ABC):
    """Who may not come back to which room, until when (unix time)."""

    @abstractmethod
    async def ban(self, room: str, username: str, until: float) -> None:
        """Keep `username` out of `room` until `until` (a later ban of the same user replaces it)."""

    @abstractmethod
    async def unban(self, room: str, username: str) -> bool:
        """Lift the ban; whether there was one (still running)."""

    @abstractmethod
    async def banned_until(self, room: str, username: str) -> float | None:
        """When the user's ban from the room ends, or None if it is not banned."""


class MemoryBans(Bans):
    """One process without a history file: gone when it stops (README, Moderation)."""

    def __init__(self) -> None:
        self._until: dict[tuple[str, str], float] = {}

    async def ban(self, room: str, username: str, until: float) -> None:
        self._until[room, username] = until

    async def unban(self, room: str, username: str) -> bool:
        until = self._until.pop((room, username), None)
        return until is not None and until > time.time()

    async def banned_until(self, room: str, username: str) -> float | None:
        until = self._until.get((room, username))
        if until is not None and until <= time.time():
            del self._until[room, username]  # over: forgotten on the next look
            return None
        return until


class SQLiteBans(Bans):
    """In the history's database, on its connection (the event loop's): a ban written while the
    turn's messages are being stored is committed with them; otherwise at once."""

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection

    def create(self) -> None:
        self._connection().executescript(SCHEMA)

    async def ban(self, room: str, username: str, until: float) -> None:
        self._connection().execute(
            "INSERT INTO bans VALUES (?, ?, ?) "
            "ON CONFLICT (room, username) DO UPDATE SET until = excluded.until",
            (room, username, until),
        )

    async def unban(self, room: str, username: str) -> bool:
        deleted = self._connection().execute(
            "DELETE FROM bans WHERE room = ? AND username = ? AND until > ?", (room, username, time.time())
        )
        return deleted.rowcount > 0

    async def banned_until(self, room: str, username: str) -> float | None:
        row = (
            self._connection()
            .execute(
                "SELECT until FROM bans WHERE room = ? AND username = ? AND until > ?",
                (room, username, time.time()),
            )
            .fetchone()
        )
        return None if row is None else row[0]


class RedisBans(Bans):
    """One key per ban, which expires when the ban ends: nothing to sweep."""

    def __init__(self, key: Callable[[str, str], str], redis: Callable[[], Any]) -> None:
        self._key = key  # (room, username) → the ban's key
        self._redis = redis

    async def ban(self, room: str, username: str, until: float) -> None:
        milliseconds = max(1, int((until - time.time()) * 1000))
        await self._redis().set(self._key(room, username), repr(until), px=milliseconds)

    async def unban(self, room: str, username: str) -> bool:
        return bool(await self._redis().delete(self._key(room, username)))

    async def banned_until(self, room: str, username: str) -> float | None:
        until = await self._redis().get(self._key(room, username))
        return None if until is None else float(until)
