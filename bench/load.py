"""The load generator: real WebSocket clients on loopback, bounded in connections, messages and time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.servers import Server

MARK = "bench:"  # every measured message's text starts with this


@dataclass
class Room:
    name: str
    members: list[ClientConnection]

    async def close(self) -> None:
        await asyncio.gather(*(member.close() for member in self.members), return_exceptions=True)


async def connect_many(
    urls: list[str], compression: str | None = None, parallel: int = 100
) -> list[ClientConnection]:
    gate = asyncio.Semaphore(parallel)

    async def one(url: str) -> ClientConnection:
        async with gate:
            # No client-side keepalive pings: browsers never send any (they only answer the
            # server's), and 10,000 idle clients pinging would load the load generator.
            return await connect(
                url,
                compression=compression,
                max_size=None,
                max_queue=None,
                open_timeout=120,
                ping_interval=None,
            )

    return list(await asyncio.gather(*(one(url) for url in urls)))


async def open_room(
    servers: Server | list[Server], size: int, compression: str | None = None, name: str | None = None
) -> Room:
    """`size` clients in a fresh room, every one ready (it has seen a message sent after it joined).

    With several servers, the clients are spread over them in turn; the first is on the first.
    """
    name = name or f"bench-{uuid.uuid4().hex[:10]}"
    servers = servers if isinstance(servers, list) else [servers]
    urls = [f"{servers[number % len(servers)].url}/ws/chat/{name}" for number in range(size)]
    members = await connect_many(urls, compression)
    room = Room(name, members)
    await broadcast_and_wait(room, members[0], f"{MARK}ready-{uuid.uuid4().hex[:6]}")
    return room


async def next_marked(ws: ClientConnection) -> list[str]:
    """The texts of the next benchmark messages, skipping joins, presence and the like.

    Usually one; more when a newcomer's `history` already holds some.
    """
    while True:
        frame = await ws.recv()
        if MARK in frame:
            event = json.loads(frame)
            if event["type"] == "history":
                return [message["message"] for message in event["messages"] if MARK in message["message"]]
            if event["type"] == "message":
                return [event["message"]]


async def broadcast_and_wait(room: Room, sender: ClientConnection, text: str) -> None:
    await sender.send(json.dumps({"type": "message", "message": text}))
    await asyncio.wait_for(asyncio.gather(*(wait_for_text(member, text) for member in room.members)), 120)


async def wait_for_text(ws: ClientConnection, text: str) -> None:
    while text not in await next_marked(ws):
        pass


def message(room: Room, number: int, text: str) -> str:
    # A client_msg_id on every message, as the browser page sends them.
    return json.dumps({"type": "message", "message": text, "client_msg_id": f"{room.name}-{number}"})


async def fan_out_in_new_room(
    servers: Server | list[Server],
    size: int,
    messages: int,
    window: int,
    cpu_seconds: Callable[[], float],
    compression: str | None = None,
) -> dict:
    """`fan_out` in a fresh room of `size` clients, which leave afterwards."""
    room = await open_room(servers, size, compression)
    try:
        return await fan_out(room, messages, window, cpu_seconds)
    finally:
        await room.close()


async def fan_out(room: Room, messages: int, window: int, cpu_seconds: Callable[[], float]) -> dict:
    """The first member sends `messages` as fast as `window` unanswered ones allow; everyone
    (the sender too) must receive them all. Reports deliveries per second, the CPU time per
    delivery of the server side (`cpu_seconds`: all its processes, from /proc), and the median
    time from a send to each member's receipt: the latency under load."""
    sender = room.members[0]
    echoed = 0
    echo = asyncio.Event()
    sent_at: list[float] = []  # by message number
    delays: list[float] = []

    async def receive(ws: ClientConnection, is_sender: bool) -> None:
        nonlocal echoed
        received = 0
        while received < messages:
            texts = await next_marked(ws)
            now = time.perf_counter()
            for text in texts:
                number = int(text[len(MARK) : text.index(" ")])
                if number < len(sent_at):  # not an earlier round's, from a newcomer's history
                    delays.append(now - sent_at[number])
            count = len(texts)
            received += count
            if is_sender:
                echoed += count
                echo.set()

    cpu_before, started = cpu_seconds(), time.perf_counter()
    receivers = [asyncio.create_task(receive(ws, ws is sender)) for ws in room.members]
    for number in range(messages):
        while number - echoed >= window:
            echo.clear()
            await echo.wait()
        sent_at.append(time.perf_counter())
        await sender.send(message(room, number, f"{MARK}{number} lorem ipsum dolor sit"))
    await asyncio.wait_for(asyncio.gather(*receivers), 300)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    deliveries = messages * len(room.members)
    return {
        "deliveries_per_s": deliveries / elapsed,
        "messages_per_s": messages / elapsed,
        "cpu_us_per_delivery": cpu / deliveries * 1e6,
        "p50_ms": statistics.median(delays) * 1000,
    }


def send_time(frame: str) -> float | None:
    """The send time a timed message carries (`MARK t=<perf_counter> ...`), or None."""
    at = frame.find(MARK + "t=")
    return None if at == -1 else float(frame[at + len(MARK) + 2 : frame.index(" ", at)])


async def latency(
    room: Room, rate: float, seconds: float, readers: list[ClientConnection] | None = None, size: int = 0
) -> dict:
    """The first member sends `rate` messages a second for `seconds`, each carrying its send
    time; every other member (or `readers`) records how long each took to arrive."""
    sender = room.members[0]
    readers = readers if readers is not None else room.members[1:]
    count = int(rate * seconds)
    samples: list[float] = []

    async def read(ws: ClientConnection) -> None:
        received = 0
        while received < count:
            sent = send_time(await ws.recv())
            if sent is None:
                continue
            samples.append(time.perf_counter() - sent)
            received += 1

    tasks = [asyncio.create_task(read(ws)) for ws in readers]
    start = time.perf_counter()
    for number in range(count):
        delay = start + number / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        text = f"{MARK}t={time.perf_counter():.6f} lorem ipsum"
        await sender.send(message(room, number, text.ljust(size, ".")))
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 120)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": samples[int(len(samples) * 0.99)] * 1000,
        "max_ms": samples[-1] * 1000,
    }


class Sink:
    """A room member that takes every byte and looks at none of them: it costs the load
    generator almost nothing, so that the latency it measures is the server's, not its own.
    It does its own WebSocket handshake and then just reads (it never answers pings, so it is
    only for runs of seconds)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.task = asyncio.create_task(self._swallow(reader))

    @classmethod
    async def join(cls, server: Server, room: str) -> Sink:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws/chat/{room} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"handshake refused: {head[:80]!r}")
        return cls(reader, writer)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(1 << 16):
            pass

    def close(self) -> None:
        self.task.cancel()
        self.writer.transport.abort()


async def sinks(server: Server, room: Room, count: int) -> list[Sink]:
    members = [await Sink.join(server, room.name) for _ in range(count)]
    await asyncio.sleep(0.3)  # let their joins settle
    return members


async def stalled_member(server: Server, room: Room) -> ClientConnection:
    """A member that never reads: a tiny receive buffer, and a client that stops after one frame."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    return await connect(f"{server.url}/ws/chat/{room.name}", sock=raw, max_queue=1, max_size=None)


async def close_code_of(ws: ClientConnection, timeout: float = 30) -> int | None:
    """Read whatever is left until the connection ends; the close code the server sent."""

    async def drain() -> None:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            return

    try:
        await asyncio.wait_for(drain(), timeout)
    except asyncio.TimeoutError:
        return None
    received = ws.protocol.close_rcvd
    return received.code if received else None


async def rooms_at_rate(
    rooms: list[Room], rate: float, seconds: float, clocks: dict[str, Callable[[], float]]
) -> dict:
    """The rooms' first members send in turn, `rate` messages a second over all the rooms, for
    `seconds`; every member (the sender too) must receive all of its room's. Reports deliveries
    per second (from the first send to the last receipt), one-way latency percentiles, what is
    `missing` if some never came (after a minute's wait), and the CPU seconds each of `clocks`
    (e.g. the chat processes, the Redis processes) counted meanwhile."""
    count = int(rate * seconds)
    expected = [len(range(number, count, len(rooms))) for number in range(len(rooms))]
    received = 0
    samples: list[float] = []

    async def read(ws: ClientConnection, wanted: int) -> None:
        nonlocal received
        got = 0
        while got < wanted:
            sent = send_time(await ws.recv())
            if sent is None:
                continue
            samples.append(time.perf_counter() - sent)
            got += 1
            received += 1

    before = {name: clock() for name, clock in clocks.items()}
    tasks = [
        asyncio.create_task(read(ws, wanted))
        for room, wanted in zip(rooms, expected, strict=True)
        for ws in room.members
    ]
    start = time.perf_counter()
    for number in range(count):
        delay = start + number / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        room = rooms[number % len(rooms)]
        text = f"{MARK}t={time.perf_counter():.6f} lorem ipsum dolor sit"
        await room.members[0].send(message(room, number, text))
    done, pending = await asyncio.wait(tasks, timeout=60)
    elapsed = time.perf_counter() - start
    for task in pending:
        task.cancel()
    for task in done:
        task.result()  # a receiver's failure (a closed connection) is the run's
    used = {name: clock() - before[name] for name, clock in clocks.items()}
    samples.sort()
    deliveries = sum(wanted * len(room.members) for room, wanted in zip(rooms, expected, strict=True))
    return {
        "messages": count,
        "deliveries": received,
        "missing": deliveries - received,
        "deliveries_per_s": received / elapsed,
        "p50_ms": statistics.median(samples) * 1000 if samples else float("nan"),
        "p99_ms": samples[int(len(samples) * 0.99)] * 1000 if samples else float("nan"),
        "cpu_seconds": used,
    }
