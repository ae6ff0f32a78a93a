"""Moderation that sticks: a kick keeps the kicked user out of that room for --kick-ban seconds
(close 4003, saying until when), an admin lifts it with `unban`; an admin deletes a message
from the history and from every page (`message_deleted`). Bans and deletions survive a restart
and hold on every process on Redis."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from playwright.async_api import expect

from tests.chat_client import ChatClient
from tests.server_process import ServerProcess
from tests.test_page import ChatPage
from tests.test_security import SECRET, mint

BANNED = re.compile(r"you are banned from this room until (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")
TOKENS = {"CHAT_JWT_SECRET": SECRET}


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    """Tokens from the real `python server.py token` command, minted once for the module."""
    return {name: mint(name, *(["--admin"] if name == "alice" else [])) for name in ("alice", "bob", "carol")}


async def join(server: ServerProcess, room: str, token: str, query: str = "") -> tuple[ChatClient, str]:
    client = await server.connect(f"/ws/chat/{room}?token={token}{query}")
    client_id, _ = await client.joined()
    return client, client_id


async def banned_until(server: ServerProcess, room: str, token: str) -> float:
    """Connect, be accepted and closed with 4003: the end of the ban, from the reason."""
    client = await server.connect(f"/ws/chat/{room}?token={token}")
    code, reason = await client.close_code()
    assert code == 4003, (code, reason)
    match = BANNED.fullmatch(reason or "")
    assert match, reason
    return time.mktime(time.strptime(match[1], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone


async def test_a_kicked_user_stays_out_of_that_room_until_the_ban_ends(start_server, tokens, room):
    server = start_server(env={**TOKENS, "CHAT_KICK_BAN": "2"})
    alice, _ = await join(server, room, tokens["alice"])
    bob, bob_id = await join(server, room, tokens["bob"])
    kicked_at = time.time()
    await alice.send(type="kick", client_id=bob_id)
    assert (await bob.close_code())[0] == 4001
    until = await banned_until(server, room, tokens["bob"])  # at once: the ban came first
    assert kicked_at + 1 <= until <= kicked_at + 3
    elsewhere, _ = await join(server, room + "-other", tokens["bob"])  # other rooms stay open
    await elsewhere.close()
    await asyncio.sleep(max(0.0, until + 1 - time.time()))
    back, _ = await join(server, room, tokens["bob"])  # the ban is over
    await back.close()
    await alice.close()


async def test_an_admin_lifts_a_ban_and_nobody_else_may(start_server, tokens, room):
    server = start_server(env=TOKENS)  # the default ban: 300 s
    alice, _ = await join(server, room, tokens["alice"])
    carol, _ = await join(server, room, tokens["carol"])
    bob, bob_id = await join(server, room, tokens["bob"])
    await alice.send(type="kick", client_id=bob_id)
    assert (await bob.close_code())[0] == 4001
    assert time.time() + 290 < await banned_until(server, room, tokens["bob"])
    await carol.send(type="unban", username="bob")
    refused = await carol.wait_for("error", code="forbidden")
    assert refused["message"] == "only an admin may unban"
    await banned_until(server, room, tokens["bob"])  # still banned
    await alice.send(type="unban", username="bob")
    notice = await carol.wait_for("system", kind="unbanned")
    assert (notice["username"], notice["message"]) == ("bob", "alice lifted the ban on bob")
    back, _ = await join(server, room, tokens["bob"])
    await alice.send(type="unban", username="bob")  # not banned any more
    await alice.wait_for("error", code="not_found")
    await alice.send(type="unban", username="")
    await alice.wait_for("error", code="invalid_username")
    for client in (alice, carol, back):
        await client.close()


async def test_a_kick_ban_of_0_lets_the_kicked_user_back_at_once(start_server, tokens, room):
    server = start_server(env={**TOKENS, "CHAT_KICK_BAN": "0"})
    alice, _ = await join(server, room, tokens["alice"])
    bob, bob_id = await join(server, room, tokens["bob"])
    await alice.send(type="kick", client_id=bob_id)
    assert (await bob.close_code())[0] == 4001
    back, _ = await join(server, room, tokens["bob"])
    await back.close()
    await alice.close()


async def said(client: ChatClient, *texts: str) -> list[int]:
    """Send each text and wait for it to come back: their ids."""
    ids = []
    for text in texts:
        await client.send(type="message", message=text)
        ids.append((await client.wait_for("message", message=text))["id"])
    return ids


async def test_an_admin_deletes_a_message_from_the_history_and_every_screen(start_server, tokens, room):
    server = start_server(env=TOKENS)
    alice, _ = await join(server, room, tokens["alice"])
    carol, _ = await join(server, room, tokens["carol"])
    first, second, third = await said(carol, "one", "two", "three")
    epoch = carol.history["epoch"]
    await carol.send(type="delete_message", id=second)
    refused = await carol.wait_for("error", code="forbidden")
    assert refused["message"] == "only an admin may delete messages"
    await alice.send(type="delete_message", id=second)
    for client in (alice, carol):
        deleted = await client.wait_for("message_deleted")
        assert (deleted["room"], deleted["id"]) == (room, second)
    newcomer, _ = await join(server, room, tokens["bob"])
    assert [m["message"] for m in newcomer.history["messages"]] == ["one", "three"]
    resumed, _ = await join(server, room, tokens["bob"], f"&since={first - 1}&epoch={epoch}")
    assert [m["id"] for m in resumed.history["messages"]] == [first, third]
    await newcomer.send(type="load_earlier", before=third + 1)
    page = await newcomer.wait_for("earlier_messages")
    assert [m["id"] for m in page["messages"]] == [first, third]
    await alice.send(type="delete_message", id=second)  # gone already
    await alice.wait_for("error", code="not_found")
    for bad in ("2", True, 0, -1, 2.0, None):
        await alice.send(type="delete_message", id=bad)
        await alice.wait_for("error", code="invalid_event")
    assert (await said(alice, "four"))[0] == third + 1  # ids go on: a deleted one is not reused
    for client in (alice, carol, newcomer, resumed):
        await client.close()


async def test_bans_and_deletions_survive_a_restart(start_server, tokens, room, tmp_path):
    database = str(tmp_path / "chat.db")
    server = start_server("--db", database, env=TOKENS)
    alice, _ = await join(server, room, tokens["alice"])
    bob, bob_id = await join(server, room, tokens["bob"])
    _, gone = await said(alice, "kept", "gone")
    await alice.send(type="delete_message", id=gone)
    await alice.wait_for("message_deleted")
    await alice.send(type="kick", client_id=bob_id)
    assert (await bob.close_code())[0] == 4001
    await alice.close()
    assert server.stop() == 0

    again = start_server("--db", database, env=TOKENS)
    await banned_until(again, room, tokens["bob"])
    carol, _ = await join(again, room, tokens["carol"])
    assert [m["message"] for m in carol.history["messages"]] == ["kept"]
    await carol.close()


async def test_bans_and_deletions_hold_on_every_process_on_redis(start_server, redis_backend, tokens, room):
    flags = (*redis_backend.flags, "--redis-heartbeat", "0.5")
    one, two = start_server(*flags, env=TOKENS), start_server(*flags, env=TOKENS)
    alice, _ = await join(one, room, tokens["alice"])
    bob, bob_id = await join(two, room, tokens["bob"])
    carol, _ = await join(two, room, tokens["carol"])
    _, gone = await said(carol, "kept", "gone")
    await alice.send(type="delete_message", id=gone)
    assert (await carol.wait_for("message_deleted"))["id"] == gone  # on the other process
    await alice.send(type="kick", client_id=bob_id)  # bob is on the other process
    assert (await bob.close_code())[0] == 4001
    await banned_until(two, room, tokens["bob"])
    await banned_until(one, room, tokens["bob"])
    newcomer, _ = await join(two, room, tokens["carol"])
    assert [m["message"] for m in newcomer.history["messages"]] == ["kept"]
    for client in (alice, carol, newcomer):
        await client.close()
    one.stop()
    two.stop()
    three = start_server(*flags, env=TOKENS)  # new processes, the same Redis
    await banned_until(three, room, tokens["bob"])
    await alice.close()


async def test_the_page_greys_out_a_deleted_message_and_says_until_when_it_is_banned(
    browser, start_server, tokens, room
):
    server = start_server(env=TOKENS)
    alice, _ = await join(server, room, tokens["alice"])
    bob = await ChatPage.open(browser, f"{server.http_url}/?room={room}&token={tokens['bob']}")
    bob_id = (await alice.wait_for("user_joined", username="bob"))["client_id"]
    await bob.say("keep this")
    await bob.say("regret this")
    regret = await alice.wait_for("message", message="regret this")
    await alice.send(type="delete_message", id=regret["id"])
    await expect(bob.message_with("message deleted")).to_have_count(1)
    await expect(bob.message_with("regret this")).to_have_count(0)
    await expect(bob.message_with("keep this")).to_have_count(1)
    await alice.send(type="kick", client_id=bob_id)
    await expect(bob.status).to_have_attribute("data-state", "refused")
    await bob.page.reload()
    await expect(bob.status).to_have_attribute("data-state", "refused")
    await expect(bob.page.locator("#refusal")).to_contain_text("banned from this room until")
    await alice.close()
    await bob.close()
