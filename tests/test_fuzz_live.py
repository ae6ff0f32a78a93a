"""Random frames against a live server: each gets exactly the answer the validator and the
sender's role predict, the connection survives, a bystander sees only what valid commands send,
and the server logs no error.

The fuzzer is anonymous (no --jwt-secret), or signed in with a token as a plain member or as an
admin. Every command is drawn, `kick`, `unban` and `delete_message` included: from anyone but an
admin they get `forbidden`; from an admin, `not_found` for a client_id that is not in the room,
and the kick itself for one that is (the bystander, or the fuzzer itself), which ends the
exchange; `not_found` for an unban (nobody is banned); a deletion of a stored message reaches
both, and later pages of history lack it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fennec_chat import protocol
from fennec_chat.gate import Tokens
from fennec_chat.protocol import (
    CloseCode,
    ErrorCode,
    Kick,
    LoadEarlier,
    Rejection,
    SendMessage,
    SetUsername,
    Typing,
)
from fennec_chat.settings import Settings
from tests.chat_client import ChatClient
from tests.server_process import ServerProcess, log_path
from tests.test_protocol import KICK_BYSTANDER, KICK_SELF, frames

SETTINGS = Settings()
SECRET = "fuzz-live-secret-0123456789abcdef"
TOKENS = Tokens(SECRET)
ROLES = ["anonymous", "member", "admin"]  # anonymous on a server without tokens; the others with


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    process = ServerProcess([], {}, log_path("fuzz")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def token_fuzz_server() -> Iterator[ServerProcess]:
    """Every socket needs a token here; an admin's may kick."""
    process = ServerProcess(["--jwt-secret", SECRET], {}, log_path("fuzz-tokens")).start()
    yield process
    process.stop()


def credentials(name: str, role: str) -> str:
    """The connect URL's query for `name` in `role`."""
    if role == "anonymous":
        return f"username={name}"
    return f"token={TOKENS.mint(name, admin=role == 'admin', ttl=600)}"


def aimed(frame: dict, members: dict[str, str]) -> dict:
    """The frame, with a kick's stand-in client_id (KICK_BYSTANDER, KICK_SELF) replaced by the
    real one of that member of the room."""
    command = protocol.parse_command(frame, SETTINGS)
    if not (isinstance(command, Kick) and command.client_id in members):
        return frame
    data = json.loads(frame["text"])
    data["client_id"] = members[command.client_id]
    return {"type": "websocket.receive", "text": json.dumps(data)}


async def send_frame(client: ChatClient, frame: dict) -> None:
    await client.send_raw(frame["text"] if "text" in frame else frame["bytes"])


async def events_until_probe(client: ChatClient, probe: str) -> list[dict]:
    """Everything the client receives before the echo of our probe message."""
    events = []
    while True:
        event = await client.next()
        if event["type"] == "message" and event["message"] == probe:
            return events
        events.append(event)


async def expect_kick(admin: ChatClient, admin_id: str, other: ChatClient, target_id: str) -> None:
    """After an admin's kick of a member of the room (`other`, or the admin itself): both get
    the `system` line, the target is closed with 4001 and the one left hears `user_left`. The
    exchange ends there."""
    target, witness = (admin, other) if target_id == admin_id else (other, admin)
    if target is other:  # the admin goes on: its probe comes after the target's user_left
        await admin.send(type="message", message="probe after the kick")
        events = await events_until_probe(admin, "probe after the kick")
    else:
        events = [await witness.next(), await witness.next()]
    assert [(e["type"], e.get("kind"), e["client_id"]) for e in events] == [
        ("system", "kicked", target_id),
        ("user_left", None, target_id),
    ]
    notice = await target.next()
    assert (notice["type"], notice["kind"], notice["client_id"]) == ("system", "kicked", target_id)
    assert await target.close_code() == (CloseCode.KICKED, "kicked")
    await witness.close()


async def exchange(server: ServerProcess, frames: list[dict], role: str) -> None:
    room = f"fuzz-{uuid.uuid4().hex[:12]}"
    fuzzer = await server.connect(f"/ws/chat/{room}?{credentials('fuzzer', role)}")
    fuzzer_id, _ = await fuzzer.joined()
    bystander_role = "anonymous" if role == "anonymous" else "member"
    bystander = await server.connect(f"/ws/chat/{room}?{credentials('bystander', bystander_role)}")
    bystander_id, _ = await bystander.joined()
    await fuzzer.expect("user_joined")
    name = "fuzzer"
    accepted: dict[str, str] = {}  # client_msg_id → text of the message first sent with it
    stored = 0  # messages in the room's history: ids 1..stored (the probes included)...
    deleted: set[int] = set()  # ...but those an admin fuzzer deleted
    members = {KICK_SELF: fuzzer_id, KICK_BYSTANDER: bystander_id}

    for number, frame in enumerate(frames):
        frame = aimed(frame, members)
        expected = protocol.parse_command(frame, SETTINGS)
        event(f"{role}: {type(expected).__name__}")  # see --hypothesis-show-statistics
        if role == "admin" and isinstance(expected, Kick) and expected.client_id in members.values():
            await send_frame(fuzzer, frame)
            await expect_kick(fuzzer, fuzzer_id, bystander, expected.client_id)
            return
        probe = f"probe {number}"
        await send_frame(fuzzer, frame)
        await fuzzer.send(type="message", message=probe)
        to_fuzzer = await events_until_probe(fuzzer, probe)
        to_bystander = await events_until_probe(bystander, probe)
        new_messages = isinstance(expected, SendMessage) and expected.client_msg_id not in accepted

        if isinstance(expected, Rejection):
            assert [(e["type"], e["code"]) for e in to_fuzzer] == [("error", expected.code)]
            assert to_bystander == []
        elif isinstance(expected, SendMessage) and expected.client_msg_id in accepted:
            # A resend: the original comes back to the sender alone, as its receipt.
            original = accepted[expected.client_msg_id]
            assert [(e["type"], e["message"]) for e in to_fuzzer] == [("message", original)]
            assert to_bystander == []
        elif isinstance(expected, SendMessage):
            for events in (to_fuzzer, to_bystander):
                assert [(e["type"], e["message"], e["client_id"]) for e in events] == [
                    ("message", expected.text, fuzzer_id)
                ]
            if expected.client_msg_id is not None:
                accepted[expected.client_msg_id] = expected.text
        elif isinstance(expected, SetUsername) and role != "anonymous":
            # A token's name is the name: no renaming.
            assert [(e["type"], e["code"]) for e in to_fuzzer] == [("error", ErrorCode.USERNAME_LOCKED)]
            assert to_bystander == []
        elif isinstance(expected, SetUsername):
            announced = [] if expected.username == name else [("username_changed", name, expected.username)]
            for events in (to_fuzzer, to_bystander):
                assert [(e["type"], e["old_username"], e["new_username"]) for e in events] == announced
            name = expected.username
        elif isinstance(expected, LoadEarlier):
            # The newest 50 below `before`, oldest first, to the asker alone.
            kept = [i for i in range(1, min(expected.before, stored + 1)) if i not in deleted]
            assert [(e["type"], [m["id"] for m in e["messages"]], e["complete"]) for e in to_fuzzer] == [
                ("earlier_messages", kept[-50:], len(kept) <= 50)
            ]
            assert to_bystander == []
        elif isinstance(expected, protocol.DeleteMessage) and role == "admin":
            if 1 <= expected.message_id <= stored and expected.message_id not in deleted:
                deleted.add(expected.message_id)
                gone = [("message_deleted", expected.message_id)]
                for events in (to_fuzzer, to_bystander):
                    assert [(e["type"], e["id"]) for e in events] == gone
            else:
                assert [(e["type"], e["code"]) for e in to_fuzzer] == [("error", ErrorCode.NOT_FOUND)]
                assert to_bystander == []
        elif isinstance(expected, protocol.Unban | protocol.DeleteMessage):
            # Only an admin may; an admin's unban of someone not banned (nobody is) is not_found.
            code = ErrorCode.NOT_FOUND if role == "admin" else ErrorCode.FORBIDDEN
            assert [(e["type"], e["code"]) for e in to_fuzzer] == [("error", code)]
            assert to_bystander == []
        elif isinstance(expected, Kick):
            # Only an admin may kick; an admin's kick of someone not in the room is not_found.
            code = ErrorCode.NOT_FOUND if role == "admin" else ErrorCode.FORBIDDEN
            assert [(e["type"], e["code"]) for e in to_fuzzer] == [("error", code)]
            assert to_bystander == []
        else:
            assert isinstance(expected, Typing)
            assert to_fuzzer == []
            assert [(e["type"], e["username"]) for e in to_bystander] == [("typing", name)]
        stored += 1 + new_messages  # the probe, and the message if it was a new one

    await fuzzer.close()
    await bystander.wait_for("user_left", client_id=fuzzer_id)
    await bystander.close()


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.sampled_from(ROLES), st.lists(frames, min_size=1, max_size=6))
def test_random_frames_get_the_predicted_answer_and_harm_nobody(fuzz_server, token_fuzz_server, role, frames):
    server = fuzz_server if role == "anonymous" else token_fuzz_server
    asyncio.run(exchange(server, frames, role))
    server.assert_no_errors()
