"""A crowd of idle chat connections, light enough to hold 100,000 of them on the machine it measures.

Each member is a bare asyncio Protocol, not a websockets client: it sends the upgrade request for
/ws/chat/crowd-<k>?username=..., checks the 101, answers every ping with a masked pong (RFC 6455:
a client's frames are masked), echoes a close frame, and discards everything else. It never
pings (browsers do not). The crowd is spread over child processes (`python -m bench.crowd`, at
most ~15,000 sockets each, below the 20,000-descriptor limit), each binding its own loopback
source address 127.0.0.<first_source + i>, so that no (source, destination) pair runs out of the
~28,000 ephemeral ports. The parent speaks to them in JSON lines on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

Counts = dict[str, Any]
LINGER_0 = struct.pack("ii", 1, 0)  # closing resets the socket: no TIME_WAIT left on our ports


class Member(asyncio.Protocol):
    """One idle chat client: handshake, then pongs, and nothing else."""

    __slots__ = ("buffer", "child", "closed_by_server", "request", "skip", "transport", "upgraded")

    def __init__(self, child: Child, request: bytes) -> None:
        self.child = child
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.skip = 0  # bytes still to come of a frame we discard
        self.closed_by_server = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]
        del self.request

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            head = self.buffer + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = head
                return
            status = head[: head.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(ConnectionError(status.decode("latin-1")[:40]))
                self.transport.abort()  # type: ignore[union-attr]
                return
            self.upgraded.set_result(None)
            self.buffer, data = b"", head[end + 4 :]
        if self.skip:
            if len(data) <= self.skip:
                self.skip -= len(data)
                return
            data, self.skip = data[self.skip :], 0
        buf = self.buffer + data if self.buffer else data
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                if opcode in (0x8, 0x9):
                    break  # a control frame (<= 125 bytes): wait for the rest
                self.skip, pos = end - size, size  # an event: drop what came, skip the rest
                break
            if opcode == 0x9:
                self.child.pongs += 1
                self.send(0xA, buf[pos + head : end])
            elif opcode == 0x8:
                self.server_closed(buf[pos + head : end])
                return
            pos = end
        self.buffer = buf[pos:]

    def send(self, opcode: int, payload: bytes) -> None:
        """One masked frame (payload <= 125 bytes: control frames only)."""
        key = os.urandom(4)
        masked = bytes(byte ^ key[index & 3] for index, byte in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + key + masked)  # type: ignore[union-attr]

    def server_closed(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.child.closed[str(code)] += 1
        self.closed_by_server = True
        self.send(0x8, payload[:2])
        self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed before 101"))
        elif not self.closed_by_server and not self.child.stopping:
            self.child.lost[type(exc).__name__ if exc else "EOF"] += 1
        self.child.members.discard(self)


class Child:
    """One process's share of the crowd: `count` members from `source`, numbered from `first`."""

    def __init__(self, url: str, first: int, count: int, source: str, parallel: int, room_size: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.first, self.count, self.source = first, count, source
        self.parallel, self.room_size = parallel, room_size
        self.members: set[Member] = set()
        self.connected, self.pongs, self.stopping = 0, 0, False
        self.failed: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()  # close codes the server sent
        self.lost: Counter[str] = Counter()  # connections that ended without a close frame

    def request(self, number: int) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET /ws/chat/crowd-{number // self.room_size}?username=c{number} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    async def connect_all(self) -> None:
        loop, gate = asyncio.get_running_loop(), asyncio.Semaphore(self.parallel)

        async def one(number: int) -> None:
            async with gate:
                try:
                    _, member = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: Member(self, self.request(number)),
                            self.host,
                            self.port,
                            local_addr=(self.source, 0),
                        ),
                        30,
                    )
                    await asyncio.wait_for(member.upgraded, 30)
                except (OSError, asyncio.TimeoutError) as error:
                    self.failed[f"{type(error).__name__}: {error}"[:60]] += 1
                    return
                self.connected += 1
                if not member.transport.is_closing():  # type: ignore[union-attr]
                    self.members.add(member)

        await asyncio.gather(*(one(number) for number in range(self.first, self.first + self.count)))

    def counts(self) -> Counts:
        return {
            "connected": self.connected,
            "open": len(self.members),
            "failed": dict(self.failed),
            "closed": dict(self.closed),
            "lost": dict(self.lost),
            "pongs": self.pongs,
        }

    def stop(self) -> None:
        self.stopping = True
        for member in list(self.members):
            if member.transport is not None:
                sock = member.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
                member.transport.abort()


async def child_main(args: argparse.Namespace) -> None:
    child = Child(args.url, args.first, args.count, args.source, args.parallel, args.room_size)
    started = time.monotonic()
    await child.connect_all()
    say(child.counts() | {"seconds": round(time.monotonic() - started, 1)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).strip():
        if line == b"stop":
            break
        say(child.counts())
    final = child.counts()
    child.stop()
    await asyncio.sleep(0.5)
    say(final)


def say(counts: Counts) -> None:
    sys.stdout.write(json.dumps(counts) + "\n")
    sys.stdout.flush()


class Crowd:
    """`count` idle members of rooms of `room_size` at `url` (ws://host:port), over `processes`
    children with sources 127.0.0.<first_source>.., at most `parallel` handshakes at once in all."""

    def __init__(
        self,
        url: str,
        count: int,
        processes: int,
        first_source: int = 2,
        parallel: int = 256,
        room_size: int = 50,
    ) -> None:
        if -(-count // processes) > 15_000:
            raise ValueError("at most 15,000 connections per process: use more processes")
        self.url, self.count, self.processes = url, count, processes
        self.first_source, self.parallel, self.room_size = first_source, parallel, room_size
        self.children: list[asyncio.subprocess.Process] = []

    async def start(self) -> Counts:
        """Connect everyone; the counts once every attempt is over (connected or failed)."""
        share = -(-self.count // self.processes)
        for index in range(self.processes):
            first = index * share
            command = [sys.executable, "-m", "bench.crowd", self.url, str(first)]
            command += [str(min(share, self.count - first)), f"127.0.0.{self.first_source + index}"]
            command += [str(max(1, self.parallel // self.processes)), str(self.room_size)]
            self.children.append(
                await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
            )
        return await self._gather()

    async def counts(self) -> Counts:
        return await self._gather(b"counts\n")

    async def stop(self) -> Counts:
        """Reset every socket (no close handshake) and end the children; their last counts."""
        counts = await self._gather(b"stop\n")
        for child in self.children:
            await child.wait()
        return counts

    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    async def _gather(self, command: bytes = b"") -> Counts:
        async def ask(child: asyncio.subprocess.Process) -> Counts:
            assert child.stdin is not None
            assert child.stdout is not None
            if command:
                child.stdin.write(command)
                await child.stdin.drain()
            return json.loads(await child.stdout.readline())

        return merge(await asyncio.gather(*(ask(child) for child in self.children)))


def merge(parts: list[Counts]) -> Counts:
    total: Counts = {"connected": 0, "open": 0, "failed": Counter(), "closed": Counter(), "lost": Counter()}
    total["pongs"] = 0
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                total[key].update(value)
            elif key != "seconds":
                total[key] += value
    total["connect_seconds"] = max((part.get("seconds", 0) for part in parts), default=0)
    return {key: dict(value) if isinstance(value, Counter) else value for key, value in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="one child of a Crowd (started by Crowd.start)")
    for name in ("url", "first", "count", "source", "parallel", "room_size"):
        parser.add_argument(name, type=str if name in ("url", "source") else int)
    args = parser.parse_args()
    from bench.run import raise_file_limit

    raise_file_limit()
    try:
        import uvloop

        uvloop.run(child_main(args))
    except ImportError:
        asyncio.run(child_main(args))


if __name__ == "__main__":
    main()
