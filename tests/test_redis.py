"""Several server processes sharing rooms, presence, the lobby and history through a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.chat_client import ChatClient
from tests.redis_process import RedisProcess
from tests.server_process import ROOT, ServerProcess, free_port, worker_pids

ROOM_EVENTS = {"message", "typing", "username_changed", "user_joined", "user_left"}


@pytest.fixture
def two_servers(start_server, redis_backend):
    """Two chat processes on two ports, on one Redis and (a second run) on a Redis Cluster."""
    flags = (*redis_backend.flags, "--redis-heartbeat", "0.5")
    return start_server(*flags), start_server(*flags)


@pytest.fixture
def two_servers_on_one_redis(start_server, redis_server):
    """Two chat processes on one Redis, which the test stops and starts."""
    flags = ("--redis-url", redis_server.url, "--redis-heartbeat", "0.5")
    return start_server(*flags), start_server(*flags)


async def room_events(client: ChatClient, count: int, timeout: float = 10) -> list[tuple]:
    """The next `count` room events, as comparable tuples."""
    events: list[tuple] = []

    async def read() -> None:
        while len(events) < count:
            event = await client.next(timeout)
            if event["type"] in ROOM_EVENTS:
                events.append((event["type"], event["client_id"], event.get("message"), event.get("id")))

    await asyncio.wait_for(read(), timeout)
    return events


def health(server: ServerProcess) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.http_url + "/health", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


async def test_room_events_cross_both_ways_in_one_order(two_servers, room):
    one, two = two_servers
    watcher_one = await one.connect(f"/ws/chat/{room}?username=w1")
    await watcher_one.joined()
    # w1's user_joined is published after its presence is registered: a newcomer on the other
    # process in between sees w1 in presence and then joining (a known race, not this test's
    # subject). Its own message, published behind it on the same connection, says it is out.
    await watcher_one.send(type="message", message="w1 is here")
    await watcher_one.wait_for("message", message="w1 is here")
    watcher_two = await two.connect(f"/ws/chat/{room}?username=w2")
    await watcher_two.joined()
    await watcher_one.expect("user_joined", username="w2")

    alice = await one.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await two.connect(f"/ws/chat/{room}?username=bob")
    bob_id, presence = await bob.joined()
    assert sorted(user["username"] for user in presence["users"]) == ["alice", "bob", "w1", "w2"]

    async def alice_talks() -> None:
        for number in range(30):
            await alice.send(type="message", message=f"a{number}")

    async def bob_talks() -> None:
        await bob.send(type="typing")
        for number in range(30):
            await bob.send(type="message", message=f"b{number}")
            if number == 10:
                await bob.send(type="set_username", username="robert")

    await asyncio.gather(alice_talks(), bob_talks())
    await bob.close()
    # 2 joins, 60 messages, a typing notice, a rename, a leave: the same sequence on both sides.
    seen_one = await room_events(watcher_one, 65)
    seen_two = await room_events(watcher_two, 65)
    assert seen_one == seen_two
    messages = [event for event in seen_one if event[0] == "message"]
    assert [event[3] for event in messages] == list(range(2, 62))  # one id sequence for both
    assert ("user_left", bob_id, "robert left the room", None) in seen_one
    assert [m[2] for m in messages if m[2].startswith("a")] == [f"a{n}" for n in range(30)]
    for client in (watcher_one, watcher_two, alice):
        await client.close()


async def test_typing_is_not_echoed_across_processes_either(two_servers, room):
    one, two = two_servers
    alice = await one.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    await alice.send(type="message", message="alice is here")  # published behind her arrival
    await alice.wait_for("message", message="alice is here")
    bob = await two.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()
    await alice.expect("user_joined")
    await bob.send(type="typing")
    await alice.expect("typing", username="bob")
    await bob.expect_silence()
    await alice.close()
    await bob.close()


async def test_presence_and_the_lobby_count_both_processes(two_servers, room):
    one, two = two_servers
    members = [await one.connect(f"/ws/chat/{room}?username=one-{n}") for n in range(2)]
    members += [await two.connect(f"/ws/chat/{room}?username=two-{n}") for n in range(3)]
    for member in members:
        await member.joined()
    lobby = await one.connect("/ws/lobby")
    everyone = {"users": 5, "usernames": ["one-0", "one-1", "two-0", "two-1", "two-2"]}

    async def until_five() -> None:  # the other process's joins may still be on their way
        while (await lobby.expect("rooms_update"))["rooms"].get(room) != everyone:
            pass

    await asyncio.wait_for(until_five(), 5)
    await members[-1].close()  # a leave on the other process is pushed to this lobby

    async def until_four() -> None:
        while (await lobby.expect("rooms_update"))["rooms"].get(room, {}).get("users") != 4:
            pass

    await asyncio.wait_for(until_four(), 5)
    for member in members[:-1]:
        await member.close()
    await lobby.close()


async def test_the_users_of_a_killed_process_leave_within_30_seconds(start_server, redis_backend, room):
    flags = (*redis_backend.flags, "--redis-heartbeat", "2")
    survivor, doomed = start_server(*flags), start_server(*flags)
    watcher = await survivor.connect(f"/ws/chat/{room}?username=watcher")
    await watcher.joined()
    victims = []
    for name in ("v1", "v2"):
        victim = await doomed.connect(f"/ws/chat/{room}?username={name}")
        await victim.joined()
        victims.append(victim)
    await watcher.wait_for("user_joined", username="v2")

    doomed.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    left = {(await watcher.wait_for("user_left", timeout=30))["username"] for _ in victims}
    assert left == {"v1", "v2"}
    assert time.monotonic() - killed_at < 30
    await watcher.expect_silence(1)  # each of them left exactly once

    newcomer = await survivor.connect(f"/ws/chat/{room}?username=new")
    _, presence = await newcomer.joined()
    assert sorted(user["username"] for user in presence["users"]) == ["new", "watcher"]
    await watcher.close()
    await newcomer.close()


async def test_a_process_taken_for_dead_after_a_long_pause_lists_its_members_again(two_servers, room):
    """A process stalled for longer than three heartbeats (an overloaded machine) is reaped by
    the others: its members' rooms hear them leave. When it resumes, it finds its heartbeat
    expired and its members gone, lists them again and their rooms hear them join; their
    sockets never closed."""
    one, two = two_servers
    watcher = await one.connect(f"/ws/chat/{room}?username=watcher")
    await watcher.joined()
    stalled = await two.connect(f"/ws/chat/{room}?username=stalled")
    stalled_id, _ = await stalled.joined()
    await watcher.wait_for("user_joined", username="stalled")

    two.process.send_signal(signal.SIGSTOP)
    try:
        await watcher.wait_for("user_left", username="stalled", timeout=10)
    finally:
        two.process.send_signal(signal.SIGCONT)

    async def listed_again() -> None:
        while True:
            newcomer = await one.connect(f"/ws/chat/{room}?username=newcomer")
            _, presence = await newcomer.joined()
            await newcomer.close()
            if "stalled" in [user["username"] for user in presence["users"]]:
                return
            await asyncio.sleep(0.2)

    await asyncio.wait_for(listed_again(), 10)
    back = await watcher.wait_for("user_joined", username="stalled", timeout=10)  # it heard the leave
    assert "took it for dead" in two.log()
    await stalled.send(type="message", message="still here")
    assert (await watcher.wait_for("message"))["message"] == "still here"
    assert back["client_id"] == stalled_id
    await watcher.close()
    await stalled.close()


async def test_resume_works_on_the_other_process(two_servers, room):
    one, two = two_servers
    reader = await one.connect(f"/ws/chat/{room}")
    await reader.joined()
    writer = await two.connect(f"/ws/chat/{room}")
    await writer.joined()
    await writer.send(type="message", message="seen")
    seen = await reader.wait_for("message")
    await reader.close()
    for text in ("missed 1", "missed 2"):
        await writer.send(type="message", message=text)
    await writer.wait_for("message", message="missed 2")

    back = await two.connect(f"/ws/chat/{room}?since={seen['id']}&epoch={reader.history['epoch']}")
    await back.joined()
    assert [m["message"] for m in back.history["messages"]] == ["missed 1", "missed 2"]
    assert back.history["reset"] is False
    await writer.send(type="message", message="live")
    await back.wait_for("message", message="live")
    await writer.close()
    await back.close()


async def test_a_resend_to_the_other_process_is_still_exactly_once(two_servers, room):
    one, two = two_servers
    bystander = await one.connect(f"/ws/chat/{room}")
    await bystander.joined()
    session = "tab-0123456789abcdef"
    sender = await one.connect(f"/ws/chat/{room}?session={session}")
    await sender.joined()
    await sender.send(type="message", message="once", client_msg_id="m-1")
    original = await sender.wait_for("message")
    assert await bystander.wait_for("message") == original
    await sender.abort()
    epoch = sender.history["epoch"]
    again = await two.connect(f"/ws/chat/{room}?session={session}&since={original['id']}&epoch={epoch}")
    await again.joined()
    await again.send(type="message", message="once", client_msg_id="m-1")
    assert await again.expect("message") == original
    await bystander.wait_for("user_back")  # the same tab, back on the other process: not a leave
    await bystander.expect_silence(0.5)
    await bystander.close()
    await again.close()


async def test_redis_going_away_and_coming_back(two_servers_on_one_redis, redis_server, room):
    one, two = two_servers_on_one_redis
    alice = await one.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await two.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()
    await alice.send(type="message", message="before")
    first = await bob.wait_for("message")

    redis_server.stop()
    for client in (alice, bob):
        await client.wait_for("error", code="backplane_unavailable")
    status, body = health(one)
    assert (status, body["status"], body["backplane"]["connected"]) == (503, "degraded", False)
    await alice.send(type="message", message="during", client_msg_id="d-1")
    refused = await alice.wait_for("error", code="backplane_unavailable")
    assert refused["client_msg_id"] == "d-1"  # the sender knows exactly what to send again

    redis_server.start()
    for client in (alice, bob):  # a fresh view of the room once the backplane is back
        await client.wait_for("presence", timeout=20)
    assert health(one)[0] == health(two)[0] == 200
    await alice.send(type="message", message="during", client_msg_id="d-1")
    after = await bob.wait_for("message", message="during")
    assert after["id"] == first["id"] + 1  # the same history goes on
    assert one.process.poll() is None  # neither server died
    assert two.process.poll() is None
    await alice.close()
    await bob.close()
    one.assert_no_errors_but("lost Redis")


async def test_a_wiped_redis_resets_the_clients_history(
    two_servers_on_one_redis, redis_server, tmp_path, room
):
    one, _ = two_servers_on_one_redis
    alice = await one.connect(f"/ws/chat/{room}")
    await alice.joined()
    await alice.send(type="message", message="soon forgotten")
    await alice.wait_for("message")
    redis_server.stop()
    await alice.wait_for("error", code="backplane_unavailable")
    for leftover in redis_server.directory.iterdir():  # the data is gone
        if leftover.is_dir():
            for part in leftover.iterdir():
                part.unlink()
        else:
            leftover.unlink()
    redis_server.start()
    reset = await alice.wait_for("history", timeout=20)
    assert reset["reset"] is True
    assert reset["messages"] == []
    assert reset["epoch"] != alice.history["epoch"]
    await alice.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_redis_down_at_start_is_a_clear_failure(scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "server.py", "--port", "0", "--redis-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "cannot reach Redis" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_workers_without_redis_are_refused():
    result = subprocess.run(
        [sys.executable, "server.py", "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--workers needs --redis-url" in result.stderr


async def test_workers_share_rooms_through_redis(start_server, redis_backend, room):
    server = start_server("--workers", "2", *redis_backend.flags)
    members = redis_backend.client()

    def workers_in_room() -> set[str]:
        return {
            json.loads(member)["process"]
            for member in members.hgetall(redis_backend.key(room, "members")).values()
        }

    # The kernel hands each connection to one worker or the other; connect until both have some.
    clients: list[ChatClient] = []
    while len(workers_in_room()) < 2:
        assert len(clients) < 300, "every connection went to the same worker"
        batch = await asyncio.gather(*(server.connect(f"/ws/chat/{room}") for _ in range(10)))
        for client in batch:
            await client.joined()
        clients += batch
    await clients[0].send(type="message", message="to every worker")
    for client in clients:
        await client.wait_for("message", message="to every worker")
    for client in clients:
        await client.close()


async def test_a_worker_that_dies_is_replaced_and_the_log_says_so(start_server, redis_server, room):
    """uvicorn replaces a dead worker (and, after 30 s without an answer, a hung one) and says so
    only at info level; an operator running at --log-level warning still hears of it."""
    server = start_server("--workers", "2", "--redis-url", redis_server.url)
    workers = worker_pids(server.process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)

    async def replaced() -> None:
        while f"worker {workers[0]} died or stopped answering: replaced" not in server.log():  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    await asyncio.wait_for(replaced(), 10)
    member = await server.connect(f"/ws/chat/{room}?username=after")  # still serving
    await member.joined()
    await member.close()


async def test_an_admin_can_kick_someone_on_the_other_process(start_server, redis_backend, room):
    from fennec_chat.gate import Tokens

    secret = {"CHAT_JWT_SECRET": "redis-kick-secret"}
    flags = (*redis_backend.flags, "--redis-heartbeat", "0.5")
    one, two = start_server(*flags, env=secret), start_server(*flags, env=secret)
    tokens = Tokens("redis-kick-secret")
    admin = await one.connect(f"/ws/chat/{room}?token={tokens.mint('mod', admin=True)}")
    await admin.joined()
    target = await two.connect(f"/ws/chat/{room}?token={tokens.mint('troll')}")
    target_id, _ = await target.joined()
    await admin.wait_for("user_joined", username="troll")
    await admin.send(type="kick", client_id=target_id)
    assert (await admin.wait_for("system"))["message"] == "troll was removed from the room by mod"
    await admin.wait_for("user_left", client_id=target_id)
    assert await target.close_code() == (4001, "kicked")
    await admin.close()


async def test_a_rooms_history_keys_expire_after_history_days(start_server, redis_backend, room):
    server = start_server(*redis_backend.flags, "--history-days", "1")
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="message", message="kept a day")
    await client.expect("message")
    visitor = await server.connect(f"/ws/chat/{room}-visited")
    await visitor.joined()
    store = redis_backend.client()
    day = 86_400_000
    for what in ("stream", "last_id", "epoch"):
        assert day - 60_000 < store.pttl(redis_backend.key(room, what)) <= day
    assert (
        day - 60_000 < store.pttl(redis_backend.key(f"{room}-visited", "epoch")) <= day
    )  # a visit expires too
    for connected in (client, visitor):
        await connected.close()


async def test_the_lobby_of_two_processes_lists_the_busiest_rooms_of_both(two_servers, room):
    one, two = two_servers
    here = [await one.connect(f"/ws/chat/{room}-both") for _ in range(2)]
    there = [await two.connect(f"/ws/chat/{room}-both"), await two.connect(f"/ws/chat/{room}-two")]
    for client in [*here, *there]:
        await client.joined()
    lobby = await one.connect("/ws/lobby")
    deadline = time.monotonic() + 5
    while True:
        event = await lobby.wait_for("rooms_update")
        if event["rooms"].get(f"{room}-both", {}).get("users") == 3 and f"{room}-two" in event["rooms"]:
            break
        assert time.monotonic() < deadline, event
        await lobby.send_raw("again")
    assert event["total_rooms"] >= 2
    for client in [*here, *there, lobby]:
        await client.close()


async def test_a_redis_back_with_older_data_starts_the_rooms_history_over(start_server, tmp_path, room):
    """Redis restarted from a snapshot older than what it acknowledged (no AOF, a lagging
    replica): the same epoch, but ids a client has seen are about to be given again. The room
    gets a new epoch, and its members a `history` with `reset: true`, never an old id with new
    words."""
    snapshotting = RedisProcess(tmp_path / "redis").start(persistent=False)
    try:
        server = start_server("--redis-url", snapshotting.url, "--redis-heartbeat", "0.5")
        alice = await server.connect(f"/ws/chat/{room}?username=alice")
        await alice.joined()
        epoch = alice.history["epoch"]
        for number in range(1, 6):
            await alice.send(type="message", message=f"m{number}")
            assert (await alice.wait_for("message"))["id"] == number
            if number == 3:
                snapshotting.client().save()  # what Redis will come back with: ids 1..3
        snapshotting.process.send_signal(signal.SIGKILL)
        snapshotting.process.wait()
        await alice.wait_for("error", code="backplane_unavailable")
        snapshotting.start(persistent=False)
        fresh = await alice.wait_for("history", timeout=20)
        assert fresh["reset"] is True
        assert fresh["epoch"] != epoch
        assert [m["message"] for m in fresh["messages"]] == ["m1", "m2", "m3"]
        await alice.send(type="message", message="after")
        assert (await alice.wait_for("message", message="after"))["id"] == 4  # in the new epoch
        late = await server.connect(f"/ws/chat/{room}?username=late&since=5&epoch={epoch}")
        await late.joined()
        assert late.history["reset"] is True
        server.assert_no_errors_but("lost Redis", "lost the newest messages")
        for client in (alice, late):
            await client.close()
    finally:
        snapshotting.stop()
