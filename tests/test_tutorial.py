"""The tutorial's steps (docs/tutorial/stepN.py), each a real server process driven by real clients.

Each step must speak the seed protocol as far as it goes. Step 1 must also show the two ways
Fennec 0.3.0's fan-out breaks (a member that stops reading freezes the room; members leaving
mid-broadcast abort it and cut the sender off), and steps 2 and 3 must show neither.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00")
BIG = 32_000  # characters in each message of a flood: a few hundred fill any socket buffer


# --- A step as a real server process ---------------------------------------------------------


class StepServer:
    """`python docs/tutorial/stepN.py --port P` on a free loopback port."""

    def __init__(self, step: int, log: Path) -> None:
        self.step = step
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(TUTORIAL / f"step{step}.py"), "--port", str(self.port)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 15
        while True:  # until the port accepts connections
            if self.process.poll() is not None:
                raise RuntimeError(f"step {step} exited:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"step {step} did not listen:\n{self.output()}") from None
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:  # a step-1 room stuck for good can hold up the shutdown
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], StepServer]]:
    """One server per step for the protocol tests (each test uses rooms of its own)."""
    servers: dict[int, StepServer] = {}

    def get(step: int) -> StepServer:
        if step not in servers:
            servers[step] = StepServer(step, tmp_path_factory.mktemp("logs") / f"step{step}.log")
        return servers[step]

    yield get
    for server in servers.values():
        server.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[[int], StepServer]]:
    """A server of its own, for the tests that leave a step-1 room broken."""
    started: list[StepServer] = []

    def start(step: int) -> StepServer:
        started.append(StepServer(step, tmp_path / f"step{step}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    return "r-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[-50:]


# --- Clients -----------------------------------------------------------------------------------


class Client:
    """A browser, played by the `websockets` library. It keeps reading from the network even when
    the test does not call next(): only the raw `StalledMember` ever stops."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def join(cls, server: StepServer, path: str) -> Client:
        return cls(await connect(server.url(path), max_size=None, max_queue=None, open_timeout=10))

    async def send(self, **command: Any) -> None:
        await self.ws.send(json.dumps(command))

    async def next(self, timeout: float = 5) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def expect(self, kind: str, timeout: float = 5, **fields: Any) -> dict[str, Any]:
        """The very next event, which must be of this type and have these fields."""
        event = await self.next(timeout)
        assert event["type"] == kind, event
        assert {name: event.get(name) for name in fields} == fields, event
        return event

    async def wait_for(self, kind: str, timeout: float = 5, **fields: Any) -> dict[str, Any]:
        """The first event of this type with these fields, skipping any other."""

        async def first() -> dict[str, Any]:
            while True:
                event = await self.next(timeout)
                if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                    return event

        return await asyncio.wait_for(first(), timeout)

    async def silence(self, seconds: float = 0.3) -> None:
        """Nothing arrives for `seconds`."""
        try:
            event = await self.next(seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected event: {event}")

    async def closed_with(self, timeout: float = 10) -> int | None:
        """Read until the server closes the connection; its close code."""

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.recv()

        await asyncio.wait_for(drain(), timeout)
        received = self.ws.protocol.close_rcvd
        return received.code if received else None

    async def close(self) -> None:
        await self.ws.close()

    def vanish(self) -> None:
        """Drop the TCP connection without a close frame, like a crashed browser or a lost phone."""
        self.ws.transport.abort()


async def welcomed(server: StepServer, path: str) -> tuple[Client, str]:
    """A new member, past the greeting that its step sends; (client, its client_id)."""
    client = await Client.join(server, path)
    welcome = await client.expect("system")
    if server.step == 3:  # then who is in the room, and its own arrival
        await client.expect("presence")
        await client.expect("user_joined", client_id=welcome["client_id"])
    return client, welcome["client_id"]


class StalledMember:
    """A member whose machine went to sleep: it completes the handshake and joins, then reads
    nothing, with a tiny receive window, so that the server's buffers for it fill up soon. A raw
    socket, because a WebSocket library would keep reading."""

    def __init__(self, server: StepServer, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        self.sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:  # the 101 response, and not a byte more
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        self.sock.setblocking(False)
        self.buffer = b""

    async def read_until_close(self, timeout: float = 15) -> tuple[int, int | None]:
        """Start reading at last: (text frames received, the close code, or None if the
        connection just ended)."""
        return await asyncio.wait_for(self._read_until_close(), timeout)

    async def _read_until_close(self) -> tuple[int, int | None]:
        texts = 0
        while (frame := await self._frame()) is not None:
            opcode, payload = frame
            if opcode == 0x8:
                return texts, struct.unpack("!H", payload[:2])[0]
            texts += opcode == 0x1
        return texts, None

    async def _frame(self) -> tuple[int, bytes] | None:
        """The next frame (opcode, payload), or None at the end. Server frames are not masked."""
        header = await self._exactly(2)
        if header is None:
            return None
        length = header[1] & 0x7F
        if length >= 126:
            extended = await self._exactly(2 if length == 126 else 8)
            if extended is None:
                return None
            length = int.from_bytes(extended, "big")
        payload = await self._exactly(length)
        return None if payload is None else (header[0] & 0x0F, payload)

    async def _exactly(self, count: int) -> bytes | None:
        loop = asyncio.get_running_loop()
        while len(self.buffer) < count:
            try:
                chunk = await loop.sock_recv(self.sock, 1 << 16)
            except ConnectionError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    async def send(self, text: str, times: int) -> None:
        """Send a short text frame `times` times (masked, as from any client), reading nothing."""
        payload, mask = text.encode(), os.urandom(4)
        assert len(payload) < 126
        frame = (
            bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
        await asyncio.get_running_loop().sock_sendall(self.sock, frame * times)

    def vanish(self) -> None:
        """Drop the connection with a reset, as a crashed machine's network would."""
        if self.sock.fileno() != -1:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()


# --- Floods ------------------------------------------------------------------------------------


class Crowd:
    """The members of a flood test, let go of after it, whether it passed or not."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.stalled: list[StalledMember] = []
        self.counters: list[Counter] = []

    async def member(self, server: StepServer, path: str) -> Client:
        client, _ = await welcomed(server, path)
        self.clients.append(client)
        return client

    def stalled_member(self, server: StepServer, path: str) -> StalledMember:
        self.stalled.append(StalledMember(server, path))
        return self.stalled[-1]

    def count(self, *clients: Client) -> list[Counter]:
        counters = [Counter(client) for client in clients]
        self.counters += counters
        return counters

    async def disperse(self) -> None:
        for counter in self.counters:
            counter.task.cancel()
        await asyncio.gather(*(counter.task for counter in self.counters), return_exceptions=True)
        for client in self.clients:
            client.vanish()
        for member in self.stalled:
            member.vanish()


@pytest.fixture
async def crowd() -> AsyncIterator[Crowd]:
    crowd = Crowd()
    yield crowd
    await crowd.disperse()


class Counter:
    """Collects the numbers of the chat messages a client receives, in the background."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.numbers: list[int] = []
        self.arrived = asyncio.Event()  # set on every message
        self.task = asyncio.create_task(self._count())

    async def _count(self) -> None:
        try:
            async for text in self.client.ws:
                event = json.loads(text)
                if event["type"] == "message":
                    self.numbers.append(int(event["message"].split(":")[0]))
                    self.arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self.arrived.set()  # nothing more will come

    async def reaches(self, count: int, patience: float) -> bool:
        """Whether `count` messages arrive, before `patience` seconds pass without one."""
        while len(self.numbers) < count:
            if self.task.done():
                return False
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), patience)
            except asyncio.TimeoutError:
                return False
        return True

    async def closed_with(self, timeout: float = 10) -> int | None:
        """Wait for the server to close the connection; its close code."""
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        received = self.client.ws.protocol.close_rcvd
        return received.code if received else None


async def flood(
    sender: Client,
    counters: list[Counter],
    total: int,
    size: int,
    between: Callable[[int], Awaitable[None]] | None = None,
    batch: int = 40,
    patience: float = 3,
) -> int:
    """The sender sends `total` numbered messages of `size` characters, in batches: the next
    batch once every counter has the last one. Return how many were sent before a batch stopped
    arriving (`patience` seconds without a message): all of them, unless the room froze.

    Batches keep a member that does read from ever falling `batch` messages behind, where step 2
    would drop it. `between(sent)` runs before each batch."""
    sent = 0
    while sent < total:
        if between is not None:
            await between(sent)
        for number in range(sent, min(sent + batch, total)):
            await asyncio.wait_for(sender.send(type="message", message=noise(number, size)), patience)
        sent = min(sent + batch, total)
        for counter in counters:
            if not await counter.reaches(sent, patience):
                return sent - batch
    return sent


def flood_size(size: int) -> int:
    """How many messages of `size` characters overflow the kernel's buffers for one socket twice
    over (it grows a send buffer up to tcp_wmem's maximum), and step 2's outbox on top."""
    try:
        most = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        most = 4 << 20
    return (2 * most + (1 << 20)) // size + 100


def noise(number: int, size: int) -> str:
    """Message `number`, `size` characters long, that does not compress: permessage-deflate must
    not shrink the flood."""
    return f"{number}:" + base64.b64encode(os.urandom(size)).decode()[: size - 8]


def assert_recent_utc(timestamp: str) -> None:
    assert ISO_UTC.fullmatch(timestamp), timestamp
    assert abs(datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)) < timedelta(seconds=30)


def assert_no_traceback(server: StepServer) -> None:
    assert "Traceback" not in server.output(), server.output()


# --- The seed protocol, step by step -----------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3])
async def test_a_newcomer_is_welcomed_with_its_client_id(shared, room, step):
    client = await Client.join(shared(step), f"/ws/chat/{room}")
    welcome = await client.expect("system", message=f"Welcome to room '{room}'!")
    assert re.fullmatch(r"[0-9a-f-]{36}", welcome["client_id"])
    assert_recent_utc(welcome["timestamp"])
    await client.close()


@pytest.mark.parametrize("step", [1, 2, 3])
async def test_a_message_reaches_everyone_in_the_room_including_the_sender(shared, room, step):
    server = shared(step)
    members = [await welcomed(server, f"/ws/chat/{room}") for _ in range(3)]
    sender, sender_id = members[0]
    await sender.send(type="message", message="Hello, world!")
    for member, _ in members:
        event = await member.wait_for("message")
        assert set(event) == {"type", "username", "message", "client_id", "timestamp"}
        assert event["message"] == "Hello, world!"
        assert event["client_id"] == sender_id
        assert event["username"]
        assert_recent_utc(event["timestamp"])
    for member, _ in members:
        await member.close()


@pytest.mark.parametrize("step", [1, 2, 3])
async def test_a_room_does_not_hear_another_room(shared, room, step):
    server = shared(step)
    here, _ = await welcomed(server, f"/ws/chat/{room}")
    elsewhere, _ = await welcomed(server, f"/ws/chat/{room}-elsewhere")
    await here.send(type="message", message="only here")
    await here.expect("message", message="only here")
    await elsewhere.silence()
    await here.close()
    await elsewhere.close()


@pytest.mark.parametrize("step", [1, 2])
async def test_steps_1_and_2_drop_a_client_that_sends_bad_json(shared, room, step):
    # receive_json() raises on a frame that is not JSON; Fennec catches it and closes with 1011.
    client = await Client.join(shared(step), f"/ws/chat/{room}")
    await client.expect("system")
    await client.ws.send("{not json")
    assert await client.closed_with() == 1011


async def test_step3_names_a_member_after_its_username_parameter(shared, room):
    alice, alice_id = await welcomed(shared(3), f"/ws/chat/{room}?username=Alice")
    await alice.send(type="message", message="hi")
    await alice.expect("message", username="Alice", message="hi", client_id=alice_id)
    await alice.close()


async def test_step3_set_username_is_announced_as_username_changed(shared, room):
    server = shared(3)
    alice, _ = await welcomed(server, f"/ws/chat/{room}?username=Alice")
    bob, bob_id = await welcomed(server, f"/ws/chat/{room}?username=Bob")
    await alice.expect("user_joined", username="Bob")
    await bob.send(type="set_username", username="  Robert ")
    for member in (alice, bob):
        changed = await member.expect("username_changed", old_username="Bob", new_username="Robert")
        assert changed["client_id"] == bob_id
    await bob.send(type="message", message="hi")
    await alice.expect("message", username="Robert", client_id=bob_id)
    await alice.close()
    await bob.close()


async def test_step3_an_invalid_username_is_refused_and_the_old_one_kept(shared, room):
    alice, _ = await welcomed(shared(3), f"/ws/chat/{room}?username=Alice")
    for bad in ("", "   ", "x" * 33, "bell\x07", 42):
        await alice.send(type="set_username", username=bad)
        await alice.expect("error", code="invalid_username")
    await alice.send(type="message", message="still me")
    await alice.expect("message", username="Alice")
    await alice.close()


async def test_step3_joins_and_leaves_are_announced_to_the_room(shared, room):
    server = shared(3)
    alice, _ = await welcomed(server, f"/ws/chat/{room}?username=Alice")
    bob, bob_id = await welcomed(server, f"/ws/chat/{room}?username=Bob")
    joined = await alice.expect("user_joined", username="Bob", client_id=bob_id)
    assert joined["message"] == "Bob joined the room"
    await bob.close()
    left = await alice.expect("user_left", username="Bob", client_id=bob_id)
    assert left["message"] == "Bob left the room"
    assert_recent_utc(left["timestamp"])
    await alice.close()


async def test_step3_presence_lists_everyone_already_in_the_room(shared, room):
    server = shared(3)
    alice, alice_id = await welcomed(server, f"/ws/chat/{room}?username=Alice")
    bob = await Client.join(server, f"/ws/chat/{room}?username=Bob")
    bob_id = (await bob.expect("system"))["client_id"]
    presence = await bob.expect("presence", room=room)
    assert sorted(presence["users"], key=lambda user: user["username"]) == [
        {"client_id": alice_id, "username": "Alice"},
        {"client_id": bob_id, "username": "Bob"},
    ]
    await alice.close()
    await bob.close()


async def test_step3_typing_reaches_the_others_but_not_the_typist(shared, room):
    server = shared(3)
    alice, _ = await welcomed(server, f"/ws/chat/{room}?username=Alice")
    bob, bob_id = await welcomed(server, f"/ws/chat/{room}?username=Bob")
    await alice.expect("user_joined")
    await bob.send(type="typing")
    await alice.expect("typing", username="Bob", client_id=bob_id)
    await bob.silence()
    await alice.close()
    await bob.close()


async def test_step3_lobby_lists_the_rooms_on_arrival_and_after_every_change(shared, room):
    server = shared(3)
    lobby = await Client.join(server, "/ws/lobby")
    first = await lobby.expect("rooms_update")
    assert room not in first["rooms"]
    assert_recent_utc(first["timestamp"])

    async def shows(listed: dict[str, Any] | None) -> None:
        """Wait for an update that lists our room so (others may come first, about other rooms)."""
        while (await lobby.wait_for("rooms_update"))["rooms"].get(room) != listed:
            pass

    alice, _ = await welcomed(server, f"/ws/chat/{room}?username=Alice")
    await shows({"users": 1, "usernames": ["Alice"]})
    bob, _ = await welcomed(server, f"/ws/chat/{room}?username=Bob")
    await shows({"users": 2, "usernames": ["Alice", "Bob"]})
    await bob.send(type="set_username", username="Robert")
    await shows({"users": 2, "usernames": ["Alice", "Robert"]})
    await alice.close()
    await shows({"users": 1, "usernames": ["Robert"]})
    await bob.close()
    await shows(None)  # an empty room is not listed
    await lobby.ws.send("again, please")  # any frame asks for the list
    assert room not in (await lobby.expect("rooms_update"))["rooms"]
    await lobby.close()


async def test_step3_the_route_template_itself_is_a_room_of_its_own_not_the_previous_one(shared, room):
    # Fennec 0.3.0 matches /ws/chat/%7Broom%7D to its route with the previous match's room.
    server = shared(3)
    alice, _ = await welcomed(server, f"/ws/chat/{room}?username=Alice")
    mallory = await Client.join(server, "/ws/chat/%7Broom%7D?username=Mallory")
    await mallory.expect("system", message="Welcome to room '{room}'!")
    await alice.silence()  # no user_joined: Mallory is not in Alice's room
    await alice.close()
    await mallory.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ('["message", "hi"]', "unknown_type"),
        ('{"type": "shout", "message": "hi"}', "unknown_type"),
        ('{"type": "message"}', "invalid_message"),
        ('{"type": "message", "message": "   "}', "invalid_message"),
        (json.dumps({"type": "message", "message": "x" * 2001}), "invalid_message"),
        ('{"type": "message", "message": 42}', "invalid_message"),
    ],
    ids=["not JSON", "not an object", "unknown type", "no message", "blank", "too long", "not a string"],
)
async def test_step3_a_bad_frame_gets_an_error_event_and_the_connection_stays_usable(
    shared, room, frame, code
):
    alice, alice_id = await welcomed(shared(3), f"/ws/chat/{room}")
    await alice.ws.send(frame)
    error = await alice.expect("error", code=code)
    assert error["message"]
    assert_recent_utc(error["timestamp"])
    await alice.send(type="message", message="x" * 2000)  # the longest message allowed
    await alice.expect("message", client_id=alice_id)
    await alice.close()


# --- What breaks in step 1, and stays whole in steps 2 and 3 ----------------------------------


async def test_step1_room_freezes_when_one_member_stops_reading(fresh, crowd, room):
    server = fresh(1)
    crowd.stalled_member(server, f"/ws/chat/{room}")
    reader, sender = [await crowd.member(server, f"/ws/chat/{room}") for _ in range(2)]
    counters = crowd.count(reader, sender)
    total = flood_size(BIG)
    # Every broadcast awaits the stalled member's socket in its turn: once its buffers are full,
    # the fan-out stops there for good, for the members who do read as well.
    assert await flood(sender, counters, total, BIG) < total
    assert all(len(counter.numbers) < total for counter in counters)


@pytest.mark.parametrize("step", [2, 3])
async def test_step2_room_carries_on_and_a_member_that_stops_reading_is_closed_with_1013(
    fresh, crowd, room, step
):
    server = fresh(step)
    size = BIG if step == 2 else 2000  # step 3 refuses messages over 2000 characters
    stalled = crowd.stalled_member(server, f"/ws/chat/{room}")
    reader, sender = [await crowd.member(server, f"/ws/chat/{room}") for _ in range(2)]
    counters = crowd.count(reader, sender)
    total = flood_size(size)
    assert await flood(sender, counters, total, size) == total
    for counter in counters:
        assert counter.numbers == list(range(total))  # every message, in order
    texts, code = await stalled.read_until_close()
    assert code == 1013  # "try again later": what it had not read by then is gone
    assert texts < total
    assert_no_traceback(server)


@pytest.mark.parametrize("stalled_member", ["reads again", "vanishes"])
async def test_step1_members_leaving_mid_broadcast_abort_it_and_cut_off_the_sender(
    fresh, crowd, room, stalled_member
):
    server = fresh(1)
    stalled = crowd.stalled_member(server, f"/ws/chat/{room}")
    reader, sender, *leavers = [await crowd.member(server, f"/ws/chat/{room}") for _ in range(7)]
    counters = crowd.count(reader, sender)
    total = flood_size(BIG)
    assert await flood(sender, counters, total, BIG) < total  # a broadcast waits on the stalled member
    for leaver in leavers:
        leaver.vanish()  # each leaves the room's set while that broadcast is walking it
    await asyncio.sleep(0.5)  # for the server to notice (it needs microseconds)
    if stalled_member == "reads again":  # the broadcast resumes: "Set changed size during iteration"
        draining = asyncio.create_task(stalled.read_until_close(30))
    else:  # the broadcast resumes with a dead socket, which raises
        stalled.vanish()
    # Fennec catches the exception in the *sender's* handler and closes its socket with 1011, and
    # the members after the failing one in the set never get that message, or any other from it.
    assert await counters[1].closed_with() == 1011
    assert len(counters[0].numbers) < total
    if stalled_member == "reads again":
        draining.cancel()


async def talk_while_members_vanish(
    crowd: Crowd, server: StepServer, room: str, messages: int = 400
) -> Counter:
    """A sender says `messages` short things while 40 other members vanish (no close frame) at
    random moments; its Counter, once the messages have come back or stopped coming."""
    sender, *members = [await crowd.member(server, f"/ws/chat/{room}") for _ in range(41)]
    [counter] = crowd.count(sender)

    async def talk() -> None:
        with contextlib.suppress(ConnectionClosed):
            for number in range(messages):
                await sender.send(type="message", message=f"{number}:hi")
                if number % 20 == 0:
                    await asyncio.sleep(0.001)  # let some vanish in between

    async def vanish(member: Client) -> None:
        await asyncio.sleep(random.uniform(0, 0.05))
        member.vanish()

    await asyncio.gather(talk(), *(vanish(member) for member in members))
    await counter.reaches(messages, patience=3)
    return counter


async def test_step1_members_vanishing_while_the_room_talks_cut_off_the_sender(fresh, crowd, room):
    # No stalled member this time: a member whose connection is gone, but whose handler has not
    # run yet, is still in the room, and the broadcast that reaches it raises.
    server = fresh(1)
    for attempt in range(10):  # one is nearly always enough: each has 40 chances
        counter = await talk_while_members_vanish(crowd, server, f"{room}-{attempt}")
        if counter.task.done():
            break
    assert await counter.closed_with() == 1011
    assert len(counter.numbers) < 400


@pytest.mark.parametrize("step", [2, 3])
async def test_step2_members_vanishing_while_the_room_talks_disturb_nobody(fresh, crowd, room, step):
    server = fresh(step)
    for attempt in range(3):
        counter = await talk_while_members_vanish(crowd, server, f"{room}-{attempt}")
        assert counter.numbers == list(range(400))
        assert not counter.task.done()  # still connected
    assert_no_traceback(server)


async def test_step3_a_member_that_never_reads_its_error_replies_is_dropped_and_announced_gone(
    fresh, crowd, room
):
    # The replies go through the member's outbox like everything else: Fennec's own send_json
    # would await its socket, and the handler would wait there for good.
    server = fresh(3)
    alice = await crowd.member(server, f"/ws/chat/{room}")
    bob = crowd.stalled_member(server, f"/ws/chat/{room}?username=Bob")
    await alice.wait_for("user_joined", username="Bob")
    sending = asyncio.create_task(bob.send("{bad", times=flood_size(80)))  # replies of 80+ bytes
    try:
        await alice.wait_for("user_left", timeout=20, username="Bob")
    finally:
        sending.cancel()
    assert (await bob.read_until_close())[1] == 1013  # too far behind: "try again later"
    assert_no_traceback(server)


@pytest.mark.parametrize("step", [2, 3])
async def test_step2_members_leaving_mid_broadcast_disturb_nobody(fresh, crowd, room, step):
    server = fresh(step)
    size = BIG if step == 2 else 2000
    stalled = crowd.stalled_member(server, f"/ws/chat/{room}")
    reader, sender, *leavers = [await crowd.member(server, f"/ws/chat/{room}") for _ in range(12)]
    counters = crowd.count(reader, sender)
    total = flood_size(size)

    async def leave(sent: int) -> None:  # while the messages flow, one batch after another
        if leavers:
            leavers.pop().vanish()
        elif sent >= total // 2:
            stalled.vanish()

    assert await flood(sender, counters, total, size, between=leave) == total
    for counter in counters:
        assert counter.numbers == list(range(total))
    await sender.send(type="message", message="0:still here")  # and the sender may go on
    assert await counters[0].reaches(total + 1, patience=5)
    assert_no_traceback(server)


# --- The page itself ---------------------------------------------------------------------------


def test_the_tutorial_quotes_the_steps_as_they_are_and_counts_their_lines():
    page = (TUTORIAL.parent / "tutorial.md").read_text()
    sources = [(TUTORIAL / f"step{step}.py").read_text() for step in (1, 2, 3)]
    for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL):
        # Blocks inside a numbered list are indented by four more spaces than in the file.
        unindented = re.sub(r"(?m)^    ", "", block)
        assert any(block in source or unindented in source for source in sources), block
    lines = [source.count("\n") for source in sources]
    assert f"in {lines[0]} lines" in page
    assert f"in {lines[1]} lines" in page
    assert lines[2] < 100
    for name in set(re.findall(r"`(test_\w+)`", page)):  # the tests the page cites exist
        assert name in globals(), name
