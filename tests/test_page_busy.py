"""client.html for a busy room, in real Chromium against a real server: a gap in the message
ids heals itself (a resume, nothing out of order, nothing twice), unread counts in the title
while the tab is hidden with a line above the first unread message, and mentions of us
highlighted, with a desktop notification only when the user allowed it."""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import expect

from tests.server_process import ServerProcess
from tests.test_page import ChatPage, page_url
from tests.test_page_text_and_access import assert_axe_clean, need_axe


@pytest.fixture
def server(limited_server: ServerProcess) -> ServerProcess:
    """The browser tests run against the production limits, as a browser would meet them."""
    return limited_server


# Every message text as it first goes into the log, in that order (a message shown out of
# order and moved later would show here).
RECORD_SHOWN = """
window.__shown = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((changes) => {
    for (const change of changes) for (const node of change.addedNodes) {
      if (node.classList?.contains("message")) window.__shown.push(node.querySelector(".text").textContent);
    }
  }).observe(document.getElementById("messages"), { childList: true });
});
"""

# A page-level stand-in for the browser's Notification: records what the page shows and asks.
# `permission` is the browser's own (the context's grant), until the page asks.
RECORD_NOTIFICATIONS = """
window.__notifications = [];
window.__permissionRequests = 0;
const BrowserNotification = window.Notification;
window.Notification = class {
  constructor(title, options = {}) { window.__notifications.push({ title, body: options.body }); }
  close() {}
  static get permission() { return window.__permission ?? BrowserNotification.permission; }
  static requestPermission() {
    window.__permissionRequests += 1;
    window.__permission = "granted";
    return Promise.resolve("granted");
  }
};
"""

HIDE = """() => {
  Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
  Object.defineProperty(document, "hidden", { value: true, configurable: true });
  document.dispatchEvent(new Event("visibilitychange"));
}"""

SHOW = """() => {
  Object.defineProperty(document, "visibilityState", { value: "visible", configurable: true });
  Object.defineProperty(document, "hidden", { value: false, configurable: true });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


# --- 3. The page heals gaps by itself -----------------------------------------------------------


async def test_a_skipped_delivery_is_healed_in_order_and_nothing_shows_twice(browser, server, room):
    sockets: list[str] = []
    dropped: list[dict] = []

    def route(page_side) -> None:
        """Alice's chat socket, with the server's delivery of "two" skipped (once)."""
        sockets.append(page_side.url)
        server_side = page_side.connect_to_server()

        def from_server(message) -> None:
            event = json.loads(message)
            if event.get("type") == "message" and event.get("message") == "two" and not dropped:
                dropped.append(event)
                return
            page_side.send(message)

        server_side.on_message(from_server)

    alice = await ChatPage.open(
        browser, page_url(server, room), name="Alice", scripts=(RECORD_SHOWN,), route=route
    )
    bob = await ChatPage.open(browser, page_url(server, room), name="Bob")
    for text in ("one", "two", "three", "four"):
        await bob.say(text)
    await expect(bob.messages.locator(".text")).to_have_text(["one", "two", "three", "four"])
    await expect(alice.messages.locator(".text")).to_have_text(["one", "two", "three", "four"])
    assert len(dropped) == 1
    # Shown in order as they came: "three" never went up before "two".
    assert await alice.page.evaluate("window.__shown") == ["one", "two", "three", "four"]
    # It resumed from the last message it showed, in the history it had.
    assert len(sockets) == 2, sockets
    assert f"since={dropped[0]['id'] - 1}&epoch=" in sockets[1]
    await bob.say("five")
    await expect(alice.messages.locator(".text")).to_have_text(["one", "two", "three", "four", "five"])
    await expect(alice.page.locator("#messages .system-line", has_text="Reconnected")).to_have_count(0)
    # Closed with 4100 to resume at once: for Bob, Alice never left (nor joined again).
    for line in ("Alice left the room", "Alice joined the room"):
        await expect(bob.page.locator("#messages .system-line", has_text=line)).to_have_count(0)
    await bob.close()
    await alice.close()


# --- 5. A busy person's page --------------------------------------------------------------------


async def test_a_hidden_tab_counts_unread_messages_in_its_title_and_marks_the_first(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    title = f"#{room} · Fennec chat"
    await expect(alice.page).to_have_title(title)
    bob = await server.connect(f"/ws/chat/{room}?username=Bob")
    await bob.joined()
    await bob.send(type="message", message="seen")
    await expect(alice.message_with("seen")).to_be_visible()
    await expect(alice.page).to_have_title(title)  # read as it came

    await alice.page.evaluate(HIDE)
    for text in ("first unread", "second unread", "third unread"):
        await bob.send(type="message", message=text)
    await expect(alice.message_with("third unread")).to_be_visible()
    await expect(alice.page).to_have_title(f"(3) {title}")
    divider = alice.page.locator("#messages .unread-divider")
    await expect(divider).to_have_count(1)
    following = divider.locator("xpath=following-sibling::li[1]")
    await expect(following.locator(".text")).to_have_text("first unread")
    await alice.say("own, while away")  # our own message is never unread
    await expect(alice.message_with("own, while away")).not_to_have_class(re.compile("pending"))
    await expect(alice.page).to_have_title(f"(3) {title}")

    await alice.page.evaluate(SHOW)
    await expect(alice.page).to_have_title(title)
    await expect(divider).to_have_count(1)  # still where the unread ones began
    await bob.send(type="message", message="while looking")
    await expect(alice.message_with("while looking")).to_be_visible()
    await expect(alice.page).to_have_title(title)

    # Hidden again: the count starts over, and the line moves to the new first unread message.
    await alice.page.evaluate(HIDE)
    await bob.send(type="message", message="later unread")
    await expect(alice.page).to_have_title(f"(1) {title}")
    await expect(divider).to_have_count(1)
    await expect(following.locator(".text")).to_have_text("later unread")
    await bob.close()
    await alice.close()


async def test_a_mention_is_highlighted_and_notified_when_hidden_and_allowed(browser, server, room):
    alice = await ChatPage.open(
        browser,
        page_url(server, room),
        name="Alice",
        scripts=(RECORD_NOTIFICATIONS,),
        permissions=["notifications"],
    )
    assert await alice.page.evaluate("window.__permissionRequests") == 0
    await expect(alice.page.locator("#notify-button")).to_be_hidden()  # allowed already
    bob = await server.connect(f"/ws/chat/{room}?username=Bob")
    await bob.joined()
    texts = ["@ALICE are you in?", "mail bob@alice.example", "@alicette is someone else", "hi all"]
    for text in texts:
        await bob.send(type="message", message=text)
    await expect(alice.message_with("hi all")).to_be_visible()
    await expect(alice.message_with("@ALICE are you in?")).to_have_class(re.compile(r"\bmention\b"))
    await expect(alice.message_with("@ALICE are you in?")).to_contain_text("mentions you")
    for text in texts[1:]:
        await expect(alice.message_with(text)).not_to_have_class(re.compile(r"\bmention\b"))
    assert await alice.page.evaluate("window.__notifications") == []  # the tab is in view

    await alice.page.evaluate(HIDE)
    await bob.send(type="message", message="not for you")
    await bob.send(type="message", message="Look, @alice!")
    await expect(alice.message_with("Look, @alice!")).to_have_class(re.compile(r"\bmention\b"))
    assert await alice.page.evaluate("window.__notifications") == [
        {"title": f"Bob mentioned you in #{room}", "body": "Look, @alice!"}
    ]

    # The name we have now: after a rename, @Ann is us and @Alice is not.
    await alice.page.evaluate(SHOW)
    await alice.set_name("Ann")
    await expect(alice.page.locator("#user-list")).to_contain_text("Ann")
    await bob.send(type="message", message="@ann welcome")
    await bob.send(type="message", message="@Alice gone?")
    await expect(alice.message_with("@Alice gone?")).not_to_have_class(re.compile(r"\bmention\b"))
    await expect(alice.message_with("@ann welcome")).to_have_class(re.compile(r"\bmention\b"))
    assert await alice.page.evaluate("window.__permissionRequests") == 0
    await bob.close()
    await alice.close()


async def test_no_notification_without_permission_and_the_button_asks_once(browser, server, room):
    alice = await ChatPage.open(
        browser,
        page_url(server, room),
        name="Alice",
        scripts=("window.__permission = 'default';", RECORD_NOTIFICATIONS),
    )
    button = alice.page.locator("#notify-button")
    await expect(button).to_be_visible()
    assert await alice.page.evaluate("window.__permissionRequests") == 0  # nothing asked on load
    bob = await server.connect(f"/ws/chat/{room}?username=Bob")
    await bob.joined()
    await alice.page.evaluate(HIDE)
    await bob.send(type="message", message="@Alice hello")
    await expect(alice.message_with("@Alice hello")).to_have_class(re.compile(r"\bmention\b"))
    assert await alice.page.evaluate("window.__notifications") == []  # not allowed (yet)

    await alice.page.evaluate(SHOW)
    await button.click()
    await expect(button).to_be_hidden()
    assert await alice.page.evaluate("window.__permissionRequests") == 1
    await alice.page.evaluate(HIDE)
    await bob.send(type="message", message="@Alice now?")
    await expect(alice.message_with("@Alice now?")).to_be_visible()
    assert await alice.page.evaluate("window.__notifications") == [
        {"title": f"Bob mentioned you in #{room}", "body": "@Alice now?"}
    ]
    await bob.close()
    await alice.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_violation_with_unread_messages_and_a_mention(browser, server, room, scheme):
    need_axe()
    alice = await ChatPage.open(
        browser, page_url(server, room), name="Alice", color_scheme=scheme, bypass_csp=True
    )
    bob = await server.connect(f"/ws/chat/{room}?username=Bob")
    await bob.joined()
    await alice.page.evaluate(HIDE)
    await bob.send(type="message", message="Hi @Alice, a question for you")
    await bob.send(type="message", message="and another line")
    await expect(alice.page.locator("#messages .unread-divider")).to_have_count(1)
    await expect(alice.page.locator("#messages .mention")).to_have_count(1)
    await alice.page.evaluate(SHOW)
    await assert_axe_clean(alice.page)
    await bob.close()
    await alice.close()
