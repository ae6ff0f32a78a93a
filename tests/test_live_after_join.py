"""History is what happened before you joined: everything said after a member's welcome reaches
it as a live `message` event, once, in id order, even while its history is being read. A client
written from the seed protocol ignores `history`, so for it a message folded into the history
would be lost."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.chat_client import ChatClient
from tests.server_process import ServerProcess

ROUNDS = 40  # newcomers joining while the room talks, each racing a message sent at its welcome


async def talk(client: ChatClient, stop: asyncio.Event) -> None:
    """Keep the room busy (and the history's writer with it) until told to stop."""
    number = 0
    while not stop.is_set():
        await client.send(type="message", message=f"chatter {number}")
        number += 1
        await asyncio.sleep(0.002)


async def drain(client: ChatClient, stop: asyncio.Event) -> None:
    """Read a talker's echoes, so that its outbox never fills."""
    with contextlib.suppress(Exception):
        while not stop.is_set():
            await client.next(timeout=10)


async def what_a_newcomer_sees(
    alice: ChatClient, newcomer_server: ServerProcess, room: str, round_number: int
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """A newcomer joins; Alice says hello the moment its welcome arrives. Returns the history
    event, the live `message` events until the hello, and the hello's text."""
    hello = f"hello newcomer {round_number}"
    bob = await newcomer_server.connect(f"/ws/chat/{room}?username=bob{round_number}")
    welcome = await bob.expect("system")
    assert welcome["kind"] == "welcome"
    await alice.send(type="message", message=hello)
    history: dict[str, Any] | None = None
    live: list[dict[str, Any]] = []

    async def until_the_hello() -> None:
        nonlocal history
        while True:
            event = await bob.next(timeout=10)
            if event["type"] == "history":
                assert history is None, "history comes once"
                assert not live, "history comes before anything live"
                history = event
            elif event["type"] == "message":
                live.append(event)
                if event["message"] == hello:
                    return

    try:
        await asyncio.wait_for(until_the_hello(), 10)
    except asyncio.TimeoutError:
        in_history = history is not None and hello in [m["message"] for m in history["messages"]]
        where = "inside the history event" if in_history else "nowhere"
        raise AssertionError(f"the message sent at the welcome never came live; it came {where}") from None
    finally:
        await bob.close()
    assert history is not None
    return history, live, hello


def check_one_round(history: dict[str, Any], live: list[dict[str, Any]], hello: str) -> None:
    stored_before = [message["id"] for message in history["messages"]]
    live_ids = [message["id"] for message in live]
    assert hello not in [message["message"] for message in history["messages"]], (
        "a message sent after the welcome was folded into the history"
    )
    assert live_ids == sorted(set(live_ids)), f"live messages out of order or repeated: {live_ids}"
    if stored_before and live_ids:
        assert stored_before[-1] < live_ids[0], "a live message was already in the history"
        # Nothing between the history and the first live message is missing.
        assert live_ids[0] == stored_before[-1] + 1, (stored_before[-1], live_ids[0])
    assert live_ids == list(range(live_ids[0], live_ids[0] + len(live_ids))), f"a gap: {live_ids}"


async def race_newcomers(alice_server: ServerProcess, newcomer_server: ServerProcess, room: str) -> None:
    alice = await alice_server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    talker = await alice_server.connect(f"/ws/chat/{room}?username=talker")
    await talker.joined()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(talk(talker, stop)), asyncio.create_task(drain(talker, stop))]
    alice_reader = asyncio.create_task(drain(alice, stop))
    try:
        for round_number in range(ROUNDS):
            check_one_round(*await what_a_newcomer_sees(alice, newcomer_server, room, round_number))
    finally:
        stop.set()
        for task in [*tasks, alice_reader]:
            task.cancel()
        await talker.close()
        await alice.close()


async def test_a_seed_client_sees_every_message_sent_after_its_welcome_as_a_live_message(server, room):
    await race_newcomers(server, server, room)


async def test_a_seed_client_sees_every_message_sent_after_its_welcome_across_redis(
    start_server, redis_backend, room
):
    flags = redis_backend.flags
    alice_server, newcomer_server = start_server(*flags), start_server(*flags)
    await race_newcomers(alice_server, newcomer_server, room)


@pytest.mark.parametrize("messages", [3])
async def test_a_resume_gets_the_missed_ones_in_history_and_the_rest_live(server, room, messages):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    for number in range(messages):
        await alice.send(type="message", message=f"before {number}")
        await alice.wait_for("message", message=f"before {number}")
    bob = await server.connect(f"/ws/chat/{room}?username=bob&since=1")
    welcome = await bob.expect("system")
    await alice.send(type="message", message="after the welcome")
    history = await bob.wait_for("history")
    assert [message["message"] for message in history["messages"]] == [
        f"before {number}" for number in range(1, messages)
    ]
    live = await bob.wait_for("message")
    assert live["message"] == "after the welcome"
    assert welcome["kind"] == "welcome"
    await bob.close()
    await alice.close()
