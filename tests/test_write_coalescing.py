"""Frames that `write_now` holds until the end of the loop turn (to send a busy socket's events
in one system call) still reach the peer whole, in order, and before anything written after
them: the app's own sends, its close, a server shutdown's 1012 and a keepalive's give-up.

These run a real uvicorn server with our protocol in the test's own event loop, so the app can
write and close within one turn, which a chat client cannot arrange from outside."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fennec_chat.frames import text_frame
from fennec_chat.outbox import WRITE_NOW
from fennec_chat.uvicorn_websocket import CORK_BYTES, WriteNowWebSocketProtocol


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts, then for the client's one message `how:count:size` writes `count` frames of
    `size` bytes with write_now, all in this turn, and ends the way `how` says."""
    assert scope["type"] == "websocket"
    await receive()
    await send({"type": "websocket.accept"})
    how, count, size = (await receive())["text"].split(":")
    write_now = scope["extensions"][WRITE_NOW]
    for number in range(int(count)):
        assert write_now(text_frame(f"{number}:".encode().ljust(int(size), b".")))
    protocol: WriteNowWebSocketProtocol = write_now.__self__
    if how == "send":
        await send({"type": "websocket.send", "text": "sent"})
        await send({"type": "websocket.close", "code": 4000})
    elif how == "shutdown":
        protocol.shutdown()
    elif how == "give_up":
        protocol.give_up(4408, "keepalive timeout")
    while (await receive())["type"] != "websocket.disconnect":
        pass


@pytest.fixture
async def url() -> AsyncIterator[str]:
    listening = socket.create_server(("127.0.0.1", 0))  # connections wait in its backlog meanwhile
    config = uvicorn.Config(app, ws=WriteNowWebSocketProtocol, ws_per_message_deflate=False, lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    yield f"ws://127.0.0.1:{listening.getsockname()[1]}/"
    server.should_exit = True
    await serving


async def transcript(url: str, how: str, count: int, size: int = 10) -> tuple[list[str], int | None]:
    """What the client receives, then the close code it gets."""
    received = []
    async with connect(url, max_size=None) as websocket:
        await websocket.send(f"{how}:{count}:{size}")
        try:
            while True:
                received.append(await asyncio.wait_for(websocket.recv(), 10))
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
    return received, code


def numbered(count: int) -> list[str]:
    return [f"{number}:" for number in range(count)]


async def test_frames_held_in_a_turn_arrive_before_the_apps_next_send_and_its_close(url):
    received, code = await transcript(url, "send", 20)
    assert [text.rstrip(".") for text in received] == [*numbered(20), "sent"]
    assert code == 4000


async def test_frames_held_in_a_turn_arrive_before_a_shutdowns_1012(url):
    received, code = await transcript(url, "shutdown", 20)
    assert [text.rstrip(".") for text in received] == numbered(20)
    assert code == 1012


async def test_frames_held_in_a_turn_arrive_before_a_give_up_close(url):
    received, code = await transcript(url, "give_up", 20)
    assert [text.rstrip(".") for text in received] == numbered(20)
    assert code == 4408


async def test_a_turn_writing_more_than_the_hold_allows_sends_everything_in_order(url):
    size = 1000
    count = 3 * CORK_BYTES // size  # the hold fills, goes out, fills again
    received, code = await transcript(url, "send", count, size)
    assert [text.rstrip(".") for text in received] == [*numbered(count), "sent"]
    assert all(len(text) == size for text in received[:-1])
    assert code == 4000
