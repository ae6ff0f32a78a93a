"""Attacks on the connections themselves: requests that never end or never stop, pings from a
peer that never reads, a peer that never answers pings, a watcher that never reads.

Each test plays the attacker from 127.0.0.2 (any 127.x address reaches a loopback server on
Linux) and checks that the server stays small and that 127.0.0.1 is still served."""

from __future__ import annotations

import asyncio
import socket
import time

from tests import raw_client
from tests.raw_client import PING, frame, open_descriptors, rss_bytes

ATTACKER = "127.0.0.2"
MiB = 1024 * 1024


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def test_a_request_head_that_never_ends_is_cut_off_with_408(start_server):
    server = start_server("--handshake-timeout", "1")
    sock = raw_client.connect(server.port, ATTACKER)
    sock.sendall(b"GET /ws/lobby HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    for number in range(100):  # a header every 50 ms, never the blank line that ends them
        try:
            sock.sendall(f"X-Slow-{number}: yes\r\n".encode())
        except OSError:
            break
        time.sleep(0.05)
    answer = raw_client.read_http_response(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 3
    server.assert_no_errors()


async def test_an_endless_request_head_is_refused_with_431_before_it_costs_memory(start_server):
    server = start_server()
    before = rss_bytes(server.process.pid)
    sock = raw_client.connect(server.port, ATTACKER)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    sent = 0
    line = b"X-Padding: " + b"a" * 8000 + b"\r\n"
    try:
        while sent < 100 * MiB:
            sock.sendall(line)
            sent += len(line)
    except OSError:  # refused and closed: what we want
        pass
    answer = raw_client.read_http_response(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert sent < 10 * MiB  # it stopped reading long before 100 MiB
    assert rss_bytes(server.process.pid) - before < 8 * MiB
    server.assert_no_errors()


async def test_half_sent_upgrade_requests_cannot_lock_out_other_addresses(start_server, room):
    server = start_server("--handshake-timeout", "2", "--max-connections-per-ip", "10", limits=True)
    descriptors = open_descriptors(server.process.pid)
    held = []
    for _ in range(40):  # the attacker tries to hold 40 unfinished upgrades
        sock = raw_client.connect(server.port, ATTACKER)
        sock.sendall(raw_client.upgrade_request(f"/ws/chat/{room}")[:40])
        held.append(sock)
    refused = [raw_client.read_http_response(sock, timeout=2) for sock in held[10:]]
    assert all(answer.startswith(b"HTTP/1.1 429") for answer in refused), refused[0]
    # Meanwhile everyone else gets in.
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    # The ten that were let in are cut off at the deadline, and their descriptors are free.
    timed_out = [raw_client.read_http_response(sock, timeout=5) for sock in held[:10]]
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in timed_out), timed_out[0]
    assert wait_until(lambda: open_descriptors(server.process.pid) <= descriptors + 2, timeout=5)
    await client.close()
    server.assert_no_errors()


async def test_a_ping_flood_from_a_peer_that_never_reads_is_closed_without_growing_the_server(
    start_server, room
):
    server = start_server()
    before = rss_bytes(server.process.pid)
    sock = raw_client.connect(server.port, ATTACKER, receive_buffer=4096)
    raw_client.handshake(sock, f"/ws/chat/{room}")
    ping = frame(PING, b"p" * 125) * 512  # 512 pings of the largest size, 67 KB a write
    sent = 0
    try:
        while sent < 200 * MiB:
            sock.sendall(ping)
            sent += len(ping)
    except OSError:  # the server gave up on us and reset the connection
        pass
    assert sent < 50 * MiB
    assert rss_bytes(server.process.pid) - before < 8 * MiB
    assert wait_until(lambda: server.health()["connections"] == 0, timeout=15)
    server.assert_no_errors()


async def test_a_ping_flood_from_a_peer_that_reads_is_closed_with_1008(server, room):
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    for _ in range(100):
        await client.ws.ping()
    code, reason = await client.close_code()
    assert (code, reason) == (1008, "flooding: too many pings")


def test_a_peer_that_never_answers_pings_is_closed_with_4408(start_server, room):
    server = start_server("--ping-interval", "0.3", "--ping-timeout", "0.5")
    sock = raw_client.connect(server.port)
    raw_client.handshake(sock, f"/ws/chat/{room}")
    code, reason = raw_client.read_until_close(sock, timeout=5)  # reads, but never answers a ping
    assert code == 4408
    assert reason == "keepalive timeout: no answer to a ping in 0.5 s"
    assert wait_until(lambda: server.health()["connections"] == 0, timeout=5)
    server.assert_no_errors()


async def test_lobby_watchers_that_never_read_are_dropped_before_they_hold_much(start_server):
    server = start_server("--outbox-bytes", "262144")
    # A room list worth sending: 100 rooms with long names.
    members = [
        await server.connect(f"/ws/chat/{'r' * 60}{number:03d}?username={'n' * 30}") for number in range(100)
    ]
    before = rss_bytes(server.process.pid)
    idle = [raw_client.connect(server.port, ATTACKER, receive_buffer=4096) for _ in range(4)]
    for sock in idle:  # each asks for the list thousands of times and reads none of it
        raw_client.handshake(sock, "/ws/lobby")
        for _ in range(20):
            sock.sendall(frame(raw_client.TEXT, b"?") * 200)
    assert await asyncio.to_thread(wait_until, lambda: server.health()["lobby_clients"] == 0, 20)
    assert rss_bytes(server.process.pid) - before < 16 * MiB
    for client in members:
        await client.close()
    for sock in idle:
        sock.close()
    server.assert_no_errors()


def test_a_new_connection_that_sends_nothing_is_closed_without_a_word(start_server):
    server = start_server("--handshake-timeout", "0.5")
    sock = raw_client.connect(server.port, ATTACKER)
    answer = raw_client.read_http_response(sock, timeout=5)
    assert answer == b""  # as a browser's spare connection would expect
    with socket.create_connection(("127.0.0.1", server.port)):
        pass  # still serving


def test_pings_and_a_close_frame_in_one_packet_end_quietly(start_server, room):
    server = start_server()
    sock = raw_client.connect(server.port, ATTACKER)
    raw_client.handshake(sock, f"/ws/chat/{room}")
    sock.sendall(frame(PING, b"x") * 30 + frame(raw_client.CLOSE, b"\x03\xe8"))
    raw_client.read_http_response(sock, timeout=5)  # whatever comes, until it closes
    assert wait_until(lambda: server.health()["connections"] == 0, timeout=5)
    server.assert_no_errors()


def test_an_origin_of_any_bytes_gets_a_reason_that_fits_a_close_frame(start_server, room):
    server = start_server()
    sock = raw_client.connect(server.port, ATTACKER)
    request = raw_client.upgrade_request(f"/ws/chat/{room}")
    sock.sendall(request[:-2] + b"Origin: http://" + b"\xe9" * 100 + b"\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    code, reason = raw_client.read_until_close(sock, timeout=5)
    assert code == 1008
    assert "is not allowed" in reason
    server.assert_no_errors()


async def test_an_event_bigger_than_the_outbox_byte_limit_still_reaches_a_reader(start_server, room):
    server = start_server("--outbox-bytes", "1000")
    writer = await server.connect(f"/ws/chat/{room}")
    await writer.joined()
    for number in range(5):
        await writer.send(type="message", message=f"{number} " + "y" * 1900)
        await writer.expect("message")
    reader = await server.connect(f"/ws/chat/{room}")
    await reader.joined()
    assert len(reader.history["messages"]) == 5  # one history event of about 10 KB
    for client in (writer, reader):
        await client.close()
