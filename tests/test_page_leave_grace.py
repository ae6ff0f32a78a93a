"""client.html when a member's tab reloads or closes (a reload is not a leave): the others see
no line, the member greyed in the people list while the server waits for its tab (--leave-grace),
and then either nothing more (it came back) or the usual "left the room". Real Chromium, real
servers."""

from __future__ import annotations

import asyncio
import re

import pytest
from playwright.async_api import expect

from tests.server_process import ServerProcess
from tests.test_page import ChatPage, page_url
from tests.test_page_text_and_access import assert_axe_clean, need_axe, open_for_audit

AWAY_HINT = "(away, may be back in a moment)"


@pytest.fixture
def server(limited_server: ServerProcess) -> ServerProcess:
    """The browser tests run against the production limits (and the default grace, 5 s)."""
    return limited_server


async def record_events(chat_page: ChatPage) -> None:
    """Keep every event the page's chat socket hands on from now on (see `heard`)."""
    await chat_page.page.evaluate(
        """() => {
        window.__heard = [];
        const handOn = chat.onEvent;
        chat.onEvent = (event) => { window.__heard.push(event); handOn(event); };
    }"""
    )


async def heard(chat_page: ChatPage) -> list[tuple[str, str | None]]:
    """(type, client_id) of every event recorded since `record_events`."""
    events = await chat_page.page.evaluate("window.__heard")
    return [(event["type"], event.get("client_id")) for event in events]


def person(chat_page: ChatPage, name: str):
    """`name`'s entry in the page's people list."""
    return chat_page.page.locator("#user-list li", has=chat_page.page.locator("bdi", has_text=name))


def system_lines(chat_page: ChatPage, text: str):
    return chat_page.page.locator("#messages .system-line", has_text=text)


async def leave_by_closing_the_tab(chat_page: ChatPage) -> None:
    """Close the tab as a person would (Chromium says 1001, going away), not the whole browser."""
    await chat_page.page.close()
    assert chat_page.problems.errors == [], chat_page.problems.errors


async def test_a_reloaded_tab_is_neither_left_nor_joined_in_the_other_tab(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await expect(person(bob, "Alice")).to_have_count(1)
    await expect(bob.page.locator("#people-heading")).to_have_text("In this room · 2")
    alice_id = await alice.page.evaluate("myId")
    await record_events(bob)

    await alice.page.reload()
    await alice.wait_connected()
    await expect(alice.status).to_have_attribute("data-state", "connected")
    await expect(person(alice, "Alice")).to_contain_text("(you)")
    assert await alice.page.evaluate("myId") == alice_id  # the same member, continued

    await alice.say("back already")
    await expect(bob.message_with("back already")).to_be_visible()
    await bob.page.wait_for_function("window.__heard.some((event) => event.type === 'user_back')")
    kinds = await heard(bob)
    membership = [kind for kind in kinds if kind[0].startswith("user_") or kind[0] == "presence"]
    assert membership == [("user_away", alice_id), ("user_back", alice_id)], kinds

    await expect(system_lines(bob, "left the room")).to_have_count(0)
    await expect(system_lines(bob, "joined the room")).to_have_count(0)
    await expect(person(bob, "Alice")).to_have_count(1)
    await expect(person(bob, "Alice")).not_to_have_class(re.compile(r"\baway\b"))
    await expect(person(bob, "Alice")).not_to_contain_text("away")
    await expect(bob.page.locator("#people-heading")).to_have_text("In this room · 2")
    await expect(bob.message_with("back already")).not_to_have_class(re.compile(r"\bown\b"))
    await expect(alice.message_with("back already")).to_have_class(re.compile(r"\bown\b"))
    await alice.close()
    await bob.close()


async def test_a_member_whose_tab_closed_is_greyed_then_gone(browser, start_server, room):
    server = start_server("--leave-grace", "2", limits=True)
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await expect(person(bob, "Alice")).to_have_count(1)
    present_color = await person(bob, "Alice").evaluate("node => getComputedStyle(node).color")

    await leave_by_closing_the_tab(alice)
    gone = person(bob, "Alice")
    await expect(gone).to_have_class(re.compile(r"\baway\b"))
    assert await system_lines(bob, "left the room").count() == 0  # not yet: she may be back
    await expect(gone).to_contain_text(AWAY_HINT)  # said in words, not in colour only
    await expect(gone.locator("bdi")).to_have_attribute("title", re.compile("back in a moment"))
    assert await gone.get_attribute("title") is None  # on the item it would replace her name
    # As a screen reader has the list: her name first, then the hint.
    await expect(bob.page.locator("#user-list")).to_match_aria_snapshot(
        f"- list:\n  - listitem: Alice {AWAY_HINT}\n  - listitem: Bob (you)"
    )
    assert await gone.evaluate("node => getComputedStyle(node).color") != present_color
    await expect(bob.page.locator("#people-heading")).to_have_text("In this room · 2")  # still here
    await expect(person(bob, "Bob")).not_to_have_class(re.compile(r"\baway\b"))
    await expect(bob.page.locator("#messages .system-line")).to_have_count(1)  # the welcome only

    await expect(system_lines(bob, "Alice left the room")).to_have_count(1, timeout=10_000)
    await expect(person(bob, "Alice")).to_have_count(0)
    await expect(bob.page.locator("#user-list li.away")).to_have_count(0)
    await expect(bob.page.locator("#people-heading")).to_have_text("In this room · 1")
    await bob.close()
    await alice.page.context.close()
    server.assert_no_errors()


async def test_a_newcomer_sees_a_member_who_is_away_greyed(browser, start_server, room):
    server = start_server("--leave-grace", "30", limits=True)
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await expect(person(bob, "Alice")).to_have_count(1)
    await leave_by_closing_the_tab(alice)
    await expect(person(bob, "Alice")).to_have_class(re.compile(r"\baway\b"))

    carol = await ChatPage.open(browser, page_url(server, room), name="Carol")
    await expect(carol.page.locator("#people-heading")).to_have_text("In this room · 3")
    await expect(person(carol, "Alice")).to_have_class(re.compile(r"\baway\b"))
    await expect(person(carol, "Alice")).to_contain_text(AWAY_HINT)
    for here in ("Bob", "Carol"):
        await expect(person(carol, here)).not_to_have_class(re.compile(r"\baway\b"))
    await expect(system_lines(carol, "Alice")).to_have_count(0)
    await carol.close()
    await bob.close()
    await alice.page.context.close()


async def test_a_member_who_is_away_stays_away_when_another_moves_rooms_and_back(browser, start_server, room):
    """The list is the server's each time the page enters a room: nobody is left greyed from
    an earlier visit, and an away member is greyed again on return."""
    server = start_server("--leave-grace", "30", limits=True)
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await leave_by_closing_the_tab(alice)
    await expect(person(bob, "Alice")).to_have_class(re.compile(r"\baway\b"))

    await bob.page.fill("#room-input", f"{room}-b")
    await bob.page.press("#room-input", "Enter")
    await expect(bob.page.locator("#room-name")).to_have_text(f"{room}-b")
    await bob.wait_connected()
    await expect(person(bob, "Alice")).to_have_count(0)
    await expect(bob.page.locator("#user-list li.away")).to_have_count(0)

    await bob.page.go_back()
    await expect(bob.page.locator("#room-name")).to_have_text(room)
    await bob.wait_connected()
    await expect(person(bob, "Alice")).to_have_class(re.compile(r"\baway\b"))
    await expect(person(bob, "Bob")).not_to_have_class(re.compile(r"\baway\b"))
    await bob.close()
    await alice.page.context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_violation_with_a_member_away(browser, start_server, room, scheme):
    need_axe()
    server = start_server("--leave-grace", "30", limits=True)
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await open_for_audit(browser, page_url(server, room), scheme, name="Bob")
    await expect(person(bob, "Alice")).to_have_count(1)
    await leave_by_closing_the_tab(alice)
    await expect(person(bob, "Alice")).to_have_class(re.compile(r"\baway\b"))
    await asyncio.sleep(0.2)  # the list settled: nothing more is coming
    await assert_axe_clean(bob.page)
    await bob.close()
    await alice.page.context.close()
