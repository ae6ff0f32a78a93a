"""The validator on its own: every frame gets a command or a rejection, never an exception."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fennec_chat import protocol
from fennec_chat.protocol import Rejection, SendMessage, SetUsername, Typing
from fennec_chat.settings import Settings

SETTINGS = Settings()
ERROR_CODES = {value for name, value in vars(protocol.ErrorCode).items() if name.isupper()}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
command_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "set_username", "typing", "kick", "", "MESSAGE"]) | st.text()},
    optional={
        "message": json_values,
        "username": json_values,
        "client_msg_id": st.sampled_from(["a", "b", "msg-1"]) | st.text(max_size=70) | json_values,
    },
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
)


def text_frame(data: object) -> dict:
    return {"type": "websocket.receive", "text": json.dumps(data)}


@settings(max_examples=2000)
@given(frames)
def test_every_frame_becomes_a_command_or_a_rejection(frame):
    result = protocol.parse_command(frame, SETTINGS)
    assert isinstance(result, SendMessage | SetUsername | Typing | Rejection)
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
        ({"type": "set_username", "username": "👩‍💻 Zoë"}, SetUsername("👩‍💻 Zoë")),
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
