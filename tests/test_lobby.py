"""The lobby: the list of active rooms, on connect, on request and pushed after every change."""

from __future__ import annotations

import asyncio
import time

from tests.chat_client import ChatClient


async def next_rooms(lobby: ChatClient, timeout: float = 5) -> dict:
    event = await lobby.expect("rooms_update", timeout=timeout)
    assert set(event) == {"type", "rooms", "total_rooms", "timestamp"}
    assert event["total_rooms"] >= len(event["rooms"])
    return event["rooms"]


async def rooms_until(lobby: ChatClient, condition, timeout: float = 5) -> dict:
    """Read pushed updates until one satisfies `condition` (pushes are coalesced)."""

    async def wait() -> dict:
        while True:
            rooms = await next_rooms(lobby)
            if condition(rooms):
                return rooms

    return await asyncio.wait_for(wait(), timeout)


async def test_lobby_lists_rooms_with_user_counts_and_names_on_connect(server, room):
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    bob = await server.connect(f"/ws/chat/{room}?username=bob")
    await bob.joined()

    lobby = await server.connect("/ws/lobby")
    # The first list may be up to one --lobby-interval old; the fresh one is pushed after it.
    rooms = await rooms_until(lobby, lambda rooms: rooms.get(room, {}).get("users") == 2)
    assert rooms[room] == {"users": 2, "usernames": ["alice", "bob"]}
    for client in (alice, bob, lobby):
        await client.close()


async def test_lobby_answers_any_text_with_a_fresh_list(server, room):
    lobby = await server.connect("/ws/lobby")
    await next_rooms(lobby)
    await lobby.send_raw("refresh please")
    rooms = await next_rooms(lobby)
    assert isinstance(rooms, dict)
    await lobby.send(type="anything")
    await next_rooms(lobby)
    await lobby.close()


async def test_lobby_answers_a_binary_frame_with_an_error_and_stays_open(server):
    lobby = await server.connect("/ws/lobby")
    await next_rooms(lobby)
    await lobby.send_raw(b"\x01\x02")
    await lobby.expect("error", code="unsupported_frame")
    await lobby.send_raw("again")
    await next_rooms(lobby)
    await lobby.close()


async def test_lobby_is_pushed_joins_renames_and_leaves(server, room):
    lobby = await server.connect("/ws/lobby")
    await next_rooms(lobby)

    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    rooms = await rooms_until(lobby, lambda rooms: room in rooms)
    assert rooms[room] == {"users": 1, "usernames": ["alice"]}

    await alice.send(type="set_username", username="Alicia")
    rooms = await rooms_until(lobby, lambda rooms: rooms.get(room, {}).get("usernames") == ["Alicia"])
    assert rooms[room]["users"] == 1

    await alice.close()
    await rooms_until(lobby, lambda rooms: room not in rooms)  # empty rooms disappear
    await lobby.close()


async def test_lobby_pushes_are_coalesced_to_one_per_interval(start_server, room):
    server = start_server("--lobby-interval", "0.5")
    lobby = await server.connect("/ws/lobby")
    await next_rooms(lobby)

    started = time.monotonic()
    members = [await server.connect(f"/ws/chat/{room}") for _ in range(30)]
    joining_took = time.monotonic() - started
    pushes = 0

    def counted(rooms: dict) -> bool:
        nonlocal pushes
        pushes += 1
        return rooms.get(room, {}).get("users") == 30

    rooms = await rooms_until(lobby, counted)
    assert len(rooms[room]["usernames"]) == 30
    # 30 joins, but at most one push per 0.5 s (plus the first one, which goes out at once).
    assert pushes <= joining_took / 0.5 + 2, (pushes, joining_took)
    for member in members:
        await member.close()
    await lobby.close()


async def test_lobby_watchers_are_not_room_users(server, room):
    lobby = await server.connect("/ws/lobby")
    await next_rooms(lobby)
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    _, presence = await alice.joined()
    assert [user["username"] for user in presence["users"]] == ["alice"]

    await lobby.send_raw("?")
    rooms = await next_rooms(lobby)
    assert rooms[room]["users"] == 1
    await lobby.close()
    await alice.expect_silence(0.5)  # a lobby watcher leaving is not a user_left
    await alice.close()


async def test_the_lobby_lists_the_busiest_rooms_and_counts_them_all(server, room):
    busy = [await server.connect(f"/ws/chat/{room}-busy?username=u{number}") for number in range(3)]
    quiet = [await server.connect(f"/ws/chat/{room}-{number:03d}") for number in range(105)]
    for client in [*busy, *quiet]:
        await client.joined()
    lobby = await server.connect("/ws/lobby")
    event = await lobby.expect("rooms_update")
    while event["rooms"].get(f"{room}-busy", {}).get("users") != 3:  # may be an interval old
        event = await lobby.expect("rooms_update")
    assert len(event["rooms"]) == 100
    assert event["total_rooms"] >= 106
    assert next(iter(event["rooms"])) == f"{room}-busy"  # busiest first
    assert event["rooms"][f"{room}-busy"] == {"users": 3, "usernames": ["u0", "u1", "u2"]}
    for client in [*busy, *quiet, lobby]:
        await client.close()


async def test_every_watcher_gets_the_same_list_within_an_interval(start_server, room):
    server = start_server("--lobby-interval", "5")
    watchers = [await server.connect("/ws/lobby") for _ in range(3)]
    first = [await watcher.expect("rooms_update") for watcher in watchers]
    for watcher in watchers:
        await watcher.send_raw("refresh")
    again = [await watcher.expect("rooms_update") for watcher in watchers]
    # One list, built once and encoded once: the very same event, timestamp and all.
    assert len({event["timestamp"] for event in first + again}) == 1
    for watcher in watchers:
        await watcher.close()
