"""Older messages on demand: `load_earlier` pages back through the retained history, with
SQLite and with Redis, and the page offers it at the top of the conversation."""

from __future__ import annotations

import asyncio
import json

import pytest
from playwright.async_api import expect

from fennec_chat import protocol
from fennec_chat.settings import Settings
from tests.chat_client import ChatClient
from tests.test_history import read_messages, send_messages
from tests.test_page import ChatPage, page_url

SETTINGS = Settings()
BAD_BEFORE = [0, -1, "5", 1.5, True, False, None, [3], 10**18]
MISSING = object()


async def seeded(server, room: str, count: int, name: str = "writer") -> ChatClient:
    """A member of `room` that has sent `count` messages (ids 1..count) and seen them stored."""
    writer = await server.connect(f"/ws/chat/{room}?username={name}")
    await writer.joined()
    await send_messages(writer, [f"seed {n:03d}" for n in range(1, count + 1)])
    await read_messages(writer, count, timeout=30)
    return writer


async def earlier(client: ChatClient, before: object = MISSING) -> dict:
    """Ask for the messages below `before`; the answer (the next event)."""
    if before is MISSING:
        await client.send(type="load_earlier")
    else:
        await client.send(type="load_earlier", before=before)
    return await client.next()


def ids(event: dict) -> list[int]:
    return [message["id"] for message in event["messages"]]


async def test_load_earlier_answers_the_sender_alone_with_the_50_newest_below_before_oldest_first(
    server, room
):
    writer = await seeded(server, room, 120)
    bystander = await server.connect(f"/ws/chat/{room}")
    await bystander.joined()
    await writer.expect("user_joined")

    page = await earlier(writer, 101)
    assert set(page) == {"type", "room", "messages", "complete", "timestamp"}
    assert (page["type"], page["room"], page["complete"]) == ("earlier_messages", room, False)
    assert ids(page) == list(range(51, 101))
    assert [m["message"] for m in page["messages"]] == [f"seed {n:03d}" for n in range(51, 101)]
    assert all(m["type"] == "message" and m["username"] == "writer" for m in page["messages"])

    page = await earlier(writer, 51)  # exactly the 50 oldest: nothing older is kept
    assert (ids(page), page["complete"]) == (list(range(1, 51)), True)
    page = await earlier(writer, 1)
    assert (ids(page), page["complete"]) == ([], True)
    page = await earlier(writer, 10**18 - 1)  # past the newest: the newest 50
    assert (ids(page), page["complete"]) == (list(range(71, 121)), False)
    await bystander.expect_silence()
    await writer.close()
    await bystander.close()


def test_the_padding_rule_lets_a_load_earlier_through_and_refuses_one_padded_beyond_its_need():
    def parse(text: str):
        return protocol.parse_command({"type": "websocket.receive", "text": text}, SETTINGS)

    biggest = json.dumps({"type": "load_earlier", "before": 10**18 - 1, "note": "x" * 200})
    assert parse(biggest) == protocol.LoadEarlier(10**18 - 1)
    padded = json.dumps({"type": "load_earlier", "before": 5}) + " " * 600
    assert parse(padded).code == "invalid_event"
    assert "at most" in parse(padded).reason


async def test_complete_says_the_start_of_the_retained_history_was_reached(start_server, room):
    server = start_server("--history-retention", "30")
    writer = await seeded(server, room, 40)  # ids 11..40 are kept
    page = await earlier(writer, 35)
    assert (ids(page), page["complete"]) == (list(range(11, 35)), True)
    page = await earlier(writer, 12)
    assert (ids(page), page["complete"]) == ([11], True)
    page = await earlier(writer, 11)
    assert (ids(page), page["complete"]) == ([], True)
    await writer.close()

    server = start_server("--history-retention", "60")
    writer = await seeded(server, room, 70)  # ids 11..70: one page and 10 more
    page = await earlier(writer, 71)
    assert (ids(page), page["complete"]) == (list(range(21, 71)), False)
    page = await earlier(writer, 21)
    assert (ids(page), page["complete"]) == (list(range(11, 21)), True)
    await writer.close()


@pytest.mark.parametrize(
    "before", [*BAD_BEFORE, MISSING], ids=lambda value: "missing" if value is MISSING else repr(value)
)
async def test_a_bad_before_gets_invalid_before_and_the_socket_stays_usable(server, room, before):
    writer = await seeded(server, room, 3)
    error = await earlier(writer, before)
    assert (error["type"], error["code"]) == ("error", "invalid_before"), error
    page = await earlier(writer, 3)
    assert (page["type"], ids(page), page["complete"]) == ("earlier_messages", [1, 2], True)
    await writer.send(type="message", message="still here")
    assert (await writer.expect("message"))["id"] == 4
    await writer.close()


async def test_load_earlier_takes_from_the_message_budget_under_the_production_limits(start_server, room):
    server = start_server(limits=True)  # messages: 5/s in bursts of 10, per anonymous socket
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    for _ in range(10):
        await alice.send(type="load_earlier", before=5)
    await alice.send(type="load_earlier", before=5)
    await alice.send(type="message", message="one too many", client_msg_id="m1")
    events = [await alice.next() for _ in range(12)]
    assert [event["type"] for event in events[:10]] == ["earlier_messages"] * 10
    assert [(event["type"], event["code"]) for event in events[10:]] == [("error", "rate_limited")] * 2
    assert events[10]["retry_after"] > 0
    assert events[11]["client_msg_id"] == "m1"
    await asyncio.sleep(events[11]["retry_after"] + 0.1)
    page = await earlier(alice, 5)
    assert page["type"] == "earlier_messages"
    await alice.close()

    # The other way round: messages use up what load_earlier may take.
    bob = await server.connect(f"/ws/chat/{room}")
    await bob.joined()
    for n in range(10):
        await bob.send(type="message", message=f"b{n}")
    await bob.send(type="load_earlier", before=5)
    events = [await bob.next() for _ in range(11)]  # the refusal may overtake the stored messages
    assert sorted(event.get("message", "") for event in events if event["type"] == "message") == [
        f"b{n}" for n in range(10)
    ]
    assert [event["code"] for event in events if event["type"] == "error"] == ["rate_limited"]
    await bob.close()


async def test_without_history_load_earlier_gets_history_unavailable(start_server, room):
    server = start_server("--no-history")
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined(history=False)
    error = await earlier(alice, 5)
    assert (error["type"], error["code"]) == ("error", "history_unavailable")
    await alice.send(type="message", message="still here")
    await alice.expect("message", message="still here")
    await alice.close()


async def test_load_earlier_pages_the_same_across_redis(start_server, redis_backend, room):
    flags = (*redis_backend.flags, "--redis-heartbeat", "0.5", "--history-retention", "100")
    one, two = start_server(*flags), start_server(*flags)
    writer = await seeded(one, room, 120)  # ids 21..120 are kept
    reader = await two.connect(f"/ws/chat/{room}")
    await reader.joined()
    assert ids(reader.history) == list(range(71, 121))
    await writer.expect("user_joined")

    page = await earlier(reader, 71)
    assert (page["type"], page["room"]) == ("earlier_messages", room)
    assert (ids(page), page["complete"]) == (list(range(21, 71)), True)
    assert [m["message"] for m in page["messages"]] == [f"seed {n:03d}" for n in range(21, 71)]
    page = await earlier(reader, 121)
    assert (ids(page), page["complete"]) == (list(range(71, 121)), False)
    page = await earlier(reader, 22)
    assert (ids(page), page["complete"]) == ([21], True)
    error = await earlier(reader, "21")
    assert (error["type"], error["code"]) == ("error", "invalid_before")
    await writer.expect_silence()  # the answers went to the reader alone
    await writer.close()
    await reader.close()


# Where a message is within the visible part of the list: pixels from the list's top edge.
PLACE = """(list, text) => {
  const item = [...list.querySelectorAll(".message")].find((node) => node.textContent.includes(text));
  return item.getBoundingClientRect().y - list.getBoundingClientRect().y;
}"""
# Scroll the list to its top and, before the scroll event can ask for more, say where the first
# message is.
SCROLL_TO_TOP = """(list) => {
  list.scrollTop = 0;
  return list.querySelector(".message").getBoundingClientRect().y - list.getBoundingClientRect().y;
}"""


async def place(page, text: str) -> float:
    return await page.locator("#messages").evaluate(PLACE, text)


async def test_the_page_loads_earlier_messages_keeps_its_place_and_shows_the_beginning(browser, server, room):
    writer = await seeded(server, room, 120)
    reader = await ChatPage.open(browser, page_url(server, room))
    page = reader.page
    await page.emulate_media(reduced_motion="reduce")  # no rising bubbles: places are measured
    await expect(reader.messages).to_have_count(50)  # 71..120, the history on join
    load = page.locator("#load-earlier")
    beginning = page.locator("#earlier-end")
    await expect(load).to_be_visible()
    await expect(beginning).to_be_hidden()

    # The button: 21..70 go above, and what the reader sees does not move.
    where = await place(page, "seed 120")
    await load.click()
    await expect(reader.messages).to_have_count(100)
    await expect(reader.messages.first).to_contain_text("seed 021")
    assert await place(page, "seed 120") == pytest.approx(where, abs=1)
    assert reader.sent_of("load_earlier") == [{"type": "load_earlier", "before": 71}]

    # Scrolling to the top: 1..20 go above what was at the top, which stays where it was.
    where = await page.locator("#messages").evaluate(SCROLL_TO_TOP)  # seed 021's place, at once
    await expect(reader.messages).to_have_count(120)
    await expect(reader.messages.first).to_contain_text("seed 001")
    assert await place(page, "seed 021") == pytest.approx(where, abs=1)
    await expect(beginning).to_be_visible()
    await expect(load).to_be_hidden()
    assert [frame["before"] for frame in reader.sent_of("load_earlier")] == [71, 21]

    # Live messages still arrive below.
    await writer.send(type="message", message="seed 121")
    await expect(reader.message_with("seed 121")).to_be_visible()
    await reader.close()
    await writer.close()
