"""One member of the chaos test (tests/chaos.py): a real WebSocket client that keeps what it
sends and what it sees the way client.html does, so that the test checks the guarantee a page
gets, not the one a bare socket gets.

Like the page it names its tab (`?session=`), sends every message with a `client_msg_id` and
keeps it pending until its copy comes back (the echo, a resend's receipt, or a history that
holds it), resends what is pending on every new connection and after `backplane_unavailable`,
resumes with `?since=<last id>&epoch=<epoch>`, starts over on `history` with `reset: true`,
heals a gap in the live ids by resuming, and reconnects with the page's backoff, to either
process, chosen at random.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

MAX_PENDING = 50  # the page's MAX_QUEUED: a full queue refuses new messages
HEAL_EVERY = 2.0  # the page's HEAL_EVERY_MS: at most one gap-healing resume every 2 s
RESEND_AFTER = 2.0  # the page's wait before resending what the server could not publish
RETRY_LATER = {"backplane_unavailable", "history_unavailable", "rate_limited"}


@dataclass
class Send:
    text: str
    transmissions: int = 0
    sent_on: int = 0  # the connection it last went out on; 0: send it at the next chance
    confirmed: tuple[str, int] | None = None  # (epoch, id) of the copy that came back
    confirmed_late: bool = False  # confirmed only once the faults had stopped


@dataclass
class Segment:
    """What the client showed of one epoch: ids and texts, in order (a reset starts another)."""

    epoch: str
    messages: list[tuple[int, str]] = field(default_factory=list)


class ChaosClient:
    def __init__(self, name: str, room: str, servers: Callable[[], list[str]], rng: random.Random) -> None:
        self.name = name
        self.room = room
        self.servers = servers  # the ws:// base URLs of the chat processes
        self.rng = rng
        self.session = f"chaos-{name}-{rng.getrandbits(64):016x}"
        self.sends: dict[str, Send] = {}  # client_msg_id → send, every one ever made
        self.pending: dict[str, Send] = {}  # the ones not confirmed yet, oldest first
        self.segments: list[Segment] = []
        self.seen: dict[tuple[str, int], str] = {}  # (epoch, id) → text: every copy must agree
        self.epoch: str | None = None
        self.position: int | None = None  # the newest id shown (the page's `position`)
        self.problems: list[str] = []  # guarantee violations seen as they happened
        self.stats: Counter[str] = Counter()
        self.checked = 0  # copies compared with what was seen before
        self.connection = 0  # counts connections, so a resend goes once per connection
        self.history_on = 0  # the connection that last brought a history (none if it could not be read)
        self.ws: ClientConnection | None = None
        self.healing = False
        self.last_heal = 0.0
        self.reconnect_at_once = False
        self.stopping = False
        self.quiescing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: list[asyncio.TimerHandle] = []

    # --- Connecting ----------------------------------------------------------------------------

    def _url(self) -> str:
        query = {"session": self.session, "username": self.name}
        if self.position is not None and self.epoch is not None:
            query |= {"since": str(self.position), "epoch": self.epoch}
        return f"{self.rng.choice(self.servers())}/ws/chat/{self.room}?{urlencode(query)}"

    def _backoff(self, attempt: int, code: int | None) -> float:
        """The page's full jitter: 0.5 s doubling, capped at 2 s (its first minute of an outage);
        a server restart (1001, 1012) is retried within 0.5 s at first."""
        ceiling = 0.5 if code in (1001, 1012) and attempt == 0 else min(2.0, 0.5 * 2**attempt)
        return self.rng.random() * ceiling

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self.stopping:
            try:
                ws = await connect(
                    self._url(),
                    open_timeout=3,
                    close_timeout=2,
                    max_queue=None,
                    max_size=None,
                    ping_interval=None,
                )
            except (OSError, asyncio.TimeoutError, WebSocketException) as error:
                self.stats[f"connect failed: {type(error).__name__}"] += 1
                await asyncio.sleep(self._backoff(attempt, None))
                attempt += 1
                continue
            self.connection += 1
            self.ws = ws
            self.stats["connections"] += 1
            opened = loop.time()
            self._spawn(self.flush())  # the page sends its queue on open, before the history
            code = await self._read(ws)
            self.ws = None
            self.stats[f"closed {code or 'without a close frame'}"] += 1
            if code in (1008, 4001):  # the page would stop here: nothing in this test refuses
                self.problems.append(f"{self.name}: refused with {code}")
            if self.reconnect_at_once:  # a heal: resume at once, as the page does
                self.reconnect_at_once = False
                continue
            if loop.time() - opened > 5:  # only a connection that stays up resets the backoff
                attempt = 0
            await asyncio.sleep(self._backoff(attempt, code))
            attempt += 1

    async def _read(self, ws: ClientConnection) -> int | None:
        try:
            async for raw in ws:
                self.handle(json.loads(raw))
        except ConnectionClosed:
            pass
        received = ws.protocol.close_rcvd
        return received.code if received else None

    async def stop(self) -> None:
        self.stopping = True
        for timer in self._timers:
            timer.cancel()
        if self.ws is not None:
            await self.ws.close(1000, "leaving")
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- Faults done to this client ------------------------------------------------------------

    def drop(self) -> bool:
        """Lose the TCP connection without a close frame (a crashed tab, a dead network)."""
        if self.ws is None:
            return False
        self.ws.transport.abort()
        return True

    async def stop_reading(self, seconds: float) -> bool:
        """Read nothing for a while (a frozen tab); the server may give up on it (1013, 4408)."""
        ws = self.ws
        if ws is None:
            return False
        ws.transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            ws.transport.resume_reading()
        return True

    # --- Sending -------------------------------------------------------------------------------

    async def talk(self, per_second: float) -> None:
        """Write messages at random moments until told to stop; each is pending until confirmed."""
        number = 0
        while True:
            await asyncio.sleep(self.rng.expovariate(per_second))
            if len(self.pending) >= MAX_PENDING:
                self.stats["queue full"] += 1
                continue
            number += 1
            padding = " ".join(["lorem"] * self.rng.choice([0, 0, 0, 5, 40, 300]))
            send = Send(f"{self.name} #{number} {padding}".strip())
            self.sends[f"{self.name}-{number}"] = self.pending[f"{self.name}-{number}"] = send
            await self.flush()

    async def flush(self) -> None:
        """Send what is pending and has not gone out on this connection yet."""
        ws, connection = self.ws, self.connection
        for client_msg_id, send in list(self.pending.items()):
            if ws is None or self.ws is not ws:
                return
            if send.confirmed or send.sent_on == connection:
                continue
            send.sent_on = connection
            send.transmissions += 1
            self.stats["resends" if send.transmissions > 1 else "first sends"] += 1
            event = {"type": "message", "message": send.text, "client_msg_id": client_msg_id}
            try:
                await ws.send(json.dumps(event))
            except ConnectionClosed:
                return

    def _after(self, seconds: float, callback: Callable[[], None]) -> None:
        """A timer that `stop` cancels (the ones already run are let go)."""
        loop = asyncio.get_running_loop()
        self._timers = [timer for timer in self._timers if timer.when() > loop.time()]
        self._timers.append(loop.call_later(seconds, callback))

    # --- What the server says ------------------------------------------------------------------

    def handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "history":
            self._history(event)
        elif kind == "message":
            self._live(event)
        elif kind == "error":
            self._error(event)

    def _history(self, event: dict[str, Any]) -> None:
        fresh = self.position is None or event["reset"]
        if event["reset"]:
            self.stats["history reset"] += 1
            self.problems.append(f"{self.name}: history reset, epoch {self.epoch} -> {event['epoch']}")
        if fresh:
            self.epoch = event["epoch"]
            self.segments.append(Segment(event["epoch"]))
            self.position = event["messages"][0]["id"] - 1 if event["messages"] else 0
        elif event["epoch"] != self.epoch:
            self.problems.append(f"{self.name}: resumed into epoch {event['epoch']} without a reset")
        if event["truncated"] and not fresh:
            self.problems.append(f"{self.name}: resume after {self.position} truncated")
        for message in event["messages"]:
            assert self.position is not None
            if message["id"] > self.position + 1:
                self.problems.append(f"{self.name}: history skips from {self.position} to {message['id']}")
            self._show(message, "from a history")
        self.healing = False
        self.history_on = self.connection

    def _live(self, event: dict[str, Any]) -> None:
        if self.position is None:
            return  # before any history (the join's history failed): the next resume brings it
        if self.healing and event["id"] > self.position:
            self.stats["held back while healing"] += 1
            return
        if event["id"] > self.position + 1:  # a gap: never shown out of order, resume instead
            # Expected after a join whose history could not be read (Redis away); worth a look otherwise.
            without = "" if self.history_on == self.connection else " (no history on this connection)"
            self.stats[f"gaps healed{without}"] += 1
            self.healing = True
            ws = self.ws
            self._after(
                max(0.0, self.last_heal + HEAL_EVERY - asyncio.get_running_loop().time()),
                lambda: self._heal(ws),
            )
            return
        self._show(event, "live")

    def _heal(self, ws: ClientConnection | None) -> None:
        self.last_heal = asyncio.get_running_loop().time()
        if ws is not None and self.ws is ws and self.healing:
            self.reconnect_at_once = True
            self._spawn(ws.close(4100, "reconnecting"))

    def _show(self, message: dict[str, Any], how: str) -> None:
        """One copy of a message, live or from a history: shown once, checked every time."""
        assert self.epoch is not None
        assert self.position is not None
        key, text = (self.epoch, message["id"]), message["message"]
        self.checked += 1
        if self.seen.setdefault(key, text) != text:
            self.problems.append(f"{self.name}: id {key} came as {self.seen[key]!r} and as {text!r}")
        send = self.sends.get(message.get("client_msg_id", ""))
        if send is not None:
            self._confirm(message["client_msg_id"], send, key, text, how)
        if message["id"] == self.position + 1:
            self.position = message["id"]
            self.segments[-1].messages.append((message["id"], text))

    def _confirm(self, client_msg_id: str, send: Send, key: tuple[str, int], text: str, how: str) -> None:
        if text != send.text:
            self.problems.append(f"{self.name}: {client_msg_id} came back as {text!r}")
        if send.confirmed is None:
            send.confirmed, send.confirmed_late = key, self.quiescing
            self.pending.pop(client_msg_id, None)
            if how == "live":  # a resend's receipt is the original event, which may be old news
                how = "by a receipt" if key[1] <= (self.position or 0) else "by its echo"
            self.stats[f"confirmed {how}"] += 1
        elif send.confirmed != key:
            self.problems.append(f"{self.name}: {client_msg_id} confirmed as {send.confirmed} and as {key}")

    def _error(self, event: dict[str, Any]) -> None:
        code = event.get("code")
        self.stats[f"error {code}"] += 1
        send = self.pending.get(event.get("client_msg_id") or "")
        if send is not None and code in RETRY_LATER:  # not lost: it goes again a little later
            send.sent_on = 0
            self._after(event.get("retry_after") or RESEND_AFTER, lambda: self._spawn(self.flush()))
        elif event.get("client_msg_id"):
            self.problems.append(f"{self.name}: {event.get('client_msg_id')} refused: {event}")

    def settled(self, last_id: int) -> bool:
        """Connected, nothing pending, and every message of the room shown."""
        return self.ws is not None and not self.pending and self.position == last_id and not self.healing

    def unsettled(self, last_id: int) -> str:
        """Why it is not settled, for a failure message."""
        return (
            f"{'connected' if self.ws else 'not connected'}, {len(self.pending)} pending, "
            f"showing up to {self.position} of {last_id}{', healing' if self.healing else ''}"
        )
