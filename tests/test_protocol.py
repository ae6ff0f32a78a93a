"""The validator on its own: every frame gets a command or a rejection, never an exception."""

from __future__ import annotations

import json
import typing
import unicodedata

import pytest
from hypothesis import example, find, given, settings
from hypothesis import strategies as st

from fennec_chat import protocol
from fennec_chat.protocol import Kick, LoadEarlier, Rejection, SendMessage, SetUsername, Typing
from fennec_chat.settings import Settings

SETTINGS = Settings()
ERROR_CODES = {value for name, value in vars(protocol.ErrorCode).items() if name.isupper()}
COMMANDS = typing.get_args(protocol.Command)  # every command the server knows

# Stand-ins for the client_ids of a live room's members, which tests/test_fuzz_live.py puts in
# their place before sending: a kick aimed at someone who is really there.
KICK_BYSTANDER = "@bystander"
KICK_SELF = "@self"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
COMMAND_TYPES = ["message", "set_username", "typing", "kick", "load_earlier", "unban", "delete_message"]
command_like = st.fixed_dictionaries(
    {"type": st.sampled_from([*COMMAND_TYPES, "", "MESSAGE"]) | st.text()},
    optional={
        "message": json_values,
        "username": json_values,
        "client_msg_id": st.sampled_from(["a", "b", "msg-1"]) | st.text(max_size=70) | json_values,
        "client_id": st.sampled_from([KICK_BYSTANDER, KICK_SELF, "nobody", "x" * 64, "x" * 65, ""])
        | st.text(max_size=70)
        | json_values,
        "before": st.integers(min_value=-2, max_value=80) | json_values,
        "id": st.integers(min_value=-2, max_value=80) | json_values,
    },
)
# Well-formed commands of every kind, most of them valid. Arbitrary JSON alone seldom makes one:
# without these, not one valid chat message turned up in 5,000 frames.
well_formed = st.one_of(
    st.builds(
        lambda text, msg_id: (
            {"type": "message", "message": text} | ({} if msg_id is None else {"client_msg_id": msg_id})
        ),
        st.text(min_size=1, max_size=60),
        st.none() | st.sampled_from(["a", "b", "msg-1"]),
    ),
    st.builds(lambda name: {"type": "set_username", "username": name}, st.text(min_size=1, max_size=34)),
    st.just({"type": "typing"}),
    st.builds(
        lambda target: {"type": "kick", "client_id": target},
        st.sampled_from([KICK_BYSTANDER, KICK_SELF, "nobody"]) | st.text(min_size=1, max_size=66),
    ),
    st.builds(
        lambda before: {"type": "load_earlier", "before": before},
        st.integers(min_value=-1, max_value=80) | st.sampled_from([10**18 - 1, 10**18, True, 1.0, "3", None]),
    ),
    st.builds(lambda name: {"type": "unban", "username": name}, st.text(min_size=1, max_size=34)),
    st.builds(
        lambda message_id: {"type": "delete_message", "id": message_id},
        st.integers(min_value=-1, max_value=80) | st.sampled_from([10**18, True, 1.0, "3", None]),
    ),
)
tricky_texts = st.sampled_from(
    [
        '{"type": "message", "message": "\\ud800"}',  # a lone surrogate, escaped
        '{"type": "set_username", "username": "\\u202e\\u0000"}',
        '{"type": "message", "message": "' + "x" * 2001 + '"}',
        '{"type": "message", "message": "\\r\\n"}',
        "[" * 5000,
        '{"type": "typing"',
        "",
    ]
)
frames = st.one_of(
    tricky_texts.map(lambda text: {"type": "websocket.receive", "text": text}),
    st.binary(max_size=64).map(lambda data: {"type": "websocket.receive", "bytes": data}),
    st.text(max_size=200).map(lambda text: {"type": "websocket.receive", "text": text}),
    json_values.map(lambda value: {"type": "websocket.receive", "text": json.dumps(value)}),
    command_like.map(lambda value: {"type": "websocket.receive", "text": json.dumps(value)}),
    well_formed.map(lambda value: {"type": "websocket.receive", "text": json.dumps(value)}),
)


def text_frame(data: object) -> dict:
    return {"type": "websocket.receive", "text": json.dumps(data)}


@settings(max_examples=2000)
@given(frames)
def test_every_frame_becomes_a_command_or_a_rejection(frame):
    result = protocol.parse_command(frame, SETTINGS)
    assert isinstance(result, protocol.Command | Rejection)
    if isinstance(result, Rejection):
        assert result.code in ERROR_CODES
        event = result.event()
        assert event["type"] == "error"
        protocol.encode(event).encode("utf-8")  # the answer itself can always be sent


@settings(max_examples=1000)
@given(st.text(max_size=2100))
def test_accepted_messages_are_trimmed_bounded_and_sendable(text):
    result = protocol.parse_command(text_frame({"type": "message", "message": text}), SETTINGS)
    if isinstance(result, SendMessage):
        assert result.text == result.text.strip()
        assert 1 <= len(result.text) <= SETTINGS.max_message_chars
        assert "\r\n" not in result.text
        assert not any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in result.text)
        protocol.encode(protocol.chat_message("u", result.text, "id")).encode("utf-8")
    else:
        assert result.code in {"invalid_message", "message_too_long"}


@settings(max_examples=1000)
@given(st.text(max_size=40))
def test_accepted_usernames_are_trimmed_bounded_and_printable(name):
    result = protocol.parse_command(text_frame({"type": "set_username", "username": name}), SETTINGS)
    if isinstance(result, SetUsername):
        assert result.username == result.username.strip()
        assert 1 <= len(result.username) <= SETTINGS.max_username_chars
        assert not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in result.username)
        protocol.encode({"username": result.username}).encode("utf-8")
    else:
        assert result.code == "invalid_username"


@pytest.mark.parametrize("command", [*COMMANDS, Rejection], ids=lambda kind: kind.__name__)
def test_the_random_frames_reach_every_command_the_server_knows(command):
    # The fuzzers (here and in test_fuzz_live.py) draw from `frames`: a command it cannot
    # produce would never be fuzzed. A new command in protocol.Command fails here until the
    # strategy learns it.
    example = find(
        frames,
        lambda frame: isinstance(protocol.parse_command(frame, SETTINGS), command),
        settings=settings(max_examples=1000, database=None),
    )
    assert isinstance(protocol.parse_command(example, SETTINGS), command)


@settings(max_examples=300)
@given(st.text(max_size=80) | json_values)
@example("")
@example("x" * 64)
@example("x" * 65)
@example("🦊" * 64)
def test_a_kick_is_accepted_exactly_when_its_client_id_is_a_string_of_1_to_64_characters(target):
    result = protocol.parse_command(text_frame({"type": "kick", "client_id": target}), SETTINGS)
    if isinstance(target, str) and 1 <= len(target) <= 64:
        assert result == Kick(target)
    else:
        assert isinstance(result, Rejection)
        assert result.code == "invalid_event"


@settings(max_examples=500)
@given(st.text(max_size=80))
def test_room_names_are_ascii_words_of_at_most_64_characters(room):
    problem = protocol.room_name_problem(room, SETTINGS)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert (problem is None) == (1 <= len(room) <= 64 and set(room) <= allowed)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"type": "message", "message": " hi "}, SendMessage("hi")),
        ({"type": "set_username", "username": " Ann "}, SetUsername("Ann")),
        ({"type": "typing"}, Typing()),
        ({"type": "typing", "extra": [1]}, Typing()),
        (
            {"type": "kick", "client_id": "0b9c6f1e-2d7a-4e55-9a51-6f0f2c1d3e4b"},
            Kick("0b9c6f1e-2d7a-4e55-9a51-6f0f2c1d3e4b"),
        ),
        ({"type": "set_username", "username": "👩‍💻 Zoë"}, SetUsername("👩‍💻 Zoë")),
        ({"type": "load_earlier", "before": 51}, LoadEarlier(51)),
        ({"type": "load_earlier", "before": 10**18 - 1}, LoadEarlier(10**18 - 1)),
        ({"type": "unban", "username": " Bob "}, protocol.Unban("Bob")),
        ({"type": "delete_message", "id": 7}, protocol.DeleteMessage(7)),
    ],
)
def test_valid_commands(data, expected):
    assert protocol.parse_command(text_frame(data), SETTINGS) == expected


def test_events_are_encoded_compactly_and_keep_unicode():
    assert protocol.encode({"type": "message", "message": "🦊 hi"}) == '{"type":"message","message":"🦊 hi"}'


def test_timestamps_are_utc_with_an_offset():
    assert protocol.now().endswith("+00:00")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, protocol.JoinRequest()),
        ({"username": " Ann "}, protocol.JoinRequest(username="Ann")),
        ({"since": "12", "epoch": "a1b2"}, protocol.JoinRequest(since=12, epoch="a1b2")),
        ({"since": "0"}, protocol.JoinRequest(since=0)),
    ],
)
def test_join_requests_are_read_from_the_connect_url(query, expected):
    assert protocol.parse_join(query, SETTINGS) == expected


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"username": "x" * 33}, "invalid_username"),
        ({"since": "-1"}, "invalid_since"),
        ({"since": "1e3"}, "invalid_since"),
        ({"since": "9" * 19}, "invalid_since"),
        ({"since": "3", "epoch": "no spaces allowed"}, "invalid_since"),
    ],
)
def test_bad_join_parameters_are_ignored_with_a_reason(query, code):
    join = protocol.parse_join(query, SETTINGS)
    assert (join.username, join.since, join.epoch) == (None, None, None)
    assert [problem.code for problem in join.problems] == [code]
