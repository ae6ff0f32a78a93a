"""Message history: ids, history on join, resume with ?since=, exactly-once sends, epochs,
restarts and crashes."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chat_client import ChatClient
from tests.server_process import ROOT, ServerProcess, log_path


async def send_messages(client: ChatClient, texts: list[str], per_second: float | None = None) -> None:
    for text in texts:
        await client.send(type="message", message=text)
        if per_second:
            await asyncio.sleep(1 / per_second)


async def read_messages(client: ChatClient, count: int, timeout: float = 10) -> list[dict]:
    """The next `count` message events, skipping other events."""
    messages = []

    async def read() -> None:
        while len(messages) < count:
            event = await client.next(timeout)
            if event["type"] == "message":
                messages.append(event)

    await asyncio.wait_for(read(), timeout)
    return messages


async def no_more_messages(client: ChatClient, seconds: float = 0.1) -> None:
    """No chat message arrives for a while (other events may)."""
    try:
        extra = await read_messages(client, 1, timeout=seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"a message arrived twice or out of nowhere: {extra}")


async def test_messages_are_numbered_from_1_within_each_room(server, room):
    first = await server.connect(f"/ws/chat/{room}-a")
    await first.joined()
    second = await server.connect(f"/ws/chat/{room}-b")
    await second.joined()
    await send_messages(first, ["a1", "a2", "a3"])
    await send_messages(second, ["b1"])
    assert [m["id"] for m in await read_messages(first, 3)] == [1, 2, 3]
    assert [m["id"] for m in await read_messages(second, 1)] == [1]
    await first.close()
    await second.close()


async def test_a_newcomer_gets_the_last_50_messages_in_order_before_anything_live(server, room):
    writer = await server.connect(f"/ws/chat/{room}?username=writer")
    await writer.joined()
    assert writer.history["messages"] == []
    assert writer.history["truncated"] is False
    await send_messages(writer, [f"m{n}" for n in range(1, 61)])
    await read_messages(writer, 60)
    await writer.send(type="typing")

    newcomer = await server.connect(f"/ws/chat/{room}")
    await newcomer.expect("system")
    await newcomer.expect("presence")
    history = await newcomer.expect("history", room=room, truncated=True, reset=False)
    assert set(history) == {"type", "room", "messages", "truncated", "epoch", "reset", "timestamp"}
    assert [m["id"] for m in history["messages"]] == list(range(11, 61))
    assert [m["message"] for m in history["messages"]] == [f"m{n}" for n in range(11, 61)]
    assert all(m["type"] == "message" and m["username"] == "writer" for m in history["messages"])

    await writer.send(type="message", message="live")
    live = await newcomer.expect("message", message="live")
    assert live["id"] == 61
    await writer.close()
    await newcomer.close()


async def test_only_chat_messages_are_stored(server, room):
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    await alice.send(type="typing")
    await alice.send(type="set_username", username="Alice")
    await alice.send(type="message", message="stored")
    await alice.wait_for("message")
    bob = await server.connect(f"/ws/chat/{room}")
    await bob.joined()
    assert [m["message"] for m in bob.history["messages"]] == ["stored"]
    await alice.close()
    await bob.close()


async def test_history_survives_a_restart_with_the_same_database(request, room):
    first = ServerProcess([], {}, log_path(f"{request.node.name}-1")).start()
    alice = await first.connect(f"/ws/chat/{room}")
    await alice.joined()
    await send_messages(alice, ["before", "the", "restart"])
    await read_messages(alice, 3)
    epoch = alice.history["epoch"]
    await alice.close()
    assert first.stop() == 0

    second = ServerProcess(["--db", str(first.db_path)], {}, log_path(f"{request.node.name}-2"))
    second.start()
    try:
        bob = await second.connect(f"/ws/chat/{room}")
        await bob.joined()
        assert [m["message"] for m in bob.history["messages"]] == ["before", "the", "restart"]
        assert bob.history["epoch"] == epoch
        await bob.send(type="message", message="after")
        assert (await read_messages(bob, 1))[0]["id"] == 4  # ids go on where they stopped
        await bob.close()
    finally:
        second.stop()


async def test_resuming_with_since_sends_exactly_the_missed_messages(server, room):
    reader = await server.connect(f"/ws/chat/{room}")
    await reader.joined()
    writer = await server.connect(f"/ws/chat/{room}")
    await writer.joined()
    await send_messages(writer, ["one", "two"])
    seen = await read_messages(reader, 2)
    epoch = reader.history["epoch"]
    await reader.close()

    await send_messages(writer, ["three", "four", "five"])
    await read_messages(writer, 5)
    back = await server.connect(f"/ws/chat/{room}?since={seen[-1]['id']}&epoch={epoch}")
    await back.joined()
    assert [m["message"] for m in back.history["messages"]] == ["three", "four", "five"]
    assert back.history["truncated"] is False
    assert back.history["reset"] is False
    await writer.send(type="message", message="six")
    assert [m["message"] for m in await read_messages(back, 1)] == ["six"]
    await writer.close()
    await back.close()


async def test_resuming_when_nothing_was_missed_sends_an_empty_history(server, room):
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    await alice.send(type="message", message="only")
    last = (await read_messages(alice, 1))[0]
    await alice.close()
    back = await server.connect(f"/ws/chat/{room}?since={last['id']}&epoch={alice.history['epoch']}")
    await back.joined()
    assert back.history["messages"] == []
    assert back.history["truncated"] is False
    await back.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    drops=st.lists(
        st.tuples(
            st.integers(0, 60), st.floats(0, 0.3), st.booleans()
        ),  # after n messages, away for s, abort?
        min_size=1,
        max_size=3,
    )
)
def test_a_client_that_drops_and_resumes_misses_nothing_and_sees_nothing_twice(server, drops):
    asyncio.run(drop_and_resume(server, drops))


async def drop_and_resume(server: ServerProcess, drops: list[tuple[int, float, bool]]) -> None:
    room = f"resume-{uuid.uuid4().hex[:12]}"
    total = 100
    writer = await server.connect(f"/ws/chat/{room}")
    await writer.joined()
    reader = await server.connect(f"/ws/chat/{room}")
    await reader.joined()
    epoch = reader.history["epoch"]
    sending = asyncio.create_task(send_messages(writer, [f"n{n}" for n in range(total)], per_second=200))

    ids: list[int] = []
    for after, away, abort in drops:
        for message in await read_messages(reader, min(after, total - len(ids))):
            ids.append(message["id"])
        await (reader.abort() if abort else reader.close())
        await asyncio.sleep(away)
        since = ids[-1] if ids else 0
        reader = await server.connect(f"/ws/chat/{room}?since={since}&epoch={epoch}")
        await reader.joined()
        assert reader.history["reset"] is False
        ids += [m["id"] for m in reader.history["messages"]]
    ids += [m["id"] for m in await read_messages(reader, total - len(ids))]
    await sending
    assert ids == list(range(1, total + 1))
    await no_more_messages(reader)
    await reader.close()
    await writer.close()


async def test_joins_during_a_burst_miss_nothing_and_repeat_nothing(server, room):
    """Subscribe first, read, then deduplicate: messages published while a newcomer's history
    is being read arrive exactly once, for fresh joins and for resumes alike."""
    writer = await server.connect(f"/ws/chat/{room}")
    await writer.joined()
    epoch = writer.history["epoch"]
    total = 600
    latest = 0

    async def burst() -> None:
        for number in range(total):
            await writer.send(type="message", message=f"b{number}")
            if number % 3 == 0:
                await asyncio.sleep(0.001)

    async def follow_writer() -> None:
        nonlocal latest
        while latest < total:
            latest = (await read_messages(writer, 1))[0]["id"]

    sending = asyncio.create_task(burst())
    following = asyncio.create_task(follow_writer())
    joiners: list[tuple[ChatClient, int | None]] = []
    while not following.done():
        since = latest if len(joiners) % 2 else None  # every other one resumes where the writer is
        query = f"?since={since}&epoch={epoch}" if since is not None else ""
        joiner = await server.connect(f"/ws/chat/{room}{query}")
        await joiner.joined()
        joiners.append((joiner, since))
        await asyncio.sleep(0.01)
    await asyncio.gather(sending, following)
    assert len(joiners) >= 6

    for joiner, since in joiners:
        ids = [m["id"] for m in joiner.history["messages"]]  # what was stored before it joined
        while not ids or ids[-1] < total:  # then everything else, live
            ids += [m["id"] for m in await read_messages(joiner, 1)]
        first = since + 1 if since is not None else ids[0]
        assert ids == list(range(first, total + 1)), (since, ids[:5])
        await no_more_messages(joiner)
        await joiner.close()
    await writer.close()


async def test_every_message_anyone_saw_survives_kill_9(request, room):
    first = ServerProcess(["--history-retention", "5000"], {}, log_path(f"{request.node.name}-1")).start()
    readers = [await first.connect(f"/ws/chat/{room}") for _ in range(3)]
    for reader in readers:
        await reader.joined()
    writer = await first.connect(f"/ws/chat/{room}")
    await writer.joined()
    seen: set[int] = set()

    async def record(reader: ChatClient) -> None:
        try:
            while True:
                event = await reader.next(10)
                if event["type"] == "message":
                    seen.add(event["id"])
                    if len(seen) >= 200:
                        enough_seen.set()
        except Exception:
            return  # the server died

    enough_seen = asyncio.Event()
    recorders = [asyncio.create_task(record(reader)) for reader in readers]

    async def write_forever() -> None:
        try:
            for number in range(3_000):
                await writer.send(type="message", message=f"k{number}")
        except Exception:
            return

    writing = asyncio.create_task(write_forever())
    await asyncio.wait_for(enough_seen.wait(), 20)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    await asyncio.gather(writing, *recorders)
    assert len(seen) >= 200

    second = ServerProcess(
        ["--db", str(first.db_path), "--history-on-join", "5000", "--history-retention", "5000"],
        {},
        log_path(f"{request.node.name}-2"),
    )
    second.start()
    try:
        check = await second.connect(f"/ws/chat/{room}")
        await check.joined()
        stored = [m["id"] for m in check.history["messages"]]
        assert stored == list(range(1, len(stored) + 1))
        assert seen <= set(stored)
        await check.send(type="message", message="after the crash")
        assert (await read_messages(check, 1))[0]["id"] == stored[-1] + 1
        await check.close()
    finally:
        second.stop()


async def test_a_resent_client_msg_id_reaches_the_others_once_and_acknowledges_the_sender(server, room):
    bystander = await server.connect(f"/ws/chat/{room}")
    await bystander.joined()
    session = "tab-0123456789abcdef"  # the page's id for its tab, the same after a reconnect
    sender = await server.connect(f"/ws/chat/{room}?session={session}")
    sender_id, _ = await sender.joined()
    await sender.send(type="message", message="exactly once", client_msg_id="msg-1")
    original = (await read_messages(sender, 1))[0]
    assert original["client_msg_id"] == "msg-1"
    assert (await read_messages(bystander, 1))[0] == original

    # The sender's connection drops before it sees the echo; it reconnects and sends again.
    await sender.abort()
    again = await server.connect(
        f"/ws/chat/{room}?session={session}&since={original['id'] - 1}&epoch={sender.history['epoch']}"
    )
    await again.joined()
    assert [m["client_msg_id"] for m in again.history["messages"]] == ["msg-1"]
    await again.send(type="message", message="exactly once", client_msg_id="msg-1")
    receipt = await again.expect("message")
    assert receipt == original  # the original event: same id, the first connection's client_id
    assert receipt["client_id"] == sender_id
    await bystander.wait_for("user_back")  # the same tab, back at once: not a leave (leave_grace.py)
    await bystander.expect_silence(0.5)

    newcomer = await server.connect(f"/ws/chat/{room}")
    await newcomer.joined()
    assert [m["message"] for m in newcomer.history["messages"]] == ["exactly once"]
    for client in (bystander, again, newcomer):
        await client.close()


async def test_resend_protection_survives_a_restart(request, room):
    first = ServerProcess([], {}, log_path(f"{request.node.name}-1")).start()
    sender = await first.connect(f"/ws/chat/{room}?session=tab-0123456789abcdef")
    await sender.joined()
    await sender.send(type="message", message="before", client_msg_id="abc")
    original = (await read_messages(sender, 1))[0]
    await sender.close()
    first.stop()
    second = ServerProcess(["--db", str(first.db_path)], {}, log_path(f"{request.node.name}-2")).start()
    try:
        again = await second.connect(f"/ws/chat/{room}?session=tab-0123456789abcdef")
        await again.joined()
        await again.send(type="message", message="before", client_msg_id="abc")
        assert await again.expect("message") == original
        await again.close()
    finally:
        second.stop()


async def test_a_since_from_another_epoch_resets_the_view(server, room):
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    await send_messages(alice, ["x", "y"])
    await read_messages(alice, 2)
    await alice.close()
    for query in ("since=1&epoch=0000000000000000", "since=99"):  # another epoch; an unknown future id
        back = await server.connect(f"/ws/chat/{room}?{query}")
        await back.joined()
        assert back.history["reset"] is True
        assert [m["message"] for m in back.history["messages"]] == ["x", "y"]
        await back.close()


async def test_retention_keeps_the_newest_messages_per_room(start_server, room):
    server = start_server("--history-retention", "5")
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    await send_messages(alice, [f"r{n}" for n in range(1, 9)])
    await read_messages(alice, 8)
    newcomer = await server.connect(f"/ws/chat/{room}")
    await newcomer.joined()
    assert [m["id"] for m in newcomer.history["messages"]] == [4, 5, 6, 7, 8]
    assert newcomer.history["truncated"] is True
    back = await server.connect(f"/ws/chat/{room}?since=1&epoch={alice.history['epoch']}")
    await back.joined()
    assert [m["id"] for m in back.history["messages"]] == [4, 5, 6, 7, 8]
    assert back.history["truncated"] is True  # 2 and 3 are gone
    for client in (alice, newcomer, back):
        await client.close()
    server.stop()  # the server holds the file exclusively while it runs
    rows = sqlite3.connect(server.db_path).execute("SELECT count(*) FROM messages").fetchone()
    assert rows == (5,)


async def test_join_and_resume_sizes_are_settings(start_server, room):
    server = start_server("--history-on-join", "2", "--history-resume-max", "3")
    alice = await server.connect(f"/ws/chat/{room}")
    await alice.joined()
    await send_messages(alice, [f"s{n}" for n in range(1, 11)])
    await read_messages(alice, 10)
    newcomer = await server.connect(f"/ws/chat/{room}")
    await newcomer.joined()
    assert [m["id"] for m in newcomer.history["messages"]] == [9, 10]
    back = await server.connect(f"/ws/chat/{room}?since=0&epoch={alice.history['epoch']}")
    await back.joined()
    assert [m["id"] for m in back.history["messages"]] == [8, 9, 10]
    assert back.history["truncated"] is True
    for client in (alice, newcomer, back):
        await client.close()


async def test_no_history_means_no_ids_no_history_event_and_no_database(start_server, room, tmp_path):
    db = tmp_path / "unused.db"
    server = start_server("--no-history", "--db", str(db))
    alice = await server.connect(f"/ws/chat/{room}?since=3&epoch=abc")
    await alice.joined(history=False)
    await alice.send(type="message", message="ephemeral", client_msg_id="c1")
    event = await alice.expect("message")
    assert "id" not in event
    assert event["client_msg_id"] == "c1"
    await alice.close()
    assert not db.exists()


async def test_an_in_memory_history_works_but_leaves_no_file(request, room):
    first = ServerProcess(["--db", ":memory:"], {}, log_path(f"{request.node.name}-1")).start()
    alice = await first.connect(f"/ws/chat/{room}")
    await alice.joined()
    await alice.send(type="message", message="in memory")
    await read_messages(alice, 1)
    bob = await first.connect(f"/ws/chat/{room}")
    await bob.joined()
    assert [m["message"] for m in bob.history["messages"]] == ["in memory"]
    await alice.close()
    await bob.close()
    first.stop()
    assert list(ROOT.glob(":memory:*")) == []

    second = ServerProcess(
        ["--db", ":memory:"], {}, log_path(f"{request.node.name}-2"), port=first.port
    ).start()
    try:
        carol = await second.connect(f"/ws/chat/{room}")
        await carol.joined()
        assert carol.history["messages"] == []
        assert carol.history["epoch"] != alice.history["epoch"]
        await carol.close()
    finally:
        second.stop()


async def test_bad_resume_parameters_and_client_msg_ids_get_errors(server, room):
    alice = await server.connect(f"/ws/chat/{room}?since=-4")
    await alice.joined()
    await alice.expect("error", code="invalid_since")
    for bad in ("", "has space", "x" * 65, 7):
        await alice.send(type="message", message="hi", client_msg_id=bad)
        await alice.expect("error", code="invalid_client_msg_id")
    await alice.send(type="message", message="hi", client_msg_id="ok-" + "x" * 61)
    await alice.expect("message")
    await alice.close()


def test_two_servers_cannot_share_one_database(start_server):
    server = start_server()
    result = subprocess.run(
        [sys.executable, "server.py", "--port", "0", "--db", str(server.db_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "cannot open the history database" in result.stdout + result.stderr
    assert server.health()["status"] == "ok"  # the first one is unharmed
