"""One attacker with one laptop, against the server as it starts by default (every limit on).

`python -m bench.attacks [--root DIR]` replays the attacks of the hardening issue and reports
what each cost the server: memory growth, descriptors held, and the round trip of a bystanding
room while it runs. `--root` points at another checkout (its own server.py) to compare.
The attacker connects from 127.0.0.2, everyone else from 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.servers import ROOT, Server, temporary_db
from tests import raw_client
from tests.raw_client import PING, TEXT, frame

ATTACKER = "127.0.0.2"
MB = 1_000_000


def chat(root: Path, *flags: str) -> Server:
    return Server(
        "fennec-chat",
        [
            sys.executable,
            str(root / "server.py"),
            "--port",
            "{port}",
            "--log-level",
            "error",
            "--db",
            temporary_db(),
            *flags,
        ],
    )


async def connect_from(url: str, source: str, **options):
    """A WebSocket client whose connection comes from `source` (any 127.x address on Linux)."""
    port = int(url.split(":")[2].split("/")[0])
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await connect(url, sock=sock, **options)


def descriptors(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


class Bystanders:
    """Two people in a room of their own: how long one message takes from one to the other."""

    async def open(self, server: Server) -> Bystanders:
        url = f"{server.url}/ws/chat/bystanders"
        self.sender, self.receiver = await connect(url), await connect(url)
        for ws in (self.sender, self.receiver):
            await drain(ws, 0.3)
        return self

    async def round_trip_ms(self, count: int = 10) -> float | None:
        times = []
        for number in range(count):
            text = f"probe {number} {time.monotonic()}"
            started = time.perf_counter()
            try:
                await self.sender.send(json.dumps({"type": "message", "message": text}))
                while text not in await asyncio.wait_for(self.receiver.recv(), 10):
                    pass
            except (TimeoutError, ConnectionClosed):
                return None
            times.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.2)  # within the rate limit
        return round(statistics.median(times), 2)

    async def close(self) -> None:
        for ws in (self.sender, self.receiver):
            await ws.close()


async def drain(ws, seconds: float) -> None:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), seconds)
    except (TimeoutError, ConnectionClosed):
        pass


async def endless_headers(server: Server) -> dict:
    """1. 100 MB of headers on one connection; 20 half-sent upgrades; 1,100 half-sent upgrades."""
    before = server.rss_bytes()

    def flood() -> int:
        sock = raw_client.connect(server.port, ATTACKER)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sent, line = 0, b"X-Pad: " + b"a" * 8000 + b"\r\n"
        started = time.monotonic()
        try:
            while sent < 100 * MB and time.monotonic() - started < 10:
                sock.sendall(line)
                sent += len(line)
        except OSError:
            pass
        sock.close()
        return sent

    sent = await asyncio.to_thread(flood)
    grown = (server.rss_bytes() - before) / MB
    half = [raw_client.connect(server.port, ATTACKER) for _ in range(20)]
    for sock in half:
        sock.sendall(raw_client.upgrade_request("/ws/chat/x")[:40])
    await asyncio.sleep(8)
    still_open = sum(1 for sock in half if _still_open(sock))
    for sock in half:
        sock.close()
    many = []
    for _ in range(1100):
        try:
            sock = raw_client.connect(server.port, ATTACKER)
            sock.sendall(raw_client.upgrade_request("/ws/chat/x")[:40])
            many.append(sock)
        except OSError:
            break
    await asyncio.sleep(0.5)
    held = descriptors(server)
    try:
        ws = await asyncio.wait_for(connect(f"{server.url}/ws/chat/someone-else"), 5)
        others_served = json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "system"
        await ws.close()
    except (TimeoutError, OSError, ConnectionClosed):
        others_served = False
    for sock in many:
        sock.close()
    return {
        "headers_accepted_mb": round(sent / MB, 1),
        "rss_growth_mb": round(grown, 1),
        "half_sent_open_after_8s": still_open,
        "descriptors_with_1100_half_sent": held,
        "others_served": others_served,
    }


def _still_open(sock) -> bool:
    """Whether the server still holds this connection (whatever it answered, it has not closed it)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # end of file: closed


async def ping_flood(server: Server) -> dict:
    """2. 200 MB of pings from a socket that never reads."""
    before = server.rss_bytes()

    def flood() -> int:
        sock = raw_client.connect(server.port, ATTACKER, receive_buffer=4096)
        raw_client.handshake(sock, "/ws/chat/pings")
        pings, sent, started = frame(PING, b"p" * 125) * 512, 0, time.monotonic()
        try:
            while sent < 200 * MB and time.monotonic() - started < 20:
                sock.sendall(pings)
                sent += len(pings)
        except OSError:
            pass
        peak = server.rss_bytes()
        sock.close()
        return sent, peak

    sent, peak = await asyncio.to_thread(flood)
    return {"pings_accepted_mb": round(sent / MB, 1), "rss_growth_mb": round((peak - before) / MB, 1)}


async def lobby_load(server: Server, bystanders: Bystanders) -> dict:
    """3. 1,000 one-member rooms, 50 lobby sockets refreshing 5 times a second; then four lobby
    sockets that ask and never read."""
    quiet = await bystanders.round_trip_ms()
    members = []
    for number in range(1000):  # from 40 addresses, within every per-address limit
        source = f"127.0.1.{number // 25 + 1}"
        try:
            members.append(await connect_from(f"{server.url}/ws/chat/room-{number:04d}", source))
        except Exception:
            break
    await asyncio.sleep(1)
    watchers = [await connect_from(f"{server.url}/ws/lobby", f"127.0.2.{number + 1}") for number in range(50)]

    async def refresh(ws) -> None:
        try:
            while True:
                await ws.send("?")
                await asyncio.sleep(0.2)
        except ConnectionClosed:
            pass

    async def read(ws) -> None:
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            pass

    tasks = [asyncio.create_task(job(ws)) for ws in watchers for job in (refresh, read)]
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    loaded = await bystanders.round_trip_ms()
    cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    for task in tasks:
        task.cancel()
    for ws in watchers:
        await ws.close()
    before = server.rss_bytes()

    def never_read() -> int:
        socks = [raw_client.connect(server.port, ATTACKER, receive_buffer=4096) for _ in range(4)]
        for sock in socks:
            raw_client.handshake(sock, "/ws/lobby")
        try:
            for _ in range(50):
                for sock in socks:
                    sock.sendall(frame(TEXT, b"?") * 100)
        except OSError:
            pass
        time.sleep(3)
        peak = server.rss_bytes()
        for sock in socks:
            sock.close()
        return peak

    peak = await asyncio.to_thread(never_read)
    for ws in members:
        await ws.close()
    return {
        "rooms_opened": len(members),
        "round_trip_ms_quiet": quiet,
        "round_trip_ms_under_lobby_load": loaded,
        "server_cpu_percent": round(cpu * 100),
        "non_reading_lobby_rss_growth_mb": round((peak - before) / MB, 1),
    }


async def rooms_and_history(server: Server, db: Path) -> dict:
    """4. For 8 s, open new rooms and fill each with long messages."""
    opened = refused = sent = 0
    deadline = time.monotonic() + 8
    number = 0
    while time.monotonic() < deadline:
        number += 1
        try:
            ws = await connect(f"{server.url}/ws/chat/flood-{number}")
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except (ConnectionClosed, TimeoutError, OSError):
            refused += 1
            continue
        if first.get("type") != "system":
            refused += 1
            continue
        opened += 1
        for _ in range(20):
            try:
                await ws.send(json.dumps({"type": "message", "message": "x" * 1990}))
                sent += 1
            except ConnectionClosed:
                break
        await ws.close()
    await asyncio.sleep(1.5)
    size = sum(path.stat().st_size for path in db.parent.glob(db.name + "*") if path.is_file())
    return {
        "rooms_opened_in_8s": opened,
        "rooms_refused": refused,
        "messages_sent": sent,
        "db_and_wal_mb": round(size / MB, 1),
    }


async def reconnect_bursts(server: Server) -> dict:
    """5. 20 sockets from one address, each reconnecting for a fresh burst, for 5 s."""
    url = f"{server.url}/ws/chat/bursts"
    watcher = await connect(url)
    await drain(watcher, 0.3)
    deadline = time.monotonic() + 5

    async def burster(number: int) -> None:
        while time.monotonic() < deadline:
            try:
                ws = await connect_from(url, ATTACKER)
                for index in range(12):
                    await ws.send(json.dumps({"type": "message", "message": f"burst {number} {index}"}))
                ws.transport.abort()  # and straight back for a fresh burst
            except (ConnectionClosed, OSError):
                await asyncio.sleep(0.01)

    counted = 0

    async def count() -> None:
        nonlocal counted
        try:
            while True:
                event = json.loads(await watcher.recv())
                counted += event.get("type") == "message"
        except ConnectionClosed:
            pass

    counter = asyncio.create_task(count())
    await asyncio.gather(*(burster(number) for number in range(20)))
    await asyncio.sleep(1)
    counter.cancel()
    await watcher.close()
    return {"messages_into_one_room_in_5s": counted, "per_second": round(counted / 5)}


async def frame_flood(server: Server, bystanders: Bystanders) -> dict:
    """6. Ten sockets sending padded typing frames, unknown types, bad JSON and kicks."""
    quiet = await bystanders.round_trip_ms()
    junk = [
        json.dumps({"type": "typing", "pad": "x" * 52_000}),
        '{"type": "bogus"}',
        "{bad json",
        '{"type": "kick"}',
    ]
    closed = 0

    async def flooder(number: int) -> None:
        nonlocal closed
        try:
            ws = await connect(f"{server.url}/ws/chat/flood-frames", max_queue=None)
            for index in range(20_000):
                await ws.send(junk[index % len(junk)])
        except ConnectionClosed:
            closed += 1

    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    flooders = asyncio.gather(*(flooder(number) for number in range(10)))
    loaded = await bystanders.round_trip_ms()
    cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    await asyncio.wait_for(flooders, 120)
    return {
        "round_trip_ms_quiet": quiet,
        "round_trip_ms_under_flood": loaded,
        "server_cpu_percent": round(cpu * 100),
        "flooders_closed": closed,
    }


async def workers_cap(root: Path) -> dict:
    """7. Two workers on Redis, a cap of 50 sockets per address: how many get in."""
    from bench.servers import redis_server

    redis = redis_server().start()
    server = chat(root, "--workers", "2", "--redis-url", f"redis://127.0.0.1:{redis.port}/0").start()
    await asyncio.sleep(2)
    admitted = []
    for _ in range(100):
        try:
            ws = await connect(f"{server.url}/ws/lobby")
            event = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if event["type"] == "rooms_update":
                admitted.append(ws)
            else:
                await ws.close()
        except (ConnectionClosed, TimeoutError, OSError):
            pass
    count = len(admitted)
    for ws in admitted:
        await ws.close()
    server.stop()
    redis.stop()
    return {"sockets_admitted_with_cap_50": count}


async def attack_all(root: Path = ROOT, only: str = "") -> dict[str, dict]:
    """Every attack, each on a fresh server; returns what each cost."""
    results: dict[str, dict] = {}

    async def fresh(name: str, job) -> None:
        db = temporary_db()
        server = chat(root)
        server.command[server.command.index("--db") + 1] = db
        server.start()
        bystanders = await Bystanders().open(server)
        try:
            results[name] = await job(server, bystanders, Path(db))
        finally:
            await bystanders.close()
            server.stop()
        print(name, json.dumps(results[name]), flush=True)

    attacks = {
        "1 unfinished requests": lambda server, b, db: endless_headers(server),
        "2 ping flood": lambda server, b, db: ping_flood(server),
        "3 lobby": lambda server, b, db: lobby_load(server, b),
        "4 rooms and history": lambda server, b, db: rooms_and_history(server, db),
        "5 reconnect bursts": lambda server, b, db: reconnect_bursts(server),
        "6 frame flood": lambda server, b, db: frame_flood(server, b),
    }
    for name, attack in attacks.items():
        if not only or name[0] in only:
            await fresh(name, attack)
    if not only or "7" in only:
        results["7 workers cap"] = await workers_cap(root)
        print("7 workers cap", json.dumps(results["7 workers cap"]), flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server.py to attack")
    parser.add_argument(
        "--only", default="", help="the numbers of the attacks to run, e.g. 135 (default: all)"
    )
    args = parser.parse_args()
    asyncio.run(attack_all(args.root.resolve(), args.only))
