"""uvicorn's WebSocket protocol, lighter for the many idle connections a chat server holds."""

from __future__ import annotations

import asyncio
from asyncio import BaseTransport
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from websockets.http11 import Request
from websockets.protocol import State

from .frames import DeflatedOnce
from .leave_grace import NO_CLOSE_FRAME
from .lighter_parts import NO_HEADERS, Inbox, Writable
from .limits import TokenBucket
from .outbox import WRITE_NOW
from .protocol import CloseCode

PONG_BACKLOG = 64 * 1024  # bytes of pongs waiting for a peer that does not read, before we give up
PINGS_PER_SECOND, PING_BURST = 2.0, 20  # a browser sends none; a library one every few seconds
ABORT_AFTER = 10.0  # seconds a closing socket may take to flush before it is dropped
CORK_BYTES = 64 * 1024  # frames held for one socket within a loop turn, before they go at once


class WriteNowWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a synchronous write (`write_now`), less memory
    per idle connection, bounded pongs and a keepalive timeout that says what happened.

    An ASGI `send` is a coroutine, so an app that fans one event out to a room needs a task
    per recipient to await it. This protocol also offers `write_now` through the scope's
    extensions: the manager writes to every socket that can take the frame at once in one
    loop, like `websockets.broadcast`, and only queues for the others.

    Measured with tracemalloc on 2,000 idle connections: uvicorn keeps each connection's
    parsed upgrade request and response for as long as the socket is open (about 2 KiB, and
    websockets' parser keeps the request's headers another 2.5 KiB), its inbox is an
    `asyncio.Queue` (three deques, about 2 KiB, for one reader and no bound) and `writable` an
    `asyncio.Event` (a deque, 0.7 KiB). lighter_parts.py has what replaces them. gc showed the
    rest of a closed connection waiting for the garbage collector in reference cycles; those
    are parted on the way, so a closed connection's memory is free at once.
    """

    # Defaults on the class, set on an instance only when they change: one more attribute on
    # each of thousands of idle connections would grow every instance's dict past a size step.
    pings: TokenBucket | None = None  # made on the first ping: most peers send none
    deaf = False  # True once we stopped listening to this peer (see give_up)
    pong_backlog = 0  # bytes of pongs written while the peer was not reading
    abort_timer: asyncio.TimerHandle | None = None
    corked: list[bytes] | None = None  # frames written by write_now in this loop turn, not yet sent
    corked_bytes = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Writable()  # type: ignore[assignment]
        if self.config.ws_per_message_deflate:  # --ws-compression
            self.conn.available_extensions = [DEFLATE_WITHOUT_CONTEXT]

    def data_received(self, data: bytes) -> None:
        if self.corked is not None:  # what we wrote goes before any answer (a close) to this
            self.send_corked()
        if self.deaf:  # uvicorn resumes reading whenever the app reads: pause it again
            self.transport.pause_reading()
            return
        super().data_received(data)

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        # The HTTP protocol that read the upgrade request and its parser refer to each other:
        # once it has handed the socket over (right after this call), part them too.
        upgraded_from = transport.get_protocol()
        if upgraded_from is not self and hasattr(upgraded_from, "parser"):
            self.loop.call_soon(setattr, upgraded_from, "parser", None)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if hasattr(self, "scope"):  # a refused handshake has none
            self.scope["extensions"][WRITE_NOW] = self.write_now

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake_complete and self.conn.close_rcvd is None and not self.close_sent:
            # uvicorn reports a connection that ended without a close frame as 1005 ("no status"),
            # as if the peer had closed without a code; it is 1006, and its tab may be back
            # (leave_grace.py). The app reads this first; uvicorn's 1005 after it goes unread.
            self.queue.put_nowait({"type": "websocket.disconnect", "code": NO_CLOSE_FRAME})
        super().connection_lost(exc)
        if self.abort_timer is not None:  # it would keep this protocol alive for nothing
            self.abort_timer.cancel()
            self.abort_timer = None
        # This protocol and the scope refer to each other through write_now: part them, so
        # that a closed connection is freed at once rather than by the garbage collector.
        if hasattr(self, "scope"):
            self.scope["extensions"].pop(WRITE_NOW, None)

    def write_now(self, frame: bytes) -> bool:
        """Write one whole text frame (outbox.text_frame, built once for a whole broadcast)
        unless that would mean waiting: False if the socket is not open or its buffer is full.
        The caller then queues the event for `send`, which websockets frames per socket. A socket
        that compresses gets the frame compressed, once per broadcast (DEFLATED).

        The frame is sent at the end of this loop turn, with every other frame written to this
        socket in the turn: a busy room's socket gets one system call per turn, not one per
        event (`send_corked`). Anything else this protocol writes sends them first."""
        if self.close_sent or self.disconnected or not self.writable.is_set():
            return False
        if not self.handshake_complete or self.initial_response is not None or self.transport.is_closing():
            return False
        conn = self.conn
        if conn.state is not State.OPEN:
            return False
        if conn.extensions:  # compression: one compressed frame per broadcast, if it can be shared
            [deflate] = conn.extensions
            if not isinstance(deflate, PerMessageDeflate) or not deflate.local_no_context_takeover:
                return False
            frame = DEFLATED.get(frame, deflate.local_max_window_bits, deflate.compress_settings)
        # Past websockets' ServerProtocol, which would build the same frame again for every
        # socket: a whole frame between two others never confuses the peer, and websockets keeps
        # no count of what was sent.
        corked = self.corked
        if corked is None:
            self.corked = [frame]
            self.corked_bytes = len(frame)
            if not CORKED:
                self.loop.call_soon(send_all_corked)
            CORKED.append(self)
        elif self.corked_bytes + len(frame) > CORK_BYTES:  # enough for one write: no bigger
            self.send_corked()
            self.transport.write(frame)
        else:
            corked.append(frame)
            self.corked_bytes += len(frame)
        return True

    def send_corked(self) -> None:
        """Write the frames `write_now` held in this turn, in one system call."""
        corked = self.corked
        if corked is None:
            return
        del self.corked, self.corked_bytes  # back to the class's defaults: no memory kept
        if not self.transport.is_closing():
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    async def send(self, message: Any) -> None:
        if self.corked is not None:  # the app's own sends (and its close) come after
            self.send_corked()
        await super().send(message)

    def shutdown(self) -> None:
        self.send_corked()  # before the server's 1012
        super().shutdown()

    def handle_ping(self) -> None:
        pong = b"".join(self.conn.data_to_send())  # websockets queued the pong on receipt
        if self.close_sent:
            return  # we are closing: no more pongs
        if self.pings is None:
            self.pings = TokenBucket(PINGS_PER_SECOND, PING_BURST)
        if self.pings.take() > 0:
            self.give_up(CloseCode.POLICY_VIOLATION, "flooding: too many pings", reading=False)
            return
        if not self.writable.is_set():
            # uvicorn writes pongs whether or not the peer reads: the pings of a peer that
            # never reads would grow our write buffer without end. (A big event waiting for a
            # peer that is reading it is fine: only pongs count here.)
            self.pong_backlog += len(pong)
            if self.pong_backlog > PONG_BACKLOG:
                reason = "too slow: you are not reading what is sent"
                self.give_up(CloseCode.TRY_AGAIN_LATER, reason, reading=False)
                return
        self.transport.write(pong)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.pong_backlog:
            self.pong_backlog = 0

    def keepalive_timeout(self) -> None:
        # uvicorn closes with 1011 ("unexpected server error") here, and then waits for the
        # buffer to flush to a peer that is probably gone.
        self.pong_timer = None
        self.pending_ping_payload = None
        if not (self.close_sent or self.transport.is_closing()):
            reason = f"keepalive timeout: no answer to a ping in {self.ping_timeout:g} s"
            self.give_up(CloseCode.KEEPALIVE_TIMEOUT, reason)

    def give_up(self, code: int, reason: str, reading: bool = True) -> None:
        """End a connection whose peer is not keeping up: the app hears of it at once, the peer
        gets a close frame, and the socket is dropped after a while unless the peer answers
        it. Closing at once would reset the connection (it has unread data) before the close
        frame got there. A peer that floods us or does not read (`reading=False`) is not read
        any more: it has a second to take the close frame, then the socket is dropped."""
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.send_corked()
        if self.conn.state is State.OPEN:  # not if the peer's own close frame came first
            self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if not reading:
            self.deaf = True
            self.transport.pause_reading()
            self.close_timer = self.loop.call_later(1.0, self.transport.abort)
            return
        if self.read_paused:  # the peer's answer must get through
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(ABORT_AFTER, self.transport.abort)

    def on_task_complete(self, task: asyncio.Task[None]) -> None:
        super().on_task_complete(task)
        # The app is done with the socket. uvicorn's transport.close() waits for the write
        # buffer to drain, forever if the peer stopped reading: drop it after a while.
        if not self.disconnected:
            self.abort_timer = self.loop.call_later(ABORT_AFTER, self.transport.abort)

    def start_keepalive(self) -> None:
        # uvicorn calls this once, right after sending the 101 response: nothing reads the
        # handshake after that. websockets' parser keeps the request in a local variable of its
        # generator for as long as the connection lasts: empty its headers (about 2.5 KiB, which
        # the scope has copied). tests/test_memory_per_connection.py shows both.
        if self.request is not None:
            self.request.headers = NO_HEADERS
        self.request = self.response = None
        super().start_keepalive()


# --ws-compression: permessage-deflate as uvicorn offers it (a 4 KiB window, memLevel 5), but
# without context takeover either way. Each message is then compressed on its own, so a
# broadcast compresses an event once for every socket with the same window, not once per
# recipient, and an idle socket keeps no compressor or decompressor (about 40 KiB) between
# messages. Messages compress a little less (no dictionary from earlier ones), which for chat
# events of a few hundred bytes costs a few bytes each.
DEFLATE_WITHOUT_CONTEXT = ServerPerMessageDeflateFactory(
    server_no_context_takeover=True,
    client_no_context_takeover=True,
    server_max_window_bits=12,
    client_max_window_bits=12,
    compress_settings={"memLevel": 5},
)
DEFLATED = DeflatedOnce()  # the frame being broadcast, compressed for each window size asked for

# The sockets with frames held in this loop turn, sent by one callback at its end.
CORKED: list[WriteNowWebSocketProtocol] = []


def send_all_corked() -> None:
    sockets = CORKED[:]
    CORKED.clear()
    for protocol in sockets:
        protocol.send_corked()
