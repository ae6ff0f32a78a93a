"""Rooms on a real Redis Cluster surviving its faults: a master failing over to its replica, and a
room's slot moving to another shard, while people talk. (The Redis test suite itself runs on a
cluster too: the `redis_backend` fixture, tests/conftest.py.)"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
from collections import Counter

from fennec_chat.redis_scripts import RedisKeys
from tests.chat_client import ChatClient
from tests.redis_cluster import RedisCluster

MESSAGES = 60
NO_LIMITS = ("--rate-messages", "0", "--rate-messages-per-address", "0", "--rate-frames", "0")


def flags(cluster: RedisCluster, room: str) -> tuple[str, ...]:
    # A prefix of the test's own on a shared cluster; three heartbeats (6 s) outlast a failover
    # (2-3 s): nobody is taken for dead meanwhile.
    prefix = ("--redis-prefix", prefix_of(room))
    return ("--redis-url", cluster.url, *prefix, "--redis-heartbeat", "2", *NO_LIMITS)


def prefix_of(room: str) -> str:
    return f"{room[-8:]}:"


def events_channel(room: str) -> str:
    return RedisKeys(prefix_of(room), cluster=True).room(room, "events")


class Talk:
    """A sender on one process that behaves as the page does (a client_msg_id on every message,
    pending until its copy comes back, sent again after `backplane_unavailable`) and a reader
    on the other process. Every error either of them gets is kept."""

    def __init__(self, sender: ChatClient, reader: ChatClient) -> None:
        self.sender, self.reader = sender, reader
        self.pending: dict[str, str] = {}
        self.received: list[tuple[int, str]] = []  # (id, text), as the reader got them
        self.errors: Counter[str] = Counter()

    async def send_all(self) -> None:
        resend = asyncio.create_task(self._resend_forever())
        echoes = asyncio.create_task(self._echoes())
        try:
            for number in range(MESSAGES):
                self.pending[f"m-{number}"] = f"message {number}"
                await self.sender.send(
                    type="message", message=f"message {number}", client_msg_id=f"m-{number}"
                )
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 30
            while self.pending and time.monotonic() < deadline:  # noqa: ASYNC110 (echoes and resends run)
                await asyncio.sleep(0.1)
        finally:
            resend.cancel()
            echoes.cancel()

    async def _echoes(self) -> None:
        while True:
            event = await self.sender.next(30)
            if event["type"] == "message" and event.get("client_msg_id"):
                self.pending.pop(event["client_msg_id"], None)
            elif event["type"] == "error":
                self.errors[event["code"]] += 1

    async def _resend_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for client_msg_id, text in list(self.pending.items())[:10]:
                await self.sender.send(type="message", message=text, client_msg_id=client_msg_id)

    async def read_all(self) -> None:
        while len({text for _, text in self.received}) < MESSAGES:
            event = await self.reader.next(30)
            if event["type"] == "message":
                self.received.append((event["id"], event["message"]))
            elif event["type"] == "error":
                self.errors[event["code"]] += 1

    def assert_nothing_lost_nothing_twice(self) -> None:
        assert not self.pending, f"never confirmed: {sorted(self.pending)}"
        ids = [message_id for message_id, _ in self.received]
        texts = [text for _, text in self.received]
        assert sorted(texts) == sorted(f"message {n}" for n in range(MESSAGES)), Counter(texts).most_common(3)
        assert ids == list(range(ids[0], ids[0] + MESSAGES)), ids  # one copy each, in order, no gap
        assert set(self.errors) <= {"backplane_unavailable"}, self.errors


def connected(server) -> bool:
    try:
        return server.health()["backplane"]["connected"]
    except urllib.error.HTTPError:  # 503 while degraded
        return False


async def talk_through(start_server, cluster: RedisCluster, room: str, fault) -> Talk:
    one, two = start_server(*flags(cluster, room)), start_server(*flags(cluster, room))
    sender = await one.connect(f"/ws/chat/{room}?username=sender")
    await sender.joined()
    reader = await two.connect(f"/ws/chat/{room}?username=reader")
    await reader.joined()
    await sender.wait_for("user_joined", username="reader")
    talk = Talk(sender, reader)
    sending = asyncio.create_task(talk.send_all())
    reading = asyncio.create_task(talk.read_all())
    await asyncio.sleep(1.0)  # a third of the messages before the fault, the rest during and after
    started = time.monotonic()
    await asyncio.to_thread(fault)
    over = time.monotonic() - started
    while not all(map(connected, (one, two))):  # noqa: ASYNC110 (a poll of /health)
        await asyncio.sleep(0.05)
    back = time.monotonic() - started
    print(f"\n  the fault took {over:.1f} s; both processes back in touch {back:.1f} s after it began")
    await asyncio.wait_for(asyncio.gather(sending, reading), 60)
    talk.assert_nothing_lost_nothing_twice()
    for process in (one, two):
        assert process.process.poll() is None
        process.assert_no_errors_but("lost Redis", "Redis refused a command")
    await sender.close()
    await reader.close()
    return talk


async def test_a_rooms_master_failing_over_to_its_replica_loses_no_message_and_shows_none_twice(
    start_server, fresh_redis_cluster, room
):
    cluster = fresh_redis_cluster
    master = cluster.master_of(events_channel(room))
    failed_over_at: list[float] = []

    def kill_the_rooms_master() -> None:
        failed_over_at.append(time.monotonic())
        cluster.fail_over(master, signal.SIGKILL)

    talk = await talk_through(start_server, cluster, room, kill_the_rooms_master)
    assert talk.errors["backplane_unavailable"] > 0  # the outage was seen, and said
    print(f"\n  messages refused and sent again during the failover: {talk.errors['backplane_unavailable']}")


async def test_a_room_whose_slot_moves_to_another_shard_loses_no_message_and_shows_none_twice(
    start_server, redis_cluster, room
):
    channel = events_channel(room)
    target = next(port for port in redis_cluster.masters() if port != redis_cluster.master_of(channel))

    def move_the_rooms_slot() -> None:
        # Between the keys' move and the slot's hand-over, the old master answers ASK: messages
        # are stored on the new one, and published where nobody listens yet.
        redis_cluster.migrate_slot(channel, target, midway=lambda *_: time.sleep(0.5))

    await talk_through(start_server, redis_cluster, room, move_the_rooms_slot)
    assert redis_cluster.master_of(channel) == target


async def test_the_lobby_lists_rooms_of_every_shard_and_forgets_them_when_they_empty(
    start_server, redis_cluster, room
):
    server = start_server(*flags(redis_cluster, room))
    rooms = [f"{room}-{n}" for n in range(12)]
    shards = {
        redis_cluster.master_of(RedisKeys(prefix_of(room), cluster=True).room(name, "events"))
        for name in rooms
    }
    assert len(shards) > 1  # the rooms are spread over the shards
    members = [await server.connect(f"/ws/chat/{name}") for name in rooms]
    for member in members:
        await member.joined()
    lobby = await server.connect("/ws/lobby")

    async def until(wanted) -> dict:
        while True:
            event = await lobby.wait_for("rooms_update", timeout=10)
            if wanted({name: entry for name, entry in event["rooms"].items() if name.startswith(room)}):
                return event
            await lobby.send_raw("again")

    await asyncio.wait_for(until(lambda ours: sorted(ours) == sorted(rooms)), 10)
    for member in members:
        await member.close()
    await asyncio.wait_for(until(lambda ours: not ours), 10)
    assert re.search(r"\bERROR\b", server.log()) is None
    await lobby.close()
