"""uvicorn's HTTP protocol with the limits it lacks: time and size for a request, and a cap on the
unfinished requests one address may hold.

uvicorn (httptools) waits for a request's head for as long as the client likes and buffers it
whatever its size: a client that sends headers slowly, or without end, holds a descriptor and
memory for good, and a thousand of them lock everyone else out. Here a connection must finish
each request (for a WebSocket, its upgrade request) within `--handshake-timeout` seconds, a
request head may be at most `MAX_HEAD_BYTES`, and one address may hold at most
`--max-connections-per-ip` connections that have not finished a request. Behind a proxy, the
proxy is the address (it sends whole requests at once, and deals with slow clients itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

logger = logging.getLogger("fennec_chat")

MAX_HEAD_BYTES = 32 * 1024  # request line and headers; nginx allows four 8 KiB buffers by default


@dataclass(frozen=True, slots=True)
class DoorLimits:
    timeout: float  # seconds to send a whole request; 0: no limit
    per_address: int  # unfinished requests one address may hold; 0: no cap
    max_head_bytes: int = MAX_HEAD_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> DoorLimits:
        return cls(settings.handshake_timeout, settings.max_connections_per_ip)


def response(status: str, reason: str) -> bytes:
    body = reason.encode() + b"\n"
    head = f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
    head += f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline and a size limit for every request."""

    # Worker processes (--workers) read their settings from the environment, where the parent
    # wrote them; a single process sets them with `configure` before it serves.
    limits: ClassVar[DoorLimits | None] = None
    unfinished: ClassVar[Counter[str]] = Counter()  # address → connections mid-request

    @classmethod
    def configure(cls, settings: Settings) -> None:
        cls.limits = DoorLimits.from_settings(settings)

    @classmethod
    def current_limits(cls) -> DoorLimits:
        if cls.limits is None:
            cls.limits = DoorLimits.from_settings(Settings.from_environ())
        return cls.limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.door = self.current_limits()
        self.address = "unknown"
        self.head_bytes: int | None = 0  # of the request head being read; None between heads
        self.head_tail = b""  # its last 3 bytes, to find a CRLFCRLF split between reads
        self.deadline: asyncio.TimerHandle | None = None
        self.counted = False
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = self.client[0] if self.client else "unknown"
        cap = self.door.per_address
        if cap and self.unfinished[self.address] >= cap:
            self.refuse(
                "429 Too Many Requests", f"too many unfinished requests from your address (at most {cap})"
            )
            return
        self._start_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_request()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:  # (over TLS, data can still arrive after close())
            return
        if self.head_bytes is not None and not self._head_fits(data):
            self.refuse(
                "431 Request Header Fields Too Large", f"request head over {self.door.max_head_bytes} bytes"
            )
            return
        super().data_received(data)

    def _head_fits(self, data: bytes) -> bool:
        assert self.head_bytes is not None
        end = (self.head_tail + data).find(b"\r\n\r\n")
        read = len(data) if end < 0 else end + 4 - len(self.head_tail)
        self.head_bytes += read
        self.head_tail = (self.head_tail + data)[-3:]
        return self.head_bytes <= self.door.max_head_bytes

    # httptools calls these as it parses.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_request()

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            self._end_request()  # a WebSocket upgrade: the app accepts (or refuses) it at once

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._end_request()
        self.head_bytes, self.head_tail = 0, b""  # what comes next is the next request's head

    # The deadline and the count of unfinished requests.

    def _start_request(self) -> None:
        if not self.counted:
            self.counted = True
            self.unfinished[self.address] += 1
        if self.door.timeout and self.deadline is None:
            self.deadline = self.loop.call_later(self.door.timeout, self._too_slow)

    def _end_request(self) -> None:
        if self.counted:
            self.counted = False
            self.unfinished[self.address] -= 1
            if self.unfinished[self.address] <= 0:
                del self.unfinished[self.address]
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        if self.head_bytes == 0:  # not a byte: a browser's spare connection, most likely
            self._end_request()
            self.refused = True
            self.transport.close()
        elif self.head_bytes is not None:  # no response has begun: say why
            self.refuse("408 Request Timeout", f"the request took longer than {self.door.timeout:g} s")
        else:  # a body that trickles in while the app may be answering: just drop the connection
            self._end_request()
            self.transport.abort()

    def refuse(self, status: str, reason: str) -> None:
        self._end_request()
        self.head_bytes = None
        self.refused = True
        if not self.transport.is_closing():
            self.transport.write(response(status, reason))
            self.transport.close()
