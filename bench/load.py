"""The load generator: real WebSocket clients on loopback, bounded in connections, messages and time."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect

from bench.servers import Server

MARK = "bench:"  # every measured message's text starts with this


@dataclass
class Room:
    name: str
    members: list[ClientConnection]

    async def close(self) -> None:
        await asyncio.gather(*(member.close() for member in self.members), return_exceptions=True)


async def open_room(
    servers: Server | list[Server], size: int, compression: str | None = None, parallel: int = 100
) -> Room:
    """`size` clients in a fresh room, every one ready (it has seen a message sent after it joined).

    With several servers, the clients are spread over them in turn; the first is on the first.
    """
    name = f"bench-{uuid.uuid4().hex[:10]}"
    gate = asyncio.Semaphore(parallel)
    servers = servers if isinstance(servers, list) else [servers]

    async def join(number: int) -> ClientConnection:
        async with gate:
            return await connect(
                f"{servers[number % len(servers)].url}/ws/chat/{name}",
                compression=compression,
                max_size=None,
                max_queue=None,
                open_timeout=60,
            )

    members = list(await asyncio.gather(*(join(number) for number in range(size))))
    room = Room(name, members)
    await broadcast_and_wait(room, members[0], f"{MARK}ready")
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
            return [event["message"]]


async def broadcast_and_wait(room: Room, sender: ClientConnection, text: str) -> None:
    await sender.send(json.dumps({"type": "message", "message": text}))
    await asyncio.gather(*(wait_for_text(member, text) for member in room.members))


async def wait_for_text(ws: ClientConnection, text: str) -> None:
    while text not in await next_marked(ws):
        pass


async def fan_out(room: Room, messages: int, window: int, cpu_seconds: Callable[[], float]) -> dict:
    """The first member sends `messages` as fast as `window` unanswered ones allow; everyone
    (the sender too) must receive them all. Reports deliveries per second and the CPU time
    per delivery of the server side (`cpu_seconds`: all its processes, from /proc)."""
    sender = room.members[0]
    echoed = 0
    echo = asyncio.Event()

    async def receive(ws: ClientConnection, is_sender: bool) -> None:
        nonlocal echoed
        received = 0
        while received < messages:
            count = len(await next_marked(ws))
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
        # A client_msg_id on every message, as the browser page sends them.
        text = f"{MARK}{number} lorem ipsum dolor sit"
        await sender.send(
            json.dumps({"type": "message", "message": text, "client_msg_id": f"{room.name}-{number}"})
        )
    await asyncio.gather(*receivers)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    deliveries = messages * len(room.members)
    return {
        "deliveries_per_s": deliveries / elapsed,
        "messages_per_s": messages / elapsed,
        "cpu_us_per_delivery": cpu / deliveries * 1e6,
    }
