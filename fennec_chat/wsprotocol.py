"""uvicorn's WebSocket protocol, lighter for the many idle connections a chat server holds."""

from __future__ import annotations

import asyncio
from asyncio import BaseTransport
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request

# The ASGI scope extension through which this protocol offers `write_now` to the app.
WRITE_NOW = "fennec_chat.write_now"


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a synchronous write and less memory.

    An ASGI `send` is a coroutine, so an app that fans one event out to a room needs a task
    per recipient to await it. This protocol also offers `write_now` through the scope's
    extensions: the manager writes to every socket that can take the frame at once in one
    loop, like `websockets.broadcast`, and only queues for the others.

    Measured with tracemalloc on 2,000 idle connections: uvicorn keeps each connection's
    parsed upgrade request and response for as long as the socket is open (about 2 KiB),
    and its inbox is an `asyncio.Queue` (three deques, about 2 KiB, for one reader and no
    bound). Together they were a fifth of what an idle chat connection cost. gc showed the
    rest of a closed connection waiting for the garbage collector in reference cycles; those
    are parted on the way, so a closed connection's memory is free at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]

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
        super().connection_lost(exc)
        # This protocol and the scope refer to each other through write_now: part them, so
        # that a closed connection is freed at once rather than by the garbage collector.
        if hasattr(self, "scope"):
            self.scope["extensions"].pop(WRITE_NOW, None)

    def write_now(self, data: bytes) -> bool:
        """Write a text frame (`data`: UTF-8) unless that would mean waiting: False if the
        socket is not open or its buffer is full (the caller then queues it for `send`)."""
        if self.close_sent or self.disconnected or not self.writable.is_set():
            return False
        if not self.handshake_complete or self.initial_response is not None or self.transport.is_closing():
            return False
        try:
            self.conn.send_text(data)
        except InvalidState:  # the peer has started closing
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    def start_keepalive(self) -> None:
        # uvicorn calls this once, right after sending the 101 response: nothing reads the
        # handshake after that.
        self.request = self.response = None
        super().start_keepalive()


class Inbox:
    """The part of `asyncio.Queue` uvicorn uses, for one reader: the ASGI app's `receive`."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)
