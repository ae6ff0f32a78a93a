"""Run the benchmarks: `python -m bench.run [workload ...]` (`make bench`).

Every workload measures this project's server and the one it is compared with in the same
run, interleaved over several rounds, and reports medians and the median of the per-round
ratios: absolute rates swing by a quarter from run to run on a small machine, ratios much less.
The reference is the websockets library's own server (bench/reference_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.request import urlopen

from bench.crowd import Crowd
from bench.load import (
    Room,
    close_code_of,
    connect_many,
    fan_out_in_new_room,
    latency,
    open_room,
    rooms_at_rate,
    sinks,
    stalled_member,
    wait_for_text,
)
from bench.servers import (
    CLOCK_TICKS,
    PAGE_SIZE,
    Server,
    chat_server,
    redis_server,
    reference_server,
    temporary_db,
)
from tests import server_process

NO_HISTORY = "fennec-chat --no-history"


@dataclass
class Report:
    workload: str
    rows: list[dict] = field(default_factory=list)  # one per server and case: medians of its rounds
    summary: dict = field(default_factory=dict)  # ratios, targets and verdicts

    def lines(self) -> list[str]:
        return [json.dumps({"workload": self.workload, **row}) for row in self.rows] + [
            json.dumps({"workload": self.workload, "summary": self.summary})
        ]


def median_of(rounds: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in rounds)


def median_ratio(ours: list[dict], theirs: list[dict], key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(ours, theirs, strict=True))


async def interleaved(
    servers: list[Server], rounds: int, run_once: Callable[[Server], Awaitable[dict]]
) -> dict[str, list[dict]]:
    """Run `run_once` against each server in turn, `rounds` times, alternating who goes first,
    after one round that is not counted (caches, allocators and the load generator warm up)."""
    for server in servers:
        await run_once(server)
    results: dict[str, list[dict]] = {server.name: [] for server in servers}
    for number in range(rounds):
        for server in servers if number % 2 == 0 else list(reversed(servers)):
            results[server.name].append(await run_once(server))
    return results


def fan_out_row(server: str, rounds: list[dict], rate: str = "deliveries_per_s", **case: int) -> dict:
    """One table row of fan-out results: the medians of a server's rounds."""
    return {"server": server, **case} | {
        rate: round(median_of(rounds, rate)),
        "cpu_us_per_delivery": round(median_of(rounds, "cpu_us_per_delivery"), 2),
    }


def verdict(value: float, limit: float) -> dict:
    return {"ratio": round(value, 3), "target": f"<= {limit}", "met": value <= limit}


BASELINE = "fennec-chat baseline"


def baseline(args: argparse.Namespace) -> list[Server]:
    """With --baseline DIR: the same server from another checkout (e.g. a `git worktree` of the
    previous commit), measured in the same rounds, for a before/after of a change."""
    return [chat_server(name=BASELINE, root=Path(args.baseline).resolve())] if args.baseline else []


def started(*servers: Server) -> list[Server]:
    return [server.start() for server in servers]


def stop(servers: list[Server]) -> None:
    for server in servers:
        server.stop()


# --- Fan-out -------------------------------------------------------------------------------------


async def fanout(args: argparse.Namespace) -> Report:
    """N receivers + 1 sender; server CPU per delivered message, against the reference."""
    # Without history too: the reference stores nothing, and a commit per batch of messages
    # is work only this project does.
    servers = started(
        chat_server(), chat_server("--no-history", name=NO_HISTORY), reference_server(), *baseline(args)
    )
    ours, lighter, reference = servers[:3]
    report = Report("fan-out: 1 sender + N receivers, 20 messages in flight, server CPU per delivery")
    try:
        for receivers in (10, 100, 500):
            messages = max(200, min(4000, 400_000 // (receivers + 1))) // (10 if args.quick else 1)

            async def run_once(server: Server, receivers: int = receivers, messages: int = messages) -> dict:
                return await fan_out_in_new_room(server, receivers + 1, messages, 20, server.cpu_seconds)

            results = await interleaved(servers, args.rounds, run_once)
            for server in servers:
                row = fan_out_row(server.name, results[server.name], N=receivers)
                report.rows.append(row | {"p50_ms": round(median_of(results[server.name], "p50_ms"), 2)})
            ratio = median_ratio(results[ours.name], results[reference.name], "cpu_us_per_delivery")
            report.summary[f"N={receivers}"] = verdict(ratio, 0.80 if receivers >= 100 else 1.00)
            if receivers == 100:  # the latency under that load: send to each member's receipt
                ratio = median_ratio(results[ours.name], results[reference.name], "p50_ms")
                report.summary[f"N={receivers} p50 latency"] = verdict(ratio, 1.5)
            ratio = median_ratio(results[lighter.name], results[reference.name], "cpu_us_per_delivery")
            report.summary[f"N={receivers} {NO_HISTORY}"] = {"ratio": round(ratio, 3)}
            for other in servers[3:]:
                ratio = median_ratio(results[ours.name], results[other.name], "cpu_us_per_delivery")
                report.summary[f"N={receivers} vs {BASELINE}"] = {"ratio": round(ratio, 3)}
    finally:
        stop(servers)
    return report


async def metrics_cost(args: argparse.Namespace) -> Report:
    """The fan-out with --metrics-port against the same server without: what counting costs."""
    port = str(server_process.free_port())
    servers = started(chat_server(), chat_server("--metrics-port", port, name="fennec-chat --metrics-port"))
    off, on = servers
    report = Report("metrics: the fan-out with and without --metrics-port, server CPU per delivery")
    try:
        for receivers in (10, 100):
            messages = max(200, min(4000, 400_000 // (receivers + 1))) // (10 if args.quick else 1)

            async def run_once(server: Server, receivers: int = receivers, messages: int = messages) -> dict:
                return await fan_out_in_new_room(server, receivers + 1, messages, 20, server.cpu_seconds)

            results = await interleaved(servers, args.rounds, run_once)
            report.rows += [fan_out_row(server.name, results[server.name], N=receivers) for server in servers]
            ratio = median_ratio(results[on.name], results[off.name], "cpu_us_per_delivery")
            report.summary[f"N={receivers} on vs off"] = (
                verdict(ratio, 1.03) if receivers == 100 else {"ratio": round(ratio, 3)}
            )
    finally:
        stop(servers)
    return report


async def browser_like(args: argparse.Namespace) -> Report:
    """Clients that offer permessage-deflate, as browsers do: this project declines it (the
    default), the reference accepts it (its default). Both are also measured the other way
    round (--ws-compression; a reference without it) to show what compression costs each."""
    servers = started(
        chat_server(),
        reference_server(compression=True),
        chat_server("--ws-compression", name="fennec-chat --ws-compression"),
        reference_server(),
    )
    ours, reference, ours_compressing, reference_plain = servers
    messages = 300 if args.quick else 3000

    async def run_once(server: Server) -> dict:
        return await fan_out_in_new_room(server, 101, messages, 20, server.cpu_seconds, "deflate")

    try:
        results = await interleaved(servers, args.rounds, run_once)
    finally:
        stop(servers)
    report = Report("browser-like clients (deflate offered): 1 sender + 100 receivers, CPU per delivery")
    report.rows = [fan_out_row(server.name, results[server.name]) for server in servers]

    def ratio(a: Server, b: Server) -> float:
        return median_ratio(results[a.name], results[b.name], "cpu_us_per_delivery")

    report.summary = verdict(ratio(ours, reference), 0.5) | {
        "deflate's cost to fennec-chat": round(ratio(ours_compressing, ours), 3),
        "deflate's cost to the reference": round(ratio(reference, reference_plain), 3),
    }
    return report


# --- Latency ---------------------------------------------------------------------------------------


async def latency_workload(args: argparse.Namespace) -> Report:
    """A sender at a fixed rate into a 100-client room: one-way latency percentiles."""
    servers = started(
        chat_server(), chat_server("--no-history", name=NO_HISTORY), reference_server(), *baseline(args)
    )
    ours, lighter, reference = servers[:3]
    seconds = 1.0 if args.quick else 4.0
    report = Report("latency: a sender at a fixed rate into a 100-client room")
    try:
        for rate in (50, 500):

            async def run_once(server: Server, rate: int = rate) -> dict:
                return await measured_room_latency(server, rate, seconds)

            results = await interleaved(servers, args.rounds, run_once)
            for server in servers:
                report.rows.append(
                    {"server": server.name, "rate": rate}
                    | {
                        key: round(median_of(results[server.name], key), 2)
                        for key in ("p50_ms", "p99_ms", "max_ms")
                    }
                )
            ratio = median_ratio(results[ours.name], results[reference.name], "p99_ms")
            report.summary[f"{rate}/s p99"] = (
                verdict(ratio, 1.05) if rate == 500 else {"ratio": round(ratio, 3)}
            )
            ratio = median_ratio(results[lighter.name], results[reference.name], "p99_ms")
            report.summary[f"{rate}/s p99 {NO_HISTORY}"] = {"ratio": round(ratio, 3)}
            for other in servers[3:]:
                ratio = median_ratio(results[ours.name], results[other.name], "p99_ms")
                report.summary[f"{rate}/s p99 vs {BASELINE}"] = {"ratio": round(ratio, 3)}
    finally:
        stop(servers)
    return report


# --- Memory ----------------------------------------------------------------------------------------


async def memory(args: argparse.Namespace) -> Report:
    """Server RSS per idle browser-like connection (deflate offered), and what is left after
    they close; then 10,000 idle connections beside a busy room."""
    raise_file_limit()
    count = 200 if args.quick else 2000
    report = Report("memory: idle browser-like connections (deflate offered), in rooms of 20")
    for server in (chat_server(), reference_server(compression=True), reference_server()):
        server.start()
        try:
            report.rows.append(
                {"server": server.name, "connections": count} | await idle_memory(server, count)
            )
        finally:
            server.stop()
    ours = report.rows[0]
    report.summary = {
        "KiB per connection": {
            "value": ours["kib_per_connection"],
            "target": "<= 14",
            "met": ours["kib_per_connection"] <= 14,
        },
        "KiB left per connection after a cycle": {
            "value": ours["kib_left_per_connection"],
            "target": "<= 0.5",
            "met": ours["kib_left_per_connection"] <= 0.5,
        },
    }
    if not args.quick:
        report.summary["10,000 idle beside a 100-client room"] = await crowded_room(args)
    return report


async def idle_memory(server: Server, count: int) -> dict:
    """RSS per connection while `count` are open, and the growth one more connect/close cycle
    leaves behind (what a leak shows; the first cycle's memory stays with the allocator)."""

    async def cycle() -> tuple[int, int]:
        urls = [f"{server.url}/ws/chat/idle-{number // 20}" for number in range(count)]
        clients = await connect_many(urls, compression="deflate")
        await asyncio.sleep(2)
        held = server.rss_bytes()
        await asyncio.gather(*(client.close() for client in clients))
        await asyncio.sleep(2)
        return held, server.rss_bytes()

    await connect_many([f"{server.url}/ws/chat/warm-up"] * 5)  # imports and first allocations
    await asyncio.sleep(1)
    before = server.rss_bytes()
    held, after_first = await cycle()
    _, after_second = await cycle()
    return {
        "kib_per_connection": round((held - before) / count / 1024, 2),
        "kib_left_per_connection": round(max(0, after_second - after_first) / count / 1024, 3),
    }


async def crowded_room(args: argparse.Namespace) -> dict:
    """p99 latency of a 100-client room at 500 msg/s beside 10,000 idle connections, against
    the same room on an otherwise empty server."""
    server = chat_server().start()
    try:
        empty = [await room_p99(server) for _ in range(args.rounds)]
        urls = [f"{server.url}/ws/chat/crowd-{number // 50}" for number in range(10_000)]
        crowd = await connect_many(urls, compression="deflate", parallel=200)
        await asyncio.sleep(3)
        rss = server.rss_bytes()
        crowded = [await room_p99(server) for _ in range(args.rounds)]
        held = sum(1 for client in crowd if client.protocol.state.name == "OPEN")
        await asyncio.gather(*(client.close() for client in crowd), return_exceptions=True)
    finally:
        server.stop()
    ratio = statistics.median(crowded) / statistics.median(empty)
    return {
        "held": held,
        "rss_mib": round(rss / 2**20),
        "p99_ms_empty": round(statistics.median(empty), 2),
        "p99_ms_crowded": round(statistics.median(crowded), 2),
    } | verdict(ratio, 1.2)


async def room_p99(server: Server) -> float:
    return (await measured_room_latency(server, 500, 3.0))["p99_ms"]


async def measured_room_latency(
    server: Server, rate: float, seconds: float, size: int = 0, stall: bool = False
) -> dict:
    """A 100-client room: a sender, 10 members that measure, 89 sinks that only read, and
    with `stall` one more member that never reads (then: the close code it finally got)."""
    room = await open_room(server, 11)
    quiet = await sinks(server, room, 89)
    stalled = await stalled_member(server, room) if stall else None
    try:
        result = await latency(room, rate, seconds, size=size)
        if stalled is not None:
            result["stalled_member_closed_with"] = await close_code_of(stalled, timeout=20)
        return result
    finally:
        for sink in quiet:
            sink.close()
        await room.close()


def raise_file_limit() -> None:
    """10,000 sockets on each side need more file descriptors than the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 30_000)), hard))


# --- Slow consumers and churn ------------------------------------------------------------------------


async def slow_consumer(args: argparse.Namespace) -> Report:
    """p99 latency of a 100-client room (500 messages/s of ~2 KB) with and without one member
    that never reads: the others must not notice, and the stalled one must be closed (1013)."""
    servers = started(chat_server(), reference_server())
    seconds = 2.0 if args.quick else 6.0
    report = Report(
        "slow consumer: a 100-client room, 500 msg/s of 2 KB, with and without a member that never reads"
    )
    try:
        for server in servers:
            without, with_stall, codes = [], [], []
            for _ in range(args.rounds):
                without.append((await measured_room_latency(server, 500, seconds, size=1900))["p99_ms"])
                result = await measured_room_latency(server, 500, seconds, size=1900, stall=True)
                with_stall.append(result["p99_ms"])
                codes.append(result["stalled_member_closed_with"])
            report.rows.append(
                {
                    "server": server.name,
                    "p99_ms_no_stall": round(statistics.median(without), 2),
                    "p99_ms_stalled_member": round(statistics.median(with_stall), 2),
                    "stalled_member_closed_with": max(set(codes), key=codes.count),
                }
            )
    finally:
        stop(servers)
    ours = report.rows[0]
    report.summary = verdict(ours["p99_ms_stalled_member"] / ours["p99_ms_no_stall"], 1.1) | {
        "stalled member closed with 1013": ours["stalled_member_closed_with"] == 1013
    }
    return report


async def churn(args: argparse.Namespace) -> Report:
    """5 rooms of 40; in each, half the members vanish at once while 200 messages go out. A room
    is broken if a remaining member misses a message or the room stops working afterwards."""
    servers = started(chat_server(), reference_server())
    report = Report("churn: 5 rooms of 40, 20 members of each vanish at once mid-broadcast")
    try:
        for server in servers:
            broken = 0
            for _ in range(args.rounds):
                rooms = [await open_room(server, 40) for _ in range(5)]
                outcomes = await asyncio.gather(*(churn_room(room) for room in rooms))
                broken += outcomes.count(False)
            report.rows.append({"server": server.name, "rooms": 5 * args.rounds, "broken": broken})
    finally:
        stop(servers)
    report.summary = {
        "broken rooms (this project)": report.rows[0]["broken"],
        "target": 0,
        "met": report.rows[0]["broken"] == 0,
    }
    return report


async def churn_room(room: Room, messages: int = 200) -> bool:
    sender, leavers, stayers = room.members[0], room.members[20:], room.members[:20]
    texts = [f"bench:churn {number}" for number in range(messages)]

    async def send_all() -> None:
        for number, text in enumerate(texts):
            await sender.send(json.dumps({"type": "message", "message": text}))
            if number == messages // 4:
                for leaver in leavers:  # all at once, no close frame
                    leaver.transport.abort()
            await asyncio.sleep(0)

    async def receive_all(ws) -> bool:
        for text in texts:
            await wait_for_text(ws, text)
        return True

    try:
        await send_all()
        await asyncio.wait_for(asyncio.gather(*(receive_all(ws) for ws in stayers)), 30)
        await sender.send(json.dumps({"type": "message", "message": "bench:after"}))
        await asyncio.wait_for(asyncio.gather(*(wait_for_text(ws, "bench:after") for ws in stayers)), 10)
        return True
    except (asyncio.TimeoutError, Exception):
        return False
    finally:
        await asyncio.gather(*(ws.close() for ws in stayers), return_exceptions=True)


# --- History and Redis -----------------------------------------------------------------------------


async def history_throughput(args: argparse.Namespace) -> Report:
    """Message throughput with the SQLite history on, against the same server with --no-history."""
    servers = started(
        chat_server("--no-history", name="history off"), chat_server(name="history on (SQLite)")
    )
    off, on = servers
    messages = 300 if args.quick else 3000

    async def run_once(server: Server) -> dict:
        return await fan_out_in_new_room(server, 11, messages, 50, server.cpu_seconds)

    try:
        results = await interleaved(servers, args.rounds, run_once)
    finally:
        stop(servers)
    report = Report("history: 1 sender + 10 receivers, window 50")
    report.rows = [fan_out_row(server.name, results[server.name], "messages_per_s") for server in servers]
    ratio = median_ratio(results[on.name], results[off.name], "messages_per_s")
    report.summary = {"throughput_on_vs_off": round(ratio, 3), "target": ">= 0.80", "met": ratio >= 0.8}
    return report


async def redis_scale(args: argparse.Namespace) -> Report:
    """Fan-out in one process against two processes sharing the room through Redis."""
    if shutil.which("redis-server") is None:
        return Report("redis", summary={"skipped": "redis-server is not installed"})
    redis = redis_server().start()
    url = f"redis://127.0.0.1:{redis.port}/0"
    single = chat_server("--db", temporary_db(), name="1 process (SQLite history)").start()
    pair = [chat_server("--redis-url", url, name=f"redis process {n}").start() for n in (1, 2)]
    receivers = 20 if args.quick else 100
    messages = 100 if args.quick else 1000

    def cpu_of(servers: list[Server]) -> Callable[[], float]:
        return lambda: sum(server.cpu_seconds() for server in servers)

    results: dict[str, list[dict]] = {"1 process": [], "2 processes + Redis": []}
    try:
        for number in range(args.rounds):
            setups = [("1 process", [single], [single]), ("2 processes + Redis", pair, [*pair, redis])]
            for name, serving, measured in setups if number % 2 == 0 else reversed(setups):
                results[name].append(
                    await fan_out_in_new_room(serving, receivers + 1, messages, 20, cpu_of(measured))
                )
    finally:
        stop([single, *pair, redis])
    report = Report(f"redis: 1 sender + {receivers} receivers, {messages} messages, window 20")
    report.rows = [fan_out_row(name, rounds) for name, rounds in results.items()]
    ratio = median_ratio(results["2 processes + Redis"], results["1 process"], "deliveries_per_s")
    report.summary = {"deliveries_two_vs_one": round(ratio, 3)}
    return report


# --- Redis Cluster -------------------------------------------------------------------------------
#
# Two chat processes on one Redis against two on a 3-master Redis Cluster (a replica each, as in
# production), both without persistence: many rooms, each with members on both processes (so
# every message crosses Redis), their senders on either, at a fixed total rate.

CLUSTER_ROOMS = 40
CLUSTER_MEMBERS = 6  # per room, alternately on each process
CLUSTER_RATE = 400  # messages a second, over all the rooms
CLUSTER_SECONDS = 5.0


@dataclass
class RedisSetup:
    """Two chat processes and the Redis processes they share."""

    name: str
    chat: list[Server]
    redis_pids: list[int]  # every redis-server process
    master_pids: list[int]  # those that serve slots (all of them for a single Redis)
    split: bool = True  # each room's members on both processes, or all on one (room affinity)


async def rooms_across(setup: RedisSetup, rooms: int, rate: float, seconds: float) -> dict:
    """`rooms_at_rate` in fresh rooms spread over the setup's two processes, closed afterwards."""
    opened: list[Room] = []
    try:
        for first in range(0, rooms, 10):  # in batches: each room's opening broadcasts and waits
            batch = [
                # Half the rooms have their first member (the sender) on each process; with
                # room affinity, all its members are there.
                open_room(
                    (setup.chat if number % 2 == 0 else setup.chat[::-1])[: 2 if setup.split else 1],
                    CLUSTER_MEMBERS,
                )
                for number in range(first, min(rooms, first + 10))
            ]
            opened += await asyncio.wait_for(asyncio.gather(*batch), 60)
        clocks = {
            "chat": lambda: sum(server.cpu_seconds() for server in setup.chat),
            "redis": lambda: cpu_of(setup.redis_pids),
            "masters": lambda: cpu_of(setup.master_pids),
        }
        result = await rooms_at_rate(opened, rate, seconds, clocks)
    finally:
        await asyncio.gather(*(room.close() for room in opened))
    cpu = result.pop("cpu_seconds")
    deliveries, messages = max(1, result["deliveries"]), result["messages"]
    return result | {
        "cpu_us_per_delivery": cpu["chat"] / deliveries * 1e6,
        "cpu_us_per_msg": cpu["chat"] / messages * 1e6,
        "redis_cpu_us_per_msg": cpu["redis"] / messages * 1e6,
        "master_cpu_us_per_msg": cpu["masters"] / messages * 1e6,
    }


def startup_failure(servers: list[Server], error: Exception) -> str:
    """Why a chat process did not start: the error and the last line of its log."""
    for server in servers:
        lines = server.log_path.read_text(errors="replace").strip().splitlines()
        if server.process and server.process.poll() is not None and lines:
            return f"{error}: {lines[-1][:200]}"
    return str(error)


async def cluster_scale(args: argparse.Namespace) -> Report:
    """Two chat processes on one Redis against two on a Redis Cluster (--redis-url
    redis+cluster://): deliveries per second, chat CPU per delivery, Redis CPU per message."""
    title = "cluster: 2 chat processes on 1 Redis vs on a 3-master Redis Cluster"
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        return Report(title, summary={"skipped": "redis-server or redis-cli is not installed"})
    from tests.redis_cluster import RedisCluster

    rooms = 12 if args.quick else CLUSTER_ROOMS
    seconds = 1.5 if args.quick else CLUSTER_SECONDS
    rate = args.cluster_rate / 4 if args.quick else args.cluster_rate
    title += f": {rooms} rooms of {CLUSTER_MEMBERS} (half on each process), {rate:g} msg/s for {seconds:g} s"
    report = Report(title)
    single = redis_server()
    cluster_directory = Path(tempfile.mkdtemp(prefix="chat-bench-cluster-"))
    cluster = RedisCluster(cluster_directory, persistent=False)
    chat: list[Server] = []
    setups: list[RedisSetup] = []
    try:
        single.start()
        assert single.process is not None
        pair = [
            chat_server("--redis-url", f"redis://127.0.0.1:{single.port}/0", name=f"1 Redis: process {n}")
            for n in (1, 2)
        ]
        chat += pair
        started(*pair)
        pids = [single.process.pid]
        setups.append(RedisSetup("2 processes + 1 Redis", pair, pids, pids))

        cluster.start()
        pair = [chat_server("--redis-url", cluster.url, name=f"Redis Cluster: process {n}") for n in (1, 2)]
        chat += pair
        try:
            started(*pair)
        except RuntimeError as error:  # e.g. a server that does not know redis+cluster:// yet
            report.summary["cluster"] = (
                f"skipped, a chat process did not start: {startup_failure(pair, error)}"
            )
        else:
            masters = [cluster.pid(port) for port in cluster.masters()]
            setups.append(RedisSetup("2 processes + Redis Cluster", pair, cluster.pids, masters))
            # What a process costs per message it only receives: every room on one process.
            setups.append(
                RedisSetup("Redis Cluster, rooms on one process", pair, cluster.pids, masters, split=False)
            )

        results: dict[str, list[dict]] = {setup.name: [] for setup in setups}
        for setup in setups:  # a warm-up, not counted: imports, connections to every master
            await rooms_across(setup, rooms, rate, min(seconds, 1.0))
        for number in range(args.rounds):
            for setup in setups if number % 2 == 0 else setups[::-1]:
                results[setup.name].append(await rooms_across(setup, rooms, rate, seconds))
    finally:
        stop(chat)
        single.stop()
        cluster.stop()
        shutil.rmtree(cluster_directory, ignore_errors=True)

    for name, rounds in results.items():
        report.rows.append(
            {"server": name}
            | {key: round(median_of(rounds, key)) for key in ("deliveries_per_s", "missing")}
            | {
                key: round(median_of(rounds, key), 2)
                for key in (
                    "cpu_us_per_delivery",
                    "cpu_us_per_msg",
                    "redis_cpu_us_per_msg",
                    "master_cpu_us_per_msg",
                    "p50_ms",
                    "p99_ms",
                )
            }
        )
    if len(setups) == 3:
        one, many, affine = (setup.name for setup in setups)
        report.summary["cluster vs single"] = {
            key: round(median_ratio(results[many], results[one], key), 3)
            for key in (
                "deliveries_per_s",
                "cpu_us_per_delivery",
                "redis_cpu_us_per_msg",
                "master_cpu_us_per_msg",
                "p99_ms",
            )
        }
        report.summary["rooms split over 2 processes vs each on one"] = {
            "chat cpu per message": round(median_ratio(results[many], results[affine], "cpu_us_per_msg"), 3)
        }
    return report


async def attacks(args: argparse.Namespace) -> Report:
    """One abusive client against every default limit (bench/attacks.py): what each attack costs."""
    from bench.attacks import attack_all

    report = Report("attacks: one client from 127.0.0.2, every limit at its default")
    report.rows = [
        {"server": "fennec-chat", "attack": name, **figures} for name, figures in (await attack_all()).items()
    ]
    return report


# --- Many idle connections (issue 15, part 4) -----------------------------------------------------
#
# Idle members from bench/crowd.py (bare asyncio clients that only answer pings, over several
# processes and loopback source addresses) in rooms of 50, beside a busy 100-client room at
# 500 msg/s. Limits that would refuse such a crowd, all lifted by chat_server() (LIMITS_OFF):
# --max-connections-per-ip 0 (and with it the cap on unfinished requests per address),
# --max-rooms 0 (2,000 rooms of 50) and --room-creation-rate 0 (one address opens them all).
# There is no cap on room size or on connections in all. The server keeps its keepalive
# (--ping-interval 20, --ping-timeout 20): the crowd must answer every ping to stay.

CROWD_HOLD = 60.0  # seconds the crowd is held after it connected, the busy room measured meanwhile


def worker_pids(server: Server) -> list[int]:
    """The processes that serve: uvicorn's workers (children of the supervisor), or the one."""
    assert server.process is not None
    return server_process.worker_pids(server.process.pid) or [server.process.pid]


def rss_of(pids: list[int]) -> int:
    """Resident bytes of these processes (those still alive)."""
    return sum(int(proc_fields(pid, "statm")[1]) * PAGE_SIZE for pid in pids if proc_fields(pid, "statm"))


def cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (those still alive)."""
    total = 0.0
    for pid in pids:
        if fields := proc_fields(pid, "stat"):
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def proc_fields(pid: int, name: str) -> list[str]:
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:  # gone: e.g. a worker uvicorn killed for missing its health check
        return []
    return text.rsplit(")", 1)[1].split() if name == "stat" else text.split()


def log_warnings(server: Server) -> dict[str, int]:
    """The server log's WARNING and ERROR lines, counted by their first words (numbers as N)."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    found = Counter(
        re.sub(r"[0-9a-f]*[0-9][0-9a-f]*", "N", " ".join(line.split()[:7]))
        for line in lines
        if line.startswith(("WARNING", "ERROR"))
    )
    return dict(found.most_common(12))


def get_health(server: Server) -> dict:
    with urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as response:
        return json.load(response)


async def checked_p99(server: Server, errors: list[str]) -> float | None:
    """room_p99, or None (and why in `errors`) if the busy room did not deliver."""
    try:
        return await room_p99(server)
    except Exception as error:  # a timeout, a refused handshake: part of the result
        errors.append(f"{type(error).__name__}: {error}"[:120])
        return None


async def crowd_beside_busy_room(
    args: argparse.Namespace, server: Server, twin: Server, count: int, processes: int, limit: float
) -> dict:
    """The busy room's p99 on `server` with `count` idle members held CROWD_HOLD seconds, against
    the same room on `twin`, the same server with nobody else, measured in alternation with it:
    other work on the machine then weighs on both alike. Before the crowd comes, both are measured
    empty (calibration: their ratio should be ~1). Counts at connect and after the hold."""
    errors: list[str] = []

    async def alternate(rounds: int, until: float = 0.0) -> tuple[list[float | None], list[float | None]]:
        ours: list[float | None] = []
        theirs: list[float | None] = []
        while len(ours) < rounds or time.monotonic() < until:
            pair = (server, twin) if len(ours) % 2 == 0 else (twin, server)
            for one in pair:
                (ours if one is server else theirs).append(await checked_p99(one, errors))
        return ours, theirs

    calibration, twin_before = await alternate(args.rounds)
    workers = worker_pids(server)
    rss_before, held_counts, health, replaced = rss_of(workers), {}, {}, []
    crowd = Crowd(server.url, count, processes)
    try:
        at_connect = await crowd.start()
        connected_at = time.monotonic()
        await asyncio.sleep(3)
        serving = worker_pids(server)  # uvicorn may have replaced some meanwhile
        rss_held = rss_of(serving)
        cpu_server, cpu_crowd = cpu_of(serving), cpu_of(crowd.pids())
        hold = 10.0 if args.quick else CROWD_HOLD
        crowded, twin_during = await alternate(args.rounds, until=connected_at + hold)
        held_seconds = time.monotonic() - connected_at
        cpu_server, cpu_crowd = cpu_of(serving) - cpu_server, cpu_of(crowd.pids()) - cpu_crowd
        replaced = sorted(set(workers) - set(worker_pids(server)))
        held_counts = await crowd.counts()
        health = await asyncio.to_thread(get_health, server)
    finally:
        final = await crowd.stop()

    def shown(values: list[float | None]) -> list[float | None]:
        return [None if value is None else round(value, 2) for value in values]

    def median(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known and len(known) == len(values) else None

    row = {
        "server": server.name,
        "connections": count,
        "workers": len(workers),
        "generator_processes": processes,
        "at_connect": at_connect,
        "after_hold": held_counts or final,
        "held_seconds": round(held_seconds, 1),
        "rss_mib_before": round(rss_before / 2**20),
        "rss_mib_held": round(rss_held / 2**20),
        "kib_per_connection": round((rss_held - rss_before) / max(1, at_connect["open"]) / 1024, 2),
        "server_cpu_share_while_held": round(cpu_server / held_seconds, 3),
        "generator_cpu_share_while_held": round(cpu_crowd / held_seconds, 3),
        "p99_ms_both_empty": {"server": shown(calibration), "twin": shown(twin_before)},
        "p99_ms_while_held": {"crowded": shown(crowded), "twin_empty": shown(twin_during)},
        "load_avg": round(os.getloadavg()[0], 2),  # the machine's: other work skews latency
        "busy_room_failures": errors,
        "workers_replaced_by_uvicorn": replaced,  # killed after missing its 5 s health check
        "server_log_warnings": log_warnings(server),
        "health_of_one_worker": {key: health.get(key) for key in ("connections", "rooms", "tasks", "status")},
    }
    crowded_p99, empty_p99 = median(crowded), median(twin_during)
    calibrated = median(calibration), median(twin_before)
    ratio = crowded_p99 / empty_p99 if crowded_p99 and empty_p99 else float("inf")
    held = row["after_hold"]["open"]
    row["summary"] = verdict(ratio, limit) | {
        "held_after_hold": held,
        "all_held": held == count,  # the latency verdict means little if the crowd was not held
        "p99_ms_empty_median": empty_p99 and round(empty_p99, 2),
        "p99_ms_crowded_median": crowded_p99 and round(crowded_p99, 2),
        "calibration_ratio_both_empty": round(calibrated[0] / calibrated[1], 3)
        if calibrated[0] and calibrated[1]
        else None,
    }
    return row


async def crowd_one_process(args: argparse.Namespace) -> Report:
    """(a) One process, as many idle connections as its 20,000 descriptors allow: 19,500 idle,
    the busy room's 100, and ~30 of its own (listener, SQLite, epoll, pipes)."""
    raise_file_limit()
    count = 2_000 if args.quick else 19_500
    server = chat_server(name="fennec-chat, 1 process")
    twin = chat_server(name="fennec-chat, 1 process, empty twin")
    try:
        started(server, twin)
        row = await crowd_beside_busy_room(args, server, twin, count, processes=2, limit=1.2)
    finally:
        stop([server, twin])
    summary = row.pop("summary")
    return Report(f"crowd: {count} idle connections on one process beside a 100-client room", [row], summary)


CROWD_WORKERS = 8  # 2 cores: more workers add no CPU, but each holds <= 20,000 descriptors, and
# 100,000 / 8 = 12,500 leaves room for uneven accepts (workers race for the shared listener).


async def crowd_workers(args: argparse.Namespace) -> Report:
    """(b) 100,000 idle connections on CROWD_WORKERS processes sharing one port and Redis; the busy
    room connects through the same port, so its members are spread over the workers. The empty
    twin is a second such cluster, on a Redis of its own."""
    raise_file_limit()
    from tests.redis_process import RedisProcess

    count = 8_000 if args.quick else 100_000
    redises = [RedisProcess(Path(tempfile.mkdtemp(prefix="crowd-redis-"))) for _ in range(2)]
    name = f"fennec-chat, {CROWD_WORKERS} workers + Redis"
    servers = [
        chat_server("--workers", str(CROWD_WORKERS), "--redis-url", redis.url, name=name + suffix)
        for redis, suffix in zip(redises, ("", ", empty twin"), strict=True)
    ]
    try:
        for redis, server in zip(redises, servers, strict=True):
            redis.start(persistent=False)
            server.start(timeout=60)
            for _ in range(120):
                if len(worker_pids(server)) >= CROWD_WORKERS:
                    break
                await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # every worker listening, not just the first
        processes = -(-count // 12_500)
        row = await crowd_beside_busy_room(args, servers[0], servers[1], count, processes, limit=1.5)
        main_redis = redises[0].process
        row["redis_rss_mib"] = round(rss_of([main_redis.pid]) / 2**20) if main_redis else None
    finally:
        stop(servers)
        for redis in redises:
            redis.stop()
    summary = row.pop("summary")
    title = f"crowd-workers: {count} idle connections on {name}, beside a 100-client room"
    return Report(title, [row], summary)


WORKLOADS: dict[str, Callable[[argparse.Namespace], Awaitable[Report]]] = {
    "fanout": fanout,
    "browser": browser_like,
    "metrics": metrics_cost,
    "latency": latency_workload,
    "memory": memory,
    "slow": slow_consumer,
    "churn": churn,
    "history": history_throughput,
    "redis": redis_scale,
    "cluster": cluster_scale,
    "attacks": attacks,
    "crowd": crowd_one_process,
    "crowd-workers": crowd_workers,
}


def print_table(report: Report) -> None:
    print(f"\n== {report.workload}")
    columns: list[str] = []
    for row in report.rows:
        columns += [key for key in row if key != "server" and key not in columns]
    print(f"  {'server':<30}" + "".join(f"{column:>22}" for column in columns))
    for row in report.rows:
        print(f"  {row['server']:<30}" + "".join(f"{row.get(column, '')!s:>22}" for column in columns))
    for key, value in report.summary.items():
        print(f"  {key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "workloads", nargs="*", metavar="workload", help=f"some of: {', '.join(WORKLOADS)} (default: all)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per workload")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="another checkout to compare with in fanout and latency (git worktree add DIR REV)",
    )
    parser.add_argument(
        "--cluster-rate",
        type=float,
        default=CLUSTER_RATE,
        help=f"messages a second in the cluster workload (default {CLUSTER_RATE}); two rates give the "
        "cost of one more message apart from what the processes spend anyway",
    )
    args = parser.parse_args()
    unknown = [name for name in args.workloads if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}")
    chosen = args.workloads or list(WORKLOADS)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine}")
    print(f"# {sys.executable} -m bench.run {' '.join(sys.argv[1:])}")
    lines = []
    for name in chosen:
        report = asyncio.run(WORKLOADS[name](args))
        print_table(report)
        lines += report.lines()
        sys.stdout.flush()
    print("\n# JSON, one line per server (and case) and one per summary")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
