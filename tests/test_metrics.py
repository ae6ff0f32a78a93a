"""Prometheus metrics (--metrics-port): scraped from a real server after a known workload, on
a listener of their own; with --workers, one scrape counts every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chat_client import ChatClient
from tests.server_process import ServerProcess, free_port, worker_pids
from tests.test_cli import assert_one_line_failure, run_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample the metrics listener serves: (name, labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def until(port: int, check: Callable[[Samples], bool], timeout: float = 10) -> Samples:
    """Scrape until `check` holds (gauges and counters of other processes catch up)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.1)


async def everything(client: ChatClient, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Every event that reaches `client` until it goes quiet."""
    events = []
    while True:
        try:
            events.append(await client.next(timeout=quiet))
        except asyncio.TimeoutError:
            return events


@pytest.fixture
def with_metrics(start_server) -> Callable[..., tuple[ServerProcess, int]]:
    def start(*flags: str, limits: bool = False) -> tuple[ServerProcess, int]:
        port = free_port()
        return start_server("--metrics-port", str(port), *flags, limits=limits), port

    return start


async def test_a_known_workload_is_counted_exactly(with_metrics, room):
    server, port = with_metrics()
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    received = await everything(alice) + await everything(bob)
    for number in range(5):
        await alice.send(type="message", message=f"hello {number}", client_msg_id=f"m{number}")
    await alice.send(type="message", message="hello 0", client_msg_id="m0")  # a resend: not a new message
    received += await everything(alice) + await everything(bob)
    await bob.close()
    received += await everything(alice)  # bob's user_left

    samples = await until(port, lambda s: value(s, "fennec_chat_rooms") == 1)
    assert value(samples, "fennec_chat_messages_total") == 5
    assert value(samples, "fennec_chat_deliveries_total") == len(received)
    assert value(samples, "fennec_chat_connections", endpoint="chat") == 1
    assert value(samples, "fennec_chat_closes_total", code="1000") == 1
    assert value(samples, "fennec_chat_rooms") == 1
    # Timed once per transaction: one per turn of the event loop that stored something.
    assert 1 <= value(samples, "fennec_chat_history_commit_seconds_count") <= 6
    assert value(samples, "fennec_chat_history_commit_seconds_sum") > 0
    # Room events: two user_joined, five messages, one user_left (a resend goes to its sender alone).
    assert value(samples, "fennec_chat_broadcast_seconds_count") == 8
    assert value(samples, "fennec_chat_backplane_up") == 1
    assert value(samples, "fennec_chat_outbox_overflows_total") == 0
    await alice.close()
    samples = await until(port, lambda s: value(s, "fennec_chat_rooms") == 0)
    assert value(samples, "fennec_chat_connections", endpoint="chat") == 0
    assert value(samples, "fennec_chat_rooms") == 0


async def test_refusals_closes_and_rate_limits_are_counted_by_code(with_metrics, room):
    server, port = with_metrics(limits=True)  # the production limits
    refused = await server.connect("/ws/chat/" + "x" * 100)  # a room name longer than 64
    assert (await refused.close_code())[0] == 1008
    lobby = await server.connect("/ws/lobby")
    await lobby.expect("rooms_update")
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    for number in range(15):  # past the burst of messages, short of being closed for flooding
        await alice.send(type="message", message=f"flood {number}")
    answers = await everything(alice)
    warnings = [event for event in answers if event.get("code") == "rate_limited"]
    assert warnings, answers
    await alice.send_raw("x" * (70 * 1024))  # past --max-frame-bytes (64 KiB)
    assert (await alice.close_code())[0] == 1009

    samples = await until(port, lambda s: value(s, "fennec_chat_closes_total", code="1009") == 1)
    assert value(samples, "fennec_chat_refusals_total", code="1008") == 1
    assert value(samples, "fennec_chat_rate_limited_total", limit="messages") == len(warnings)
    assert value(samples, "fennec_chat_closes_total", code="1009") == 1
    assert value(samples, "fennec_chat_connections", endpoint="lobby") == 1
    assert value(samples, "fennec_chat_connections", endpoint="chat") == 0
    await lobby.close()


async def test_resumes_are_counted_by_outcome(with_metrics, room):
    server, port = with_metrics()
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    epoch = alice.history["epoch"]
    for number in range(3):
        await alice.send(type="message", message=f"before {number}")
        await alice.wait_for("message", message=f"before {number}")
    for query, outcome in [(f"since=1&epoch={epoch}", "exact"), ("since=1&epoch=another", "reset")]:
        bob = await server.connect(f"/ws/chat/{room}?username=bob&{query}")
        await bob.joined()
        assert bob.history.get("reset", False) == (outcome == "reset")
        await bob.close()
    samples = scrape(port)
    assert value(samples, "fennec_chat_resumes_total", outcome="exact") == 1
    assert value(samples, "fennec_chat_resumes_total", outcome="reset") == 1
    await alice.close()


async def test_one_scrape_counts_every_worker_and_forgets_a_dead_ones_connections(
    with_metrics, redis_server, room
):
    server, port = with_metrics("--workers", "2", "--redis-url", redis_server.url)
    workers = worker_pids(server.process.pid)
    assert len(workers) == 2, workers

    def serving() -> dict[int, int]:  # each worker's open connections, from /proc
        return {worker: len(connections_of(worker, server.port)) for worker in workers}

    clients, paused = [], None
    try:
        for number in range(8):
            if number == 4 and 0 in serving().values():
                # The workers race for the shared listener, and one may win every time: pause
                # it, so that the other accepts the rest (a moment, far below the heartbeat's
                # expiry).
                paused = max(serving().items(), key=lambda item: item[1])[0]
                os.kill(paused, signal.SIGSTOP)
            clients.append(await server.connect(f"/ws/chat/{room}?username=u{number}"))
    finally:
        if paused is not None:
            os.kill(paused, signal.SIGCONT)
    for client in clients:
        await client.joined()
    assert all(serving().values()), serving()  # both workers have some
    for number, client in enumerate(clients):
        await client.send(type="message", message=f"from u{number}")
    samples = await until(port, lambda s: value(s, "fennec_chat_messages_total") == 8)
    assert value(samples, "fennec_chat_messages_total") == 8
    assert value(samples, "fennec_chat_connections", endpoint="chat") == 8
    assert value(samples, "fennec_chat_deliveries_total") >= 8 * 8

    dead, lost = next(iter(serving().items()))
    os.kill(dead, signal.SIGKILL)
    samples = await until(port, lambda s: value(s, "fennec_chat_connections", endpoint="chat") == 8 - lost)
    assert value(samples, "fennec_chat_connections", endpoint="chat") == 8 - lost
    assert value(samples, "fennec_chat_messages_total") == 8  # a dead worker's counts still count


def connections_of(pid: int, port: int) -> list[str]:
    """The established TCP connections process `pid` accepted on `port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
            if local_port == port and state == "01" and inode in inodes:  # 01: ESTABLISHED
                found.append(inode)
    return found


async def test_backplane_up_follows_redis(with_metrics, redis_server, room):
    server, port = with_metrics("--redis-url", redis_server.url, "--redis-heartbeat", "0.5")
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    assert value(scrape(port), "fennec_chat_backplane_up") == 1
    redis_server.stop()
    await alice.wait_for("error", code="backplane_unavailable")
    assert value(scrape(port), "fennec_chat_backplane_up") == 0
    redis_server.start()
    samples = await until(port, lambda s: value(s, "fennec_chat_backplane_up") == 1, timeout=20)
    assert value(samples, "fennec_chat_backplane_up") == 1
    assert value(samples, "fennec_chat_backplane_publish_seconds_count") > 0
    await alice.close()


def test_metrics_are_not_served_on_the_chat_port(with_metrics):
    server, port = with_metrics()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5)
    assert refused.value.code == 404
    assert "fennec_chat_rooms" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert listening_addresses(port) == ["127.0.0.1"]  # loopback unless --metrics-host says otherwise


def listening_addresses(port: int) -> list[str]:
    """The IPv4 addresses something listens on at `port` (from /proc/net/tcp)."""
    found = []
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            address, local_port = fields[1].split(":")
            if int(local_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_a_metrics_port_in_use_is_one_line_and_exit_1(server, tmp_path):
    result = run_server("--port", "0", "--metrics-port", str(server.port), "--db", str(tmp_path / "chat.db"))
    assert_one_line_failure(result, f"127.0.0.1:{server.port}", "--metrics-port", "address already in use")
