"""SQLiteHistory on its own: numbering, order, resends, retention, pages and epochs."""

from __future__ import annotations

import asyncio

import pytest

from fennec_chat.sqlite_history import SQLiteHistory


@pytest.fixture
async def history(tmp_path):
    store = SQLiteHistory(str(tmp_path / "history.db"), retention=100)
    await store.start()
    yield store
    await store.close()


def message(text: str, client_msg_id: str | None = None) -> dict:
    event = {"type": "message", "message": text}
    if client_msg_id is not None:
        event["client_msg_id"] = client_msg_id
    return event


async def test_ids_follow_the_order_of_appends_and_waiters_resume_in_that_order(history):
    resumed: list[int] = []

    async def append(number: int) -> None:
        stored = await history.append("room", message(str(number)), "alice")
        resumed.append(stored.event["id"])

    await asyncio.gather(*(append(number) for number in range(500)))
    assert resumed == list(range(1, 501))


async def test_the_stored_text_is_the_event_with_its_id(history):
    stored = await history.append("room", message("hello"), "alice")
    assert stored.event == {"type": "message", "message": "hello", "id": 1}
    assert stored.text == '{"type":"message","message":"hello","id":1}'
    assert stored.duplicate is False


async def test_a_repeated_client_msg_id_returns_the_original(history):
    first = await history.append("room", message("once", "c-1"), "alice")
    again, other_room = await asyncio.gather(
        history.append("room", message("once, resent", "c-1"), "alice"),
        history.append("elsewhere", message("same id, other room", "c-1"), "alice"),
    )
    assert again.duplicate is True
    assert again.event == first.event
    assert other_room.duplicate is False
    assert (await history.recent("room", 10)).messages == [first.event]


async def test_retention_prunes_the_oldest_messages(tmp_path):
    store = SQLiteHistory(str(tmp_path / "small.db"), retention=3)
    await store.start()
    for number in range(1, 8):
        await store.append("room", message(str(number), f"c{number}"), "alice")
    page = await store.recent("room", 10)
    assert [m["id"] for m in page.messages] == [5, 6, 7]
    assert page.truncated is True
    # The resend window is the retained history: a pruned client_msg_id is new again.
    assert (await store.append("room", message("again", "c1"), "alice")).duplicate is False
    assert (await store.append("room", message("again", "c7"), "alice")).duplicate is True
    await store.close()


async def test_pages_say_when_they_are_truncated_or_reset(history):
    for number in range(1, 11):
        await history.append("room", message(str(number)), "alice")
    epoch = (await history.room_state("room")).epoch

    recent = await history.recent("room", 4)
    assert ([m["id"] for m in recent.messages], recent.truncated, recent.reset) == (
        [7, 8, 9, 10],
        True,
        False,
    )
    whole = await history.recent("room", 50)
    assert (len(whole.messages), whole.truncated) == (10, False)

    resumed = await history.since("room", 6, epoch, limit=50)
    assert ([m["id"] for m in resumed.messages], resumed.truncated) == ([7, 8, 9, 10], False)
    capped = await history.since("room", 2, epoch, limit=3)
    assert ([m["id"] for m in capped.messages], capped.truncated) == ([8, 9, 10], True)
    up_to_date = await history.since("room", 10, epoch, limit=50)
    assert (up_to_date.messages, up_to_date.truncated) == ([], False)

    for stale in (
        await history.since("room", 3, "another-epoch", 50),
        await history.since("room", 11, epoch, 50),
    ):
        assert stale.reset is True
        assert [m["id"] for m in stale.messages] == list(range(1, 11))


async def test_an_empty_room_has_an_epoch_and_no_messages(history):
    page = await history.recent("new-room", 50)
    assert page.messages == []
    assert page.truncated is False
    assert page.epoch == (await history.room_state("new-room")).epoch


async def test_ids_and_epochs_survive_reopening(tmp_path):
    path = str(tmp_path / "durable.db")
    store = SQLiteHistory(path, retention=100)
    await store.start()
    await store.append("room", message("a"), "alice")
    epoch = (await store.room_state("room")).epoch
    await store.close()

    reopened = SQLiteHistory(path, retention=100)
    await reopened.start()
    assert (await reopened.room_state("room")).epoch == epoch
    assert (await reopened.append("room", message("b"), "alice")).event["id"] == 2
    await reopened.close()


async def test_an_unusable_path_is_a_clear_error(tmp_path):
    store = SQLiteHistory(str(tmp_path / "missing-dir" / "x.db"), retention=10)
    with pytest.raises(RuntimeError, match="cannot open the history database"):
        await store.start()


class SmallWal(SQLiteHistory):
    """The same store, with limits small enough for a test to pass them in a second."""

    CHECKPOINT_EVERY = 0.05
    WAL_SOFT_LIMIT = 256 * 1024
    WAL_HARD_LIMIT = 512 * 1024


async def test_a_flood_that_never_pauses_leaves_a_bounded_write_ahead_log(tmp_path):
    path = tmp_path / "flood.db"
    store = SmallWal(str(path), retention=100_000)
    await store.start()
    wal = path.with_name("flood.db-wal")
    largest = 0
    text = "x" * 1900
    pending = []
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.5
    while loop.time() < until:  # a message every millisecond or so: the writer never pauses
        pending.append(store.append("room", message(text), "alice"))
        if len(pending) % 50 == 0:
            largest = max(largest, wal.stat().st_size)
        await asyncio.sleep(0.001)
    await asyncio.gather(*pending)
    assert largest < 4 * 1024 * 1024  # past the hard limit it starts over, and is cut back to twice that
    await store.close()
    assert not wal.exists() or wal.stat().st_size == 0  # a closed store leaves it empty
