"""Limits that belong to the sender: a second socket, or a reconnect, must not reset them."""

from __future__ import annotations

import asyncio
import json
import urllib.error

from websockets.exceptions import ConnectionClosed

from tests.chat_client import ChatClient
from tests.server_process import ServerProcess
from tests.test_security import SECRET, mint


async def count_answers(client: ChatClient, expected: int) -> dict[str, int]:
    """Read `expected` answers (messages or errors) and count them by kind."""
    counts: dict[str, int] = {}
    while sum(counts.values()) < expected:
        event = await client.next(timeout=10)
        if event["type"] in ("message", "error"):
            kind = event["type"] if event["type"] == "message" else event["code"]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


async def test_twenty_sockets_from_one_address_share_its_message_budget(start_server, room):
    server = start_server("--rate-messages-per-address", "10", "--flood-warnings", "0", limits=True)
    senders = [await server.connect(f"/ws/chat/{room}-{number}") for number in range(20)]
    for sender in senders:
        await sender.joined()
    # Each socket could send 10 at once on its own; together they get the address's 20.
    for sender in senders:
        for number in range(5):
            await sender.send(type="message", message=f"burst {number}")
    counts = [await count_answers(sender, 5) for sender in senders]
    accepted = sum(count.get("message", 0) for count in counts)
    refused = sum(count.get("rate_limited", 0) for count in counts)
    assert accepted + refused == 100
    assert 20 <= accepted <= 25  # the burst, and what trickled in meanwhile
    for sender in senders:
        await sender.close()


async def test_a_token_user_has_one_message_budget_across_sockets(start_server, room):
    server = start_server(env={"CHAT_JWT_SECRET": SECRET}, limits=True)
    token = mint("alice")
    first = await server.connect(f"/ws/chat/{room}?token={token}")
    await first.joined()
    for number in range(10):  # the whole burst
        await first.send(type="message", message=f"m{number}")
    assert (await count_answers(first, 10)) == {"message": 10}
    second = await server.connect(f"/ws/chat/{room}?token={token}")
    await second.joined()
    await second.send(type="message", message="one more", client_msg_id="x1")
    refusal = await second.wait_for("error")
    assert (refusal["code"], refusal["client_msg_id"]) == ("rate_limited", "x1")
    for client in (first, second):
        await client.close()


async def test_a_flood_of_frames_that_are_not_messages_ends_in_1008(start_server, room):
    server = start_server(limits=True)
    flooder = await server.connect(f"/ws/chat/{room}")
    await flooder.joined()
    bystander = await server.connect(f"/ws/chat/{room}")
    await bystander.joined()
    junk = [
        "{not json",
        json.dumps({"type": "bogus"}),
        json.dumps({"type": "typing"}),
        json.dumps({"type": "kick"}),
    ]
    for number in range(400):
        try:
            await flooder.send_raw(junk[number % len(junk)])
        except ConnectionClosed:  # closed under us: what we want
            break
    code, reason = await flooder.close_code()
    assert (code, reason) == (1008, "flooding: too many frames")
    await bystander.send(type="message", message="still fine")
    await bystander.wait_for("message", message="still fine")
    await bystander.close()
    server.assert_no_errors()


async def test_padding_in_a_known_command_is_refused(server, room):
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="typing", padding="x" * 20_000)
    error = await client.expect("error", code="invalid_event")
    assert "at most" in error["message"]
    await client.send_raw('{"type": "typing"' + " " * 20_000 + "}")  # whitespace is padding too
    await client.expect("error", code="invalid_event")
    await client.send(type="message", message="small extras are fine", room="ignored")
    await client.expect("message", message="small extras are fine")
    await client.close()


async def test_frames_that_are_not_commands_cost_their_size(start_server, room):
    server = start_server("--rate-frames", "10", "--flood-warnings", "50", limits=True)
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send_raw("[" * 30_000)  # bad JSON worth 29 frames
    await client.expect("error", code="invalid_json")
    await client.send(type="message", message="next")
    refusal = await client.expect("error", code="rate_limited")
    assert "too many frames" in refusal["message"]
    assert refusal["retry_after"] > 1
    await client.close()


async def test_the_per_address_cap_holds_across_processes(start_server, redis_backend, room):
    flags = (*redis_backend.flags, "--redis-heartbeat", "0.5", "--max-connections-per-ip", "3")
    one, two = start_server(*flags, limits=True), start_server(*flags, limits=True)
    clients = [await one.connect(f"/ws/chat/{room}"), await two.connect(f"/ws/chat/{room}")]
    clients.append(await two.connect("/ws/lobby"))
    for client in clients[:2]:
        await client.joined()
    await clients[2].expect("rooms_update")
    for server in (one, two):
        extra = await server.connect(f"/ws/chat/{room}")
        code, reason = await extra.close_code()
        assert (code, reason) == (1013, "too many connections from your address (at most 3)")
    await clients[0].close()
    await asyncio.sleep(0.3)  # the seat is given back through Redis
    again = await two.connect(f"/ws/chat/{room}")
    await again.joined()
    for client in [*clients[1:], again]:
        await client.close()


async def test_a_killed_process_gives_its_seats_back(start_server, redis_backend, room):
    flags = (*redis_backend.flags, "--redis-heartbeat", "0.3", "--max-connections-per-ip", "2")
    one, two = start_server(*flags, limits=True), start_server(*flags, limits=True)
    held = [await one.connect(f"/ws/chat/{room}") for _ in range(2)]
    for client in held:
        await client.joined()
    refused = await two.connect(f"/ws/chat/{room}")
    assert (await refused.close_code())[0] == 1013
    one.process.kill()
    one.process.wait()

    async def admitted() -> bool:
        client = await two.connect(f"/ws/chat/{room}")
        try:
            await client.expect("system")
        except ConnectionClosed:
            return False
        await client.close()
        return True

    for _ in range(40):  # within three heartbeats and a reap
        if await admitted():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the dead process's seats were never given back")


async def first_connected(server: ServerProcess, timeout: float = 20) -> None:
    """Wait until /health says the backplane is back (it answers 503 until then)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if server.health()["backplane"]["connected"]:
                return
        except urllib.error.HTTPError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "Redis never came back"
        await asyncio.sleep(0.1)


async def test_a_seat_given_back_while_redis_was_away_is_not_counted_when_it_returns(
    start_server, redis_server, room
):
    flags = ("--redis-url", redis_server.url, "--redis-heartbeat", "0.3", "--max-connections-per-ip", "1")
    server = start_server(*flags, limits=True)
    first = await server.connect(f"/ws/chat/{room}")
    await first.joined()
    redis_server.stop()  # keeps its data: the seat is still counted there
    await first.wait_for("error", code="backplane_unavailable")
    await first.close()  # its release cannot reach Redis
    redis_server.start()
    await first_connected(server)
    second = await server.connect(f"/ws/chat/{room}")
    await second.joined()  # the server said anew what it holds: nothing
    await second.close()
    server.assert_no_errors_but("lost Redis")


def test_a_users_budget_stays_shared_when_the_ledger_forgets_full_buckets():
    from fennec_chat.limits import Ledger, RateLimits, Sender
    from fennec_chat.protocol import SendMessage
    from fennec_chat.settings import Settings

    ledger, settings = Ledger(), Settings()
    first = RateLimits(settings, ledger, Sender("10.0.0.1", user="alice"))
    ledger.sweep()  # every bucket is full: all are forgotten
    second = RateLimits(settings, ledger, Sender("10.0.0.2", user="alice"))
    frame = {"type": "websocket.receive", "text": '{"type": "send_message", "text": "hi"}'}
    for _ in range(10):
        assert first.check(SendMessage("hi"), frame) == SendMessage("hi")
    assert second.check(SendMessage("hi"), frame).code == "rate_limited"
