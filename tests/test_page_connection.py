"""client.html at the edges of a connection (issue 13): messages written offline, a returning
server, refusals, names per tab, and what a newcomer sees. Real Chromium, real servers."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time

import pytest
from playwright.async_api import BrowserContext, expect

from tests.browser import PageProblems
from tests.server_process import ROOT, ServerProcess, log_path
from tests.test_page import ChatPage, page_url


@pytest.fixture
def server(limited_server: ServerProcess) -> ServerProcess:
    """The browser tests run against the production limits, as a browser would meet them."""
    return limited_server


async def open_tab(context: BrowserContext, url: str) -> ChatPage:
    """Another tab of the same browser (shared localStorage, its own sessionStorage)."""
    return await ChatPage.open_tab(context, url)


def chat_sockets(page) -> list[tuple[float, str]]:
    """(time, url) of every chat socket the page opens from now on."""
    opened: list[tuple[float, str]] = []
    page.on(
        "websocket", lambda ws: opened.append((time.monotonic(), ws.url)) if "/ws/chat/" in ws.url else None
    )
    return opened


def restart(server: ServerProcess, name: str) -> ServerProcess:
    """The same server again: same port, same database."""
    return ServerProcess(
        ["--db", str(server.db_path)], {}, log_path(name), port=server.port, limits=True
    ).start()


# --- 1. A message written offline is never thrown away ----------------------------------------


async def test_a_message_written_offline_waits_for_its_room_and_goes_out_once_there(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    other_room = f"{room}-b"
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")

    server.stop()
    await expect(alice.page.locator("#retry-button")).to_be_visible()
    await alice.say("written offline in the first room")
    await expect(alice.message_with("written offline")).to_have_class(re.compile("pending"))

    # Another room: the message is not there, not lost either, and its room says it waits.
    await alice.page.fill("#room-input", other_room)
    await alice.page.press("#room-input", "Enter")
    await expect(alice.page.locator("#room-name")).to_have_text(other_room)
    await expect(alice.message_with("written offline")).to_have_count(0)
    first_room = alice.page.locator(f'#room-list button[data-room="{room}"]')
    await expect(first_room.locator(".unsent")).to_have_text("1 unsent")
    await expect(first_room).to_have_accessible_name(
        re.compile(r"^# \S+\s*, 1 unsent\s*, \d+ (person|people)$")
    )
    await expect(alice.page.locator("#notices .notice")).to_have_count(0)  # nothing discarded
    unsent = await alice.page.evaluate("sessionStorage.getItem('fennec-chat.unsent')")
    assert "written offline in the first room" in unsent  # a reload would keep it, too

    restarted = restart(server, f"{request.node.name}-2")
    try:
        await alice.wait_connected(timeout=15_000)
        await expect(alice.page.locator("#user-list")).to_contain_text("Alice")
        assert alice.sent_of("message") == []  # not sent in the wrong room

        await first_room.click()
        await alice.wait_connected()
        await bob.wait_connected(timeout=15_000)
        await expect(alice.message_with("written offline")).not_to_have_class(re.compile("pending"))
        await expect(bob.message_with("written offline")).to_have_count(1)
        await expect(alice.message_with("written offline")).to_have_count(1)
        await expect(first_room.locator(".unsent")).to_have_count(0)
        sent = alice.sent_of("message")
        assert len({frame["client_msg_id"] for frame in sent}) == 1, sent

        # The server has it once: a newcomer's history shows it once.
        carol = await restarted.connect(f"/ws/chat/{room}?username=Carol")
        await carol.joined()
        texts = [message["message"] for message in carol.history["messages"]]
        assert texts.count("written offline in the first room") == 1, texts
        await carol.close()
        await alice.close()
        await bob.close()
    finally:
        restarted.stop()


async def test_unsent_messages_survive_a_reload(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    file_url = (ROOT / "client.html").as_uri() + f"?server={server.ws_url}&room={room}"
    alice = await ChatPage.open(browser, file_url, name="Alice")  # from disk: it reloads offline
    server.stop()
    await alice.say("written before a reload")
    await expect(alice.message_with("written before a reload")).to_have_class(re.compile("pending"))
    await alice.page.reload()
    await expect(alice.message_with("written before a reload")).to_have_class(re.compile("pending"))
    restarted = restart(server, f"{request.node.name}-2")
    try:
        await alice.wait_connected(timeout=15_000)
        await expect(alice.message_with("written before a reload")).not_to_have_class(re.compile("pending"))
        watcher = await restarted.connect(f"/ws/chat/{room}?username=Watcher")
        await watcher.joined()
        assert [m["message"] for m in watcher.history["messages"]] == ["written before a reload"]
        await watcher.close()
        await alice.close()
    finally:
        restarted.stop()


async def test_a_message_sent_but_never_confirmed_before_a_reload_shows_once(browser, server, room):
    """The server got it, its echo never came: after a reload the page sends it again (same
    client_msg_id, so the server does not store it twice) and shows it once."""
    swallow = {"messages": True}

    def route(page_side) -> None:
        server_side = page_side.connect_to_server()

        def from_server(message) -> None:
            if swallow["messages"] and json.loads(message).get("type") == "message":
                return
            page_side.send(message)

        server_side.on_message(from_server)

    alice = await ChatPage.open(browser, page_url(server, room), name="Alice", route=route)
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")

    await alice.say("sent, echo lost")
    await expect(bob.message_with("sent, echo lost")).to_have_count(1)
    await expect(alice.message_with("sent, echo lost")).to_have_class(re.compile("pending"))
    swallow["messages"] = False
    await alice.page.reload()
    await alice.wait_connected()
    await expect(alice.message_with("sent, echo lost")).not_to_have_class(re.compile("pending"))
    await bob.say("after the reload")
    await expect(alice.message_with("after the reload")).to_be_visible()
    await expect(alice.message_with("sent, echo lost")).to_have_count(1)
    await expect(bob.message_with("sent, echo lost")).to_have_count(1)
    assert await alice.page.evaluate("sessionStorage.getItem('fennec-chat.unsent')") is None
    await bob.close()
    await alice.close()


async def test_a_message_the_history_could_not_store_is_sent_again(browser, server, room):
    """`history_unavailable` with its client_msg_id: nobody got it, so the page sends it again;
    one without (a history that could not be read) fails no message."""
    refused, forwarded = [], []

    def route(page_side) -> None:
        server_side = page_side.connect_to_server()

        def from_page(message) -> None:
            frame = json.loads(message)
            if frame.get("type") == "message" and not refused:
                refused.append(frame)
                error = {
                    "type": "error",
                    "code": "history_unavailable",
                    "timestamp": "2026-01-01T00:00:00+00:00",
                }
                page_side.send(json.dumps(error | {"message": "history could not be read"}))
                page_side.send(
                    json.dumps(
                        error
                        | {
                            "message": "the message could not be stored",
                            "client_msg_id": frame["client_msg_id"],
                        }
                    )
                )
                return
            forwarded.append(frame)
            server_side.send(message)

        page_side.on_message(from_page)

    alice = await ChatPage.open(browser, page_url(server, room), name="Alice", route=route)
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await alice.say("stored the second time")
    await expect(bob.message_with("stored the second time")).to_have_count(1, timeout=10_000)
    await expect(alice.message_with("stored the second time")).not_to_have_class(re.compile("pending|failed"))
    assert len(refused) == 1
    assert [f.get("client_msg_id") for f in forwarded].count(refused[0]["client_msg_id"]) == 1  # sent again
    await bob.close()
    await alice.close()


# --- 2. Back promptly when the server is back -------------------------------------------------


async def test_the_backoff_cap_is_2_s_in_an_outages_first_minute_and_grows_to_10_s(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    ceilings = await alice.page.evaluate(
        """[0, 30_000, 59_000, 90_000, 120_000, 180_000, 600_000].map(
            (outage) => Array.from({ length: 30 }, (_, attempt) => backoffCeiling(attempt, outage)))"""
    )
    for schedule in ceilings[:3]:  # the first minute: doubling from 0.5 s up to 2 s, never more
        assert schedule[:3] == [500, 1000, 2000], schedule
        assert max(schedule) == 2000, schedule
    caps = [max(schedule) for schedule in ceilings[3:]]
    assert 2000 < caps[0] < caps[1] < 10_000, caps  # then growing...
    assert caps[2:] == [10_000, 10_000], caps  # ...to 10 s
    await alice.close()


async def test_after_an_8_second_outage_the_page_asks_every_2_s_at_most_and_marks_what_is_stale(
    browser, request, room
):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    await expect(alice.page.locator(f'#room-list button[data-room="{room}"] .count')).to_have_text("1")
    await alice.page.evaluate("Math.random = () => 0.999")  # the longest waits full jitter allows
    attempts = chat_sockets(alice.page)

    server.stop()
    # While away, presence and counts are what was, and say so.
    await expect(alice.page.locator("#user-list")).to_have_class(re.compile(r"\bstale\b"))
    await expect(alice.page.locator("#people-heading")).to_contain_text("last known")
    await expect(alice.page.locator("#room-list")).to_have_class(re.compile(r"\bstale\b"))
    await expect(alice.page.locator("#rooms-heading")).to_contain_text("last known")
    await asyncio.sleep(8)
    restarted = restart(server, f"{request.node.name}-2")
    try:
        await alice.wait_connected(timeout=15_000)
        times = [at for at, _ in attempts]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        # Today's page waited 4 s, then 8 s (its 10 s cap); within the first minute: 2 s at most.
        assert len(gaps) >= 4, gaps
        assert max(gaps) < 2.8, gaps
        ceilings = await alice.page.evaluate("chat.delays.map((d) => d.ceiling)")
        assert max(ceilings) == 2000, ceilings
        await expect(alice.page.locator("#user-list")).not_to_have_class(re.compile(r"\bstale\b"))
        await expect(alice.page.locator("#people-heading")).not_to_contain_text("last known")
        await expect(alice.page.locator("#room-list")).not_to_have_class(re.compile(r"\bstale\b"))
        await alice.close()
    finally:
        restarted.stop()


# --- 3. Refused is not offline -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "explained"),
    [
        ("not valid", "not spaces"),
        ("a/b", "“/”"),
        ("x" * 65, "at most 64 characters (this one has 65)"),
    ],
)
async def test_an_invalid_room_in_the_url_is_explained_and_never_tried(browser, server, name, explained):
    context = await browser.new_context()
    page = await context.new_page()
    problems = PageProblems()
    problems.watch(page)
    attempts = chat_sockets(page)
    query = json.dumps(name)[1:-1].replace("/", "%2F").replace(" ", "%20")
    await page.goto(f"{server.http_url}/?room={query}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    await expect(page.locator("#refusal")).to_be_visible()
    await expect(page.locator("#refusal-text")).to_contain_text(explained)
    await expect(page.locator("#refusal-text")).not_to_contain_text("endpoint")
    await expect(page.locator("#message-input")).to_be_disabled()
    await expect(page.locator("#send-button")).to_be_disabled()
    await expect(page.locator("#retry-button")).to_be_hidden()
    await expect(page.locator("#room-name")).to_have_text("No room")
    await expect(page.locator('#room-list button[aria-current="true"]')).to_have_count(0)
    await asyncio.sleep(0.5)
    assert attempts == []  # nothing was sent to the server

    # The same words as the "Go to a room" field.
    await page.fill("#room-input", name)
    await page.press("#room-input", "Enter")
    field_says = await page.locator("#room-error").text_content()
    assert field_says
    assert field_says in await page.locator("#refusal-text").text_content()

    await page.locator("#refusal-way-out").click()  # "Go to #general"
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#room-name")).to_have_text("general")
    await expect(page.locator("#message-input")).to_be_enabled()
    await expect(page.locator("#refusal")).to_be_hidden()
    assert problems.errors == []
    await context.close()


async def test_a_refusal_disables_the_composer_shows_the_whole_reason_and_offers_a_way_out(
    browser, start_server
):
    server = start_server("--max-room-chars", "8")  # the page only learns that once in a room
    context = await browser.new_context(viewport={"width": 390, "height": 720})
    page = await context.new_page()
    attempts = chat_sockets(page)
    await page.goto(page_url(server, "ninechars"))
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    reason = "invalid room name: use 1-8 letters, digits, '-', '_' or '.'"
    await expect(page.locator("#refusal-text")).to_have_text(f"The server refused this page: {reason}.")
    text = page.locator("#refusal-text")
    assert await text.evaluate("node => node.scrollWidth <= node.clientWidth")  # not cut off
    assert await text.is_visible()
    await expect(page.locator("#message-input")).to_be_disabled()
    await expect(page.locator("#send-button")).to_be_disabled()
    await expect(page.locator("#retry-button")).to_be_hidden()
    await page.locator("#panel-toggle").click()
    await expect(page.locator('#room-list button[data-room="ninechars"]')).to_have_count(0)
    await page.locator("#panel-close").click()
    await asyncio.sleep(1)
    assert len(attempts) == 1  # not retried
    await page.locator("#refusal-way-out").click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#message-input")).to_be_enabled()
    await context.close()


async def test_an_origin_refusal_shows_its_whole_reason_and_no_room_to_go_to(browser, start_server, room):
    network_server = start_server("--host", "0.0.0.0")
    file_url = (ROOT / "client.html").as_uri() + f"?server={network_server.ws_url}&room={room}"
    context = await browser.new_context(viewport={"width": 390, "height": 720})
    page = await context.new_page()
    await page.goto(file_url)
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    text = page.locator("#refusal-text")
    await expect(text).to_contain_text("--allowed-origins null")
    box = await text.bounding_box()
    assert box is not None
    assert box["width"] <= 390
    assert await text.evaluate("node => node.scrollWidth <= node.clientWidth")
    await expect(page.locator("#refusal-way-out")).to_be_hidden()  # another room would not help
    await expect(page.locator("#message-input")).to_be_disabled()
    await context.close()


async def test_go_to_a_room_says_names_are_case_sensitive_and_never_cuts_one(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    page = alice.page
    await expect(page.locator("#room-hint")).to_contain_text("case-sensitive")
    field, error = page.locator("#room-input"), page.locator("#room-error")
    too_long = "r" * 70
    await page.type("#room-input", too_long)
    await expect(field).to_have_value(too_long)  # not cut to 64 behind the person's back
    await expect(error).to_have_text("Too long: room names have at most 64 characters (this one has 70).")
    await page.press("#room-input", "Enter")
    await expect(page.locator("#room-name")).to_have_text(room)  # stayed
    await field.fill("what?")
    await expect(error).to_have_text("Room names use only letters, digits, '-', '_' and '.' (not “?”).")
    await field.fill(f"{room}-Upper")
    await expect(error).to_have_text("")
    await page.press("#room-input", "Enter")
    await expect(page.locator("#room-name")).to_have_text(f"{room}-Upper")  # as typed, not lowered
    await alice.wait_connected()
    await alice.close()


# --- 4. Tabs in one browser keep their own names ----------------------------------------------


async def test_tabs_in_one_browser_keep_their_own_names(browser, server, room):
    watcher = await ChatPage.open(browser, page_url(server, room), name="Watcher")
    context = await browser.new_context()
    tom = await open_tab(context, page_url(server, room))
    await tom.set_name("Tom")
    await expect(watcher.page.locator("#user-list")).to_contain_text("Tom")
    tina = await open_tab(context, page_url(server, room))
    await tina.set_name("Tina")
    await expect(watcher.page.locator("#user-list")).to_contain_text("Tina")

    lines_before = await watcher.page.locator("#messages .system-line").count()
    await tom.page.reload()
    await tom.wait_connected()
    await expect(tom.page.locator("#name-input")).to_have_value("Tom")
    # Back as Tom, with no rename after it (a page once came back as Tina), and silently: a reload
    # is not a leave.
    await tom.say("still Tom")
    await expect(watcher.message_with("still Tom").locator(".author")).to_have_text("Tom")
    await expect(watcher.page.locator("#messages .system-line")).to_have_count(lines_before)
    await expect(watcher.page.locator("#user-list li", has_text="Tom")).to_have_count(1)
    await expect(watcher.page.locator("#user-list li", has_text="Tina")).to_have_count(1)

    # A new tab starts with the last name used in this browser.
    third = await open_tab(context, page_url(server, room))
    await expect(third.page.locator("#name-input")).to_have_value("Tina")
    for person in (tom, tina, third, watcher):
        await person.close()


# --- 10. Newcomers are quiet ---------------------------------------------------------------------


async def test_a_newcomer_with_a_saved_name_joins_under_it(browser, server, room):
    watcher = await ChatPage.open(browser, page_url(server, room), name="Watcher")
    context = await browser.new_context()
    await context.add_init_script("localStorage.setItem('fennec-chat.username', 'Bob')")
    bob = await open_tab(context, page_url(server, room))
    await expect(
        watcher.page.locator("#messages .system-line", has_text="Bob joined the room")
    ).to_be_visible()
    await expect(bob.page.locator("#name-input")).to_have_value("Bob")
    await asyncio.sleep(0.3)
    assert await watcher.page.locator("#messages .system-line", has_text="now known as").count() == 0
    assert await watcher.page.locator("#messages .system-line", has_text="User-").count() == 0
    await bob.close()
    await watcher.close()


async def test_day_separators_when_messages_span_days(browser, server, room):
    def message(n: int, text: str, timestamp: str) -> dict:
        return {
            "type": "message",
            "id": n,
            "username": "Old",
            "message": text,
            "client_id": f"old-{n}",
            "timestamp": timestamp,
        }

    history = {
        "type": "history",
        "room": room,
        "messages": [
            message(1, "late on new year's day", "2024-01-01T23:50:00+00:00"),
            message(2, "also late", "2024-01-01T23:55:00+00:00"),
            message(3, "just after midnight", "2024-01-02T00:10:00+00:00"),
        ],
        "truncated": False,
        "epoch": "injected",
        "reset": False,
    }
    injected = [history]

    def route(page_side) -> None:
        server_side = page_side.connect_to_server()

        def from_server(text) -> None:
            while injected:
                page_side.send(json.dumps(injected.pop(0)))
            page_side.send(text)

        server_side.on_message(from_server)

    alice = await ChatPage.open(
        browser, page_url(server, room), route=route, timezone_id="UTC", locale="en-GB"
    )
    page = alice.page
    separators = page.locator("#messages .day-separator")
    await expect(separators).to_have_text([re.compile("1 January 2024"), re.compile("2 January 2024")])
    await alice.say("today")
    await expect(alice.message_with("today")).not_to_have_class(re.compile("pending"))
    await expect(separators).to_have_text(
        [re.compile("1 January 2024"), re.compile("2 January 2024"), "Today"]
    )
    order = await page.locator("#messages > li").evaluate_all(
        "items => items.map((item) => item.classList.contains('day-separator') ? 'day' : "
        "item.querySelector('.text')?.textContent ?? null).filter(Boolean)"
    )
    assert order == [
        "day",
        "late on new year's day",
        "also late",
        "day",
        "just after midnight",
        "day",
        "today",
    ]
    await alice.close()


@pytest.mark.parametrize("scheme", ["http", "https", "ftp"])
async def test_a_wrong_server_scheme_is_an_error_not_a_fallback(browser, server, room, scheme):
    address = f"{scheme}://127.0.0.1:{server.port}"
    file_url = (ROOT / "client.html").as_uri() + f"?server={address}&room={room}"
    context = await browser.new_context()
    page = await context.new_page()
    problems = PageProblems()
    problems.watch(page)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(file_url)
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    await expect(page.locator("#status-text")).to_contain_text("?server=")
    await expect(page.locator("#refusal-text")).to_contain_text("ws://")
    await expect(page.locator("#refusal-text")).to_contain_text(address)
    await expect(page.locator("#message-input")).to_be_disabled()
    await asyncio.sleep(0.5)
    assert sockets == []  # not to localhost:8000, not anywhere
    assert problems.errors == []
    await context.close()
