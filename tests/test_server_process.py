"""The server as a program: start-up, settings, HTTP routes, keepalive and a clean shutdown.
(--help, wrong flags, each way start-up can fail, the banner and HEAD: tests/test_cli.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.server_process import ROOT, ServerProcess, free_port, log_path


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def run_server_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "server.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_startup_prints_the_page_url_and_both_endpoints(start_server):
    server = start_server()
    log = server.log()
    assert f"http://localhost:{server.port}/" in log
    assert f"ws://localhost:{server.port}/ws/chat/{{room}}" in log
    assert f"ws://localhost:{server.port}/ws/lobby" in log


def test_port_and_host_come_from_the_environment(request):
    port = free_port()
    server = ServerProcess(
        [], {"PORT": str(port), "HOST": "127.0.0.1"}, log_path(request.node.name), port=port
    )
    server.start()
    try:
        assert server.health()["status"] == "ok"
    finally:
        assert server.stop() == 0


def test_flags_beat_environment_variables(request):
    flag_port, env_port = free_port(), free_port()
    server = ServerProcess([], {}, log_path(request.node.name), port=flag_port)
    server.env["PORT"] = str(env_port)
    server.start()
    try:
        assert server.health()["status"] == "ok"
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{env_port}/health", timeout=1)
    finally:
        server.stop()


def test_host_0_0_0_0_listens_on_every_interface(start_server):
    server = start_server("--host", "0.0.0.0")
    assert "every network interface" in server.log()
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
async def test_stopping_closes_every_socket_with_a_reconnect_code_and_exits_0(
    start_server, room, stop_signal
):
    server = start_server()
    member = await server.connect(f"/ws/chat/{room}")
    await member.joined()
    lobby = await server.connect("/ws/lobby")
    await lobby.expect("rooms_update")

    server.process.send_signal(stop_signal)
    for client in (member, lobby):
        code, _ = await client.close_code(timeout=10)
        assert code in (1001, 1012)
    exit_code = await asyncio.to_thread(server.process.wait, 15)
    assert exit_code == 0
    server.assert_no_errors()


def test_the_page_is_served_at_the_root(server):
    status, headers, body = http_get(server.http_url + "/?room=dev")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert body == (ROOT / "client.html").read_bytes()


async def test_health_counts_connections_and_rooms(start_server, room):
    server = start_server()
    member = await server.connect(f"/ws/chat/{room}")
    await member.joined()
    lobby = await server.connect("/ws/lobby")
    await lobby.expect("rooms_update")

    status, headers, body = http_get(server.http_url + "/health")
    health = json.loads(body)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert health["status"] == "ok"
    assert (health["connections"], health["rooms"]) == (2, 1)
    assert (health["chat_clients"], health["lobby_clients"]) == (1, 1)
    await member.close()
    await lobby.close()


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/nothing-here"])
def test_no_page_reaches_for_the_internet(server, path):
    # Fennec's default /docs loads Swagger UI from a CDN; the chat turns it off.
    status, _, _ = http_get(server.http_url + path)
    assert status == 404


async def test_compression_is_declined_by_default(server, room):
    client = await server.connect(f"/ws/chat/{room}", compression="deflate")  # as browsers offer it
    assert client.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    await client.close()


async def test_compression_can_be_turned_on(start_server, room):
    server = start_server("--ws-compression")
    client = await server.connect(f"/ws/chat/{room}", compression="deflate")
    assert "permessage-deflate" in client.ws.response.headers.get("Sec-WebSocket-Extensions", "")
    await client.joined()
    await client.close()


async def test_a_peer_that_stops_answering_pings_is_dropped(start_server, room):
    server = start_server("--ping-interval", "0.3", "--ping-timeout", "0.3")
    watcher = await server.connect(f"/ws/chat/{room}?username=watcher")
    await watcher.joined()
    ghost = await server.connect(f"/ws/chat/{room}?username=ghost", ping_interval=None)
    await watcher.expect("user_joined", username="ghost")

    ghost.ws.transport.pause_reading()  # like a laptop that went to sleep: no pong, no FIN
    await watcher.wait_for("user_left", username="ghost", timeout=5)
    await watcher.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "70000"], {}, "port 70000"),
        (["--outbox-limit", "0"], {}, "outbox_limit must be at least 1"),
        (["--max-message-chars", "many"], {}, "invalid whole number value"),
        ([], {"CHAT_OUTBOX_LIMIT": "lots"}, "CHAT_OUTBOX_LIMIT"),
        ([], {"CHAT_WS_COMPRESSION": "maybe"}, "expected true or false"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(args, env, message):
    result = run_server_command(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
