"""Attacks through rooms: opening rooms without end, filling the disk, a room list that grows
with every room."""

from __future__ import annotations

import asyncio
import sqlite3

from tests.server_process import ServerProcess


def stored_rooms(server: ServerProcess) -> set[str]:
    with sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True) as db:
        return {room for (room,) in db.execute("SELECT room FROM rooms")}


async def test_one_address_cannot_open_rooms_faster_than_the_room_creation_rate(start_server, room):
    server = start_server("--room-creation-rate", "3", limits=True)
    opened = []
    for number in range(3):
        client = await server.connect(f"/ws/chat/{room}-{number}")
        await client.joined()
        opened.append(client)
    refused = await server.connect(f"/ws/chat/{room}-3")
    code, reason = await refused.close_code()
    assert code == 1013
    assert reason.startswith("too many new rooms: try again in ")
    # Rooms that are open already cost nothing to join.
    joining = await server.connect(f"/ws/chat/{room}-0")
    await joining.joined()
    for client in [*opened, joining]:
        await client.close()


async def test_reconnecting_does_not_reset_the_room_creation_budget(start_server, room):
    server = start_server("--room-creation-rate", "2", limits=True)
    for number in range(2):
        client = await server.connect(f"/ws/chat/{room}-{number}")
        await client.joined()
        await client.close()  # the room closes with it
    again = await server.connect(f"/ws/chat/{room}-0")
    assert (await again.close_code())[0] == 1013


async def test_the_server_holds_at_most_max_rooms(start_server, room):
    server = start_server("--max-rooms", "2", "--room-creation-rate", "0", limits=True)
    first = await server.connect(f"/ws/chat/{room}-a")
    await first.joined()
    second = await server.connect(f"/ws/chat/{room}-b")
    await second.joined()
    third = await server.connect(f"/ws/chat/{room}-c")
    code, reason = await third.close_code()
    assert (code, reason) == (1013, "the server has too many rooms open (2): join an existing one")
    await first.close()
    await asyncio.sleep(0.2)
    third = await server.connect(f"/ws/chat/{room}-c")  # a room closed: there is space again
    await third.joined()
    for client in (second, third):
        await client.close()


async def test_rooms_visited_without_a_word_leave_nothing_behind(start_server, room):
    server = start_server()
    for number in range(30):
        client = await server.connect(f"/ws/chat/{room}-{number}")
        await client.joined()
        await client.close()
    talked = await server.connect(f"/ws/chat/{room}-talk")
    await talked.joined()
    await talked.send(type="message", message="hello")
    await talked.expect("message")
    await talked.close()
    await asyncio.sleep(0.3)
    assert stored_rooms(server) == {f"{room}-talk"}
    health = server.health()
    assert (health["rooms"], health["connections"]) == (0, 0)


async def test_the_history_of_a_room_nobody_writes_in_expires(start_server, room):
    server = start_server("--history-days", "0.00002")  # 1.7 s
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="message", message="soon forgotten")
    await client.expect("message")
    epoch = client.history["epoch"]
    await client.close()
    await asyncio.sleep(2.5)
    assert stored_rooms(server) == set()
    back = await server.connect(f"/ws/chat/{room}?since=1&epoch={epoch}")
    await back.joined()
    assert back.history["messages"] == []
    assert back.history["epoch"] != epoch
    await back.close()
