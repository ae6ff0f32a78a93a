"""The chaos test's verdict on one room (tests/chaos.py): once everything has settled, what each
client showed, what each client sent and what Redis holds must tell one story."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.chaos_client import ChaosClient


@dataclass
class Checks:
    made: int = 0
    failures: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def __call__(self, kind: str, ok: bool, failure: str) -> bool:
        self.made += 1
        self.kinds[kind] += 1
        if not ok:
            self.failures.append(f"[{kind}] {failure}")
        return ok

    def by_kind(self) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in self.kinds.most_common())


def first_difference(mine: Sequence[tuple[int, str]], theirs: Sequence[tuple[int, str]]) -> str:
    for index, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            return f"at position {index}: {a} where the other has {b}"
    return f"{len(mine)} messages where the other has {len(theirs)}"


def check_room(
    checks: Checks,
    members: list[ChaosClient],
    stream: list[tuple[str, dict[str, Any]]],
    epoch: str,
    last_id: int,
) -> None:
    """`stream`: XRANGE of the room's history in Redis; `epoch` and `last_id`: its keys there."""
    room = members[0].room
    stored = [json.loads(fields["e"]) for _, fields in stream]
    history = [(event["id"], event["message"]) for event in stored]

    # The store: ids 1, 2, 3… up to the room's counter, each message of this room's clients once.
    checks(
        "store",
        [i for i, _ in history] == list(range(1, last_id + 1)),
        f"{room}: ids in Redis are not 1..{last_id}",
    )
    sends = {
        send.text: (client.name, client_msg_id)
        for client in members
        for client_msg_id, send in client.sends.items()
    }
    texts = Counter(text for _, text in history)
    for message_id, text in history:
        checks("store", text in sends, f"{room}: id {message_id} holds {text!r}, which nobody here sent")
    for text, count in texts.items():
        checks(
            "store",
            count == 1,
            f"{room}: {text!r} is stored {count} times, as ids "
            + ", ".join(str(message_id) for message_id, stored_text in history if stored_text == text),
        )
    owners = Counter(event.get("client_msg_id") for event in stored)
    for client_msg_id, count in owners.items():
        checks("store", count == 1, f"{room}: client_msg_id {client_msg_id} is stored {count} times")

    # Each client: what it showed is exactly the store, in order, consecutive, in one epoch.
    by_id = dict(history)
    for client in members:
        checks(
            "settled",
            client.settled(last_id),
            f"{room}: {client.name} never settled: {client.unsettled(last_id)}",
        )
        checks.made += client.checked  # every copy it received was compared as it came
        checks.kinds["copies compared as they came"] += client.checked
        for problem in client.problems:
            checks("seen live", False, f"{room}: {problem}")
        for segment in client.segments:
            ids = [i for i, _ in segment.messages]
            checks(
                "transcript",
                ids == list(range(ids[0], ids[0] + len(ids))) if ids else True,
                f"{room}: {client.name}'s ids in epoch {segment.epoch} are not consecutive",
            )
        last = client.segments[-1]
        checks(
            "transcript",
            last.epoch == epoch,
            f"{room}: {client.name} ended in epoch {last.epoch}, Redis in {epoch}",
        )
        first = last.messages[0][0] if last.messages else last_id + 1
        expected = [(i, text) for i, text in history if i >= first]
        checks(
            "transcript",
            last.messages == expected,
            f"{room}: {client.name}'s transcript is not the history in Redis: "
            + first_difference(last.messages, expected),
        )
        checks(
            "transcript",
            first == 1 or len(client.segments) > 1,
            f"{room}: {client.name}'s transcript starts at {first}, not 1",
        )
        # Its own sends: every one confirmed, under the id that holds its text, and stored once.
        for client_msg_id, send in client.sends.items():
            if not checks(
                "exactly once", send.confirmed is not None, f"{room}: {client_msg_id} never confirmed"
            ):
                checks.failures[-1] += (
                    f" (sent {send.transmissions} times, last on connection {send.sent_on}"
                    f" of {client.connection})"
                )
                continue
            assert send.confirmed is not None
            confirmed_epoch, confirmed_id = send.confirmed
            if confirmed_epoch != epoch:
                checks(
                    "exactly once",
                    False,
                    f"{room}: {client_msg_id} was confirmed in epoch {confirmed_epoch}, since replaced",
                )
                continue
            checks(
                "exactly once",
                by_id.get(confirmed_id) == send.text,
                f"{room}: {client_msg_id} confirmed as id {confirmed_id}, "
                f"which holds {by_id.get(confirmed_id)!r}",
            )
            checks(
                "exactly once",
                texts[send.text] == 1,
                f"{room}: {client_msg_id} stored {texts[send.text]} times",
            )

    # And the clients among themselves: the same sequence for everyone.
    reference = members[0].segments[-1].messages
    for client in members[1:]:
        mine = client.segments[-1].messages
        checks(
            "same for everyone",
            mine == reference,
            f"{room}: {client.name} and {members[0].name} differ {first_difference(mine, reference)}",
        )
