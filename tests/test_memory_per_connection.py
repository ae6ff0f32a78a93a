"""What an idle connection keeps: our uvicorn protocol lets go of what uvicorn and websockets
would hold for the connection's whole life (make bench WORKLOADS=memory measures the bytes).

A real uvicorn server runs in the test's own event loop, so that the test can look at the
objects it holds; the clients are raw sockets, which allocate no Python objects of that kind."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from fennec_chat.uvicorn_websocket import WriteNowWebSocketProtocol

CONNECTIONS = 20


async def idle_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def serve(protocol: type) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    listening = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(idle_app, ws=protocol, ws_per_message_deflate=False, lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        yield listening.getsockname()[1], server
    finally:
        server.should_exit = True
        await serving


async def open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` raw WebSocket connections, upgraded and then left idle."""
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /idle HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"X-Padding: {'p' * 500}\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writers.append(writer)
    await asyncio.sleep(0.2)
    return writers


def requests_with_headers() -> list[Request]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, Request) and "X-Padding" in o.headers]


@pytest.mark.parametrize(
    ("protocol", "kept"),
    [(WebSocketsSansIOProtocol, CONNECTIONS), (WriteNowWebSocketProtocol, 0)],
    ids=["uvicorn's own keeps them", "ours lets go"],
)
async def test_an_idle_connection_keeps_no_upgrade_request_headers(protocol, kept):
    """websockets' parser keeps the upgrade request in its generator's local variable for as
    long as the connection lasts. When uvicorn's own protocol stops keeping it (the first
    case fails), the workaround in start_keepalive can go."""
    async for port, _ in serve(protocol):
        writers = await open_idle(port, CONNECTIONS)
        assert len(requests_with_headers()) == kept
        for writer in writers:
            writer.close()


async def test_an_idle_connection_keeps_no_asyncio_event_or_deque():
    """uvicorn's `writable` is an asyncio.Event, whose deque of waiters costs ~700 bytes per
    connection; ours is a small object that still lets a send wait for a peer to read."""
    async for port, server in serve(WriteNowWebSocketProtocol):
        writers = await open_idle(port, CONNECTIONS)
        protocols = [c for c in server.server_state.connections if isinstance(c, WriteNowWebSocketProtocol)]
        assert len(protocols) == CONNECTIONS
        assert not any(isinstance(p.writable, asyncio.Event) for p in protocols)
        assert all(p.writable.is_set() for p in protocols)
        for writer in writers:
            writer.close()
