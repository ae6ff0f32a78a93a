"""The embedded history: SQLite, written by one thread of its own, never by the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import queue
import secrets
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(slots=True)
class _Job:
    kind: str  # "append", "state", "messages", "before", "forget", "restart_wal" or "stop"
    args: tuple
    future: asyncio.Future | None = field(default=None)


class SQLiteHistory(History):
    """History in one SQLite file (or in memory), written by one thread of its own.

    The event loop never touches the database: it queues jobs and awaits their futures. The
    writer thread takes every job waiting in the queue at once and commits all the appends
    among them in one transaction, so under load many messages share one commit. Commits do
    not wait for the disk (WAL, synchronous=NORMAL); the WAL is copied into the database, with
    the disk syncs that takes, by a second thread every second, so that no message waits for it.
    """

    CHECKPOINT_EVERY = 1.0  # seconds
    LEFT_FOR_THE_WRITER = 256  # WAL frames (pages): what the writer copies itself, at most about
    WAL_SOFT_LIMIT = 16 * 1024 * 1024  # bytes in the WAL: start it over when writing pauses...
    WAL_HARD_LIMIT = 64 * 1024 * 1024  # ...or at once, under a flood that never pauses
    EXPIRE_EVERY = 3600.0  # seconds between two looks for rooms idle past --history-days

    def __init__(self, path: str, retention: int, days: float = 0) -> None:
        self.path = path
        self.retention = retention
        self.max_age = days * 86400  # seconds; 0 keeps every room
        # Often enough that a room is gone within a tenth of its lifetime past its last message.
        self.expire_every = min(self.EXPIRE_EVERY, max(self.max_age / 10, 0.05)) if days else None
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the writer thread: the rooms in use. A room gets its row with its first
        # message, so that merely visiting a room stores nothing.
        self._rooms: dict[str, RoomState] = {}
        self._last_write = 0.0  # time.monotonic() of the writer's last batch
        self._lock_file: Any = None
        self._stopping = threading.Event()
        self._checkpointer: threading.Thread | None = None

    @property
    def on_disk(self) -> bool:
        return self.path != ":memory:" and not self.path.startswith("file::memory:")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        # A busy event loop holds the GIL for up to the switch interval (5 ms) before the writer
        # thread gets a turn, and every message waits for the writer: ask for shorter turns.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
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
        self._thread = threading.Thread(target=self._run, args=(ready,), name="chat-history", daemon=True)
        self._thread.start()
        try:
            await ready
        except Exception as error:
            self._thread = None
            self._unlock()
            raise StartupError(f"cannot open the history database {self.path} (--db): {error}") from error
        if self.on_disk:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_forever, name="chat-checkpoints", daemon=True
            )
            self._checkpointer.start()

    async def close(self) -> None:
        self._stopping.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._thread is not None:
            self._jobs.put(_Job("stop", ()))
            await asyncio.to_thread(self._thread.join)
            self._thread = None
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

    def _checkpoint_forever(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 2000")
        self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        try:
            while not self._stopping.wait(self.CHECKPOINT_EVERY):
                frames, left = self._checkpoint(db)
                # While messages keep coming, a checkpoint from here never catches up with the
                # frames written meanwhile, so the WAL never starts over and grows without end.
                # Only the writer can finish the job (between two batches, a few ms: the file
                # is reused, not cut), once a few more passes from here have left it little:
                # when writing pauses, or past a limit under a flood that never pauses.
                wal_bytes = frames * self.page_size
                idle = time.monotonic() - self._last_write > self.CHECKPOINT_EVERY / 2
                if wal_bytes > self.WAL_HARD_LIMIT or (idle and wal_bytes > self.WAL_SOFT_LIMIT):
                    for _ in range(5):
                        if left <= self.LEFT_FOR_THE_WRITER:
                            break
                        _, left = self._checkpoint(db)
                    self._jobs.put(_Job("restart_wal", ()))
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> tuple[int, int]:
        """Copy what the WAL holds into the database: (frames in the WAL, frames left to copy)."""
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return 0, 0
        return frames, max(0, frames - copied)

    def append(self, room: str, event: dict[str, Any], sender: str) -> asyncio.Future[Stored]:
        return self._submit("append", room, event, sender)

    def forget(self, room: str) -> None:
        if self._thread is not None:
            self._jobs.put(_Job("forget", (room,)))

    async def room_state(self, room: str) -> RoomState:
        return await self._submit("state", room)

    async def messages(self, room: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        return await self._submit("messages", room, after_id, limit)

    async def before(self, room: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        return await self._submit("before", room, before_id, limit)

    def _submit(self, kind: str, *args: Any) -> asyncio.Future:
        if self._thread is None:
            raise RuntimeError("history is not open")
        future = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(kind, args, future))
        return future

    # --- The writer thread ----------------------------------------------------------------

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            db = self._open()
        except Exception as error:
            self._resolve([(ready, None, error)])
            return
        self._resolve([(ready, None, None)])
        next_expiry = time.monotonic()
        try:
            while True:
                if self.expire_every is not None and time.monotonic() >= next_expiry:
                    self._expire(db)
                    next_expiry = time.monotonic() + self.expire_every
                try:
                    jobs = [self._jobs.get(timeout=self.expire_every)]
                except queue.Empty:
                    continue
                while not self._jobs.empty():
                    jobs.append(self._jobs.get_nowait())
                stopping = any(job.kind == "stop" for job in jobs)
                for job in jobs:
                    if job.kind == "forget":
                        self._rooms.pop(job.args[0], None)
                work = [job for job in jobs if job.kind not in ("stop", "forget", "restart_wal")]
                if work:
                    self._resolve(self._work(db, work))
                    self._last_write = time.monotonic()
                if any(job.kind == "restart_wal" for job in jobs):
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("PRAGMA wal_checkpoint(RESTART)")
                if stopping:
                    if self.on_disk:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a tidy file behind
                    return
        finally:
            db.close()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit is in the WAL file before we broadcast; it survives the process being
        # killed (only a power cut may lose the last transactions).
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA busy_timeout = 2000")
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

    def _expire(self, db: sqlite3.Connection) -> None:
        """Forget the rooms nobody has written in for --history-days: messages, ids and epoch."""
        cutoff = time.time() - self.max_age
        with contextlib.suppress(sqlite3.Error):
            db.execute("BEGIN IMMEDIATE")
            expired = [room for (room,) in db.execute("SELECT room FROM rooms WHERE updated < ?", (cutoff,))]
            db.execute(
                "DELETE FROM messages WHERE room IN (SELECT room FROM rooms WHERE updated < ?)", (cutoff,)
            )
            db.execute("DELETE FROM rooms WHERE updated < ?", (cutoff,))
            db.execute("COMMIT")
            for room in expired:  # a member still there gets a new epoch with the next message
                self._rooms.pop(room, None)

    def _work(self, db: sqlite3.Connection, jobs: list[_Job]) -> list[tuple]:
        results: list[tuple] = []
        appends = [job for job in jobs if job.kind == "append"]
        if appends:
            try:
                db.execute("BEGIN IMMEDIATE")
                stored = [self._append(db, *job.args) for job in appends]
                for room in {job.args[0] for job in appends}:
                    self._save_last_id_and_prune(db, room)
                db.execute("COMMIT")
                results += [(job.future, result, None) for job, result in zip(appends, stored, strict=True)]
            except Exception as error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._rooms.clear()  # ids handed out in the failed batch are free again
                results += [(job.future, None, error) for job in appends]
        for job in jobs:
            if job.kind == "append":
                continue
            try:
                if job.kind == "state":
                    result: Any = self._state(db, job.args[0])
                elif job.kind == "before":
                    result = self._before(db, *job.args)
                else:
                    result = self._messages(db, *job.args)
                results.append((job.future, result, None))
            except Exception as error:
                results.append((job.future, None, error))
        return results

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

    def _messages(self, db: sqlite3.Connection, room: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        rows = db.execute(
            "SELECT event FROM messages WHERE room = ? AND id > ? ORDER BY id DESC LIMIT ?",
            (room, after_id, limit),
        ).fetchall()
        return [json.loads(text) for (text,) in reversed(rows)]

    def _before(self, db: sqlite3.Connection, room: str, before_id: int, limit: int) -> list[dict[str, Any]]:
        rows = db.execute(
            "SELECT event FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (room, before_id, limit),
        ).fetchall()
        return [json.loads(text) for (text,) in reversed(rows)]

    def _resolve(self, results: list[tuple]) -> None:
        """Hand results to the event loop in one callback, so waiters resume in append order."""
        if results and self._loop is not None:
            self._loop.call_soon_threadsafe(_set_results, results)


def _set_results(results: list[tuple]) -> None:
    for future, result, error in results:
        if future is None or future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
