"""Random frames against a live server: each gets exactly the answer the validator predicts,
the connection survives, a bystander sees only what valid commands send, and the server logs
no error."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fennec_chat import protocol
from fennec_chat.protocol import Rejection, SendMessage, SetUsername, Typing
from fennec_chat.settings import Settings
from tests.chat_client import ChatClient
from tests.server_process import ServerProcess, log_path
from tests.test_protocol import frames

SETTINGS = Settings()


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    process = ServerProcess([], {}, log_path("fuzz")).start()
    yield process
    process.stop()


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


async def exchange(server: ServerProcess, frames: list[dict]) -> None:
    room = f"fuzz-{uuid.uuid4().hex[:12]}"
    fuzzer = await server.connect(f"/ws/chat/{room}?username=fuzzer")
    fuzzer_id, _ = await fuzzer.joined()
    bystander = await server.connect(f"/ws/chat/{room}?username=bystander")
    await bystander.joined()
    await fuzzer.expect("user_joined")
    name = "fuzzer"
    accepted: dict[str, str] = {}  # client_msg_id → text of the message first sent with it

    for number, frame in enumerate(frames):
        expected = protocol.parse_command(frame, SETTINGS)
        probe = f"probe {number}"
        await send_frame(fuzzer, frame)
        await fuzzer.send(type="message", message=probe)
        to_fuzzer = await events_until_probe(fuzzer, probe)
        to_bystander = await events_until_probe(bystander, probe)

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
        elif isinstance(expected, SetUsername):
            announced = [] if expected.username == name else [("username_changed", name, expected.username)]
            for events in (to_fuzzer, to_bystander):
                assert [(e["type"], e["old_username"], e["new_username"]) for e in events] == announced
            name = expected.username
        else:
            assert isinstance(expected, Typing)
            assert to_fuzzer == []
            assert [(e["type"], e["username"]) for e in to_bystander] == [("typing", name)]

    await fuzzer.close()
    await bystander.wait_for("user_left", client_id=fuzzer_id)
    await bystander.close()


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(frames, min_size=1, max_size=6))
def test_random_frames_get_the_predicted_answer_and_harm_nobody(fuzz_server, frames):
    asyncio.run(exchange(fuzz_server, frames))
    fuzz_server.assert_no_errors()
