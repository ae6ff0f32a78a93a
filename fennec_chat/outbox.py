"""One client's outgoing events: written at once when the socket takes them, else queued
(bounded) for the client's own writer task."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable

from fennec import WebSocket

from .frames import HEADER_BYTES

# The ASGI scope extension through which a server may offer a synchronous write: a callable
# that writes one whole WebSocket frame made by `frames.text_frame` (compressed on the way if the
# connection compresses without context takeover), unless that would mean waiting or the frame
# cannot be shared: then it returns False and the event takes the ordinary ASGI `send`.
# fennec_chat/uvicorn_websocket.py offers it; under any other server the outbox does without.
WRITE_NOW = "fennec_chat.write_now"


class OutboxState(enum.Enum):
    OPEN = "open"  # events are written or queued
    CLOSING = "closing"  # a close frame goes out (after what is queued, unless discarded); no new events
    STOPPED = "stopped"  # the connection has ended or failed: nothing more is written


# The states as module constants for the per-event paths: reading `OutboxState.OPEN` through
# the enum class costs ~50 ns on Python 3.11, a global ~10 (put() runs once per recipient).
OPEN, CLOSING, STOPPED = OutboxState.OPEN, OutboxState.CLOSING, OutboxState.STOPPED


class Outbox:
    """Events waiting to be written to one socket.

    A broadcast never waits for anyone's network: an event goes straight into a socket's
    buffer when the server offers `write_now` (server.py's protocol does) and the socket has
    room and nothing queued before it; otherwise it waits here. A client that stops reading
    fills its own outbox and nobody else's.

    A writer task runs only while something waits here (or a close frame must go out), and
    returns once all of it is sent: an idle connection, nearly all of them, keeps no task, no
    coroutine and no future (about 1 KiB each on 10,000 idle connections).
    """

    __slots__ = (
        "_byte_limit",
        "_close_frame",
        "_limit",
        "_pending",
        "_pending_bytes",
        "_websocket",
        "_write_now",
        "_writer",
        "state",
    )

    def __init__(self, websocket: WebSocket, limit: int, byte_limit: int) -> None:
        self._websocket = websocket
        self._limit = limit  # events...
        self._byte_limit = byte_limit  # ...and their bytes: a few big room lists count as much
        self.state = OutboxState.OPEN
        # A list, not a deque: an empty deque costs 600 bytes per connection, and an outbox is
        # nearly always empty or a few events long, where popping from the front is as cheap.
        self._pending: list[tuple[str, int]] = []  # (event, its size in bytes)
        self._pending_bytes = 0
        self._close_frame: tuple[int, str] | None = None  # (code, reason) once CLOSING
        self._write_now: Callable[[bytes], bool] | None = websocket.scope.get("extensions", {}).get(WRITE_NOW)
        self._writer: asyncio.Task[None] | None = None  # while events (or a close frame) wait

    def put(self, text: str, frame: bytes) -> bool:
        """Send or queue one encoded event (`frame` is `text_frame` of it, shared by every
        recipient of a broadcast). False means the client is too far behind to keep."""
        if self.state is not OPEN:
            return True  # the socket is closing or gone: late events have nobody to reach
        # Straight to the socket only when no writer runs: it keeps the order otherwise.
        if self._writer is None and self._write_now is not None and self._write_now(frame):
            return True
        # Bytes count once something waits: one event bigger than the limit (a long history
        # page) still gets through to a client that reads.
        size = len(frame) - HEADER_BYTES[frame[1]]  # the event's own bytes, as --outbox-bytes says
        if len(self._pending) >= self._limit or (
            self._pending and self._pending_bytes + size > self._byte_limit
        ):
            return False
        self._pending.append((text, size))
        self._pending_bytes += size
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())
        return True

    @property
    def close_code(self) -> int | None:
        """The code of the close frame asked for, if one was."""
        return self._close_frame[0] if self._close_frame is not None else None

    def close(self, code: int, reason: str, discard: bool = True) -> None:
        """Send a close frame as soon as the socket takes it, after what is queued unless
        `discard` (a client that stopped reading will not read what is queued anyway)."""
        if self.state is not OutboxState.OPEN:
            return
        self.state = OutboxState.CLOSING
        if discard:
            self._discard()
        self._close_frame = (code, reason)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())

    def stop(self) -> None:
        """The connection has ended: stop writing (a close frame asked for may still go out).

        A running writer returns after the send in flight, and is not cancelled: a cancelled
        task keeps its exception, whose traceback keeps the task's frame and this outbox, a
        cycle that only the garbage collector frees, and meanwhile every closed connection's
        memory stays in use.
        """
        if self.state is OutboxState.OPEN:
            self.state = OutboxState.STOPPED
            self._discard()

    async def wait_closed(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until a close frame asked for by `close` is sent."""
        if self._writer is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def _discard(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0

    async def _write_queued(self) -> None:
        # One turn per queued event: it calls the ASGI `send` that Fennec's WebSocket wraps
        # (`send_text()` would only add a state check and a coroutine per event).
        send = self._websocket.send
        pending = self._pending
        try:
            # Events put while a send is in flight join the queue behind it.
            while pending:
                # No local names for the event: the frame would keep it alive while suspended.
                self._pending_bytes -= pending[0][1]
                await send({"type": "websocket.send", "text": pending.pop(0)[0]})
            if self.state is CLOSING:
                assert self._close_frame is not None
                await self._websocket.close(*self._close_frame)
        except Exception:
            # The peer vanished mid-send; its receive loop sees the disconnect and cleans up.
            self.state = OutboxState.STOPPED
            self._discard()
        finally:
            self._writer = None  # nothing waits: the next event may go straight to the socket
