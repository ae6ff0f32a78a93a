"""client.html for everyone: notices that leave the controls free, text in any script, the
message limit as the server counts it, typing shown at once, keyboard and phone use, and an
axe-core audit, in real Chromium against a real server."""

from __future__ import annotations

import asyncio
import re
import uuid
from urllib.parse import urlencode

import pytest
from playwright.async_api import expect

from tests.browser import optional_part_missing
from tests.chat_client import ChatClient
from tests.server_process import ROOT, ServerProcess
from tests.test_page import ChatPage, page_url

# Installed by .ci/run (npm, pinned); on a laptop without it the audit is skipped.
AXE = ROOT / ".ci" / "node" / "node_modules" / "axe-core" / "axe.min.js"

PHONE = 390
DESKTOP = 1280


@pytest.fixture
def server(limited_server: ServerProcess) -> ServerProcess:
    """The browser tests run against the production limits, as a browser would meet them."""
    return limited_server


def overlaps(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["width"]
        and b["x"] < a["x"] + a["width"]
        and a["y"] < b["y"] + b["height"]
        and b["y"] < a["y"] + a["height"]
    )


# --- Notices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
async def test_a_notice_never_covers_the_composer_or_any_other_control(browser, server, room, width):
    alice = await ChatPage.open(browser, page_url(server, room), width=width)
    await alice.page.evaluate("chat.ws.send('{not json')")
    notice = alice.page.locator("#notices .notice")
    await expect(notice).to_contain_text("not valid JSON")
    notice_box = await notice.bounding_box()
    controls = alice.page.locator("button:visible, input:visible, textarea:visible")
    assert await controls.count() >= 3
    for index in range(await controls.count()):
        control = controls.nth(index)
        box = await control.bounding_box()
        described = await control.evaluate("node => node.id || node.outerHTML.slice(0, 80)")
        assert not overlaps(notice_box, box), f"the notice covers {described}"
    # A tap on Send reaches Send while the notice shows.
    send = await alice.page.locator("#send-button").bounding_box()
    hit = await alice.page.evaluate(
        "([x, y]) => document.elementFromPoint(x, y).closest('button')?.id",
        [send["x"] + send["width"] / 2, send["y"] + send["height"] / 2],
    )
    assert hit == "send-button"
    await alice.close()


async def test_a_rename_the_server_refuses_as_too_fast_says_so_and_puts_the_name_back(
    browser, start_server, room
):
    server = start_server("--rate-renames", "0.1", "--rate-renames-burst", "1", limits=True)
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.set_name("Ann")
    await expect(alice.page.locator("#user-list")).to_contain_text("Ann")
    # The page's own pacing is out of step with the server's (another tab of the same person,
    # an older server): the server is the one that refuses.
    await alice.page.evaluate("pace.renames.set(0, 1)")
    await alice.set_name("Bea")
    error = alice.page.locator("#name-error")
    await expect(error).to_have_text(re.compile(r"^Renaming too fast: try again in (9|10) s\.$"))
    await expect(alice.page.locator("#name-input")).to_have_value("Ann")  # the name we really have
    await expect(alice.page.locator("#notices .notice")).to_have_count(0)  # said next to the field
    assert [frame["username"] for frame in alice.sent_of("set_username")] == ["Ann", "Bea"]
    await alice.close()


async def test_a_name_the_server_refuses_is_replaced_by_the_actual_name(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    await alice.set_name("\u202eevil")  # a bidi override: the page lets it through, the server does not
    await expect(alice.page.locator("#name-error")).to_contain_text("control characters")
    await expect(alice.page.locator("#name-input")).to_have_value("Alice")
    await alice.close()


async def test_a_message_sent_too_fast_is_said_in_words_and_whole_seconds(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    # A burst past the page's own pacing (as a second tab behind the same address would add).
    await alice.page.evaluate(
        "for (let n = 0; n < 14; n++) chat.send({type: 'message', message: `burst ${n}`})"
    )
    notice = alice.page.locator("#notices .notice").first
    await expect(notice).to_have_text(re.compile(r"^Sending messages too fast: try again in \d+ s\.$"))
    await alice.close()


# --- Text in any script ------------------------------------------------------------------------


async def test_hebrew_and_arabic_messages_and_names_read_right_to_left(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    sara = await server.connect(f"/ws/chat/{room}?{urlencode({'username': 'سارة'})}")
    await sara.joined()
    await sara.send(type="message", message="שלום עולם")
    message = alice.message_with("שלום עולם")
    await expect(message).to_be_visible()
    person = alice.page.locator("#user-list li", has_text="سارة").locator("[dir]")
    for node in (message.locator(".text"), message.locator(".author"), person):
        await expect(node).to_have_attribute("dir", "auto")
        assert await node.evaluate("node => getComputedStyle(node).direction") == "rtl"
    # What people write goes in right to left, too.
    for field in ("#message-input", "#name-input"):
        await expect(alice.page.locator(field)).to_have_attribute("dir", "auto")
    await alice.page.fill("#message-input", "مرحبا")
    assert await alice.page.locator("#message-input").evaluate("n => getComputedStyle(n).direction") == "rtl"
    await sara.close()
    await alice.close()


async def test_avatars_show_the_first_grapheme_flags_and_joined_emoji_intact(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    names = {"🇫🇷 Fred": "🇫🇷", "👩‍👩‍👧 Family": "👩‍👩‍👧", "e\u0301mile": "E\u0301", "zoë": "Z"}
    clients = []
    for name, _ in names.items():
        client = await server.connect(f"/ws/chat/{room}?{urlencode({'username': name})}")
        await client.joined()
        await client.send(type="message", message=f"hello from {name}")
        clients.append(client)
    for name, first in names.items():
        await expect(alice.message_with(f"hello from {name}").locator(".avatar")).to_have_text(first)
        await expect(alice.page.locator("#user-list li", has_text=name).locator(".avatar")).to_have_text(
            first
        )
    for client in clients:
        await client.close()
    await alice.close()


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
async def test_a_64_character_room_name_fits_the_panel_and_the_composer(browser, server, width):
    long_room = ("longroom" + uuid.uuid4().hex * 2)[:64]
    alice = await ChatPage.open(browser, page_url(server, long_room), width=width)
    page = alice.page
    if width == PHONE:
        await page.click("#panel-toggle")
        await expect(page.locator("#side-panel")).to_be_visible()
    button = page.locator(f'#room-list button[data-room="{long_room}"]')
    await expect(button).to_be_visible()
    for selector in ("#side-panel", f'#room-list button[data-room="{long_room}"]'):
        scroll, client = await page.locator(selector).evaluate("n => [n.scrollWidth, n.clientWidth]")
        assert scroll <= client, f"{selector} overflows: {scroll} > {client}"
    # The whole name is there to read, wrapped if need be.
    await expect(button).to_contain_text(long_room)
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    # The composer's placeholder ("Message #…") takes one line, like a short one.
    if width == PHONE:
        await page.click("#panel-close")
    composer = page.locator("#message-input")
    await expect(composer).to_have_attribute("placeholder", re.compile("Message #"))
    heights = await composer.evaluate(
        """node => {
            const long = [node.scrollHeight, node.scrollWidth, node.clientWidth];
            const placeholder = node.placeholder;
            node.placeholder = "Message #general";
            const short = node.scrollHeight;
            node.placeholder = placeholder;
            return [...long, short];
        }"""
    )
    long_height, scroll_width, client_width, short_height = heights
    assert long_height == short_height, heights  # not wrapped onto lines that do not show
    assert scroll_width <= client_width, heights
    await alice.close()


async def test_the_message_limit_counts_characters_as_the_server_does_with_a_counter_near_it(
    browser, server, room
):
    alice = await ChatPage.open(browser, page_url(server, room))
    page = alice.page
    composer, counter = page.locator("#message-input"), page.locator("#message-count")
    await alice.page.fill("#message-input", "short")
    await expect(counter).to_be_hidden()  # far from the limit: no counter
    # 2,000 emoji are 2,000 characters to the server (4,000 UTF-16 units to the browser).
    emoji = "😀" * 2000
    await page.fill("#message-input", emoji)  # as a paste would
    await expect(composer).to_have_value(emoji)
    await expect(counter).to_be_visible()
    await expect(counter).to_have_text("0 characters left")
    await page.press("#message-input", "Enter")
    await expect(alice.message_with("😀😀😀")).not_to_have_class(re.compile("pending|failed"))
    assert [len(frame["message"]) for frame in alice.sent_of("message")] == [2000]

    await page.fill("#message-input", "x" * 1995)
    await expect(counter).to_have_text("5 characters left")
    # A paste past the limit is kept whole and said to be too long, never cut short silently.
    await page.fill("#message-input", "y" * 2003)
    await expect(composer).to_have_value("y" * 2003)
    await expect(counter).to_have_text("3 characters too many")
    await expect(composer).to_have_attribute("aria-invalid", "true")
    await page.press("#message-input", "Enter")
    await expect(composer).to_have_value("y" * 2003)  # kept, to shorten
    assert len(alice.sent_of("message")) == 1
    await expect(composer).to_be_focused()
    await alice.close()


# --- Typing ------------------------------------------------------------------------------------


async def test_typing_shows_at_once_for_the_next_message_after_one_is_sent(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), name="Alice")
    bob = await ChatPage.open(browser, page_url(server, room))
    # Every frame the page sends, in order, recorded by the page itself as it sends it.
    await alice.page.evaluate(
        """() => {
            window.__sent = [];
            const send = WebSocket.prototype.send;
            WebSocket.prototype.send = function (data) {
                if (this.url.includes("/ws/chat/")) window.__sent.push(JSON.parse(data).type);
                return send.call(this, data);
            };
        }"""
    )
    await alice.page.click("#message-input")
    await alice.page.keyboard.type("first")
    await expect(bob.page.locator("#typing")).to_have_text("Alice is typing…")
    await asyncio.sleep(1.1)  # the server takes one typing notice a second (the page, one per 2 s)
    await alice.page.keyboard.press("Enter")
    await expect(bob.message_with("first")).to_be_visible()
    await expect(bob.page.locator("#typing")).to_have_text("")  # cleared by the message
    await alice.page.keyboard.type("s")  # one key of the next message
    # The notice went with that very key: the throttle started over when the message went.
    assert await alice.page.evaluate("window.__sent") == ["typing", "message", "typing"]
    await expect(bob.page.locator("#typing")).to_have_text("Alice is typing…")
    await alice.close()
    await bob.close()


# --- Keyboard and phone ------------------------------------------------------------------------


async def expect_focus_ring_on_composer(page) -> None:
    composer = page.locator("#message-input")
    await expect(composer).to_be_focused()
    assert await composer.evaluate("node => node.matches(':focus-visible')")
    style, width = await composer.evaluate(
        "node => [getComputedStyle(node).outlineStyle, parseFloat(getComputedStyle(node).outlineWidth)]"
    )
    assert style != "none"
    assert width >= 2


async def test_switching_rooms_from_the_list_by_keyboard_focuses_the_composer(browser, server, room):
    other_room = f"{room}-b"
    there = await ChatPage.open(browser, page_url(server, other_room))
    alice = await ChatPage.open(browser, page_url(server, room), width=DESKTOP)
    button = alice.page.locator(f'#room-list button[data-room="{other_room}"]')
    await expect(button).to_be_visible()
    await button.focus()
    await alice.page.keyboard.press("Enter")
    await expect(alice.page.locator("#room-name")).to_have_text(other_room)
    await alice.wait_connected()
    await expect_focus_ring_on_composer(alice.page)
    await alice.close()
    await there.close()


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
async def test_going_to_a_typed_room_by_keyboard_focuses_the_composer(browser, server, room, width):
    alice = await ChatPage.open(browser, page_url(server, room), width=width)
    if width == PHONE:
        await alice.page.locator("#panel-toggle").focus()
        await alice.page.keyboard.press("Enter")
        await expect(alice.page.locator("#side-panel")).to_be_visible()
    await alice.page.locator("#room-input").focus()
    await alice.page.keyboard.type(f"{room}-typed")
    await alice.page.keyboard.press("Enter")
    await expect(alice.page.locator("#room-name")).to_have_text(f"{room}-typed")
    await expect_focus_ring_on_composer(alice.page)
    await alice.close()


async def test_focus_stays_on_a_room_button_when_the_room_list_changes(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room))
    await alice.page.locator(f'#room-list button[data-room="{room}"]').focus()
    elsewhere = await server.connect(f"/ws/chat/{room}-elsewhere")  # the list changes under it
    await elsewhere.joined()
    await expect(alice.page.locator(f'#room-list button[data-room="{room}-elsewhere"]')).to_have_count(1)
    await expect(alice.page.locator(f'#room-list button[data-room="{room}"]')).to_be_focused()
    await elsewhere.close()
    await alice.close()


async def test_the_phone_drawer_traps_focus_and_does_not_focus_a_text_field(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), width=PHONE, has_touch=True)
    page = alice.page
    await page.tap("#panel-toggle")
    await expect(page.locator("#side-panel")).to_be_visible()
    # Focus moved into the drawer, but not to a text field (that would pop the keyboard).
    focused = await page.evaluate(
        "[document.activeElement.tagName, document.activeElement.closest('#side-panel') !== null]"
    )
    assert focused[0] not in ("INPUT", "TEXTAREA"), focused
    assert focused[1], focused
    for key in ["Tab"] * 14 + ["Shift+Tab"] * 14:
        await page.keyboard.press(key)
        inside = await page.evaluate("document.activeElement.closest('#side-panel') !== null")
        name = await page.evaluate("document.activeElement.id || document.activeElement.tagName")
        assert inside, f"{key} moved focus out of the drawer, to {name}"
    await page.keyboard.press("Escape")
    await expect(page.locator("#side-panel")).to_be_hidden()
    await expect(page.locator("#panel-toggle")).to_be_focused()
    await alice.close()


async def test_a_tap_outside_the_phone_drawer_closes_it_over_a_dimmed_backdrop(browser, server, room):
    alice = await ChatPage.open(browser, page_url(server, room), width=PHONE, has_touch=True)
    page = alice.page
    await page.tap("#panel-toggle")
    await expect(page.locator("#side-panel")).to_be_visible()
    await page.wait_for_timeout(300)  # the drawer's slide-in
    # Left of the drawer, over the conversation: a dimmed backdrop, not the messages.
    backdrop = await page.evaluate(
        """() => {
            const node = document.elementFromPoint(20, 400);
            const outside = node.closest('#side-panel, .conversation') === null;
            return [outside, getComputedStyle(node).backgroundColor];
        }"""
    )
    assert backdrop[0], backdrop
    alpha = re.fullmatch(r"rgba?\(\d+, \d+, \d+(?:, ([\d.]+))?\)", backdrop[1])
    assert alpha, backdrop
    assert float(alpha.group(1) or 0) >= 0.2, backdrop  # see-through, but dimmed
    await page.touchscreen.tap(20, 400)
    await expect(page.locator("#side-panel")).to_be_hidden()
    await expect(page.locator("#panel-toggle")).to_have_attribute("aria-expanded", "false")
    # The page is usable again: the composer takes a tap.
    await page.tap("#message-input")
    await expect(page.locator("#message-input")).to_be_focused()
    await alice.close()


# --- The axe-core audit ------------------------------------------------------------------------

RUN_AXE = """async () => {
    // Wait for entry animations and the drawer's slide (not for the endless "connecting" pulse).
    const finite = document.getAnimations().filter((a) => a.effect.getTiming().iterations !== Infinity);
    await Promise.all(finite.map((a) => a.finished.catch(() => null)));
    // Every rule, the experimental ones too (label-content-name-mismatch is one of them).
    const experimental = axe.getRules(["experimental"]);
    const rules = Object.fromEntries(experimental.map((r) => [r.ruleId, { enabled: true }]));
    const result = await axe.run(document, { resultTypes: ["violations"], rules });
    return result.violations.map((v) => ({
        id: v.id,
        impact: v.impact,
        nodes: v.nodes.map((n) => `${n.target.join(" ")}: ${n.failureSummary}`),
    }));
}"""


def need_axe() -> None:
    if not AXE.exists():
        optional_part_missing(f"axe-core is not installed at {AXE.relative_to(ROOT)} (see .ci/run)")


async def assert_axe_clean(page) -> None:
    await page.add_script_tag(path=str(AXE))
    violations = await page.evaluate(RUN_AXE)
    report = [f"{v['id']} ({v['impact']}): {node}" for v in violations for node in v["nodes"]]
    assert violations == [], "axe-core found:\n" + "\n".join(report)


async def open_for_audit(browser, url: str, scheme: str, width: int = DESKTOP, **options) -> ChatPage:
    # The page's CSP rightly refuses injected scripts: the audit's context bypasses it.
    return await ChatPage.open(browser, url, width=width, color_scheme=scheme, bypass_csp=True, **options)


async def a_conversation(server: ServerProcess, room: str, alice: ChatPage) -> ChatClient:
    """Messages of others and our own, a history divider, system lines, and a notice; returns
    the other person (Bob), still in the room."""
    bob = await server.connect(f"/ws/chat/{room}?username=Bob")
    await bob.joined()
    await bob.send(type="message", message="Hi! Anyone here?")
    await alice.say("Yes, me")
    await expect(alice.message_with("Yes, me")).not_to_have_class(re.compile("pending"))
    await alice.page.reload()
    await alice.wait_connected()
    await expect(alice.page.locator("#messages .divider")).to_have_count(1)
    await bob.send(type="message", message="Welcome back")
    await expect(alice.message_with("Welcome back")).to_be_visible()
    await alice.page.evaluate("chat.ws.send('{not json')")
    await expect(alice.page.locator("#notices .notice")).to_be_visible()
    return bob


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_violation_in_a_conversation(browser, server, room, scheme):
    need_axe()
    alice = await open_for_audit(browser, page_url(server, room), scheme, name="Alice")
    bob = await a_conversation(server, room, alice)
    await assert_axe_clean(alice.page)
    await bob.close()
    await alice.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_violation_with_the_phone_drawer_open(browser, server, room, scheme):
    need_axe()
    alice = await open_for_audit(browser, page_url(server, room), scheme, width=PHONE, name="Alice")
    bob = await a_conversation(server, room, alice)
    await alice.page.click("#panel-toggle")
    await expect(alice.page.locator("#side-panel")).to_be_visible()
    await assert_axe_clean(alice.page)
    await bob.close()
    await alice.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_axe_finds_no_violation_with_a_message_pending_offline(browser, start_server, room, scheme):
    need_axe()
    server = start_server(limits=True)
    alice = await open_for_audit(browser, page_url(server, room), scheme, name="Alice")
    await alice.say("sent before")
    await expect(alice.message_with("sent before")).not_to_have_class(re.compile("pending"))
    await alice.page.context.set_offline(True)
    server.stop()
    await expect(alice.status).not_to_have_attribute("data-state", "connected")
    await alice.say("written offline")
    await expect(alice.message_with("written offline")).to_have_class(re.compile("pending"))
    await assert_axe_clean(alice.page)
    await alice.close()
