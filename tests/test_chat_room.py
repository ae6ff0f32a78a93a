"""The chat room protocol, event by event and field by field, against a real server."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta, timezone

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00")


def assert_recent_utc(timestamp: str) -> None:
    assert ISO_UTC.fullmatch(timestamp), timestamp
    moment = datetime.fromisoformat(timestamp)
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - moment) < timedelta(seconds=30)


async def test_newcomer_gets_welcome_then_presence_with_itself(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    welcome = await alice.expect("system", message=f"Welcome to room '{room}'!")
    assert set(welcome) == {"type", "kind", "message", "client_id", "timestamp", "limits"}
    assert welcome["kind"] == "welcome"
    assert set(welcome["limits"]) == {
        "messages_per_second",
        "messages_burst",
        "renames_per_second",
        "renames_burst",
        "typing_per_second",
        "message_chars",
        "username_chars",
        "room_chars",
    }
    assert_recent_utc(welcome["timestamp"])

    presence = await alice.expect("presence", room=room)
    assert presence["users"] == [{"client_id": welcome["client_id"], "username": "alice"}]
    assert_recent_utc(presence["timestamp"])
    await alice.expect("history", room=room, messages=[])
    await alice.close()


async def test_presence_lists_everyone_already_in_the_room(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    alice_id, _ = await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    bob_id, presence = await bob.joined()
    assert presence["users"] == [
        {"client_id": alice_id, "username": "alice"},
        {"client_id": bob_id, "username": "bob"},
    ]
    await alice.close()
    await bob.close()


async def test_others_are_told_when_someone_joins(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    bob_id, _ = await bob.joined()

    joined = await alice.expect(
        "user_joined", username="bob", client_id=bob_id, message="bob joined the room"
    )
    assert set(joined) == {"type", "username", "client_id", "message", "timestamp"}
    assert_recent_utc(joined["timestamp"])
    await bob.expect_silence()  # the newcomer is not told about itself
    await alice.close()
    await bob.close()


async def test_default_username_is_user_and_the_first_8_characters_of_the_client_id(server, room):
    guest = await server.connect(f"/ws/chat/{room}")
    client_id, presence = await guest.joined()
    assert presence["users"] == [{"client_id": client_id, "username": f"User-{client_id[:8]}"}]
    await guest.close()


async def test_username_in_the_url_is_announced_without_a_rename(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=B%C3%B6b%20the%20builder")
    await bob.joined()
    await alice.expect("user_joined", username="Böb the builder")
    await alice.expect_silence()  # no username_changed follows
    await alice.close()
    await bob.close()


async def test_an_invalid_username_in_the_url_falls_back_to_the_default_and_says_why(server, room):
    too_long = "x" * 33
    guest = await server.connect(f"/ws/chat/{room}?username={too_long}")
    client_id, presence = await guest.joined()
    assert presence["users"][0]["username"] == f"User-{client_id[:8]}"
    await guest.expect("error", code="invalid_username")
    await guest.send(type="message", message="still here")
    await guest.expect("message", message="still here")
    await guest.close()


async def test_a_message_reaches_everyone_in_the_room_including_the_sender(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    alice_id, _ = await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()
    await alice.expect("user_joined")

    await alice.send(type="message", message="  Hello, world!  ")
    for member in (alice, bob):
        event = await member.expect("message", username="alice", message="Hello, world!", client_id=alice_id)
        assert set(event) == {"type", "username", "message", "client_id", "timestamp", "id"}
        assert_recent_utc(event["timestamp"])
    await alice.close()
    await bob.close()


async def test_messages_keep_newlines_and_unicode(server, room):
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    text = "first line\r\nsecond line\twith a tab, ünïcödé and 🦊"
    await alice.send(type="message", message=text)
    event = await alice.expect("message")
    assert event["message"] == "first line\nsecond line\twith a tab, ünïcödé and 🦊"
    await alice.close()


async def test_rename_is_announced_to_everyone_and_used_afterwards(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    alice_id, _ = await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()
    await alice.expect("user_joined")

    await alice.send(type="set_username", username="  Alicia  ")
    for member in (alice, bob):
        event = await member.expect(
            "username_changed",
            old_username="alice",
            new_username="Alicia",
            client_id=alice_id,
            message="alice is now known as Alicia",
        )
        assert_recent_utc(event["timestamp"])

    await alice.send(type="message", message="hi")
    await bob.expect("message", username="Alicia")
    await alice.send(type="typing")
    await bob.expect("typing", username="Alicia")

    carol = await server.connect(f"/ws/chat/{room}")
    _, presence = await carol.joined()
    assert {"client_id": alice_id, "username": "Alicia"} in presence["users"]
    for member in (alice, bob, carol):
        await member.close()


async def test_renaming_to_the_same_name_announces_nothing(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    await alice.send(type="set_username", username="alice")
    await alice.expect_silence()
    await alice.close()


async def test_typing_is_not_echoed_to_the_typist(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    alice_id, _ = await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()
    await alice.expect("user_joined")

    await alice.send(type="typing")
    event = await bob.expect("typing", username="alice", client_id=alice_id)
    assert set(event) == {"type", "username", "client_id", "timestamp"}
    assert_recent_utc(event["timestamp"])
    await alice.expect_silence()
    await alice.close()
    await bob.close()


async def test_leaving_is_announced_to_the_others_once(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    bob_id, _ = await bob.joined()
    await alice.expect("user_joined")

    await bob.close()
    left = await alice.expect("user_left", username="bob", client_id=bob_id, message="bob left the room")
    assert set(left) == {"type", "username", "client_id", "message", "timestamp"}
    assert_recent_utc(left["timestamp"])
    await alice.expect_silence(0.5)
    await alice.close()


async def test_a_dropped_connection_counts_as_leaving(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    bob_id, _ = await bob.joined()
    await alice.expect("user_joined")

    await bob.abort()  # no close frame, like a crashed browser or a lost network
    await alice.expect("user_left", username="bob", client_id=bob_id)
    await alice.expect_silence(0.5)
    await alice.close()


async def test_leaving_uses_the_latest_username(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()
    await alice.expect("user_joined")
    await bob.send(type="set_username", username="robert")
    await alice.expect("username_changed")
    await bob.close()
    await alice.expect("user_left", username="robert", message="robert left the room")
    await alice.close()


async def test_two_tabs_may_share_a_username(server, room):
    first = await server.connect(f"/ws/chat/{room}?username=alice")
    first_id, _ = await first.joined()
    second = await server.connect(f"/ws/chat/{room}?username=alice")
    second_id, presence = await second.joined()
    assert first_id != second_id
    assert sorted(user["client_id"] for user in presence["users"]) == sorted([first_id, second_id])
    await first.close()
    await second.close()


async def test_rooms_are_isolated(server, room):
    here = await server.connect(f"/ws/chat/{room}-a")
    await here.joined()
    elsewhere = await server.connect(f"/ws/chat/{room}-b")
    _, presence = await elsewhere.joined()
    assert len(presence["users"]) == 1

    await elsewhere.send(type="message", message="only for room b")
    await elsewhere.send(type="typing")
    await elsewhere.send(type="set_username", username="someone")
    await elsewhere.expect("message")
    await elsewhere.expect("username_changed")
    await elsewhere.close()
    await here.expect_silence(0.5)  # no join, message, typing, rename or leave from room b
    await here.close()


async def test_many_messages_arrive_in_the_order_they_were_sent(server, room):
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}")
    await bob.joined()
    await alice.expect("user_joined")
    for number in range(100):
        await alice.send(type="message", message=str(number))
    for member in (alice, bob):
        received = [(await member.expect("message"))["message"] for _ in range(100)]
        assert received == [str(number) for number in range(100)]
    await asyncio.gather(alice.close(), bob.close())
