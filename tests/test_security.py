"""Security and moderation: origins, tokens, rate limits, the per-address cap, the word filter,
kicking, WSS, headers and logs without tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest

from fennec_chat.gate import Tokens, origin_problem
from fennec_chat.settings import Settings
from tests.chat_client import ChatClient
from tests.server_process import ROOT

SECRET = "test-secret-that-is-long-enough"


def mint(username: str, *extra: str, secret: str = SECRET) -> str:
    """A token from the real command: python server.py token ..."""
    result = subprocess.run(
        [sys.executable, "server.py", "token", "--username", username, "--jwt-secret", secret, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def hand_made_token(header: dict, claims: dict, secret: str = SECRET) -> str:
    signing_input = f"{b64(header)}.{b64(claims)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def scope(origin: str | None, host: str = "localhost:8000", port: int = 8000) -> dict:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"headers": headers, "server": ("127.0.0.1", port)}


# --- Origins -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "localhost:8000", True),  # not a browser
        ("null", "localhost:8000", True),  # a page opened from disk
        ("http://localhost:8000", "localhost:8000", True),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://localhost:9999", "localhost:8000", False),  # another local app
        ("https://evil.example", "localhost:8000", False),
        ("http://evil.example:8000", "evil.example:8000", False),  # DNS rebinding on a loopback server
    ],
)
def test_default_origins_on_a_loopback_server(origin, host, allowed):
    assert (origin_problem(scope(origin, host), Settings()) is None) == allowed


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://chat.lan:8000", "chat.lan:8000", True),  # the page the server itself served
        ("http://192.168.1.5:8000", "192.168.1.5:8000", True),
        ("http://evil.example", "chat.lan:8000", False),
    ],
)
def test_default_origins_on_a_server_open_to_the_network(origin, host, allowed):
    settings = Settings(host="0.0.0.0")
    assert (origin_problem(scope(origin, host), settings) is None) == allowed


def test_an_explicit_origin_list_replaces_the_defaults():
    settings = Settings(allowed_origins="https://chat.example.com, https://www.example.com/")
    assert origin_problem(scope("https://chat.example.com"), settings) is None
    assert origin_problem(scope("https://www.example.com"), settings) is None
    assert origin_problem(scope("http://localhost:8000"), settings) is not None
    assert origin_problem(scope("https://evil.example"), Settings(allowed_origins="*")) is None


async def test_a_cross_origin_page_is_refused_with_1008_and_a_reason(server, room):
    client = await server.connect(f"/ws/chat/{room}", origin="https://evil.example")
    code, reason = await client.close_code()
    assert code == 1008
    assert "origin https://evil.example is not allowed" in reason
    lobby = await server.connect("/ws/lobby", origin="https://evil.example")
    assert (await lobby.close_code())[0] == 1008


async def test_pages_from_disk_and_from_the_server_itself_are_accepted(server, room):
    for origin in ("null", f"http://localhost:{server.port}", f"http://127.0.0.1:{server.port}"):
        client = await server.connect(f"/ws/chat/{room}", origin=origin)
        await client.joined()
        await client.close()


async def test_allowed_origins_star_accepts_any_page(start_server, room):
    server = start_server("--allowed-origins", "*")
    client = await server.connect(f"/ws/chat/{room}", origin="https://anywhere.example")
    await client.joined()
    await client.close()


# --- Tokens ------------------------------------------------------------------------------------


@pytest.fixture
def token_server(start_server):
    return start_server(env={"CHAT_JWT_SECRET": SECRET})


async def test_a_valid_token_names_the_user(token_server, room):
    token = mint("alice")
    client = await token_server.connect(f"/ws/chat/{room}?token={token}&username=mallory")
    client_id, presence = await client.joined()
    assert presence["users"] == [{"client_id": client_id, "username": "alice"}]
    await client.send(type="message", message="hi")
    assert (await client.wait_for("message"))["username"] == "alice"
    await client.close()


async def test_a_token_locks_the_name(token_server, room):
    client = await token_server.connect(f"/ws/chat/{room}?token={mint('alice')}")
    await client.joined()
    await client.send(type="set_username", username="bob")
    await client.expect("error", code="username_locked")
    await client.close()


async def test_the_lobby_needs_a_token_too(token_server):
    refused = await token_server.connect("/ws/lobby")
    assert (await refused.close_code())[0] == 1008
    lobby = await token_server.connect(f"/ws/lobby?token={mint('alice')}")
    await lobby.expect("rooms_update")
    await lobby.close()


def bad_tokens() -> list:
    now = int(time.time())
    good_claims = {"username": "eve", "exp": now + 86_400}  # made at collection: keep it valid
    return [
        pytest.param(None, "a token is required", id="missing"),
        pytest.param("not-a-token", "malformed", id="malformed"),
        pytest.param("a.b.c", "malformed", id="garbage-parts"),
        pytest.param(Tokens("another secret").mint("eve"), "signature", id="forged"),
        pytest.param(
            hand_made_token({"alg": "HS256"}, {"username": "eve", "exp": now - 5}), "expired", id="expired"
        ),
        pytest.param(hand_made_token({"alg": "HS256"}, {"username": "eve"}), "no expiry", id="no-expiry"),
        pytest.param(f"{b64({'alg': 'none'})}.{b64(good_claims)}.", "algorithm", id="alg-none"),
        pytest.param(hand_made_token({"alg": "HS512"}, good_claims), "algorithm", id="alg-hs512"),
        pytest.param(
            hand_made_token({"alg": "HS256"}, {"username": "x" * 40, "exp": now + 86_400}),
            "username",
            id="bad-name",
        ),
    ]


@pytest.mark.parametrize(("token", "reason"), bad_tokens())
async def test_bad_tokens_are_refused_with_1008_without_echoing_them(token_server, room, token, reason):
    query = f"?token={token}" if token else ""
    client = await token_server.connect(f"/ws/chat/{room}{query}")
    code, said = await client.close_code()
    assert code == 1008
    assert reason in said
    if token:
        assert token not in said


async def test_tokens_never_reach_the_logs(token_server, room):
    token = mint("alice")
    client = await token_server.connect(f"/ws/chat/{room}?token={token}")
    await client.joined()
    await client.close()
    page_url = f"{token_server.http_url}/?room={room}&token={token}"
    await asyncio.to_thread(lambda: urllib.request.urlopen(page_url, timeout=5).close())
    await asyncio.sleep(0.2)
    log = token_server.log()
    assert token not in log
    assert token.split(".")[2] not in log  # not even its signature
    assert "token=[redacted]" in log


def test_the_token_command_needs_a_secret():
    result = subprocess.run(
        [sys.executable, "server.py", "token", "--username", "alice"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "CHAT_JWT_SECRET" in result.stderr


# --- Rate limits -------------------------------------------------------------------------------


async def test_messages_beyond_the_burst_are_refused_with_retry_after_then_allowed_again(start_server, room):
    server = start_server(limits=True)
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    for number in range(11):
        await client.send(type="message", message=f"m{number}", client_msg_id=f"c{number}")
    received = [await client.next() for _ in range(11)]
    assert [event["type"] for event in received].count("message") == 10
    refusal = next(event for event in received if event["type"] == "error")
    assert refusal["code"] == "rate_limited"
    assert refusal["client_msg_id"] == "c10"
    assert 0 < refusal["retry_after"] <= 0.25  # 5 a second
    await asyncio.sleep(refusal["retry_after"])
    await client.send(type="message", message="m10", client_msg_id="c10")
    await client.expect("message", message="m10")
    await client.close()


async def test_typing_beyond_its_limit_is_dropped_silently(start_server, room):
    server = start_server(limits=True)
    typist = await server.connect(f"/ws/chat/{room}")
    await typist.joined()
    watcher = await server.connect(f"/ws/chat/{room}")
    await watcher.joined()
    for _ in range(5):
        await typist.send(type="typing")
    await watcher.expect("typing")
    await watcher.expect_silence(0.3)
    await typist.wait_for("user_joined")
    await typist.expect_silence(0.3)  # no error either
    await asyncio.sleep(0.8)
    await typist.send(type="typing")
    await watcher.expect("typing")
    await typist.close()
    await watcher.close()


async def test_three_renames_per_10_seconds(start_server, room):
    server = start_server(limits=True)
    client = await server.connect(f"/ws/chat/{room}")
    await client.joined()
    for number in range(4):
        await client.send(type="set_username", username=f"name{number}")
    for number in range(3):
        await client.expect("username_changed", new_username=f"name{number}")
    refusal = await client.expect("error", code="rate_limited")
    assert 3 < refusal["retry_after"] <= 3.34  # one rename every 10/3 s
    await client.close()


async def test_a_client_that_keeps_flooding_is_closed_with_1008(start_server, room):
    server = start_server(limits=True)
    flooder = await server.connect(f"/ws/chat/{room}")
    await flooder.joined()
    bystander = await server.connect(f"/ws/chat/{room}")
    await bystander.joined()
    for number in range(60):
        await flooder.send(type="message", message=f"spam {number}")
    code, reason = await flooder.close_code()
    assert code == 1008
    assert "flooding" in reason
    await bystander.wait_for("user_left")
    await bystander.send(type="message", message="still fine")
    await bystander.wait_for("message", message="still fine")
    await bystander.close()


async def test_rate_limits_are_settings(start_server, room):
    server = start_server("--rate-messages", "1", "--rate-messages-burst", "1", limits=True)
    client = await server.connect(f"/ws/chat/{room}")
    welcome = await client.expect("system")
    assert welcome["limits"]["messages_per_second"] == 1.0
    assert welcome["limits"]["messages_burst"] == 1
    await client.send(type="message", message="one")
    await client.send(type="message", message="two")
    await client.expect("presence")
    await client.expect("history")
    # The refusal is immediate; the accepted message comes once stored: either may be first.
    answers = {event["type"]: event for event in [await client.next(), await client.next()]}
    assert answers["message"]["message"] == "one"
    assert answers["error"]["code"] == "rate_limited"
    assert 0.9 < answers["error"]["retry_after"] <= 1
    await client.close()


async def test_lobby_refreshes_are_rate_limited_too(start_server):
    server = start_server(limits=True)
    lobby = await server.connect("/ws/lobby")
    await lobby.expect("rooms_update")
    for _ in range(12):
        await lobby.send_raw("?")
    await lobby.wait_for("error", code="rate_limited")
    await lobby.close()


async def test_connections_per_address_are_capped_with_1013(start_server, room):
    server = start_server("--max-connections-per-ip", "3", limits=True)
    clients = [await server.connect(f"/ws/chat/{room}") for _ in range(2)]
    clients.append(await server.connect("/ws/lobby"))  # lobby sockets count too
    for client in clients[:2]:
        await client.joined()
    extra = await server.connect(f"/ws/chat/{room}")
    code, reason = await extra.close_code()
    assert code == 1013
    assert "too many connections" in reason
    await clients[0].close()
    await asyncio.sleep(0.2)
    again = await server.connect(f"/ws/chat/{room}")
    await again.joined()
    for client in [*clients[1:], again]:
        await client.close()


# --- Moderation --------------------------------------------------------------------------------


async def test_blocked_words_are_masked_in_messages_and_names(start_server, room, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# words we do not want\ndarn\nheck\n\n")
    server = start_server("--blocklist", str(blocklist))
    client = await server.connect(f"/ws/chat/{room}?username=heck")
    _, presence = await client.joined()
    assert presence["users"][0]["username"] == "****"
    await client.send(type="message", message="Darn it, what the HECK! darned heckle")
    event = await client.expect("message")
    assert event["message"] == "**** it, what the ****! darned heckle"  # whole words only
    await client.send(type="set_username", username="Heck Yes")
    await client.expect("username_changed", new_username="**** Yes")
    await client.close()


@pytest.fixture
async def admin_and_others(token_server, room):
    admin = await token_server.connect(f"/ws/chat/{room}?token={mint('alice', '--admin')}")
    await admin.joined()
    bob = await token_server.connect(f"/ws/chat/{room}?token={mint('bob')}")
    bob_id, _ = await bob.joined()
    carol = await token_server.connect(f"/ws/chat/{room}?token={mint('carol')}")
    await carol.joined()
    await bob.wait_for("user_joined", username="carol")
    return admin, bob, bob_id, carol


async def test_an_admin_can_kick(admin_and_others):
    admin, bob, bob_id, carol = admin_and_others
    await admin.send(type="kick", client_id=bob_id)
    notice = await carol.wait_for("system")
    assert notice["message"] == "bob was removed from the room by alice"
    await carol.expect("user_left", client_id=bob_id)
    code, reason = await bob.close_code()
    assert (code, reason) == (4001, "kicked")
    await admin.close()
    await carol.close()


async def test_only_admins_may_kick(admin_and_others):
    admin, bob, bob_id, carol = admin_and_others
    await carol.send(type="kick", client_id=bob_id)
    await carol.expect("error", code="forbidden")
    await admin.send(type="kick", client_id="nobody-here")
    await admin.wait_for("error", code="not_found")
    await bob.send(type="message", message="still here")
    await bob.wait_for("message", message="still here")
    for client in (admin, bob, carol):
        await client.close()


async def test_kick_needs_a_client_id(token_server, room):
    admin = await token_server.connect(f"/ws/chat/{room}?token={mint('alice', '--admin')}")
    await admin.joined()
    await admin.send(type="kick")
    await admin.expect("error", code="invalid_event")
    await admin.close()


# --- WSS and headers ---------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_a_wss_round_trip_with_a_self_signed_certificate(start_server, certificate, room):
    cert, key = certificate
    server = start_server("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    client = await ChatClient.connect(f"wss://127.0.0.1:{server.port}/ws/chat/{room}", ssl=trust)
    await client.joined()
    await client.send(type="message", message="encrypted")
    await client.expect("message", message="encrypted")
    await client.close()
    assert f"wss://localhost:{server.port}/ws/chat/" in server.log()


def test_the_page_is_served_with_a_strict_content_security_policy(server):
    with urllib.request.urlopen(server.http_url + "/", timeout=5) as response:
        headers, page = response.headers, response.read()
    policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    for kind in ("script", "style"):
        (inline,) = re.findall(rb"<%s>(.*?)</%s>" % (kind.encode(), kind.encode()), page, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(inline).digest()).decode()
        assert policy[f"{kind}-src"] == f"'sha256-{digest}'"  # only the page's own, nothing inline else
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
