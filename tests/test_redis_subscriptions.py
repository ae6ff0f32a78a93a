"""A process subscribes to a room's Redis channel while it has members there. When its last
member leaves and a newcomer arrives at once, the old subscription's last messages may still be
on their way as the new one starts, and Redis sends nothing in between: the backplane must not
hand over a message from before the gap. (The newcomer's history, read once the room is ready,
holds those.)"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

from fennec_chat.redis_backplane import RedisBackplane
from fennec_chat.settings import Settings
from tests.test_concurrency_core import Recorder

ROUNDS = 100


def chatter_in_another_process(settings: Settings, room: str, stop: threading.Event) -> threading.Thread:
    """Another chat process (its own backplane, its own event loop) storing messages in `room`
    as fast as it can."""

    async def talk() -> None:
        talker = RedisBackplane(settings)
        await talker.start(Recorder())
        try:
            number = 0
            while not stop.is_set():
                sent = [
                    talker.publish_message(room, {"type": "message", "message": f"m{number + n}"}, "talker")
                    for n in range(20)
                ]
                number += 20
                await asyncio.gather(*sent)
        finally:
            await talker.close()

    thread = threading.Thread(target=asyncio.run, args=(talk(),), daemon=True)
    thread.start()
    return thread


async def test_a_room_left_and_joined_again_at_once_hears_its_messages_without_a_gap(redis_server):
    settings = Settings(redis_url=redis_server.url, redis_heartbeat=0.5)
    room = "busy"
    stop = threading.Event()
    talker = chatter_in_another_process(settings, room, stop)
    heard = Recorder()  # the room events the backplane hands over, in order
    here = RedisBackplane(settings)
    await here.start(heard)
    gaps: list[tuple[int, list[int]]] = []
    rounds_that_heard_something = 0
    try:
        for round_number in range(ROUNDS):
            here.join(room, "bob", "bob", first_here=True)
            await here.ready(room)
            await asyncio.sleep(0.005)
            time.sleep(0.003)  # noqa: ASYNC251 - a busy loop, on purpose: the room's messages pile up unread
            here.leave(room, "bob", last_here=True)
            here.join(room, "bob", "bob", first_here=True)  # a newcomer, at once
            heard.events = []
            await here.ready(room)
            await asyncio.sleep(0.01)
            ids = [event.message_id for event in heard.events if event.message_id is not None]
            if ids:
                rounds_that_heard_something += 1
                if before_a_gap := [a for a, b in itertools.pairwise(ids) if b != a + 1]:
                    gaps.append((round_number, before_a_gap))
            here.leave(room, "bob", last_here=True)
    finally:
        stop.set()
        talker.join(10)
        await here.close()
    assert rounds_that_heard_something > ROUNDS // 2, "the chatter hardly reached this process"
    assert not gaps, f"messages heard before a gap (round, id before the gap): {gaps[:5]}"
