"""A reload is not a leave: a member whose connection ends without a goodbye (1001, the close a
browser sends on a reload, or no close frame at all) stays in its room, away, for --leave-grace;
the same tab (?session=, name, token user) back within it continues under its old client_id and
nobody sees it leave or join. A deliberate close (1000) is a leave at once, as is every close
of a client that named no session (a seed client)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from typing import Any

import pytest

from fennec_chat.gate import Tokens
from fennec_chat.leave_grace import Away, AwayBook, may_come_back
from tests.chat_client import ChatClient
from tests.server_process import ServerProcess

SECRET = "leave-grace-test-secret"
TOKENS = Tokens(SECRET)
COMINGS_AND_GOINGS = {"user_joined", "user_left", "user_away", "user_back"}
ROUNDS = 40


def new_session() -> str:
    return uuid.uuid4().hex


async def comings_and_goings(client: ChatClient, seconds: float) -> list[tuple[str, str]]:
    """(type, client_id) of every join, leave, away and back `client` hears for `seconds`."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError):
        while (left := deadline - time.monotonic()) > 0:
            event = await client.next(timeout=left)
            if event["type"] in COMINGS_AND_GOINGS:
                seen.append((event["type"], event["client_id"]))
    return seen


async def member(server: ServerProcess, room: str, query: str = "") -> tuple[ChatClient, str]:
    client = await server.connect(f"/ws/chat/{room}?{query}")
    client_id, _ = await client.joined()
    return client, client_id


async def watcher(server: ServerProcess, room: str) -> ChatClient:
    client, _ = await member(server, room, "username=watcher")
    return client


async def watched_alice(server: ServerProcess, room: str, tab: str) -> tuple[ChatClient, ChatClient, str]:
    """Bob watching, and Alice of tab `tab` joining: (bob, alice, alice's client_id)."""
    bob = await watcher(server, room)
    alice, alice_id = await member(server, room, f"username=alice&session={tab}")
    await bob.expect("user_joined", client_id=alice_id)
    return bob, alice, alice_id


async def test_a_reload_is_neither_a_leave_nor_a_join_for_the_others(server, room):
    tab = new_session()
    bob, alice, alice_id = await watched_alice(server, room, tab)

    await alice.ws.close(1001)  # what a browser sends when the page reloads
    await bob.expect("user_away", client_id=alice_id, username="alice")
    alice, returned_id = await member(server, room, f"username=alice&session={tab}")
    assert returned_id == alice_id, "the same tab continues under its old client_id"
    await bob.expect("user_back", client_id=alice_id, username="alice")
    assert await comings_and_goings(bob, 0.5) == []

    # It is the same member: its messages carry the old id.
    await alice.send(type="message", message="still here")
    said = await bob.wait_for("message", message="still here")
    assert said["client_id"] == alice_id


@pytest.mark.parametrize(
    "goodbye_less_end",
    [
        "abort",  # no close frame: a lost network, a crashed browser
        "4100",  # the page's own close, when it resumes to heal a gap
    ],
)
async def test_a_tab_that_ends_without_a_goodbye_is_away_not_gone(server, room, goodbye_less_end):
    tab = new_session()
    bob, alice, alice_id = await watched_alice(server, room, tab)
    await (alice.abort() if goodbye_less_end == "abort" else alice.ws.close(4100, "reconnecting"))
    await bob.expect("user_away", client_id=alice_id)
    _, returned_id = await member(server, room, f"username=alice&session={tab}")
    assert returned_id == alice_id
    assert await comings_and_goings(bob, 0.3) == [("user_back", alice_id)]


async def test_a_deliberate_close_is_a_leave_at_once(server, room):
    bob, alice, alice_id = await watched_alice(server, room, new_session())

    await alice.ws.close(1000)  # the page closes so when it switches rooms
    assert await comings_and_goings(bob, 0.5) == [("user_left", alice_id)]


async def test_a_client_without_a_session_leaves_at_once_as_the_seed_says(server, room):
    bob = await watcher(server, room)
    for close in ("1001", "abort"):
        alice, alice_id = await member(server, room, "username=alice")
        await bob.expect("user_joined", client_id=alice_id)
        await (alice.abort() if close == "abort" else alice.ws.close(1001))
        assert await comings_and_goings(bob, 0.5) == [("user_left", alice_id)], close


async def test_presence_shows_an_away_member_as_away(server, room):
    tab = new_session()
    alice, alice_id = await member(server, room, f"username=alice&session={tab}")
    await alice.abort()
    carol = await server.connect(f"/ws/chat/{room}?username=carol")
    _, presence = await carol.joined()
    users = {user["client_id"]: user for user in presence["users"]}
    assert users[alice_id] == {"client_id": alice_id, "username": "alice", "away": True}
    assert "away" not in next(user for user in presence["users"] if user["username"] == "carol")

    await member(server, room, f"username=alice&session={tab}")
    await carol.expect("user_back", client_id=alice_id)
    dave = await server.connect(f"/ws/chat/{room}?username=dave")
    _, presence = await dave.joined()
    assert [user for user in presence["users"] if user["client_id"] == alice_id] == [
        {"client_id": alice_id, "username": "alice"}
    ]


async def test_a_member_away_longer_than_the_grace_leaves_and_returns_as_a_newcomer(start_server, room):
    server = start_server("--leave-grace", "0.5")
    tab = new_session()
    bob, alice, alice_id = await watched_alice(server, room, tab)
    await alice.abort()
    started = time.monotonic()
    await bob.expect("user_away", client_id=alice_id)
    await bob.expect("user_left", client_id=alice_id, username="alice", timeout=3)
    assert time.monotonic() - started >= 0.4

    _, new_id = await member(server, room, f"username=alice&session={tab}")
    assert new_id != alice_id
    await bob.expect("user_joined", client_id=new_id)


async def test_leave_grace_0_turns_it_off(start_server, room):
    server = start_server("--leave-grace", "0")
    bob, alice, alice_id = await watched_alice(server, room, new_session())
    await alice.ws.close(1001)
    assert await comings_and_goings(bob, 0.5) == [("user_left", alice_id)]


async def test_a_session_continues_only_the_same_name_and_nobody_else(start_server, room):
    server = start_server("--leave-grace", "1")
    tab = new_session()
    bob, alice, alice_id = await watched_alice(server, room, tab)
    await alice.abort()
    await bob.expect("user_away", client_id=alice_id)

    # The right tab under another name, and another tab under the right name: neither is Alice.
    _, renamed_id = await member(server, room, f"username=mallory&session={tab}")
    _, guessed_id = await member(server, room, f"username=alice&session={new_session()}")
    _, bare_id = await member(server, room, "username=alice")
    assert alice_id not in (renamed_id, guessed_id, bare_id)
    seen = await comings_and_goings(bob, 2)
    assert seen == [
        ("user_joined", renamed_id),
        ("user_joined", guessed_id),
        ("user_joined", bare_id),
        ("user_left", alice_id),  # her leave is not hidden: it comes when her grace ends
    ]


async def test_a_member_continues_only_with_its_own_token(start_server, room):
    server = start_server("--jwt-secret", SECRET, "--leave-grace", "5")
    tokens = {name: TOKENS.mint(name) for name in ("alice", "bob", "watcher")}
    bob = await server.connect(f"/ws/chat/{room}?token={tokens['watcher']}")
    await bob.joined()
    tab = new_session()
    alice, alice_id = await member(server, room, f"token={tokens['alice']}&session={tab}")
    await bob.expect("user_joined", client_id=alice_id)
    await alice.abort()
    await bob.expect("user_away", client_id=alice_id)

    _, other_id = await member(server, room, f"token={tokens['bob']}&session={tab}")
    assert other_id != alice_id
    _, returned_id = await member(server, room, f"token={tokens['alice']}&session={tab}")
    assert returned_id == alice_id
    assert await comings_and_goings(bob, 0.3) == [("user_joined", other_id), ("user_back", alice_id)]


async def test_a_kicked_away_member_leaves_at_once_and_comes_back_as_a_newcomer(start_server, room):
    # --kick-ban 0: the kicked may come back at once (test_moderation.py tests the ban).
    server = start_server("--jwt-secret", SECRET, "--leave-grace", "30", "--kick-ban", "0")
    admin = await server.connect(f"/ws/chat/{room}?token={TOKENS.mint('boss', admin=True)}")
    await admin.joined()
    tab = new_session()
    alice_token = TOKENS.mint("alice")
    alice, alice_id = await member(server, room, f"token={alice_token}&session={tab}")
    await admin.expect("user_joined", client_id=alice_id)
    await alice.abort()
    await admin.expect("user_away", client_id=alice_id)

    await admin.send(type="kick", client_id=alice_id)
    await admin.expect("system", kind="kicked")
    await admin.expect("user_left", client_id=alice_id)
    _, returned_id = await member(server, room, f"token={alice_token}&session={tab}")
    assert returned_id != alice_id
    await admin.expect("user_joined", client_id=returned_id)


async def test_two_returns_of_one_tab_continue_the_member_once(server, room):
    tab = new_session()
    bob, alice, alice_id = await watched_alice(server, room, tab)
    await alice.abort()
    await bob.expect("user_away", client_id=alice_id)

    returns = await asyncio.gather(*(member(server, room, f"username=alice&session={tab}") for _ in range(2)))
    ids = sorted(client_id for _, client_id in returns)
    assert ids.count(alice_id) == 1
    [newcomer] = [client_id for client_id in ids if client_id != alice_id]
    assert sorted(await comings_and_goings(bob, 0.5)) == [("user_back", alice_id), ("user_joined", newcomer)]


async def race_returns_with_the_grace(
    leave_on: ServerProcess, return_to: ServerProcess, room: str, grace: float, rounds: int
) -> tuple[int, int]:
    """Round after round a member drops and its tab returns at a random moment around the end of
    its grace. Each round, the others hear exactly one story: away then back (under the old id),
    or away, left, then a newcomer joining; and presence has the member once. Returns how many
    rounds went each way."""
    bob = await watcher(leave_on, room)
    carol, carol_id = await member(return_to, room, "username=carol")  # another process, with Redis
    # Carol's arrival is published once her process listens to the room; on another process
    # Bob may hear it after later events. Heard before the story starts, it is not part of it.
    await bob.wait_for("user_joined", client_id=carol_id)
    continued = restarted = 0
    tab = new_session()
    alice, alice_id = await member(leave_on, room, f"username=alice&session={tab}")
    for listener in (bob, carol):
        await listener.wait_for("user_joined", client_id=alice_id)
    for round_number in range(rounds):
        await alice.abort()
        await asyncio.sleep(random.uniform(grace * 0.6, grace * 1.4))
        alice, new_id = await member(return_to, room, f"username=alice&session={tab}")
        if new_id == alice_id:
            continued += 1
            story = [("user_away", alice_id), ("user_back", alice_id)]
        else:
            restarted += 1
            story = [("user_away", alice_id), ("user_left", alice_id), ("user_joined", new_id)]
        for listener in (bob, carol):
            heard = await comings_and_goings(listener, 0.15)
            while len(heard) < len(story):
                more = await listener.next(timeout=3)
                if more["type"] in COMINGS_AND_GOINGS:
                    heard.append((more["type"], more["client_id"]))
            assert heard == story, f"round {round_number}: {heard} instead of {story}"
        newcomer = await return_to.connect(f"/ws/chat/{room}?username=newcomer")
        _, presence = await newcomer.joined()
        alices = [user for user in presence["users"] if user["username"] == "alice"]
        assert alices == [{"client_id": new_id, "username": "alice"}], f"round {round_number}"
        await newcomer.close()
        for listener in (bob, carol):
            await listener.wait_for("user_left", username="newcomer")
        alice_id = new_id
        (leave_on, return_to) = (return_to, leave_on)
    return continued, restarted


async def test_returns_racing_the_end_of_the_grace_tell_one_story(start_server, room):
    server = start_server("--leave-grace", "0.2")
    continued, restarted = await race_returns_with_the_grace(server, server, room, 0.2, ROUNDS)
    assert continued, restarted  # both sides of the race were run
    assert restarted, continued


@pytest.fixture
def two_servers_with_grace(start_server, redis_backend):
    def start(grace: str) -> tuple[ServerProcess, ServerProcess]:
        flags = (*redis_backend.flags, "--redis-heartbeat", "0.5", "--leave-grace", grace)
        return start_server(*flags), start_server(*flags)

    return start


async def test_with_redis_returns_racing_the_end_of_the_grace_tell_one_story(two_servers_with_grace, room):
    one, two = two_servers_with_grace("0.2")
    continued, restarted = await race_returns_with_the_grace(one, two, room, 0.2, ROUNDS)
    assert continued, restarted
    assert restarted, continued


async def test_with_redis_a_tab_returning_to_another_process_continues_the_member(
    two_servers_with_grace, room
):
    one, two = two_servers_with_grace("5")
    tab = new_session()
    bob, alice, alice_id = await watched_alice(one, room, tab)
    await alice.ws.close(1001)
    await bob.expect("user_away", client_id=alice_id)
    alice, returned_id = await member(two, room, f"username=alice&session={tab}")
    assert returned_id == alice_id
    await bob.expect("user_back", client_id=alice_id)
    await alice.send(type="message", message="on the other process now")
    said = await bob.wait_for("message", message="on the other process now")
    assert said["client_id"] == alice_id
    assert await comings_and_goings(bob, 1) == []

    # And it leaves properly from there.
    await alice.ws.close(1000)
    await bob.expect("user_left", client_id=alice_id)


async def test_with_redis_a_stopped_process_members_continue_on_another(two_servers_with_grace, room):
    one, two = two_servers_with_grace("5")
    bob = await watcher(two, room)
    tab = new_session()
    alice, alice_id = await member(one, room, f"username=alice&session={tab}")
    await bob.expect("user_joined", client_id=alice_id)

    one.process.send_signal(signal.SIGTERM)  # uvicorn closes every socket with 1012 (restart)
    assert (await alice.close_code())[0] == 1012
    await bob.expect("user_away", client_id=alice_id)
    one.process.wait(timeout=15)
    _, returned_id = await member(two, room, f"username=alice&session={tab}")
    assert returned_id == alice_id
    assert await comings_and_goings(bob, 2) == [("user_back", alice_id)]


async def test_with_redis_an_away_member_of_a_killed_process_leaves_when_its_grace_ends(
    two_servers_with_grace, room
):
    one, two = two_servers_with_grace("2")
    bob = await watcher(two, room)
    alice, alice_id = await member(one, room, f"username=alice&session={new_session()}")
    await bob.expect("user_joined", client_id=alice_id)
    await alice.abort()
    await bob.expect("user_away", client_id=alice_id)
    started = time.monotonic()
    one.process.send_signal(signal.SIGKILL)  # nobody on `one` will end its grace
    await bob.expect("user_left", client_id=alice_id, timeout=10)
    waited = time.monotonic() - started
    assert 1.5 <= waited <= 2 + 3 * 0.5 + 2, waited  # after its grace, within a reaping or two
    assert await comings_and_goings(bob, 1) == []


def presence_of(users: list[dict[str, Any]], client_id: str) -> list[dict[str, Any]]:
    return [user for user in users if user["client_id"] == client_id]


async def test_with_redis_presence_shows_an_away_member_as_away_everywhere(two_servers_with_grace, room):
    one, two = two_servers_with_grace("5")
    alice, alice_id = await member(one, room, f"username=alice&session={new_session()}")
    await alice.abort()
    await asyncio.sleep(0.2)
    for server in (one, two):
        newcomer = await server.connect(f"/ws/chat/{room}?username=newcomer")
        _, presence = await newcomer.joined()
        assert presence_of(presence["users"], alice_id) == [
            {"client_id": alice_id, "username": "alice", "away": True}
        ]
        await newcomer.close()


async def test_uvicorn_itself_reports_a_lost_connection_as_1005_so_our_protocol_says_1006(start_server, room):
    """uvicorn's stock protocol tells the app 1005 ("no status": a close frame without a code,
    a deliberate close) when a connection simply stops. Under it (plain `uvicorn server:app`) a
    lost connection is therefore a leave at once; uvicorn_websocket.py reports 1006. When this
    test fails, uvicorn says 1006 itself: delete the workaround in `connection_lost`."""
    for plain_uvicorn, expected in ((True, "user_left"), (False, "user_away")):
        server = start_server(plain_uvicorn=plain_uvicorn)
        bob, alice, alice_id = await watched_alice(server, room, new_session())
        await alice.abort()
        await bob.expect(expected, client_id=alice_id)


# --- The rules themselves (fennec_chat/leave_grace.py), without a server -----------------------


def test_only_a_goodbye_less_end_of_a_named_tab_may_come_back():
    for code in (1001, 1006, 4100, 4408):
        assert may_come_back(code, "tab", presence_outlives_process=False), code
        assert not may_come_back(code, None, presence_outlives_process=True), code
    for code in (1000, 1005, 1002, 1008, 1009, 1011, 4001):
        assert not may_come_back(code, "tab", presence_outlives_process=True), code
    # A server restart: only when another process can hold the member meanwhile (Redis).
    assert may_come_back(1012, "tab", presence_outlives_process=True)
    assert not may_come_back(1012, "tab", presence_outlives_process=False)


def test_an_away_member_is_continued_once_and_only_by_its_own_tab_name_and_token():
    book = AwayBook()
    book.add(Away("room", "id-1", "alice", "tab", "", "mark-1"))
    assert book.take("room", "tab", "mallory", "") is None  # another name
    assert book.take("room", "tab", "alice", "alice") is None  # another token user
    assert book.take("room", "other-tab", "alice", "") is None  # another tab
    assert book.take("other-room", "tab", "alice", "") is None  # another room
    assert book.take("room", "tab", "alice", "").client_id == "id-1"
    assert book.take("room", "tab", "alice", "") is None  # once
    assert len(book) == 0
    assert not book.has_room("room")


def test_a_late_timer_of_an_earlier_absence_ends_nothing():
    book = AwayBook()
    book.add(Away("room", "id-1", "alice", "tab", "", "second-absence"))
    assert book.remove("id-1", "first-absence") is None
    assert book.in_room("room")[0].mark == "second-absence"
    assert book.remove("id-1", "").mark == "second-absence"  # "": any absence (a kick)


def test_a_default_name_is_continued_by_a_tab_that_asks_for_none():
    book = AwayBook()
    book.add(Away("room", "abcdef0123", "User-abcdef01", "tab", "", "mark"))
    assert book.take("room", "tab", "", "").client_id == "abcdef0123"


def test_of_two_away_members_of_one_duplicated_tab_the_newest_is_continued():
    book = AwayBook()
    book.add(Away("room", "older", "alice", "tab", "", "m1"))
    book.add(Away("room", "newer", "alice", "tab", "", "m2"))
    assert book.take("room", "tab", "alice", "").client_id == "newer"
    assert [away.client_id for away in book.in_room("room")] == ["older"]  # leaves when its grace ends
    assert book.remove("older", "m1") is not None
    assert len(book) == 0
