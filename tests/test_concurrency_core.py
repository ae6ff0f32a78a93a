"""The concurrency core, unit by unit: a client's outbox, uvicorn's inbox replacement, the lobby's
throttle and the local backplane's single order per room.

The outbox runs over a real `fennec.WebSocket` whose ASGI `send` and `receive` are plain
callables written here: `send` records every message and can be held shut, like a socket whose
reader has stopped reading; `write_now` (the scope extension our uvicorn protocol offers) is a
plain callable too. The inbox is tested on its own and inside a real uvicorn (run in the test's
own event loop, with `WriteNowWebSocketProtocol`) against a real `websockets` client. The lobby
runs on the real asyncio clock with short intervals; the tests count builds and pushes rather
than time anything. The backplane stores messages in a real SQLite history (in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvicorn
from fennec import Application, WebSocket, WebSocketRouter
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from fennec_chat.backplane import Listener, LocalBackplane, RoomEvent
from fennec_chat.frames import text_frame
from fennec_chat.lighter_parts import Inbox
from fennec_chat.lobby import LOBBY_ROOMS, LOBBY_USERNAMES, Lobby, Throttle, room_list
from fennec_chat.manager import ChatManager
from fennec_chat.outbox import WRITE_NOW, Outbox, OutboxState
from fennec_chat.protocol import CloseCode
from fennec_chat.settings import Settings
from fennec_chat.sqlite_history import SQLiteHistory
from fennec_chat.uvicorn_websocket import WriteNowWebSocketProtocol

WAIT = 5.0  # seconds before a test gives up on something that should happen at once


# --- Plain ASGI callables around a real fennec.WebSocket ---------------------------------------


class Peer:
    """The server side of one ASGI WebSocket connection. `send` records what the app sends;
    while `hold()` is in effect it waits (after the accept) like a socket whose reader stopped
    reading. `wire` is every frame in the order it left, through `send` or `write_now`."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.wire: list[tuple[str, str]] = []  # ("send" | "write_now" | "close", text or code)
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = asyncio.Event()  # set while a send waits for `release()`
        self.fail_sends = False  # True: `send` raises, like a peer that vanished

    def hold(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "websocket.accept":
            if self.fail_sends:
                raise OSError("connection reset by peer")
            if not self.open.is_set():
                self.waiting.set()
                await self.open.wait()
                self.waiting.clear()
        self.sent.append(message)
        if message["type"] == "websocket.send":
            self.wire.append(("send", message["text"]))
        elif message["type"] == "websocket.close":
            self.wire.append(("close", f"{message['code']} {message['reason']}"))

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()  # the outbox never reads
        raise AssertionError("unreachable")

    @property
    def texts(self) -> list[str]:
        """The events written, by either path, in order."""
        return [text for kind, text in self.wire if kind != "close"]

    @property
    def closes(self) -> list[str]:
        return [text for kind, text in self.wire if kind == "close"]


class WriteNow:
    """A stand-in for our uvicorn protocol's synchronous write: takes a frame when `room`."""

    def __init__(self, peer: Peer, room: bool = True) -> None:
        self.peer = peer
        self.room = room
        self.calls = 0
        self.taken: list[bytes] = []  # the very objects handed over

    def __call__(self, frame: bytes) -> bool:
        self.calls += 1
        if not self.room:
            return False
        self.taken.append(frame)
        self.peer.wire.append(("write_now", payload_of(frame).decode()))
        return True


def payload_of(frame: bytes) -> bytes:
    """What a server's text frame carries (a whole, unmasked frame: RFC 6455, 5.2)."""
    assert frame[0] == 0x81, frame[:2]  # final, text
    length, start = frame[1], 2
    if length == 126:
        length, start = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == start + length
    return frame[start:]


async def open_socket(peer: Peer, write_now: WriteNow | None = None) -> WebSocket:
    """A real fennec.WebSocket over `peer`, accepted (Fennec only closes an accepted socket)."""
    extensions: dict[str, Any] = {} if write_now is None else {WRITE_NOW: write_now}
    scope = {"type": "websocket", "path": "/", "query_string": b"", "headers": [], "extensions": extensions}
    websocket = WebSocket(scope, peer.receive, peer.send)
    await websocket.accept()
    return websocket


async def settle() -> None:
    """Let every task that is ready run until it waits again (no timer involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


def writer_of(outbox: Outbox) -> asyncio.Task[None] | None:
    # The writer task is private, but whether it runs at all, and whether it ends on its own or
    # is cancelled, is the point.
    return outbox._writer


def put(outbox: Outbox, text: str) -> bool:
    return outbox.put(text, text_frame(text.encode()))


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `condition()` holds, or fail. Polling: the conditions are other objects'
    state, which no event announces."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


# --- Outbox: order -------------------------------------------------------------------------------


async def test_outbox_writes_events_in_the_order_they_were_put_even_while_the_reader_is_slow():
    peer = Peer()
    outbox = Outbox(await open_socket(peer), limit=100, byte_limit=1 << 20)
    events = [f"event {n}" for n in range(30)]
    for text in events[:10]:
        assert put(outbox, text)
    peer.hold()
    await settle()
    for text in events[10:20]:  # queued behind a send that waits
        assert put(outbox, text)
    peer.release()
    await settle()
    for text in events[20:]:
        assert put(outbox, text)
    outbox.close(1000, "bye", discard=False)
    await outbox.wait_closed(WAIT)
    assert peer.texts == events
    assert peer.wire[-1] == ("close", "1000 bye")


async def test_outbox_writes_through_write_now_at_once_when_its_writer_is_idle():
    peer = Peer()
    write_now = WriteNow(peer)
    outbox = Outbox(await open_socket(peer, write_now), limit=10, byte_limit=1 << 20)
    await settle()  # the writer is idle
    assert put(outbox, "straight to the socket")
    # Written synchronously, inside put(): no await in between, no ASGI send.
    assert peer.wire == [("write_now", "straight to the socket")]
    assert outbox.queued == 0
    outbox.stop()
    await outbox.wait_closed(WAIT)
    assert [m for m in peer.sent if m["type"] == "websocket.send"] == []


async def test_outbox_queues_what_write_now_refuses_and_keeps_later_events_behind_it():
    peer = Peer()
    write_now = WriteNow(peer, room=False)  # the socket's buffer is full
    outbox = Outbox(await open_socket(peer, write_now), limit=10, byte_limit=1 << 20)
    await settle()
    assert put(outbox, "a")  # refused by write_now: queued for the writer
    write_now.room = True  # the buffer drained, but "a" is still queued...
    assert put(outbox, "b")
    assert put(outbox, "c")
    assert write_now.calls == 1  # ...so "b" and "c" did not jump ahead of it
    await settle()  # the writer sends a, b, c and goes idle
    assert put(outbox, "d")  # nothing queued: straight to the socket again
    outbox.close(1000, "", discard=False)
    await outbox.wait_closed(WAIT)
    assert peer.wire == [("send", "a"), ("send", "b"), ("send", "c"), ("write_now", "d"), ("close", "1000 ")]


# --- Outbox: the limits --------------------------------------------------------------------------


async def stuck_outbox(limit: int, byte_limit: int, write_now: bool = False) -> tuple[Outbox, Peer]:
    """An outbox whose writer is stuck sending its first event to a reader that stopped."""
    peer = Peer()
    writer = WriteNow(peer, room=False) if write_now else None
    outbox = Outbox(await open_socket(peer, writer), limit=limit, byte_limit=byte_limit)
    peer.hold()
    assert put(outbox, "in flight")
    await asyncio.wait_for(peer.waiting.wait(), WAIT)
    assert outbox.queued == 0
    return outbox, peer


@pytest.mark.parametrize("write_now", [False, True], ids=["asgi-send", "write-now-refusing"])
async def test_outbox_refuses_the_event_past_its_event_limit(write_now):
    outbox, peer = await stuck_outbox(limit=5, byte_limit=1 << 20, write_now=write_now)
    assert [put(outbox, f"e{n}") for n in range(5)] == [True] * 5
    assert not put(outbox, "one too many")
    assert outbox.queued == 5
    peer.release()
    outbox.close(1000, "", discard=False)
    await outbox.wait_closed(WAIT)
    assert peer.texts == ["in flight", "e0", "e1", "e2", "e3", "e4"]


async def test_outbox_counts_utf8_bytes_and_takes_events_up_to_exactly_the_byte_limit():
    outbox, peer = await stuck_outbox(limit=100, byte_limit=100)
    fox = "🦊"  # 4 bytes in UTF-8
    assert put(outbox, fox * 20)  # 80 bytes, 20 characters
    assert not put(outbox, fox * 6)  # 104 bytes in all: refused although only 26 characters
    assert put(outbox, "x" * 20)  # exactly 100 bytes: taken
    assert not put(outbox, "y")
    assert outbox.queued == 2
    outbox.stop()
    peer.release()
    await outbox.wait_closed(WAIT)


async def test_outbox_takes_one_event_bigger_than_the_byte_limit_when_nothing_waits_before_it():
    outbox, peer = await stuck_outbox(limit=100, byte_limit=100)
    assert put(outbox, "h" * 500)  # a long history page: nothing queued, so it is taken
    assert not put(outbox, "y")  # but nothing more fits behind it
    peer.release()
    await eventually(lambda: outbox.queued == 0)
    await settle()
    peer.hold()  # the reader stops again with nothing queued...
    assert put(outbox, "in flight again")
    await asyncio.wait_for(peer.waiting.wait(), WAIT)
    assert put(outbox, "i" * 500)  # ...so a big event is taken again
    peer.release()
    outbox.close(1000, "", discard=False)
    await outbox.wait_closed(WAIT)
    assert peer.texts == ["in flight", "h" * 500, "in flight again", "i" * 500]


async def test_a_client_whose_outbox_overflows_is_closed_with_1013_and_the_others_get_everything():
    manager = ChatManager(Settings(outbox_limit=3, outbox_bytes=1 << 20))
    slow, fast = Peer(), Peer()
    slow_id = await manager.connect(await open_socket(slow))
    fast_id = await manager.connect(await open_socket(fast, WriteNow(fast)))  # its socket has room
    slow.hold()
    await settle()
    for n in range(6):  # to everyone on this process, as `broadcast_json(..., room=None)` does
        await manager.broadcast_json({"type": "note", "n": n})
    assert not manager.is_connected(slow_id)
    assert manager.is_connected(fast_id)
    slow.release()
    await manager.disconnect(slow_id)  # waits for the close frame to go out
    assert slow.closes == [f"{CloseCode.TRY_AGAIN_LATER} too slow: more than 3 events waiting"]
    assert slow.texts == []  # what was queued was discarded: the slow reader gets the close only
    assert [json.loads(text)["n"] for text in fast.texts] == list(range(6))
    assert fast.closes == []
    await manager.shutdown()


# --- Outbox: closing and stopping ----------------------------------------------------------------


async def test_closing_after_the_queue_writes_every_queued_event_then_the_close_frame():
    outbox, peer = await stuck_outbox(limit=10, byte_limit=1 << 20)
    writer = writer_of(outbox)
    for text in ("one", "two", "three"):
        assert put(outbox, text)
    outbox.close(CloseCode.KICKED, "kicked", discard=False)
    assert outbox.state is OutboxState.CLOSING
    assert put(outbox, "too late")  # accepted and dropped: nobody is left to read it
    outbox.close(1000, "a second close is ignored")
    peer.release()
    await outbox.wait_closed(WAIT)
    assert peer.wire == [
        ("send", "in flight"),
        ("send", "one"),
        ("send", "two"),
        ("send", "three"),
        ("close", "4001 kicked"),
    ]
    assert writer.done()


async def test_closing_with_discard_drops_the_queue_and_sends_the_close_frame():
    outbox, peer = await stuck_outbox(limit=10, byte_limit=1 << 20)
    for text in ("one", "two", "three"):
        assert put(outbox, text)
    outbox.close(CloseCode.TRY_AGAIN_LATER, "too slow", discard=True)
    assert outbox.queued == 0
    peer.release()
    await outbox.wait_closed(WAIT)
    assert peer.wire == [("send", "in flight"), ("close", "1013 too slow")]


async def test_an_idle_outbox_runs_no_writer_task_and_stops_at_once():
    peer = Peer()
    outbox = Outbox(await open_socket(peer), limit=10, byte_limit=1 << 20)
    await settle()
    assert writer_of(outbox) is None  # nothing waits: no task, no coroutine, no future
    outbox.stop()
    assert outbox.state is OutboxState.STOPPED
    await outbox.wait_closed(WAIT)
    assert writer_of(outbox) is None
    assert peer.wire == []  # no close frame: the connection is already gone


async def test_the_writer_returns_once_the_queue_is_sent_and_the_next_event_goes_straight_out():
    peer = Peer()
    write_now = WriteNow(peer, room=False)  # the socket's buffer is full: events queue
    outbox = Outbox(await open_socket(peer, write_now), limit=10, byte_limit=1 << 20)
    assert put(outbox, "queued")
    writer = writer_of(outbox)
    assert writer is not None
    await asyncio.wait_for(asyncio.shield(writer), WAIT)
    assert writer_of(outbox) is None
    assert not writer.cancelled()
    write_now.room = True  # the socket took it all
    assert put(outbox, "straight")
    assert writer_of(outbox) is None
    assert peer.wire[-1] == ("write_now", "straight")


async def test_stopping_a_busy_outbox_drops_its_queue_and_its_writer_returns_after_the_send_in_flight():
    outbox, peer = await stuck_outbox(limit=10, byte_limit=1 << 20)
    writer = writer_of(outbox)
    assert put(outbox, "queued")
    outbox.stop()
    assert outbox.queued == 0
    peer.release()
    await outbox.wait_closed(WAIT)
    assert writer.done()
    assert not writer.cancelled()
    assert writer.exception() is None
    assert peer.wire == [("send", "in flight")]


async def test_a_close_frame_asked_for_still_goes_out_when_the_connection_is_stopped_after():
    outbox, peer = await stuck_outbox(limit=10, byte_limit=1 << 20)
    outbox.close(CloseCode.KICKED, "kicked", discard=False)
    outbox.stop()  # the handler ended: too late to take back the close frame
    peer.release()
    await outbox.wait_closed(WAIT)
    assert peer.wire == [("send", "in flight"), ("close", "4001 kicked")]


async def test_nothing_is_written_after_the_outbox_stopped():
    peer = Peer()
    write_now = WriteNow(peer)
    outbox = Outbox(await open_socket(peer, write_now), limit=10, byte_limit=1 << 20)
    await settle()
    outbox.stop()
    await outbox.wait_closed(WAIT)
    assert put(outbox, "late")  # True: late events are simply not for anyone
    outbox.close(1000, "late close")
    await settle()
    assert write_now.calls == 0
    assert peer.wire == []
    assert outbox.state is OutboxState.STOPPED


async def test_a_send_that_fails_stops_the_outbox_quietly_and_nothing_more_is_written():
    peer = Peer()
    outbox = Outbox(await open_socket(peer), limit=10, byte_limit=1 << 20)
    peer.fail_sends = True
    assert put(outbox, "to a vanished peer")
    assert put(outbox, "queued behind it")
    writer = writer_of(outbox)
    await outbox.wait_closed(WAIT)
    assert writer.done()
    assert writer.exception() is None  # the receive loop learns of the disconnect, not the writer
    assert outbox.state is OutboxState.STOPPED
    assert outbox.queued == 0
    peer.fail_sends = False
    assert put(outbox, "later")
    await settle()
    assert peer.wire == []


# --- Inbox: on its own ---------------------------------------------------------------------------


async def test_inbox_hands_out_items_in_the_order_they_were_put():
    inbox = Inbox()
    items = [{"type": "websocket.receive", "text": str(n)} for n in range(100)]
    for item in items[:50]:
        inbox.put_nowait(item)
    got = [await inbox.get() for _ in range(25)]
    for item in items[50:]:
        inbox.put_nowait(item)
    got += [await inbox.get() for _ in range(75)]
    assert got == items
    assert inbox.empty()


async def test_inbox_wakes_a_reader_that_waits_before_anything_arrives():
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await settle()
    assert not reader.done()
    inbox.put_nowait("first")
    inbox.put_nowait("second")
    assert await asyncio.wait_for(reader, WAIT) == "first"
    assert await inbox.get() == "second"
    assert inbox.empty()


async def test_inbox_delivers_the_disconnect_after_the_frames_that_came_before_it():
    inbox = Inbox()
    inbox.put_nowait({"type": "websocket.receive", "text": "last words"})
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    assert (await inbox.get())["type"] == "websocket.receive"
    assert await inbox.get() == {"type": "websocket.disconnect", "code": 1000}
    # Nothing after the disconnect: a reader that asks again waits (uvicorn's Queue did too).
    late_reader = asyncio.create_task(inbox.get())
    await settle()
    assert not late_reader.done()
    late_reader.cancel()
    await asyncio.gather(late_reader, return_exceptions=True)


async def test_inbox_itself_is_unbounded_so_the_bound_must_come_from_paused_reading():
    inbox = Inbox()
    for n in range(10_000):
        inbox.put_nowait(n)  # never refuses, never raises
    assert [await inbox.get() for _ in range(10_000)] == list(range(10_000))


async def test_an_inbox_reader_cancelled_while_waiting_does_not_lose_the_next_item():
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get())
    await settle()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    inbox.put_nowait("kept")
    assert await asyncio.wait_for(inbox.get(), WAIT) == "kept"


# --- Inbox and outbox inside a real uvicorn ------------------------------------------------------


class Endpoint:
    """Fennec WebSocket endpoints for a real uvicorn, which report what they saw. The assertions
    live in the tests: Fennec swallows a handler's exceptions."""

    SMALL_BUFFER = 16 * 1024  # socket buffer bytes, so that a peer that does not read is felt soon

    def __init__(self) -> None:
        self.protocol: Any = None
        self.connected = asyncio.Event()
        self.read_now = asyncio.Event()
        self.received: list[dict[str, Any]] = []
        self.all_put = asyncio.Event()
        self.write_now_answers: list[bool] = []
        self.done = asyncio.Event()

    async def read(self, websocket: WebSocket) -> None:
        """Read nothing until `read_now`, then everything up to the disconnect."""
        await websocket.accept()
        self.protocol = websocket.receive.__self__  # uvicorn's protocol: its bound receive
        self.connected.set()
        await self.read_now.wait()
        while True:
            message = await websocket.receive()
            self.received.append(message)
            if message["type"] == "websocket.disconnect":
                break
        self.done.set()

    async def write(self, websocket: WebSocket) -> None:
        """Put EVENTS events into an outbox at once, then close after them, counting how often
        the real `write_now` took an event and how often it refused."""
        await websocket.accept()
        self.protocol = websocket.receive.__self__
        sock = self.protocol.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SMALL_BUFFER)
        extensions = websocket.scope["extensions"]
        real_write_now = extensions[WRITE_NOW]

        def counting(data: bytes) -> bool:
            taken = real_write_now(data)
            self.write_now_answers.append(taken)
            return taken

        extensions[WRITE_NOW] = counting
        outbox = Outbox(websocket, limit=1000, byte_limit=64 << 20)
        await settle()  # its writer idle: write_now may be used
        for text in outbox_events():
            assert outbox.put(text, text_frame(text.encode()))
        self.all_put.set()
        outbox.close(1000, "that was all", discard=False)
        await outbox.wait_closed(WAIT)
        self.done.set()


def outbox_events() -> list[str]:
    return [f"{n:04d}" + "x" * (8 * 1024) for n in range(256)]  # 2 MiB in all


@contextlib.asynccontextmanager
async def serving(endpoint: Endpoint) -> AsyncIterator[tuple[str, int]]:
    """uvicorn with our WebSocket protocol, in this event loop, on a free loopback port."""
    router = WebSocketRouter()
    router.add_route("/read", endpoint.read)
    router.add_route("/write", endpoint.write)
    app = Application(docs_enabled=False)
    app.include_websocket_router(router)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        app,
        ws=WriteNowWebSocketProtocol,
        ws_per_message_deflate=False,
        lifespan="off",
        log_config=None,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await eventually(lambda: server.started or serve.done())
        assert server.started, serve
        yield f"ws://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serve, WAIT)
        listener.close()


async def test_uvicorn_hands_the_app_every_frame_in_order_then_the_peers_close():
    endpoint = Endpoint()
    async with serving(endpoint) as (url, _), connect(url + "/read", max_size=None) as client:
        await asyncio.wait_for(endpoint.connected.wait(), WAIT)
        assert isinstance(endpoint.protocol.queue, Inbox)
        for n in range(20):
            await client.send(f"frame {n}")
        closing = asyncio.create_task(client.close())  # sent before the app reads anything
        endpoint.read_now.set()
        await asyncio.wait_for(endpoint.done.wait(), WAIT)
        await asyncio.wait_for(closing, WAIT)
    kinds = [message["type"] for message in endpoint.received]
    assert kinds == ["websocket.connect"] + ["websocket.receive"] * 20 + ["websocket.disconnect"]
    assert [message["text"] for message in endpoint.received[1:-1]] == [f"frame {n}" for n in range(20)]
    assert endpoint.received[-1]["code"] == 1000


async def test_uvicorn_stops_reading_a_peer_while_the_app_does_not_read_so_the_inbox_stays_small():
    endpoint = Endpoint()
    frames = [f"{n:03d}" + "z" * (16 * 1024) for n in range(64)]  # 1 MiB in all
    async with serving(endpoint) as (url, _), connect(url + "/read", max_size=None) as client:
        await asyncio.wait_for(endpoint.connected.wait(), WAIT)

        async def send_all() -> None:
            for frame in frames:
                await client.send(frame)

        sending = asyncio.create_task(send_all())
        protocol = endpoint.protocol
        await eventually(lambda: protocol.read_paused and len(protocol.queue._items) > 1)
        await asyncio.sleep(0.2)  # time for more to arrive, were reading not paused
        held = len(protocol.queue._items)  # private: the Inbox itself offers only empty()
        assert held < len(frames) // 2, held
        endpoint.read_now.set()
        await asyncio.wait_for(sending, WAIT)
        closing = asyncio.create_task(client.close())
        await asyncio.wait_for(endpoint.done.wait(), WAIT)
        await asyncio.wait_for(closing, WAIT)
    texts = [message["text"] for message in endpoint.received if message["type"] == "websocket.receive"]
    assert texts == frames


async def read_until_closed(client: Any) -> list[str]:
    return [text async for text in client]


async def test_outbox_events_reach_a_real_client_in_order_through_write_now_and_the_writer():
    endpoint = Endpoint()
    async with serving(endpoint) as (url, port):
        # A client that reads nothing until everything was put, through small socket buffers:
        # write_now takes events until the server's buffer is full, the writer the rest.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, Endpoint.SMALL_BUFFER)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        async with connect(url + "/write", sock=sock, max_size=None, max_queue=1) as client:
            await asyncio.wait_for(endpoint.all_put.wait(), WAIT)
            received = await asyncio.wait_for(read_until_closed(client), WAIT)
            assert (client.close_code, client.close_reason) == (1000, "that was all")
        await asyncio.wait_for(endpoint.done.wait(), WAIT)
    assert received == outbox_events()
    assert True in endpoint.write_now_answers  # the synchronous path was used...
    assert False in endpoint.write_now_answers  # ...and refused once the buffer was full


# --- Lobby: the throttle -------------------------------------------------------------------------

INTERVAL = 0.05


class Runs:
    """A throttled callback that records when it ran (the loop's clock)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> None:
        self.times.append(asyncio.get_running_loop().time())
        if self.gate is not None:
            await self.gate.wait()


async def test_throttle_merges_a_burst_of_requests_into_one_run():
    runs = Runs()
    throttle = Throttle(INTERVAL, runs)
    for _ in range(1000):
        throttle.request()
    await eventually(lambda: len(runs.times) == 1)
    await asyncio.sleep(3 * INTERVAL)  # nothing else was asked for: nothing else runs
    assert len(runs.times) == 1


def most_runs(started: float, interval: float) -> float:
    """How many runs "at most one per interval" allows since `started` (the loop's clock): one
    at once, then one per interval. A slow machine only makes the real count smaller."""
    loop = asyncio.get_running_loop()
    return 1 + (loop.time() - started) / (interval - loop._clock_resolution)


async def test_throttle_runs_at_most_once_per_interval_and_honours_the_last_request():
    loop = asyncio.get_running_loop()
    runs = Runs()
    throttle = Throttle(INTERVAL, runs)
    started = loop.time()
    requests = 0
    stop = started + 8 * INTERVAL
    while loop.time() < stop:  # a request every tenth of an interval
        throttle.request()
        requests += 1
        await asyncio.sleep(INTERVAL / 10)
    last_request = loop.time()
    throttle.request()
    await eventually(lambda: bool(runs.times) and runs.times[-1] >= last_request)  # not lost
    assert len(runs.times) <= most_runs(started, INTERVAL), (len(runs.times), requests)
    assert len(runs.times) >= 2
    throttle.cancel()


async def test_throttle_runs_again_for_a_request_made_while_it_was_running():
    runs = Runs()
    runs.gate = asyncio.Event()
    throttle = Throttle(INTERVAL, runs)
    throttle.request()
    await eventually(lambda: len(runs.times) == 1)
    throttle.request()  # while the first run is still going
    throttle.request()
    runs.gate.set()
    await eventually(lambda: len(runs.times) == 2)
    await asyncio.sleep(3 * INTERVAL)
    assert len(runs.times) == 2


async def test_a_cancelled_throttle_does_not_run_what_was_requested():
    runs = Runs()
    throttle = Throttle(INTERVAL, runs)
    throttle.request()
    throttle.cancel()
    await asyncio.sleep(3 * INTERVAL)
    assert runs.times == []


# --- Lobby: one build, one text, for everyone ----------------------------------------------------


class Builds:
    """A lobby's `build` and `deliver`, counting builds and recording pushes."""

    def __init__(self, slow: bool = False) -> None:
        self.count = 0
        self.slow = slow
        self.pushes: list[tuple[str, tuple[str, ...]]] = []

    async def build(self) -> dict:
        self.count += 1
        if self.slow:
            await asyncio.sleep(INTERVAL / 5)
        return room_list([(f"room-{self.count}", {"c1": "ann"})], 1)

    def deliver(self, text: str, recipients: tuple[str, ...]) -> None:
        self.pushes.append((text, recipients))


async def test_lobby_builds_the_list_once_for_many_concurrent_readers_who_all_get_the_same_text():
    builds = Builds(slow=True)
    lobby = Lobby(60.0, builds.build, builds.deliver)  # an interval no test run outlasts
    texts = await asyncio.gather(*(lobby.current() for _ in range(50)))
    assert builds.count == 1
    assert all(text is texts[0] for text in texts)
    assert json.loads(texts[0])["rooms"] == {"room-1": {"users": 1, "usernames": ["ann"]}}
    lobby.changed()  # stale now, but built within the interval: served as it is
    assert await lobby.current() is texts[0]
    assert builds.count == 1
    lobby.cancel()


async def test_lobby_pushes_a_burst_of_changes_to_every_watcher_as_one_text_in_one_delivery():
    builds = Builds()
    lobby = Lobby(INTERVAL, builds.build, builds.deliver)
    lobby.watchers.update({"w1", "w2", "w3"})
    for _ in range(500):
        lobby.changed()
    await eventually(lambda: len(builds.pushes) == 1)
    await asyncio.sleep(3 * INTERVAL)
    assert builds.count == 1
    assert len(builds.pushes) == 1
    text, recipients = builds.pushes[0]
    assert sorted(recipients) == ["w1", "w2", "w3"]
    assert text is await lobby.current()  # the same encoded text, not a copy
    lobby.cancel()


async def test_lobby_without_watchers_builds_nothing_until_someone_asks():
    builds = Builds()
    lobby = Lobby(INTERVAL, builds.build, builds.deliver)
    for _ in range(100):
        lobby.changed()
    await asyncio.sleep(3 * INTERVAL)
    assert (builds.count, builds.pushes) == (0, [])
    await lobby.current()
    assert builds.count == 1
    lobby.cancel()


async def test_lobby_rebuilds_for_requests_at_most_once_per_interval_however_often_rooms_change():
    loop = asyncio.get_running_loop()
    builds = Builds()
    lobby = Lobby(INTERVAL, builds.build, builds.deliver)
    started = loop.time()
    stop = started + 6 * INTERVAL
    requests = 0
    while loop.time() < stop:  # a change and a request every tenth of an interval
        lobby.changed()
        await lobby.current()
        requests += 1
        await asyncio.sleep(INTERVAL / 10)
    lobby.cancel()
    assert builds.count <= most_runs(started, INTERVAL), (builds.count, requests)
    assert builds.count >= 2  # it did rebuild as things changed


async def test_a_push_right_after_a_requested_rebuild_sends_that_list_without_building_it_again():
    builds = Builds()
    lobby = Lobby(INTERVAL, builds.build, builds.deliver)
    lobby.watchers.add("watcher")
    lobby.changed()  # a room changed: a push is due (at once: none ran yet)
    await lobby.current()  # a watcher asks meanwhile: the list is built, fresh
    await eventually(lambda: len(builds.pushes) == 1)  # the push goes out...
    await asyncio.sleep(2 * INTERVAL)
    lobby.cancel()
    assert builds.count == 1  # ...of the list just built: nothing changed since


def test_the_room_list_holds_the_100_busiest_rooms_and_50_names_each_with_exact_counts():
    rooms = [(f"room-{n:03d}", {f"c{n}-{m}": f"user-{m:03d}" for m in range(n % 7)}) for n in range(150)]
    rooms.append(("crowded", {f"cc{m}": f"name-{m:03d}" for m in range(80)}))
    event = room_list(rooms, total=151)
    listed = event["rooms"]
    expected = sorted((room for room in rooms if room[1]), key=lambda room: (-len(room[1]), room[0]))
    assert list(listed) == [name for name, _ in expected[:LOBBY_ROOMS]]  # busiest first
    assert len(listed) == LOBBY_ROOMS == 100
    assert event["total_rooms"] == 151
    assert listed["crowded"]["users"] == 80
    assert listed["crowded"]["usernames"] == [f"name-{m:03d}" for m in range(LOBBY_USERNAMES)]
    assert LOBBY_USERNAMES == 50
    assert all(len(room["usernames"]) <= 50 for room in listed.values())
    assert "room-000" not in listed  # empty rooms are never listed


async def test_every_lobby_watcher_gets_the_same_encoded_bytes_of_the_bounded_list():
    manager = ChatManager(Settings(lobby_interval=INTERVAL))
    watchers = []
    for _ in range(3):
        peer = Peer()
        write_now = WriteNow(peer)
        client_id = await manager.connect(await open_socket(peer, write_now))
        await settle()
        await manager.watch_lobby(client_id)
        watchers.append(write_now)
    assert [len(w.taken) for w in watchers] == [1, 1, 1]  # the list on connect
    # 120 rooms of 1 to 4 members, and one of 60, in one burst of changes.
    sizes = {f"room-{n:03d}": n % 4 + 1 for n in range(120)} | {"crowded": 60}
    for room, size in sizes.items():
        for m in range(size):
            client_id = await manager.connect(await open_socket(Peer()))
            manager.rename(client_id, f"u{m:02d}")
            manager.join_room(client_id, room)
    await eventually(lambda: all(len(w.taken) == 2 for w in watchers))
    await asyncio.sleep(3 * INTERVAL)
    assert [len(w.taken) for w in watchers] == [2, 2, 2]  # one push for the whole burst
    pushed = [w.taken[1] for w in watchers]
    assert all(data is pushed[0] for data in pushed)  # framed once, the same bytes for all
    event = json.loads(payload_of(pushed[0]))
    busiest = sorted(sizes, key=lambda room: (-sizes[room], room))[:100]
    assert list(event["rooms"]) == busiest
    assert {room: listed["users"] for room, listed in event["rooms"].items()} == {
        room: sizes[room] for room in busiest
    }
    assert event["rooms"]["crowded"]["usernames"] == [f"u{m:02d}" for m in range(50)]
    assert event["total_rooms"] == 121
    await manager.shutdown()


# --- The backplane's single order ----------------------------------------------------------------


class Recorder:
    """A backplane `Listener` that records the room events handed to it."""

    def __init__(self) -> None:
        self.events: list[RoomEvent] = []

    def deliver_room_event(self, event: RoomEvent) -> None:
        self.events.append(event)

    def lobby_changed(self) -> None:
        pass

    def backplane_lost(self) -> None:
        pass

    async def backplane_back(self, rooms: set[str], reset_rooms: set[str]) -> None:
        pass


def label_of(event: RoomEvent) -> str:
    return json.loads(event.text)["label"]


@pytest.mark.parametrize("with_history", [True, False], ids=["sqlite-history", "no-history"])
async def test_a_rooms_events_reach_the_listener_in_the_order_they_were_published(with_history):
    history = SQLiteHistory(":memory:", retention=10_000) if with_history else None
    backplane = LocalBackplane(history)
    listener = Recorder()
    await backplane.start(listener)
    rooms = ["alpha", "beta", "gamma"]
    published: dict[str, list[str]] = {room: [] for room in rooms}  # labels, in publish order
    stored: list[asyncio.Future] = []
    chance = random.Random(20240601)  # seeded; the history thread's timing still varies

    async def member(room: str, who: int) -> None:
        for n in range(25):
            label = f"{room}/{who}/{n}"
            if chance.random() < 0.7:  # a chat message: stored first, then delivered
                event = {"type": "message", "label": label, "client_msg_id": f"m{n}"}
                stored.append(backplane.publish_message(room, event, sender=f"member-{who}"))
            else:  # a rename, a join...: delivered at once unless messages are being stored
                backplane.publish(RoomEvent(room, json.dumps({"type": "other", "label": label})))
            published[room].append(label)
            for _ in range(chance.randrange(3)):
                await asyncio.sleep(0)
            if chance.random() < 0.1:
                await asyncio.sleep(0.001)  # let the history thread commit a batch meanwhile

    await asyncio.gather(*(member(room, who) for room in rooms for who in range(8)))
    await asyncio.wait_for(asyncio.gather(*stored), WAIT)
    await settle()
    for room in rooms:
        events = [event for event in listener.events if event.room == room]
        assert [label_of(event) for event in events] == published[room]
        if with_history:
            ids = [event.message_id for event in events if event.message_id is not None]
            assert ids == list(range(1, len(ids) + 1))  # increasing, no gap, no repeat
            assert len(ids) == sum(1 for event in events if json.loads(event.text)["type"] == "message")
    await backplane.close()


async def test_a_resent_message_is_neither_delivered_again_nor_given_an_id():
    backplane = LocalBackplane(SQLiteHistory(":memory:", retention=100))
    listener = Recorder()
    await backplane.start(listener)
    first = backplane.publish_message("room", {"type": "message", "label": "hi", "client_msg_id": "x"}, "ann")
    again = backplane.publish_message("room", {"type": "message", "label": "hi", "client_msg_id": "x"}, "ann")
    backplane.publish(RoomEvent("room", json.dumps({"type": "other", "label": "after"})))
    then = backplane.publish_message(
        "room", {"type": "message", "label": "next", "client_msg_id": "y"}, "ann"
    )
    results = await asyncio.wait_for(asyncio.gather(first, again, then), WAIT)
    await settle()
    assert [r.duplicate for r in results] == [False, True, False]
    assert [(label_of(e), e.message_id) for e in listener.events] == [("hi", 1), ("after", None), ("next", 2)]
    await backplane.close()


def test_the_recording_listener_has_every_method_of_the_listener_protocol():
    # The recorder stands for the manager: if the protocol grows, the recorder must grow too.
    wanted = {name for name in vars(Listener) if not name.startswith("_")}
    assert wanted, "no methods found on Listener"
    assert wanted <= set(vars(Recorder)), wanted - set(vars(Recorder))


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_text_frame_built_once_is_what_websockets_itself_reads(length):
    """Every length field of RFC 6455's frame header: 7 bits (< 126), 16 bits, 64 bits."""
    payload = ("é" * length).encode()[:length]
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
    with pytest.raises(StopIteration) as parsed:
        next(parser)
    frame = parsed.value.value
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
