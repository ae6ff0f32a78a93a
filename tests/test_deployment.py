"""The deployment the README describes, run as a user would: redis-server, two chat processes
and Debian's nginx with deploy/nginx.conf itself (not a copy), driven by two Chromium tabs; and
the systemd unit in deploy/, checked by `systemd-analyze verify`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest
import websockets.sync.client
from playwright.async_api import expect

from tests.browser import optional_part_missing
from tests.server_process import ROOT, ServerProcess, log_path
from tests.test_page import ChatPage

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
UNIT = ROOT / "deploy" / "fennec-chat@.service"
# The ports deploy/nginx.conf names: nginx on 8080, the chat processes on 8001 and 8002.
PUBLIC, CHAT_PORTS = 8080, (8001, 8002)
SITE = f"http://localhost:{PUBLIC}"


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: past TIME_WAIT
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def nginx() -> Iterator[subprocess.Popen]:
    """nginx with deploy/nginx.conf as users run it (`-e stderr`: not the default error log)."""
    executable = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if executable is None:
        optional_part_missing("no nginx found: apt-get install nginx")
    assert port_is_free(PUBLIC), f"port {PUBLIC}, where deploy/nginx.conf listens, is in use"
    log = log_path("nginx").open("wb")
    process = subprocess.Popen(
        [executable, "-e", "stderr", "-c", str(NGINX_CONF), "-g", "daemon off;"], stdout=log, stderr=log
    )
    try:
        wait_for_port(PUBLIC, process)
        yield process
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: the workers finish, the pid file goes
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def chat_processes(redis_server) -> Iterator[list[ServerProcess]]:
    """The two processes of deploy/nginx.conf's header, with its environment, on one Redis
    (heartbeats every 0.5 s, so that a killed process's members leave within seconds)."""
    env = {"CHAT_ALLOWED_ORIGINS": SITE}
    flags = ["--redis-url", redis_server.url, "--redis-heartbeat", "0.5"]
    busy = [port for port in CHAT_PORTS if not port_is_free(port)]
    assert not busy, f"the ports deploy/nginx.conf sends to are in use: {busy}"
    processes = []
    try:
        for port in CHAT_PORTS:
            name = f"deployment-{port}"
            processes.append(ServerProcess(flags, env, log_path(name), port=port, limits=True).start())
        yield processes
    finally:
        for process in processes:
            process.stop()


def chat_clients(process: ServerProcess) -> int:
    try:
        return process.health()["chat_clients"]
    except OSError:
        return 0


async def until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def texts(tab: ChatPage) -> list[str]:
    return await tab.page.locator("#messages .message .text").all_text_contents()


async def test_two_tabs_through_nginx_survive_the_kill_of_one_process(browser, chat_processes, nginx, room):
    one, two = chat_processes
    alice = await ChatPage.open(browser, f"{SITE}/?room={room}", name="Alice")
    await until(lambda: chat_clients(one) + chat_clients(two) == 1)
    alices = one if chat_clients(one) else two
    others = two if alices is one else one
    # nginx balances open connections (least_conn): Bob lands on the other process, or is
    # sent again until he does.
    for _ in range(10):
        bob = await ChatPage.open(browser, f"{SITE}/?room={room}", name="Bob")
        await until(lambda: chat_clients(one) + chat_clients(two) == 2)
        if chat_clients(others) == 1:
            break
        await bob.close()
        await until(lambda: chat_clients(one) + chat_clients(two) == 1)
    assert chat_clients(alices) == chat_clients(others) == 1, "both tabs on one process"

    for tab, other in ((alice, "Bob"), (bob, "Alice")):  # presence crosses the processes
        await expect(tab.page.locator("#user-list li", has_text=other)).to_have_count(1)
    await alice.say("hello from one process")
    await bob.say("hello from the other")
    for tab in (alice, bob):
        await expect(tab.message_with("hello from the other")).to_have_count(1)
        await expect(tab.message_with("hello from one process")).to_have_count(1)

    alices.process.send_signal(signal.SIGKILL)  # no close frame, no goodbye
    alices.process.wait()
    meanwhile = [f"while you were away {number}" for number in range(3)]
    for text in meanwhile:
        await bob.say(text)
    await alice.wait_connected(timeout=30_000)  # through nginx, to the process still alive
    await until(lambda: chat_clients(others) == 2)
    await bob.say("after the return")
    expected = ["hello from one process", "hello from the other", *meanwhile, "after the return"]
    for tab in (alice, bob):
        await expect(tab.message_with("after the return")).to_have_count(1)
        assert await texts(tab) == expected  # nothing lost, nothing twice, in order
    # Presence and the lobby converge: both tabs see the two of them, once each.
    for tab in (alice, bob):
        await expect(tab.page.locator("#user-list li")).to_have_count(2, timeout=20_000)
        for name in ("Alice", "Bob"):
            await expect(tab.page.locator("#user-list li", has_text=name)).to_have_count(1)
    await until(lambda: lobby_users(room) == 2)
    await alice.close()
    await bob.close()
    others.assert_no_errors_but("lost")


def lobby_users(room: str) -> int | None:
    """The room's member count in the lobby, through nginx: its first rooms_update says."""
    with websockets.sync.client.connect(f"ws://localhost:{PUBLIC}/ws/lobby", origin=SITE) as lobby:
        update = json.loads(lobby.recv(timeout=5))
    listed = update["rooms"].get(room)
    return None if listed is None else listed["users"]


def test_the_health_check_answers_through_nginx(chat_processes, nginx):
    with urllib.request.urlopen(f"{SITE}/health", timeout=5) as response:
        assert json.load(response)["status"] == "ok"


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        optional_part_missing("no systemd-analyze found: apt-get install systemd")
    # verify checks that ExecStart's program exists: the unit's install path is pointed at
    # this checkout, which has the .venv it names; nothing else is changed.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/fennec-chat", str(ROOT)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "fennec-chat@8001.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys and bad values are warnings here
    for hardening in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "SystemCallFilter="):
        assert hardening in unit.read_text()
