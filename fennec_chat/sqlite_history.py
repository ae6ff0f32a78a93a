"""The embedded history: SQLite, written by the event loop itself, one commit per loop turn."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import secrets
import sqlite3
import threading
import time
from typing import Any

from . import metrics
from .fennec_fixes import StartupError
from .history import History, RoomState, Stored
from .protocol import encode

# --- SQLite ------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    room    TEXT PRIMARY KEY,
    epoch   TEXT NOT NULL,
    last_id INTEGER NOT NULL,
    updated REAL NOT NULL DEFAULT 0     -- unix time of the last message
);
CREATE TABLE IF NOT EXISTS messages (
    room          TEXT NOT NULL,
    id            INTEGER NOT NULL,
    client_msg_id TEXT,
    event         TEXT NOT NULL,
    sender        TEXT,                 -- sender_digest(): client_msg_ids are per sender
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
"""
# Databases made before: add what they lack. A room's age starts now for them.
MIGRATIONS = {
    ("rooms", "updated"): "ALTER TABLE rooms ADD COLUMN updated REAL NOT NULL DEFAULT 0",
    ("messages", "sender"): "ALTER TABLE messages ADD COLUMN sender TEXT",
}
INDEXES = """
DROP INDEX IF EXISTS messages_by_client_msg_id;
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_sender_msg_id
    ON messages (room, sender, client_msg_id) WHERE client_msg_id IS NOT NULL;
"""


class SQLiteHistory(History):
    """History in one SQLite file (or in memory), written by the event loop, group-committed.

    A message is inserted the moment it is published, inside a transaction that stays open
    until the end of the current turn of the event loop: every message published meanwhile
    joins it, and one COMMIT (scheduled with `call_soon`) makes them all durable before any of
    them is delivered. In WAL mode with synchronous=NORMAL a commit is a write into the WAL
    file, with no disk sync: it survives the process being killed (only a power cut or an OS
    crash may lose the last transactions), and it takes microseconds, so no message waits for
    another thread. The WAL is copied into the database, with the disk syncs that takes, by a
    thread of its own every second; the loop only starts the WAL over, rarely, between commits.
    """

    CHECKPOINT_EVERY = 1.0  # seconds
    LEFT_FOR_THE_WRITER = 256  # WAL frames (pages): what the writer copies itself, at most about
    WAL_SOFT_LIMIT = 16 * 1024 * 1024  # bytes in the WAL: start it over when writing pauses...
    WAL_HARD_LIMIT = 64 * 1024 * 1024  # ...or at once, under a flood that never pauses
    EXPIRE_EVERY = 3600.0  # seconds between two looks for rooms idle past --history-days
    EXPIRED_PER_TURN = 20  # rooms forgotten per loop turn: a big expiry never stalls the chat

    def __init__(self, path: str, retention: int, days: float = 0) -> None:
        self.path = path
        self.retention = retention
        self.max_age = days * 86400  # seconds; 0 keeps every room
        # Often enough that a room is gone within a tenth of its lifetime past its last message.
        self.expire_every = min(self.EXPIRE_EVERY, max(self.max_age / 10, 0.05)) if days else None
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The rooms in use. A room gets its row with its first message, so that merely visiting
        # a room stores nothing.
        self._rooms: dict[str, RoomState] = {}
        # The transaction of this loop turn: what it holds, and what waits for its commit.
        self._uncommitted: list[tuple[asyncio.Future[Stored], Stored]] = []
        self._touched: set[str] = set()  # rooms whose last id and pruning the commit saves
        self._commit_scheduled = False
        self._begun = 0.0  # time.perf_counter() when the turn's transaction began
        self._last_write = 0.0  # time.monotonic() of the last commit
        self._lock_file: Any = None
        self._stopping = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def on_disk(self) -> bool:
        return self.path != ":memory:" and not self.path.startswith("file::memory:")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._lock()
        except BlockingIOError as error:
            raise StartupError(
                f"cannot open the history database {self.path}: it is in use by another chat server "
                "(--db picks another file, --db :memory: keeps the history in memory, --no-history none)"
            ) from error
        except OSError as error:
            raise StartupError(
                f"cannot open the history database {self.path} (--db): {error.strerror or error}"
            ) from error
        try:
            self._db = self._open()
        except Exception as error:
            self._unlock()
            raise StartupError(f"cannot open the history database {self.path} (--db): {error}") from error
        if self.on_disk:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_forever, name="chat-checkpoints", daemon=True
            )
            self._checkpointer.start()
        if self.expire_every is not None:
            self._expiry = self._loop.call_soon(self._expire)

    async def close(self) -> None:
        self._stopping.set()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._db is not None:
            self._commit()
            if self.on_disk:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a tidy file behind
            self._db.close()
            self._db = None
        self._unlock()

    def _lock(self) -> None:
        """One server per database file: a second one is refused at start, not corrupted later."""
        if self.on_disk:
            self._lock_file = open(self.path + ".lock", "a")  # noqa: SIM115 - held until close()
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._unlock()
                raise

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the lock
            self._lock_file = None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit is in the WAL file before we broadcast; it survives the process being
        # killed (only a power cut may lose the last transactions).
        db.execute("PRAGMA synchronous = NORMAL")
        # The checkpoint thread never takes the write lock, so the loop waits for nobody; should
        # it ever have to, it waits a moment, not seconds.
        db.execute("PRAGMA busy_timeout = 100")
        # Never checkpoint on commit: that would make one message wait for the disk.
        if self.on_disk:
            db.execute("PRAGMA wal_autocheckpoint = 0")
        # When the WAL starts over, a file grown past this is cut back to it (rarely: cutting
        # a file takes the disk long enough to make messages wait).
        db.execute(f"PRAGMA journal_size_limit = {2 * self.WAL_HARD_LIMIT}")
        db.executescript(SCHEMA)
        for (table, column), statement in MIGRATIONS.items():
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(statement)
        db.execute("UPDATE rooms SET updated = ? WHERE updated = 0", (time.time(),))
        db.executescript(INDEXES)
        return db

    # --- The checkpoint thread: the disk syncs, away from the loop -----------------------------

    def _checkpoint_forever(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 2000")
        self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        try:
            while not self._stopping.wait(self.CHECKPOINT_EVERY):
                frames, left = self._checkpoint(db)
                # While messages keep coming, a checkpoint from here never catches up with the
                # frames written meanwhile, so the WAL never starts over and grows without end.
                # Only the writer can finish the job (between two commits, a few ms: the file
                # is reused, not cut), once a few more passes from here have left it little:
                # when writing pauses, or past a limit under a flood that never pauses.
                wal_bytes = frames * self.page_size
                idle = time.monotonic() - self._last_write > self.CHECKPOINT_EVERY / 2
                if wal_bytes > self.WAL_HARD_LIMIT or (idle and wal_bytes > self.WAL_SOFT_LIMIT):
                    for _ in range(5):
                        if left <= self.LEFT_FOR_THE_WRITER:
                            break
                        _, left = self._checkpoint(db)
                    assert self._loop is not None
                    with contextlib.suppress(RuntimeError):  # the loop has closed
                        self._loop.call_soon_threadsafe(self._restart_wal)
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> tuple[int, int]:
        """Copy what the WAL holds into the database: (frames in the WAL, frames left to copy)."""
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return 0, 0
        return frames, max(0, frames - copied)

    def _restart_wal(self) -> None:
        """Copy the little that is left and start the WAL file over (the loop is the writer)."""
        if self._db is not None and not self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(RESTART)")

    # --- The History interface, in the loop ----------------------------------------------------

    def append(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        db = self._opened()
        assert self._loop is not None
        stored = self._loop.create_future()
        try:
            if not db.in_transaction:
                db.execute("BEGIN IMMEDIATE")
                self._begun = time.perf_counter()
            result = self._append(db, room, event, sender)
        except Exception as error:
            self._fail_turn(error)
            stored.set_exception(error)
            return stored
        self._uncommitted.append((stored, result))
        if not result.duplicate:
            self._touched.add(room)
        if not self._commit_scheduled:
            # After every message published in this turn: they share the commit.
            self._commit_scheduled = True
            self._loop.call_soon(self._commit)
        return stored

    def forget(self, room: str) -> None:
        if room not in self._touched:
            self._rooms.pop(room, None)

    async def room_state(self, room: str) -> RoomState:
        return self._state(self._committed(), room)

    async def messages(self, room: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        rows = self._committed().execute(
            "SELECT event FROM messages WHERE room = ? AND id > ? ORDER BY id DESC LIMIT ?",
            (room, after_id, limit),
        )
        return [json.loads(text) for (text,) in reversed(rows.fetchall())]

    async def before(self, room: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        rows = self._committed().execute(
            "SELECT event FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (room, before_id, limit),
        )
        return [json.loads(text) for (text,) in reversed(rows.fetchall())]

    def opened(self) -> sqlite3.Connection:
        """The connection, for what else keeps its state in this file (bans.py)."""
        return self._opened()

    async def delete(self, room: str, message_id: int) -> bool:
        # In the turn's transaction if one is open (committed with it), else at once.
        deleted = self._opened().execute("DELETE FROM messages WHERE room = ? AND id = ?", (room, message_id))
        return deleted.rowcount > 0

    def _opened(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("history is not open")
        return self._db

    def _committed(self) -> sqlite3.Connection:
        """The connection, with this turn's messages committed first: a reader sees only what
        is durable (the writer's own connection would also see what is not, yet)."""
        db = self._opened()
        if db.in_transaction:
            self._commit()
        return db

    # --- One transaction per loop turn ---------------------------------------------------------

    def _commit(self) -> None:
        """Commit this turn's messages, then hand them over, in the order they were published."""
        self._commit_scheduled = False
        waiting, self._uncommitted = self._uncommitted, []
        db = self._db
        if db is None or not db.in_transaction:
            return
        try:
            for room in self._touched:
                self._save_last_id_and_prune(db, room)
            db.execute("COMMIT")
        except Exception as error:
            self._uncommitted = waiting
            self._fail_turn(error)
            return
        finally:
            self._touched.clear()
        self._last_write = time.monotonic()
        # The wait of the turn's first message: from its arrival to its commit.
        metrics.history_commit_seconds.observe(time.perf_counter() - self._begun)
        for future, result in waiting:
            if not future.done():
                future.set_result(result)

    def _fail_turn(self, error: Exception) -> None:
        """The transaction failed (a full disk...): nobody got its messages; their ids are free."""
        db = self._db
        if db is not None and db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        self._rooms.clear()
        self._touched.clear()
        waiting, self._uncommitted = self._uncommitted, []
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    def _expire(self) -> None:
        """Forget the rooms nobody has written in for --history-days (messages, ids and epoch),
        a few rooms per turn of the loop, between two commits."""
        assert self._loop is not None
        assert self.expire_every is not None
        db, again = self._db, self.expire_every
        if db is None:
            return
        if db.in_transaction:
            again = 0  # this turn's messages are not committed yet: right after them
        else:
            try:
                db.execute("BEGIN IMMEDIATE")
                cutoff = time.time() - self.max_age
                rows = db.execute(
                    "SELECT room FROM rooms WHERE updated < ? LIMIT ?", (cutoff, self.EXPIRED_PER_TURN)
                ).fetchall()
                for (room,) in rows:
                    db.execute("DELETE FROM messages WHERE room = ?", (room,))
                    db.execute("DELETE FROM rooms WHERE room = ?", (room,))
                db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            else:
                for (room,) in rows:
                    self._rooms.pop(room, None)  # a member still there gets a new epoch next time
                if len(rows) == self.EXPIRED_PER_TURN:
                    again = 0  # more to forget, after whatever else waits
        self._expiry = self._loop.call_later(again, self._expire)

    def _state(self, db: sqlite3.Connection, room: str) -> RoomState:
        state = self._rooms.get(room)
        if state is None:
            row = db.execute("SELECT epoch, last_id FROM rooms WHERE room = ?", (room,)).fetchone()
            # A room without a row starts its history now: a new epoch tells clients so.
            state = RoomState(secrets.token_hex(8), 0) if row is None else RoomState(*row)
            self._rooms[room] = state
        return state

    def _append(self, db: sqlite3.Connection, room: str, event: dict[str, Any], sender: str) -> Stored:
        state = self._state(db, room)
        message_id = state.last_id + 1
        stored_event = {**event, "id": message_id}
        text = encode(stored_event)
        client_msg_id = event.get("client_msg_id")
        try:
            db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?)", (room, message_id, client_msg_id, text, sender)
            )
        except sqlite3.IntegrityError:
            # The unique index says this sender's client_msg_id was accepted before: a resend.
            (original,) = db.execute(
                "SELECT event FROM messages WHERE room = ? AND sender = ? AND client_msg_id = ?",
                (room, sender, client_msg_id),
            ).fetchone()
            return Stored(json.loads(original), original, duplicate=True)
        self._rooms[room] = RoomState(state.epoch, message_id)
        return Stored(stored_event, text)

    def _save_last_id_and_prune(self, db: sqlite3.Connection, room: str) -> None:
        state = self._rooms[room]
        db.execute(
            "INSERT INTO rooms VALUES (?, ?, ?, ?) "
            "ON CONFLICT (room) DO UPDATE SET last_id = excluded.last_id, updated = excluded.updated",
            (room, state.epoch, state.last_id, time.time()),
        )
        db.execute("DELETE FROM messages WHERE room = ? AND id <= ?", (room, state.last_id - self.retention))
