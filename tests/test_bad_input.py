"""Bad input gets a clear answer and harms nobody: the socket stays open, other users see nothing."""

from __future__ import annotations

import json

import pytest

from tests.chat_client import ChatClient

TOO_LONG = "x" * 2001

BAD_FRAMES = [
    pytest.param("{not json", "invalid_json", id="not-json"),
    pytest.param("[" * 60_000, "invalid_json", id="absurdly-deep-nesting"),
    pytest.param("[1, 2]", "invalid_event", id="array"),
    pytest.param('"just a string"', "invalid_event", id="string"),
    pytest.param("42", "invalid_event", id="number"),
    pytest.param('{"message": "no type"}', "invalid_event", id="no-type"),
    pytest.param('{"type": 5}', "invalid_event", id="type-not-a-string"),
    pytest.param('{"type": "dance"}', "unknown_type", id="unknown-type"),
    pytest.param('{"type": "message"}', "invalid_message", id="message-missing"),
    pytest.param('{"type": "message", "message": 123}', "invalid_message", id="message-not-a-string"),
    pytest.param('{"type": "message", "message": "  \\n\\t "}', "invalid_message", id="message-blank"),
    pytest.param('{"type": "message", "message": "a\\u0000b"}', "invalid_message", id="message-nul"),
    pytest.param(
        '{"type": "message", "message": "a\\ud800b"}', "invalid_message", id="message-lone-surrogate"
    ),
    pytest.param(json.dumps({"type": "message", "message": TOO_LONG}), "message_too_long", id="message-2001"),
    pytest.param('{"type": "set_username"}', "invalid_username", id="username-missing"),
    pytest.param('{"type": "set_username", "username": ""}', "invalid_username", id="username-empty"),
    pytest.param('{"type": "set_username", "username": "   "}', "invalid_username", id="username-blank"),
    pytest.param('{"type": "set_username", "username": 7}', "invalid_username", id="username-number"),
    pytest.param(
        json.dumps({"type": "set_username", "username": "x" * 33}), "invalid_username", id="username-33"
    ),
    pytest.param('{"type": "set_username", "username": "a\\nb"}', "invalid_username", id="username-newline"),
    pytest.param(
        '{"type": "set_username", "username": "\\u202eevil"}', "invalid_username", id="username-bidi"
    ),
    pytest.param(
        '{"type": "set_username", "username": "\\udc00"}', "invalid_username", id="username-surrogate"
    ),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frame_gets_an_error_and_the_socket_still_chats(server, room, frame, code):
    sender = await server.connect(f"/ws/chat/{room}?username=sender")
    sender_id, _ = await sender.joined()
    bystander = await server.connect(f"/ws/chat/{room}?username=bystander")
    await bystander.joined()
    await sender.expect("user_joined")

    await sender.send_raw(frame)
    error = await sender.expect("error", code=code)
    assert set(error) == {"type", "code", "message", "timestamp"}
    assert error["message"]
    await bystander.expect_silence()

    await sender.send(type="message", message="still here")
    await sender.expect("message", message="still here")
    await bystander.expect("message", message="still here", client_id=sender_id)
    await sender.close()
    await bystander.close()


async def test_binary_frame_gets_unsupported_frame(server, room):
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send_raw(b'{"type": "message", "message": "hi"}')
    await client.expect("error", code="unsupported_frame")
    await client.send(type="message", message="as text")
    await client.expect("message", message="as text")
    await client.close()


async def test_messages_of_exactly_the_limit_are_accepted(server, room):
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="message", message="y" * 2000)
    event = await client.expect("message")
    assert len(event["message"]) == 2000
    await client.send(type="set_username", username="z" * 32)
    await client.expect("username_changed", new_username="z" * 32)
    await client.close()


async def test_unknown_fields_are_ignored(server, room):
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="message", message="hi", color="red", nested={"a": [1, 2]})
    event = await client.expect("message", message="hi")
    assert "color" not in event
    await client.close()


async def test_a_1_megabyte_frame_is_refused_with_1009_and_others_are_unaffected(server, room):
    flooder = await server.connect(f"/ws/chat/{room}")
    await flooder.joined()
    other = await server.connect(f"/ws/chat/{room}")
    other_id, _ = await other.joined()
    await flooder.expect("user_joined")

    await flooder.send_raw(json.dumps({"type": "message", "message": "x" * 1_000_000}))
    code, _ = await flooder.close_code()
    assert code == 1009

    await other.expect("user_left")
    await other.send(type="message", message="unaffected")
    await other.expect("message", message="unaffected", client_id=other_id)
    await other.close()


async def test_frame_limit_is_a_setting(start_server, room):
    server = start_server("--max-frame-bytes", "1024")
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="message", message="x" * 1100)
    code, _ = await client.close_code()
    assert code == 1009


async def test_message_and_username_limits_are_settings(start_server, room):
    server = start_server("--max-message-chars", "10", env={"CHAT_MAX_USERNAME_CHARS": "4"})
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    await client.send(type="message", message="x" * 11)
    await client.expect("error", code="message_too_long")
    await client.send(type="message", message="x" * 10)
    await client.expect("message")
    await client.send(type="set_username", username="abcde")
    await client.expect("error", code="invalid_username")
    await client.send(type="set_username", username="abcd")
    await client.expect("username_changed")
    await client.close()


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/ws/chat/has%20space", id="space"),
        pytest.param("/ws/chat/" + "r" * 65, id="65-characters"),
        pytest.param("/ws/chat/caf%C3%A9", id="non-ascii"),
        pytest.param("/ws/chat/a%3Cb%3E", id="angle-brackets"),
    ],
)
async def test_invalid_room_name_is_accepted_then_closed_with_1008_and_a_reason(server, path):
    client = await server.connect(path)
    code, reason = await client.close_code()
    assert code == 1008
    assert "room name" in reason


async def test_the_route_template_as_a_room_name_is_refused_not_the_previous_room(server, room):
    # Fennec 0.3.0 matches /ws/chat/{room} (sent as %7Broom%7D) exactly, with the path
    # parameters of the previous connection still on the route: it must not land in that room.
    alice = await server.connect(f"/ws/chat/{room}?username=alice")
    await alice.joined()
    intruder = await server.connect("/ws/chat/%7Broom%7D?username=mallory")
    code, reason = await intruder.close_code()
    assert code == 1008
    assert "room name" in reason
    await alice.expect_silence(0.5)  # no user_joined, no presence change
    await alice.close()


@pytest.mark.parametrize("path", ["/ws/chat/", "/ws/chat/a%2Fb", "/ws/nowhere", "/ws/chat/a/b"])
async def test_unknown_websocket_endpoint_is_closed_with_1008_and_a_reason(server, path):
    client = await server.connect(path)
    code, reason = await client.close_code()
    assert code == 1008
    assert "/ws/chat/{room}" in reason


async def test_longest_and_punctuated_room_names_are_valid(server):
    for room in ("r" * 64, "a.b-c_D9", "..."):
        client = await server.connect(f"/ws/chat/{room}")
        welcome = await client.expect("system")
        assert welcome["message"] == f"Welcome to room '{room}'!"
        await client.close()


async def test_invalid_room_refusal_leaves_nothing_behind(start_server):
    server = start_server()
    for _ in range(20):
        client = await ChatClient.connect(f"{server.ws_url}/ws/chat/bad%20name")
        await client.close_code()
    health = server.health()
    assert (health["connections"], health["rooms"]) == (0, 0)
    server.assert_no_errors()
