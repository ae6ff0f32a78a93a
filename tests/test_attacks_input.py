"""Input made to crash, lock out, impersonate or leak: each answered without a traceback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from fennec_chat import protocol
from fennec_chat.gate import origin_problem
from fennec_chat.settings import Settings
from tests.server_process import ROOT
from tests.test_security import SECRET, b64, mint, scope


async def test_a_unicode_digit_in_since_is_an_error_not_a_crash_and_leaks_no_seat(start_server, room):
    server = start_server("--max-connections-per-ip", "3", limits=True)
    for _ in range(10):  # more than the cap: a leaked seat each would lock the address out
        client = await server.connect(f"/ws/chat/{room}?since=%C2%B2")  # "²"
        await client.joined()
        await client.expect("error", code="invalid_since")
        await client.close()
    await asyncio.sleep(0.2)
    three = [await server.connect(f"/ws/chat/{room}") for _ in range(3)]
    for client in three:
        await client.joined()
        await client.close()
    server.assert_no_errors()


@pytest.mark.parametrize("origin", ["http://localhost:99999", "http://[::1", "http://localhost:abc"])
async def test_a_malformed_origin_is_refused_with_1008_and_no_traceback(server, room, origin):
    client = await server.connect(f"/ws/chat/{room}", origin=origin)
    code, reason = await client.close_code()
    assert code == 1008
    assert reason.startswith("malformed origin")
    server.assert_no_errors()


def test_origin_null_is_admitted_only_by_a_loopback_server():
    null = scope("null")
    assert origin_problem(null, Settings(host="127.0.0.1")) is None
    assert "--allowed-origins null" in origin_problem(null, Settings(host="0.0.0.0"))
    assert origin_problem(null, Settings(host="0.0.0.0", allowed_origins="null")) is None


async def test_a_percent_encoded_token_parameter_is_redacted_in_the_log(start_server, room):
    server = start_server(env={"CHAT_JWT_SECRET": SECRET})
    token = mint("alice")
    client = await server.connect(f"/ws/chat/{room}?tok%65n={token}")
    await client.joined()  # the server read it as a token...
    await client.close()
    await asyncio.sleep(0.2)
    log = server.log()
    assert token.split(".")[2] not in log  # ...and the log did too
    assert "tok%65n=[redacted]" in log


async def test_a_client_msg_id_is_its_senders_own(server, room):
    mallory = await server.connect(f"/ws/chat/{room}?username=Mallory&session=mallory-0123456789abcdef")
    await mallory.joined()
    alice = await server.connect(f"/ws/chat/{room}?username=Alice&session=alice-0123456789abcdef")
    await alice.joined()
    await mallory.send(type="message", message="Mallory got there first", client_msg_id="msg-2")
    await alice.wait_for("message", username="Mallory")
    await alice.send(type="message", message="Alice's own words", client_msg_id="msg-2")
    receipt = await alice.wait_for("message", client_msg_id="msg-2", username="Alice")
    assert receipt["message"] == "Alice's own words"
    assert (await mallory.wait_for("message", username="Alice"))["message"] == "Alice's own words"
    for client in (mallory, alice):
        await client.close()


@pytest.mark.parametrize(
    "name",
    [
        "\u200b",  # zero width space
        "\u3164",  # hangul filler
        "\u2800",  # braille blank
        "Alice\u200b",
        "\u200eAlice",  # left-to-right mark
        "Bob\u200f",
        "\u061cEve",
        "Z" + "\u0301" * 31,  # 31 stacked accents
        "System",
        "\uff33ystem",  # fullwidth S
        "  sYsTeM ",
        "Admin",
        "Alice\u200d",  # a joiner with nothing to join
    ],
)
def test_names_that_render_blank_or_pretend_are_refused(name):
    assert isinstance(protocol.check_username(name, Settings()), protocol.Rejection)


@pytest.mark.parametrize(
    "name", ["Zoë", "👩\u200d💻 Zoë", "Nguyễn", "Systematic", "❤️ Ann", "山田", "ශ්\u200dරී", "\U0001fa77 Pink"]
)
def test_real_names_are_still_welcome(name):
    assert protocol.check_username(name, Settings()) == name


def test_any_kind_of_space_in_a_name_is_one_plain_space():
    assert protocol.check_username("山田\u3000太郎", Settings()) == "山田 太郎"
    assert protocol.check_username("Ann\u00a0\u00a0Lee ", Settings()) == "Ann Lee"


def test_a_token_may_carry_a_reserved_name():
    assert protocol.check_username("Admin", Settings(), reserved_ok=True) == "Admin"


def signed(claims_json: str) -> str:
    """An HS256 token whose claims are this exact JSON text (json.dumps cannot write NaN)."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims_json.encode())}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize("expiry", ["NaN", "1e309"])
async def test_a_token_that_never_expires_is_refused(start_server, room, expiry):
    server = start_server(env={"CHAT_JWT_SECRET": SECRET})
    token = signed('{"username": "eve", "exp": ' + expiry + "}")
    client = await server.connect(f"/ws/chat/{room}?token={token}")
    code, reason = await client.close_code()
    assert (code, reason) == (1008, "invalid token: token has no expiry")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--username", "Alice\u200b"], "invisible"),
        (["--username", "x" * 40], "1-32 characters"),
        (["--username", "ok", "--ttl", "0"], "--ttl must be a positive number"),
        (["--username", "ok", "--ttl", "-5"], "--ttl must be a positive number"),
    ],
)
def test_the_token_command_refuses_what_the_server_would(args, problem):
    result = subprocess.run(
        [sys.executable, "server.py", "token", "--jwt-secret", SECRET, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert problem in result.stderr


def test_health_says_ok_and_counts_only(server):
    health = server.health()
    assert health["status"] == "ok"
    assert health["backplane"] == {"kind": "local", "connected": True}
    assert health["ws_protocol"] in ("fast", "stock")  # which uvicorn protocol: a word, no details
    words = ("status", "backplane", "ws_protocol")
    numbers = {key: value for key, value in health.items() if key not in words}
    assert all(isinstance(value, int) for value in numbers.values()), health


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/health", 200),
        ("GET", "/nowhere", 404),
        ("POST", "/", 405),
        ("DELETE", "/health", 405),
    ],
)
def test_every_response_says_nosniff_and_a_wrong_method_gets_405(server, method, path, status):
    request = urllib.request.Request(server.http_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            got, headers = response.status, response.headers
    except urllib.error.HTTPError as error:
        got, headers = error.code, error.headers
    assert got == status
    assert headers["x-content-type-options"] == "nosniff"
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
