"""The deployment in deploy/, as a user runs it (issue 16).

deploy/nginx.conf as it stands, the file users copy, in front of the two chat processes its
header comment starts, with a real redis-server behind them: two Chromium tabs chat through it,
each on its own process, and one process is killed. And deploy/fennec-chat@.service: checked by
systemd-analyze, and its hardening and stop settings tried on a real server.

nginx listens on the conf's own ports (8080 in front of 8001 and 8002), so these tests need
them free; they say so if they are not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from tests.browser import optional_part_missing
from tests.chat_client import ChatClient
from tests.redis_process import RedisProcess
from tests.server_process import ARTIFACTS, ROOT, ServerProcess, log_path
from tests.test_page import ChatPage

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
UNIT = ROOT / "deploy" / "fennec-chat@.service"

# The one flag this test adds to what the conf's header runs: processes beat every 0.5 s rather
# than 5, so a killed one is found dead (three missed beats) in 1.5 s rather than 15.
HEARTBEAT = ["--redis-heartbeat", "0.5"]


# --- deploy/nginx.conf: what its header tells users to run --------------------------------------


@dataclass
class Recipe:
    """The chat processes the conf's header comment starts, and the ports the conf itself uses."""

    environment: dict[str, str]  # its `export NAME=value` lines
    chat_commands: list[list[str]]  # the arguments of each `python server.py ...` line
    upstream_ports: list[int]
    listen_port: int

    @classmethod
    def read(cls, conf: Path) -> Recipe:
        text = conf.read_text()
        environment: dict[str, str] = {}
        chat_commands: list[list[str]] = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break  # the header is over
            command = re.sub(r"\s+#.*", "", line.removeprefix("#").strip())
            if command.startswith("export "):
                name, _, value = command.removeprefix("export ").partition("=")
                environment[name] = value
            elif command.startswith("python server.py "):
                chat_commands.append(shlex.split(command)[2:])
        upstream = [int(port) for port in re.findall(r"^\s*server 127\.0\.0\.1:(\d+)\b", text, re.M)]
        listen = re.search(r"^\s*listen (\d+);", text, re.M)
        assert listen, "deploy/nginx.conf has no `listen PORT;`"
        return cls(environment, chat_commands, upstream, int(listen.group(1)))

    def port_of(self, args: list[str]) -> int:
        return int(args[args.index("--port") + 1])


def nginx_path() -> str | None:
    configured = os.environ.get("CHAT_NGINX")
    if configured:
        return configured if os.path.exists(configured) else None
    # Debian's is in /usr/sbin, which a user's PATH may lack.
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def require_free(port: int) -> None:
    """nginx and the chat processes bind the conf's fixed ports: say so plainly if one is taken."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as they do
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as error:
            pytest.fail(
                f"port {port} is taken ({error.strerror}): tests/test_deployment.py runs deploy/nginx.conf "
                "as users do, on its own ports; stop whatever listens there"
            )


class Nginx:
    """nginx with deploy/nginx.conf itself, kept in the foreground; its prefix in a fresh
    directory (see the conf's header), its output in test-artifacts/."""

    def __init__(self, executable: str, conf: Path, port: int) -> None:
        self.executable, self.conf, self.port = executable, conf, port
        # Open to every user: under root, nginx's workers run as nobody, and they may keep a
        # response bigger than their buffers (the page is 75 KB) in proxy_temp under the prefix.
        self.prefix = Path(tempfile.mkdtemp(prefix="fennec-chat-nginx-"))
        self.prefix.chmod(0o755)
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / "nginx-deployment.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> Nginx:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [self.executable, "-p", str(self.prefix), "-c", str(self.conf), "-g", "daemon off;"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Deployment:
    recipe: Recipe
    redis: RedisProcess
    chat: list[ServerProcess]
    nginx: Nginx

    @property
    def page_origin(self) -> str:
        return f"http://localhost:{self.nginx.port}"

    def page_url(self, room: str) -> str:
        return f"{self.page_origin}/?room={room}"

    def count(self, what: str) -> dict[int, int]:
        """A /health count of every live chat process, by port (asked directly, not via nginx)."""
        return {server.port: server.health()[what] for server in self.chat if server.process.poll() is None}

    async def until(
        self, what: str, condition: Callable[[dict[int, int]], bool], timeout: float = 10
    ) -> dict[int, int]:
        """The /health counts of `what` once they meet `condition`."""
        deadline = time.monotonic() + timeout
        while not condition(counts := self.count(what)):
            assert time.monotonic() < deadline, (what, counts)
            await asyncio.sleep(0.05)
        return counts

    async def counted(self, what: str, expected: dict[int, int]) -> None:
        """Until each live process's /health count of `what` is as expected."""
        await self.until(what, lambda counts: counts == expected)

    async def lobby_through_nginx(self) -> ChatClient:
        client = await ChatClient.connect(
            f"ws://127.0.0.1:{self.nginx.port}/ws/lobby", origin=self.page_origin
        )
        await client.expect("rooms_update")
        return client


@pytest.fixture
def deployment(redis_server: RedisProcess) -> Iterator[Deployment]:
    recipe = Recipe.read(NGINX_CONF)
    assert len(recipe.chat_commands) == 2, recipe  # two processes, one each side of least_conn
    started = sorted(recipe.port_of(args) for args in recipe.chat_commands)
    assert started == sorted(recipe.upstream_ports), "the header starts other ports than nginx uses"
    executable = nginx_path()
    if executable is None:
        optional_part_missing("no nginx found: install Debian's nginx or set CHAT_NGINX to its path")
    for port in [*recipe.upstream_ports, recipe.listen_port]:
        require_free(port)
    chat: list[ServerProcess] = []
    nginx = Nginx(executable, NGINX_CONF, recipe.listen_port)
    try:
        for args in recipe.chat_commands:
            args = [redis_server.url if arg.startswith("redis://") else arg for arg in args]
            port = recipe.port_of(args)
            # PORT in the environment: ServerProcess then passes `args` as they are (--port and all).
            environment = {**recipe.environment, "PORT": str(port)}
            # limits=True: the production limits, as the header's commands run them.
            server = ServerProcess(
                [*args, *HEARTBEAT], environment, log_path(f"deployment-{port}"), port=port, limits=True
            )
            chat.append(server.start())
        yield Deployment(recipe, redis_server, chat, nginx.start())
    finally:
        nginx.stop()
        for server in chat:
            server.stop()


def texts(page: Page):
    return page.locator("#messages .message .text")


def room_count(page: Page, room: str):
    return page.locator(f'#room-list button[data-room="{room}"] .count')


async def test_two_tabs_through_nginx_lose_nothing_when_the_process_of_one_is_killed(
    deployment: Deployment, browser: Browser, room: str
) -> None:
    one, two = deployment.chat

    # Alice first; then Bob, steered to the other process (see crowd_towards).
    alice = await ChatPage.open(browser, deployment.page_url(room), name="Alice")
    await expect(room_count(alice.page, room)).to_have_text("1")  # her lobby socket is open too
    counts = await deployment.until("chat_clients", lambda counts: sum(counts.values()) == 1)
    doomed = one if counts[one.port] == 1 else two
    survivor = two if doomed is one else one

    ballast = await crowd_towards(deployment, doomed, survivor)
    bob = await ChatPage.open(browser, deployment.page_url(room), name="Bob")
    await deployment.counted("chat_clients", {doomed.port: 1, survivor.port: 1})
    for client in ballast:
        await client.close()

    # They chat, and see each other, across the two processes.
    for page in (alice, bob):
        await expect(page.page.locator("#user-list li")).to_have_count(2)
        await expect(page.page.locator("#user-list")).to_contain_text("Alice")
        await expect(page.page.locator("#user-list")).to_contain_text("Bob")
        await expect(room_count(page.page, room)).to_have_text("2")
    before = ["Hello from Alice", "Hello from Bob"]
    await alice.say(before[0])
    await expect(texts(bob.page)).to_have_text(before[:1])
    await bob.say(before[1])
    await expect(texts(alice.page)).to_have_text(before)
    last_seen = await alice.page.evaluate("position.id")
    alice_sockets: list[str] = []
    alice.page.on("websocket", lambda ws: alice_sockets.append(ws.url) if "/ws/chat/" in ws.url else None)
    # Alice's page waits its longest first retry (half a second, full jitter at its top), so
    # that what is said below is surely said while she is away.
    await alice.page.evaluate("Math.random = () => 0.999")

    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    killed_at = time.monotonic()
    while_away = [f"Bob, while Alice is away {number}" for number in range(1, 4)]
    await bob.page.evaluate("(texts) => texts.forEach((text) => sendMessage(text))", while_away)
    written_away = "Alice, written while reconnecting"  # pending until her page is back
    await alice.page.evaluate("(text) => sendMessage(text)", written_away)

    # Her tab comes back through nginx, on the other process, and resumes where it was.
    await alice.wait_connected(timeout=15_000)
    await deployment.counted("chat_clients", {survivor.port: 2})
    assert alice_sockets, "Alice's page opened no new chat socket"
    assert f"since={last_seen}&" in alice_sockets[0], alice_sockets
    everything = [*before, *while_away, written_away]
    for page in (alice, bob):  # nothing lost, nothing twice, in one order
        await expect(texts(page.page)).to_have_text(everything)
        await expect(page.page.locator("#messages .message.pending")).to_have_count(0)
    after = ["Bob, once Alice is back", "Alice, back"]
    await bob.say(after[0])
    await expect(texts(alice.page)).to_have_text([*everything, after[0]])
    await alice.say(after[1])
    everything += after

    # The survivor finds the killed process dead (three missed heartbeats) and removes its
    # member, Alice's old connection, in about 2 s (20 s with the default heartbeat)...
    reaped = "stopped answering: removed its 1 clients"
    while reaped not in survivor.log():
        assert time.monotonic() - killed_at < 10, survivor.log()
        await asyncio.sleep(0.1)
    # ...and presence and the lobby converge: Alice listed once, on the survivor, both here.
    for page in (alice, bob):
        await expect(room_count(page.page, room)).to_have_text("2")
        await expect(page.page.locator("#user-list li")).to_have_count(2)
        await expect(page.page.locator("#user-list li.away")).to_have_count(0)
    store = deployment.redis.client()
    members = store.hgetall(f"fennec-chat:room:{room}:members")
    assert len(members) == 2, members
    processes = {json.loads(member)["process"] for member in members.values()}
    assert store.smembers("fennec-chat:processes") == processes, members  # the killed one forgotten

    for page in (alice, bob):  # still nothing twice, now that everything has settled
        await expect(texts(page.page)).to_have_text(everything)
    survivor.assert_no_errors()
    # nginx ran the conf cleanly; it only says it found the killed process refusing connections.
    assert not re.search(r"\[(emerg|alert|crit)\]", deployment.nginx.log()), deployment.nginx.log()
    await alice.close()
    await bob.close()


async def crowd_towards(
    deployment: Deployment, busy: ServerProcess, other: ServerProcess
) -> list[ChatClient]:
    """Leave `busy` with at least two more connections through nginx than `other`, so that
    least_conn sends the next tab's two sockets (its chat and its lobby) to `other`.

    least_conn gives a new connection to the process with the fewest open ones, in turn among
    equals. Four lobby sockets opened one after another therefore land two and two (or three and
    one if `busy` was behind); closing those on `other` leaves `busy` ahead by two or more.
    Returns the sockets kept open: close them once the tab is connected.
    """
    opened: list[tuple[ChatClient, int]] = []
    for _ in range(4):
        before = deployment.count("lobby_clients")
        client = await deployment.lobby_through_nginx()
        after = deployment.count("lobby_clients")
        (port,) = [port for port in after if after[port] > before[port]]
        opened.append((client, port))
    kept = []
    for client, port in opened:
        if port == other.port:
            await client.close()
        else:
            kept.append(client)
    await deployment.until("connections", lambda counts: counts[busy.port] - counts[other.port] >= 2)
    return kept


# --- deploy/fennec-chat@.service ---------------------------------------------------------------


def unit_settings(unit: Path) -> dict[str, str]:
    """Key=value lines of a unit file (the last one of each key)."""
    settings: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def unit_executable(settings: dict[str, str]) -> str:
    return shlex.split(settings["ExecStart"])[0]


def test_the_systemd_unit_passes_systemd_analyze_verify_with_no_warning(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        optional_part_missing("no systemd-analyze found: install systemd")
    # verify refuses an ExecStart whose program does not exist, and the unit's is where a user
    # installs the chat (/opt/fennec-chat/.venv/bin/python): this copy runs ours instead. That
    # path is all that changes.
    python = unit_executable(unit_settings(UNIT))
    text = UNIT.read_text()
    assert text.count(python) == 1, python
    (tmp_path / UNIT.name).write_text(text.replace(python, sys.executable))
    instance = tmp_path / UNIT.name.replace("@", "@8001")  # a template is verified as an instance
    result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


WRAPPER = [sys.executable, str(ROOT / "tests" / "deny_write_execute.py")]


def needs_the_write_execute_filter() -> None:
    from tests import deny_write_execute

    assert unit_settings(UNIT)["MemoryDenyWriteExecute"] == "yes"  # what the filter stands for
    if not deny_write_execute.supported():
        optional_part_missing("the write-execute filter is written for Linux on x86-64 or arm64 only")


def test_the_write_execute_filter_refuses_memory_both_writable_and_executable() -> None:
    """What the next test relies on: tests/deny_write_execute.py bites."""
    needs_the_write_execute_filter()
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    refused = subprocess.run(
        [*WRAPPER, sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0
    assert "PermissionError: [Errno 1] Operation not permitted" in refused.stderr


def seccomp_mode(pid: int) -> str:
    """0: none, 2: a filter (/proc/PID/status)."""
    found = re.search(r"^Seccomp:\s+(\d+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found
    return found.group(1)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_server_runs_under_the_units_memory_deny_write_execute_and_stops_in_time(
    request: pytest.FixtureRequest, tmp_path: Path, room: str, backend: str
) -> None:
    """CPython, uvloop, httptools and SQLite or redis-py under the seccomp filter systemd
    installs for MemoryDenyWriteExecute=yes; then the unit's KillSignal stops the server
    cleanly, well within its TimeoutStopSec."""
    needs_the_write_execute_filter()
    settings = unit_settings(UNIT)
    args = ["--db", str(tmp_path / "chat.db")]  # the unit's default: a file in its state directory
    if backend == "redis":
        args = ["--redis-url", request.getfixturevalue("redis_server").url]
    server = ServerProcess(args, {}, log_path(request.node.name))
    server.program = [*WRAPPER, *server.program]
    server.start()
    try:
        assert seccomp_mode(server.process.pid) == "2"  # the server itself is filtered
        alice = await server.connect(f"/ws/chat/{room}?username=alice")
        await alice.joined()
        await alice.send(type="message", message="under the filter")
        await alice.expect("message", message="under the filter")
        lobby = await server.connect("/ws/lobby")
        await lobby.expect("rooms_update")

        server.process.send_signal(signal.Signals[settings["KillSignal"]])
        stopping = time.monotonic()
        assert await alice.close_code(timeout=10) == (1012, "")  # the page comes back at once
        await asyncio.to_thread(server.process.wait, int(settings["TimeoutStopSec"]))
        took = time.monotonic() - stopping
        assert server.process.returncode == 0
        assert took < int(settings["TimeoutStopSec"]) / 2, took
        server.assert_no_errors()
    finally:
        server.stop()
