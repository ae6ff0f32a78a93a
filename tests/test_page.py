"""client.html in real Chromium against a real server: chatting, typing, names, rooms,
reconnection, refusals and safety against injected HTML."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page, WebSocketRoute, expect

from tests.browser import PageProblems
from tests.server_process import ARTIFACTS, ROOT, ServerProcess, free_port, log_path


@pytest.fixture
def server(limited_server: ServerProcess) -> ServerProcess:
    """The browser tests run against the production limits, as a browser would meet them."""
    return limited_server


XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


class ChatPage:
    """One person with the chat page open, in a browser context of their own."""

    def __init__(self, page: Page, problems: PageProblems, sent: list[dict] | None = None) -> None:
        self.page = page
        self.problems = problems
        self.sent = sent if sent is not None else []  # what the page sent on its chat sockets

    @classmethod
    async def open(
        cls,
        browser: Browser,
        url: str,
        width: int = 1100,
        name: str | None = None,
        scripts: tuple[str, ...] = (),
        route: Callable[[WebSocketRoute], None] | None = None,
        **options,
    ) -> ChatPage:
        """Open the page in a fresh browser profile; `name` is a name saved on an earlier visit,
        `scripts` run before the page's own, `route` stands between its chat sockets and the server."""
        context = await browser.new_context(viewport={"width": width, "height": 720}, **options)
        if name is not None:
            await context.add_init_script(f"localStorage.setItem('fennec-chat.username', {json.dumps(name)})")
        for script in scripts:
            await context.add_init_script(script)
        return await cls.open_tab(context, url, route)

    @classmethod
    async def open_tab(
        cls, context: BrowserContext, url: str, route: Callable[[WebSocketRoute], None] | None = None
    ) -> ChatPage:
        """Open the page in a new tab of `context` (its localStorage shared, its own
        sessionStorage), watching for page errors and recording what it sends."""
        page = await context.new_page()
        problems = PageProblems()
        problems.watch(page)
        if route is not None:
            await page.route_web_socket(re.compile(r"/ws/chat/"), route)
        sent: list[dict] = []
        page.on("websocket", lambda ws: record_frames(ws, sent) if "/ws/chat/" in ws.url else None)
        await page.goto(url)
        chat_page = cls(page, problems, sent)
        await chat_page.wait_connected()
        return chat_page

    @property
    def status(self):
        return self.page.locator("#status")

    @property
    def messages(self):
        return self.page.locator("#messages .message")

    def message_with(self, text: str):
        return self.page.locator("#messages .message", has_text=text)

    async def wait_connected(self, timeout: float = 10_000) -> None:
        await expect(self.status).to_have_attribute("data-state", "connected", timeout=timeout)
        await expect(self.page.locator("#user-list li")).not_to_have_count(0, timeout=timeout)

    async def set_name(self, name: str) -> None:
        await self.page.fill("#name-input", name)
        await self.page.press("#name-input", "Enter")

    async def say(self, text: str) -> None:
        await self.page.fill("#message-input", text)
        await self.page.press("#message-input", "Enter")

    def sent_of(self, kind: str) -> list[dict]:
        return [frame for frame in self.sent if frame.get("type") == kind]

    async def close(self) -> None:
        assert self.problems.errors == [], self.problems.errors
        await self.page.context.close()


def record_frames(ws, sent: list[dict]) -> None:
    def record(payload: str | bytes) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:  # a test's deliberately broken frame
            frame = None
        sent.append(frame if isinstance(frame, dict) else {"unreadable": payload})

    ws.on("framesent", record)


def page_url(server: ServerProcess, room: str) -> str:
    return f"{server.http_url}/?room={room}"


async def test_two_pages_chat_both_ways_and_another_room_sees_nothing(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.set_name("Alice")
    bob = await ChatPage.open(browser, page_url(server, room))
    await bob.set_name("Bob")
    elsewhere = await ChatPage.open(browser, page_url(server, f"{room}-other"))

    await alice.say("Hello from Alice")
    await expect(bob.message_with("Hello from Alice")).to_have_class(re.compile(r"^message$"))
    await expect(bob.message_with("Hello from Alice").locator(".author")).to_have_text("Alice")
    await expect(alice.message_with("Hello from Alice")).to_have_class(re.compile(r"\bown\b"))
    await expect(alice.message_with("Hello from Alice")).not_to_have_class(re.compile("pending"))

    await bob.say("Hi Alice, Bob here")
    await expect(alice.message_with("Bob here")).not_to_have_class(re.compile(r"\bown\b"))
    await expect(bob.message_with("Bob here")).to_have_class(re.compile(r"\bown\b"))

    # The own bubble is styled apart from the others'.
    own_color = (
        await alice.message_with("Hello from Alice")
        .locator(".bubble")
        .evaluate("node => getComputedStyle(node).backgroundColor")
    )
    other_color = (
        await alice.message_with("Bob here")
        .locator(".bubble")
        .evaluate("node => getComputedStyle(node).backgroundColor")
    )
    assert own_color != other_color

    await asyncio.sleep(0.3)
    assert await elsewhere.messages.count() == 0
    for person in (alice, bob, elsewhere):
        await person.close()


async def test_quick_messages_each_arrive_once_and_in_order(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    bob = await ChatPage.open(browser, page_url(server, room))
    # Ten sends in one go, far faster than the echoes come back (what the Send button calls).
    await alice.page.evaluate("for (let n = 0; n < 10; n++) sendMessage(`quick ${n}`)")
    expected = [f"quick {number}" for number in range(10)]
    await expect(bob.messages.locator(".text")).to_have_text(expected)
    await expect(alice.messages.locator(".text")).to_have_text(expected)
    await expect(alice.page.locator("#messages .message.pending")).to_have_count(0)
    await alice.close()
    await bob.close()


# Notes the extensions each of the page's sockets agreed to (`WebSocket.extensions`).
AGREED_EXTENSIONS = """
window.agreedExtensions = [];
window.WebSocket = class extends WebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("open", () => window.agreedExtensions.push(this.extensions));
  }
};
"""


async def test_with_compression_on_pages_chat_in_frames_compressed_once_per_broadcast(
    browser, start_server, room
):
    """Chromium offers permessage-deflate; with --ws-compression it is agreed without context
    takeover, and the frames the server compresses once for all arrive whole, long or short."""
    server = start_server("--ws-compression")
    alice = await ChatPage.open(browser, page_url(server, room), scripts=(AGREED_EXTENSIONS,))
    bob = await ChatPage.open(browser, page_url(server, room), scripts=(AGREED_EXTENSIONS,))
    for page in (alice, bob):
        agreed = await page.page.evaluate("window.agreedExtensions")  # the chat's and the lobby's
        assert agreed
        for extensions in agreed:
            assert extensions.startswith("permessage-deflate"), extensions
            assert "server_no_context_takeover" in extensions
    texts = ["short", "long " + "é" * 1900, "after the long one"]
    for text in texts:
        await alice.say(text)
    for page in (alice, bob):
        await expect(page.messages.locator(".text")).to_have_text(texts)
        assert page.problems.errors == []
    await alice.close()
    await bob.close()


async def test_enter_sends_and_shift_enter_starts_a_new_line(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.page.click("#message-input")
    await alice.page.keyboard.type("first line")
    await alice.page.keyboard.press("Shift+Enter")
    await alice.page.keyboard.type("second line")
    await alice.page.keyboard.press("Enter")
    await expect(alice.messages.locator(".text")).to_have_text("first line\nsecond line")
    await expect(alice.page.locator("#message-input")).to_have_value("")
    await alice.close()


async def test_typing_indicator_appears_in_the_other_page_and_clears(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.set_name("Alice")
    bob = await ChatPage.open(browser, page_url(server, room))

    await alice.page.click("#message-input")
    await alice.page.keyboard.type("I am wri")
    await expect(bob.page.locator("#typing")).to_have_text("Alice is typing…")
    await expect(alice.page.locator("#typing")).to_have_text("")
    await expect(bob.page.locator("#typing")).to_have_text("", timeout=5_000)  # 3 s of silence

    await alice.page.keyboard.type("ting again")
    await expect(bob.page.locator("#typing")).to_have_text("Alice is typing…", timeout=5_000)
    await alice.page.keyboard.press("Enter")
    await expect(bob.message_with("I am writing again")).to_be_visible()
    await expect(bob.page.locator("#typing")).to_have_text("")  # cleared by the message itself
    await alice.close()
    await bob.close()


async def test_typing_indicator_names_two_and_counts_three(browser, server, room):
    watcher = await ChatPage.open(browser, page_url(server, room))
    typists = []
    for name in ("Ann", "Ben", "Cat"):
        typist = await ChatPage.open(browser, page_url(server, room))
        await typist.set_name(name)
        typists.append(typist)
    await typists[0].page.type("#message-input", "a")
    await expect(watcher.page.locator("#typing")).to_have_text("Ann is typing…")
    await typists[1].page.type("#message-input", "b")
    await expect(watcher.page.locator("#typing")).to_have_text("Ann and Ben are typing…")
    await typists[2].page.type("#message-input", "c")
    await expect(watcher.page.locator("#typing")).to_have_text("3 people are typing…")
    for person in (watcher, *typists):
        await person.close()


async def test_a_new_name_shows_in_the_other_page_and_survives_a_reload(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    bob = await ChatPage.open(browser, page_url(server, room))

    await alice.set_name("Alice")
    await expect(bob.page.locator("#messages .system-line", has_text="is now known as Alice")).to_be_visible()
    await expect(bob.page.locator("#user-list")).to_contain_text("Alice")
    await alice.say("named now")
    await expect(bob.message_with("named now").locator(".author")).to_have_text("Alice")

    await alice.page.reload()
    await alice.wait_connected()
    await expect(alice.page.locator("#name-input")).to_have_value("Alice")
    # The reloaded tab is back under its name: no default name, no rename, and (a reload is not
    # a leave) no "left" or "joined" line either.
    await alice.say("back again")
    await expect(bob.message_with("back again").locator(".author")).to_have_text("Alice")
    await expect(bob.page.locator("#messages .system-line", has_text="is now known as")).to_have_count(1)
    for line in ("Alice left the room", "Alice joined the room"):
        await expect(bob.page.locator("#messages .system-line", has_text=line)).to_have_count(0)
    await alice.close()
    await bob.close()


async def test_the_servers_answer_to_an_invalid_name_appears_next_to_the_control(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.set_name("\u202eevil")  # a bidi override: the page lets it through, the server does not
    await expect(alice.page.locator("#name-error")).to_contain_text("control characters")
    await alice.set_name("")
    await expect(alice.page.locator("#name-error")).to_contain_text("32 characters")
    await alice.close()


async def test_error_events_are_quiet_notices_not_alerts(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.page.evaluate("chat.ws.send('{not json')")
    await expect(alice.page.locator("#notices .notice")).to_contain_text("not valid JSON")
    assert alice.problems.dialogs == []
    await alice.close()


async def test_html_in_names_and_messages_shows_literally_and_never_runs(browser, server, room):
    mallory = await ChatPage.open(browser, page_url(server, room))
    alice = await ChatPage.open(browser, page_url(server, room))

    await mallory.set_name("<img src=x onerror=alert(1)>")
    await mallory.say(XSS)
    for page in (alice, mallory):
        await expect(page.message_with("window.__xss=2").locator(".text")).to_have_text(XSS)
        await expect(page.page.locator("#user-list")).to_contain_text("<img src=x onerror=alert(1)>")
        assert (
            await page.page.locator("#messages img, #messages script, #user-list img, #messages b").count()
            == 0
        )
        assert await page.page.evaluate("window.__xss") is None
        assert page.problems.dialogs == []
    await mallory.close()
    await alice.close()


async def test_switching_rooms_from_the_lobby_list_follows_in_the_url(browser, server, room):
    other_room = f"{room}-b"
    there = await ChatPage.open(browser, page_url(server, other_room))
    await there.set_name("There")
    alice = await ChatPage.open(browser, page_url(server, room))

    room_button = alice.page.locator(f'#room-list button[data-room="{other_room}"]')
    await expect(room_button.locator(".count")).to_have_text("1")
    await room_button.click()

    await expect(alice.page.locator("#room-name")).to_have_text(other_room)
    assert alice.page.url.endswith(f"?room={other_room}")
    await alice.wait_connected()
    await expect(alice.page.locator("#user-list")).to_contain_text("There")
    await expect(room_button).to_have_attribute("aria-current", "true")
    await alice.say("hello over here")
    await expect(there.message_with("hello over here")).to_be_visible()

    await alice.page.go_back()  # the back button returns to the first room
    await expect(alice.page.locator("#room-name")).to_have_text(room)
    await alice.wait_connected()
    await expect(alice.page.locator("#user-list li")).to_have_count(1)
    await alice.close()
    await there.close()


async def test_typing_a_room_name_switches_rooms(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.page.fill("#room-input", "not a room!")
    await alice.page.press("#room-input", "Enter")
    await expect(alice.page.locator("#room-error")).not_to_be_empty()
    await alice.page.fill("#room-input", f"{room}-typed")
    await alice.page.press("#room-input", "Enter")
    await expect(alice.page.locator("#room-name")).to_have_text(f"{room}-typed")
    assert alice.page.url.endswith(f"?room={room}-typed")
    await alice.wait_connected()
    await alice.close()


async def test_the_page_reconnects_after_a_restart_and_delivers_what_was_written_meanwhile(
    browser, request, room
):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await bob.say("before the restart")
    await expect(alice.message_with("before the restart")).to_be_visible()

    server.stop()
    await expect(alice.status).to_have_attribute("data-state", re.compile("reconnecting|connecting"))
    await expect(alice.page.locator("#status-text")).to_contain_text(re.compile("Reconnecting|Connecting"))
    await expect(alice.page.locator("#retry-button")).to_be_visible()
    await alice.say("written while the server was down")
    pending = alice.message_with("written while the server was down")
    await expect(pending).to_have_class(re.compile("pending"))

    # Same port, same database. The two pages come back in whatever order their backoff
    # picks; Bob resumes from his last message id, so he gets Alice's message either way.
    restarted = ServerProcess(
        ["--db", str(server.db_path)], {}, log_path(f"{request.node.name}-2"), port=server.port, limits=True
    )
    restarted.start()
    try:
        await alice.wait_connected(timeout=15_000)
        await bob.wait_connected(timeout=15_000)
        await expect(pending).not_to_have_class(re.compile("pending"))
        await expect(bob.message_with("written while the server was down")).to_have_count(1)
        await expect(alice.message_with("written while the server was down")).to_have_count(1)
        for person in (alice, bob):
            await expect(person.message_with("before the restart")).to_have_count(1)
        await alice.close()
        await bob.close()
    finally:
        restarted.stop()


async def test_a_reload_keeps_the_conversation_without_duplicates(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    await alice.say("first from Alice")
    await expect(bob.message_with("first from Alice")).to_be_visible()
    await bob.say("reply from Bob")
    await expect(alice.message_with("reply from Bob")).to_be_visible()

    await alice.page.reload()
    await alice.wait_connected()
    await expect(alice.page.locator("#messages .divider")).to_have_text("Earlier messages")
    await expect(alice.messages.locator(".text")).to_have_text(["first from Alice", "reply from Bob"])
    await expect(alice.message_with("first from Alice")).to_have_class(re.compile(r"\bown\b"))  # still ours
    await expect(alice.message_with("reply from Bob")).not_to_have_class(re.compile(r"\bown\b"))
    await bob.say("after the reload")
    await expect(alice.messages.locator(".text")).to_have_text(
        ["first from Alice", "reply from Bob", "after the reload"]
    )
    await expect(bob.messages).to_have_count(3)
    await alice.close()
    await bob.close()


async def test_a_reconnect_resumes_with_exactly_the_missed_messages(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    await alice.say("one")
    await expect(alice.message_with("one")).not_to_have_class(re.compile("pending"))
    server.stop()
    await expect(alice.page.locator("#retry-button")).to_be_visible()

    restarted = ServerProcess(
        ["--db", str(server.db_path)], {}, log_path(f"{request.node.name}-2"), port=server.port, limits=True
    )
    restarted.start()
    try:
        # Before Alice is back, someone else talks.
        await alice.page.evaluate("chat.attempt = 10; chat.outageSince = Date.now() - 600_000")
        writer = await restarted.connect(f"/ws/chat/{room}?username=Writer")
        await writer.joined()
        for text in ("two", "three"):
            await writer.send(type="message", message=text)
        await alice.page.evaluate("chat.retrySoon()")  # unless it is back already
        await alice.wait_connected()
        await expect(alice.messages.locator(".text")).to_have_text(["one", "two", "three"])
        await expect(alice.page.locator("#messages .divider")).to_have_count(0)  # nothing to re-introduce
        await writer.close()
        await alice.close()
    finally:
        restarted.stop()


async def test_a_different_history_replaces_what_the_page_shows(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.say("from the old history")
    await expect(alice.message_with("from the old history")).not_to_have_class(re.compile("pending"))
    server.stop()
    # The store is replaced: a new database file, so a new epoch.
    replaced = ServerProcess(
        [], {}, log_path(f"{request.node.name}-second"), port=server.port, limits=True
    ).start()
    try:
        writer = await replaced.connect(f"/ws/chat/{room}?username=Writer")
        await writer.joined()
        await writer.send(type="message", message="from the new history")
        await alice.page.evaluate("chat.retrySoon()")  # unless it is back already
        await alice.wait_connected()
        await expect(alice.messages.locator(".text")).to_have_text(["from the new history"])
        await writer.close()
        await alice.close()
    finally:
        replaced.stop()


async def test_retry_now_reconnects_at_once(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room))
    server.stop()
    await expect(alice.page.locator("#retry-button")).to_be_visible()
    # Push the backoff to its 10 s ceiling (a long outage), then bring the server back and press the button.
    await alice.page.evaluate(
        "Math.random = () => 0.999; chat.attempt = 10; chat.outageSince = Date.now() - 600_000"
    )
    await expect(alice.page.locator("#status-text")).to_have_text("Reconnecting in 10 s")
    restarted = ServerProcess(
        [], {}, log_path(f"{request.node.name}-second"), port=server.port, limits=True
    ).start()
    try:
        await alice.page.locator("#retry-button").click()
        await alice.wait_connected(timeout=3_000)
        await alice.close()
    finally:
        restarted.stop()


async def test_the_page_comes_back_at_once_when_the_network_returns(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.page.context.set_offline(True)
    server.stop()
    await expect(alice.status).to_have_attribute("data-state", "offline")
    await expect(alice.page.locator("#status-text")).to_contain_text("Offline")
    # The backoff alone would wait up to 10 s (as after a long outage).
    await alice.page.evaluate("chat.attempt = 10; chat.outageSince = Date.now() - 600_000")
    restarted = ServerProcess(
        [], {}, log_path(f"{request.node.name}-second"), port=server.port, limits=True
    ).start()
    try:
        await alice.page.context.set_offline(False)  # fires the browser's 'online' event
        await alice.wait_connected(timeout=3_000)
        await alice.close()
    finally:
        restarted.stop()


async def test_the_page_retries_at_once_when_the_tab_becomes_visible_again(browser, request, room):
    server = ServerProcess([], {}, log_path(f"{request.node.name}-first"), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room))
    server.stop()
    await alice.page.evaluate(
        "Math.random = () => 0.999; chat.attempt = 10; chat.outageSince = Date.now() - 600_000"
    )
    await expect(alice.page.locator("#status-text")).to_have_text("Reconnecting in 10 s")
    restarted = ServerProcess(
        [], {}, log_path(f"{request.node.name}-second"), port=server.port, limits=True
    ).start()
    try:
        await alice.page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
        await alice.wait_connected(timeout=3_000)
        await alice.close()
    finally:
        restarted.stop()


async def test_at_most_50_messages_wait_for_the_connection(browser, request, room):
    server = ServerProcess([], {}, log_path(request.node.name), limits=True).start()
    alice = await ChatPage.open(browser, page_url(server, room))
    server.stop()
    await expect(alice.page.locator("#retry-button")).to_be_visible()
    for number in range(51):
        await alice.page.fill("#message-input", f"queued {number}")
        await alice.page.press("#message-input", "Enter")
    await expect(alice.page.locator("#messages .message.pending")).to_have_count(50)
    await expect(alice.page.locator("#notices .notice")).to_contain_text("Too many unsent messages")
    await expect(alice.page.locator("#message-input")).to_have_value("queued 50")  # kept, not lost
    await alice.close()


async def test_a_refusal_shows_the_reason_and_is_not_retried(browser, server):
    context = await browser.new_context()
    page = await context.new_page()
    attempts = []
    page.on("websocket", lambda ws: attempts.append(ws.url) if "/ws/chat/" in ws.url else None)
    await page.goto(f"{server.http_url}/?room=not%20valid")
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    await expect(page.locator("#status-text")).to_contain_text("invalid room name")
    await asyncio.sleep(3)
    assert attempts == []  # the page knows the name is invalid: it does not even try
    await context.close()


async def test_the_page_works_when_opened_from_disk_with_a_server_parameter(browser, server, room):
    file_url = (ROOT / "client.html").as_uri() + f"?server={server.ws_url}&room={room}"
    alice = await ChatPage.open(browser, file_url)
    await alice.set_name("FromDisk")
    bob = await ChatPage.open(browser, page_url(server, room))
    await alice.say("sent from a file:// page")
    await expect(bob.message_with("sent from a file:// page")).to_be_visible()
    await expect(alice.page.locator("#room-name")).to_have_text(room)
    await alice.close()
    await bob.close()


async def test_new_messages_pill_appears_only_when_the_reader_has_scrolled_up(browser, server, room):
    reader = await ChatPage.open(browser, page_url(server, room))
    writer = await ChatPage.open(browser, page_url(server, room))
    for number in range(30):
        await writer.say(f"line {number}")
    await expect(reader.message_with("line 29")).to_be_visible()  # followed to the bottom
    await expect(reader.page.locator("#new-messages")).to_be_hidden()

    await reader.page.locator("#messages").evaluate("list => { list.scrollTop = 0; }")
    await writer.say("while you were reading")
    await expect(reader.page.locator("#new-messages")).to_be_visible()
    await expect(reader.message_with("while you were reading")).not_to_be_in_viewport()
    await reader.page.locator("#new-messages").click()
    await expect(reader.message_with("while you were reading")).to_be_in_viewport()
    await expect(reader.page.locator("#new-messages")).to_be_hidden()
    await reader.close()
    await writer.close()


async def test_on_a_narrow_screen_the_side_panel_hides_behind_a_button(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), width=360)
    toggle = alice.page.locator("#panel-toggle")
    panel = alice.page.locator("#side-panel")
    await expect(panel).to_be_hidden()
    await expect(toggle).to_have_attribute("aria-expanded", "false")
    await toggle.click()
    await expect(panel).to_be_visible()
    await expect(toggle).to_have_attribute("aria-expanded", "true")
    await expect(alice.page.locator("#panel-close")).to_be_focused()  # not a field: no keyboard pops up
    await alice.page.keyboard.press("Escape")
    await expect(panel).to_be_hidden()
    await expect(toggle).to_be_focused()
    width = await alice.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360  # nothing sticks out sideways
    await alice.close()


@pytest.mark.parametrize("motion", ["no-preference", "reduce"])
async def test_entry_animations_respect_reduced_motion(browser, server, room, motion):
    alice = await ChatPage.open(browser, page_url(server, room), reduced_motion=motion)
    await alice.say("animated?")
    # The pending bubble is replaced by the server's copy: look at the one that stays.
    await expect(alice.message_with("animated?")).not_to_have_class(re.compile("pending"))
    name = await alice.message_with("animated?").evaluate("node => getComputedStyle(node).animationName")
    assert name == ("none" if motion == "reduce" else "rise")
    await alice.close()


async def test_controls_are_labelled_and_the_log_is_announced_politely(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    page = alice.page
    await expect(page.get_by_role("log", name="Messages")).to_have_attribute("aria-live", "polite")
    for label in ("Message", "Your name", "Go to a room"):
        await expect(page.get_by_label(label, exact=True)).to_be_visible()
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    await expect(page.get_by_role("status").first).to_be_visible()
    await alice.close()


async def test_screenshot_of_two_tabs_mid_conversation(browser, start_server):
    """Saved to test-artifacts/two-tabs.png (docs/screenshot.png is one of these)."""
    server = start_server()
    alice = await ChatPage.open(browser, page_url(server, "general"), width=900, name="Alice")
    bob = await ChatPage.open(
        browser, page_url(server, "general"), width=900, name="Bob", color_scheme="dark"
    )
    await alice.say("Hi Bob! Is the deploy out?")
    await expect(bob.message_with("deploy")).to_be_visible()
    await bob.say("Yes, all green 🚀\nStaging is next.")
    await expect(alice.message_with("Staging")).to_be_visible()
    await asyncio.sleep(2)  # typing notices go out at most once every 2 s
    await alice.page.type("#message-input", "Great, thanks")
    await expect(bob.page.locator("#typing")).to_have_text("Alice is typing…")

    shots = [base64.b64encode(await person.page.screenshot()).decode() for person in (alice, bob)]
    composer = await browser.new_page(viewport={"width": 1840, "height": 740})
    await composer.set_content(
        '<body style="margin:0;background:#c9ced6;display:flex;gap:20px;padding:10px">'
        + "".join(f'<img src="data:image/png;base64,{shot}" width="900">' for shot in shots)
        + "</body>"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "two-tabs.png"
    await composer.screenshot(path=str(path))
    assert path.stat().st_size > 20_000
    await composer.close()
    await alice.close()
    await bob.close()


async def test_a_burst_of_messages_is_paced_to_the_servers_limit_not_refused(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    bob = await ChatPage.open(browser, page_url(server, room))
    # 25 messages at once: 10 go at once (the burst), the rest at the server's 5 a second.
    await alice.page.evaluate("for (let n = 0; n < 25; n++) sendMessage(`paced ${n}`)")
    expected = [f"paced {n}" for n in range(25)]
    await expect(bob.messages.locator(".text")).to_have_text(expected, timeout=15_000)
    await expect(alice.page.locator("#messages .message.pending")).to_have_count(0)
    await expect(alice.page.locator("#notices .notice")).to_have_count(0)  # nothing was refused
    await alice.close()
    await bob.close()


async def test_the_page_runs_under_its_content_security_policy(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    violations: list[str] = []
    alice.page.on(
        "console",
        lambda message: violations.append(message.text) if "Content Security" in message.text else None,
    )
    await alice.page.reload()
    await alice.wait_connected()
    await alice.say("under CSP")
    await expect(alice.message_with("under CSP")).not_to_have_class(re.compile("pending"))
    policy = await alice.page.evaluate(
        "fetch(location.href).then(r => r.headers.get('content-security-policy'))"
    )
    assert "default-src 'none'" in policy
    assert violations == []
    await alice.close()


@pytest.fixture
def other_site() -> Iterator[str]:
    """Another site on this machine: a plain file server on another port, serving the page.
    (A page from a public site could not reach 127.0.0.1 at all: Chromium blocks that itself.)"""
    port = free_port()
    files = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(ROOT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):  # until it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    files.terminate()
    files.wait()


OPEN_SOCKET = """url => new Promise((done) => {
    const ws = new WebSocket(url);
    ws.onclose = (closed) => done([closed.code, closed.reason]);
})"""


TRY_SOCKET = """url => new Promise((done) => {
    try {
        const ws = new WebSocket(url);
        ws.onopen = () => done(["open"]);
        ws.onerror = () => done(["failed"]);
    } catch (error) {
        done(["blocked", error.name]);
    }
    setTimeout(() => done(["no answer"]), 3000);
})"""


async def test_a_page_from_another_site_is_refused_and_says_why(browser, server, room, other_site):
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{other_site}/README.md")  # any page of the other site: its script, our server
    closed = await page.evaluate(OPEN_SOCKET, f"{server.ws_url}/ws/chat/{room}")
    assert closed == [1008, f"origin {other_site} is not allowed (see --allowed-origins)"]
    await context.close()


async def test_the_page_opened_from_disk_says_how_to_allow_it_on_a_server_open_to_the_network(
    browser, start_server, room
):
    network_server = start_server("--host", "0.0.0.0")
    file_url = (ROOT / "client.html").as_uri() + f"?server={network_server.ws_url}&room={room}"
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(file_url)
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")
    await expect(page.locator("#status-text")).to_contain_text("--allowed-origins null")
    await context.close()
    allowing = start_server("--host", "0.0.0.0", "--allowed-origins", "null")
    alice = await ChatPage.open(
        browser, (ROOT / "client.html").as_uri() + f"?server={allowing.ws_url}&room={room}"
    )
    await alice.close()


@pytest.fixture
def listener() -> Iterator[tuple[int, socket.socket]]:
    """A port where nothing but this test listens, to see whether anything knocks."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.1)
    yield sock.getsockname()[1], sock
    sock.close()


async def test_the_served_page_ignores_a_server_parameter_and_keeps_its_token(
    browser, token_server, room, listener
):
    from fennec_chat.gate import Tokens

    port, sock = listener
    token = Tokens("page-test-secret").mint("Alice", ttl=600)
    url = f"{token_server.http_url}/?room={room}&server=ws://127.0.0.1:{port}&token={token}"
    alice = await ChatPage.open(browser, url)  # connected: to its own server
    await expect(alice.page.locator("#user-list")).to_contain_text("Alice")
    # Even a script that tried could not reach the other server: the page's CSP forbids it.
    tried = await alice.page.evaluate(TRY_SOCKET, f"ws://127.0.0.1:{port}/ws/chat/{room}?token={token}")
    assert tried in (["blocked", "SecurityError"], ["failed"]), tried
    with pytest.raises(TimeoutError):
        sock.accept()  # nobody knocked
    alice.problems.errors.clear()  # the CSP violation we provoked
    await alice.close()


async def test_a_message_with_a_direction_override_cannot_flip_the_page_around_it(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    mallory = await server.connect(f"/ws/chat/{room}?username=Mallory")
    await mallory.joined()
    await mallory.send(type="message", message="\u202eevil reversed")
    text = alice.message_with("evil reversed").locator(".text")
    await expect(text).to_have_attribute("dir", "auto")  # isolated: its own direction only
    author = alice.message_with("evil reversed").locator(".author")
    assert await author.evaluate("node => node.tagName") == "BDI"
    await mallory.close()
    await alice.close()


@pytest.fixture
def token_server(start_server) -> ServerProcess:
    return start_server(env={"CHAT_JWT_SECRET": "page-test-secret"}, limits=True)


async def test_a_token_in_the_page_url_signs_in(browser, token_server, room):
    from fennec_chat.gate import Tokens

    token = Tokens("page-test-secret").mint("Alice", ttl=600)
    alice = await ChatPage.open(browser, f"{token_server.http_url}/?room={room}&token={token}")
    await expect(alice.page.locator("#user-list")).to_contain_text("Alice")
    assert "token=" not in alice.page.url  # kept for the tab, out of the address bar
    await expect(alice.page.locator("#name-input")).to_be_disabled()
    await alice.page.reload()
    await alice.wait_connected()
    await expect(alice.page.locator("#user-list")).to_contain_text("Alice")
    await alice.close()


async def test_a_kicked_page_says_so_and_does_not_come_back(browser, token_server, room):
    from fennec_chat.gate import Tokens

    tokens = Tokens("page-test-secret")
    bob = await ChatPage.open(browser, f"{token_server.http_url}/?room={room}&token={tokens.mint('Bob')}")
    admin = await token_server.connect(f"/ws/chat/{room}?token={tokens.mint('Mod', admin=True)}")
    _, presence = await admin.joined()
    bob_id = next(user["client_id"] for user in presence["users"] if user["username"] == "Bob")
    attempts = []
    bob.page.on("websocket", lambda ws: attempts.append(ws.url) if "/ws/chat/" in ws.url else None)
    await admin.send(type="kick", client_id=bob_id)
    await expect(bob.status).to_have_attribute("data-state", "refused")
    await expect(bob.page.locator("#status-text")).to_contain_text("removed from this room")
    await expect(bob.page.locator("#messages .system-line").last).to_contain_text(
        "Bob was removed from the room by Mod"
    )
    await asyncio.sleep(2)
    assert attempts == []
    await admin.close()
    await bob.close()


# --- The page's limits come from the server's welcome ----------------------------------------


async def test_page_takes_its_message_limit_from_the_welcome(browser, start_server, room):
    server = start_server("--max-message-chars", "10")
    alice = await ChatPage.open(browser, page_url(server, room))
    composer = alice.page.locator("#message-input")
    await alice.page.type("#message-input", "0123456789 and more")
    # Never cut short: the counter under the composer counts against the welcome's limit.
    await expect(composer).to_have_value("0123456789 and more")
    await expect(alice.page.locator("#message-count")).to_have_text("9 characters too many")
    # A longer text that got there some other way (a script, an extension) is refused at once.
    await composer.evaluate("node => { node.value = 'ten and one'; }")
    await alice.page.press("#message-input", "Enter")
    await expect(alice.page.locator("#notices .notice")).to_have_text(
        "Messages are limited to 10 characters."
    )
    await expect(composer).to_have_value("ten and one")  # kept, to shorten
    assert alice.sent_of("message") == []
    await alice.page.fill("#message-input", "ten chars!")
    await alice.page.press("#message-input", "Enter")
    await expect(alice.message_with("ten chars!")).not_to_have_class(re.compile("pending"))
    await alice.close()


async def test_page_takes_its_username_limit_from_the_welcome(browser, start_server, room):
    server = start_server("--max-username-chars", "5")
    alice = await ChatPage.open(browser, page_url(server, room))
    name, error = alice.page.locator("#name-input"), alice.page.locator("#name-error")
    await expect(name).to_have_attribute("maxlength", "5")
    await alice.set_name("")
    await expect(error).to_have_text("Use 1\u20135 characters.")
    await name.evaluate("node => { node.value = 'Alexander'; }")  # past the field's own limit
    await alice.page.press("#name-input", "Enter")
    await expect(error).to_have_text("Use 1\u20135 characters.")
    await alice.page.fill("#name-input", "")
    await alice.page.type("#name-input", "Alexander")
    await expect(name).to_have_value("Alexa")
    await alice.page.press("#name-input", "Enter")
    await expect(alice.page.locator("#user-list")).to_contain_text("Alexa")
    await expect(error).to_have_text("")
    assert [frame["username"] for frame in alice.sent_of("set_username")] == ["Alexa"]
    await alice.close()


async def test_page_takes_its_room_name_limit_from_the_welcome(browser, start_server):
    server = start_server("--max-room-chars", "8")
    alice = await ChatPage.open(browser, page_url(server, "short"))
    field, error = alice.page.locator("#room-input"), alice.page.locator("#room-error")
    too_long = "Too long: room names have at most 8 characters (this one has 9)."
    await alice.page.type("#room-input", "ninechars")
    await expect(field).to_have_value("ninechars")  # never cut: a cut name would be another room
    await expect(error).to_have_text(too_long)  # said as it is typed
    await alice.page.press("#room-input", "Enter")
    await expect(error).to_have_text(too_long)
    await expect(alice.page.locator("#room-name")).to_have_text("short")  # stayed, not refused
    await expect(alice.status).to_have_attribute("data-state", "connected")
    await alice.page.press("#room-input", "Backspace")
    await expect(error).to_have_text("")
    await alice.page.press("#room-input", "Enter")
    await expect(alice.page.locator("#room-name")).to_have_text("ninechar")
    await alice.wait_connected()
    await expect(error).to_have_text("")
    await alice.close()


async def test_page_paces_its_typing_notices_to_the_welcomes_limit(browser, start_server, room):
    server = start_server("--rate-typing", "0.2", limits=True)  # one notice every 5 s
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room))
    await alice.page.click("#message-input")
    for _ in range(14):  # about 4 s of typing: one notice, not one every 2 s
        await alice.page.keyboard.type("a")
        await asyncio.sleep(0.25)
    assert len(alice.sent_of("typing")) == 1
    # Bob's page knows the next one cannot come sooner: the one it has still shows...
    assert await bob.page.locator("#typing").text_content() == "Alice is typing…"
    # ...until it would have come, and a moment more.
    await expect(bob.page.locator("#typing")).to_have_text("", timeout=5_000)
    await alice.close()
    await bob.close()


async def test_page_paces_renames_to_the_welcomes_limit(browser, start_server, room):
    server = start_server("--rate-renames", "0.1", "--rate-renames-burst", "1", limits=True)
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.set_name("Ann")
    await expect(alice.page.locator("#user-list")).to_contain_text("Ann")
    await alice.set_name("Bea")  # a second one within 10 s: said next to the field, not sent
    await expect(alice.page.locator("#name-error")).to_have_text(
        re.compile(r"^Renaming too fast: try again in (9|10) s\.$")
    )
    assert [frame["username"] for frame in alice.sent_of("set_username")] == ["Ann"]
    await expect(alice.page.locator("#notices .notice")).to_have_count(0)
    await alice.close()


async def open_with_chat_route(browser: Browser, url: str, before_first: list[dict]) -> ChatPage:
    """Open the page with `before_first` slipped in ahead of each chat socket's first event."""
    context = await browser.new_context()
    page = await context.new_page()
    problems = PageProblems()
    problems.watch(page)

    def route(page_side) -> None:
        server_side = page_side.connect_to_server()
        pending = list(before_first)

        def from_server(message) -> None:
            while pending:
                page_side.send(json.dumps(pending.pop(0)))
            page_side.send(message)

        server_side.on_message(from_server)

    await page.route_web_socket(re.compile(r"/ws/chat/"), route)
    await page.goto(url)
    chat_page = ChatPage(page, problems)
    await chat_page.wait_connected()
    return chat_page


async def test_page_tells_its_welcome_by_kind_and_shows_other_system_lines(browser, server, room):
    notice = {"type": "system", "message": "Maintenance at noon", "timestamp": "2024-01-01T11:00:00+00:00"}
    alice = await open_with_chat_route(browser, page_url(server, room), [notice])
    # The notice came first, yet the welcome is still the welcome: we know who we are.
    await expect(alice.page.locator("#messages .system-line")).to_have_text(
        ["Maintenance at noon", f"Welcome to room '{room}'!"]
    )
    await expect(alice.page.locator("#user-list")).to_contain_text("(you)")
    await alice.close()


async def test_page_ignores_events_of_a_type_it_does_not_know_even_built_in_names(browser, server, room):
    odd = [{"type": kind} for kind in ("__proto__", "constructor", "toString", "no_such_type")]
    alice = await open_with_chat_route(browser, page_url(server, room), [*odd, {"no type": 1}])
    await expect(alice.page.locator("#messages .system-line")).to_have_text([f"Welcome to room '{room}'!"])
    await alice.close()  # asserts that no script error happened
