"""Prometheus metrics (`--metrics-port`): what an operator watches, on a listener of its own.

Off by default: every metric is then `OFF`, whose methods do nothing, so the code that counts
never asks whether metrics are on. On, one process keeps them in memory (prometheus-client's
default registry, with its process and garbage-collector metrics) and serves them from a
thread. With --workers, every worker writes its counts into files in a directory of its own
(the library's multiprocess mode, a few times slower per count) and the supervisor, which
`python server.py` started, serves their sum: one scrape sees every worker. Either way the
chat's public port never serves them.

Counting is done once per event, never per recipient: a broadcast to 100 members is one
`deliveries.inc(100)`, and the history's commit is timed once per transaction.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from .fennec_fixes import StartupError

logger = logging.getLogger("fennec_chat")

DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus-client's multiprocess mode writes
# Seconds: from a tenth of a millisecond (a broadcast to a few members) to seconds (a Redis
# that is going away).
ROOMS_EVERY = 1.0  # seconds between two counts of the rooms (with Redis, a command each time)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Off:
    """A metric while metrics are off."""

    def labels(self, *values: str, **named: str) -> Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


OFF = Off()
_served_here = False  # this process serves the metrics (one process: from memory)

# The metrics, each `OFF` until `enable()`.
connections: Any = OFF  # open connections, by endpoint (chat, lobby)
rooms: Any = OFF  # rooms with members, on every process
messages: Any = OFF  # chat messages accepted (stored and sent to the room)
deliveries: Any = OFF  # events handed to a member's socket
refusals: Any = OFF  # connections refused at the gate, by close code
closes: Any = OFF  # admitted connections that ended, by close code (1006: no close frame)
rate_limited: Any = OFF  # frames refused or dropped by a rate limit, by limit
outbox_overflows: Any = OFF  # members closed with 1013 for falling too far behind
broadcast_seconds: Any = OFF  # handing one room event to this process's members
history_commit_seconds: Any = OFF  # from a message's arrival at the history to its commit
resumes: Any = OFF  # reconnections with ?since=, by outcome (exact, truncated, reset)
backplane_up: Any = OFF  # 1 while the backplane works (the lowest of every process's view)
backplane_publish_seconds: Any = OFF  # one batch of commands to Redis, sent and answered


def serve(host: str, port: int, workers: bool) -> None:
    """In the process `python server.py` started, before any worker: the listener that serves
    the metrics, on a thread of its own. With `workers`, a fresh directory for every worker's
    counts first, and the listener serves their sum."""
    if workers:
        directory = tempfile.mkdtemp(prefix="fennec-chat-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        # Before prometheus-client is imported: it reads this once. Workers inherit it.
        os.environ[DIRECTORY_VARIABLE] = directory
    try:
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector
    except ImportError as missing:
        raise StartupError(
            "--metrics-port needs prometheus-client: pip install 'fennec-chat[metrics]'"
        ) from missing
    registry = REGISTRY
    if workers:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=os.environ[DIRECTORY_VARIABLE])
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise StartupError(
            f"cannot serve metrics on {host}:{port} (--metrics-port): "
            f"{(error.strerror or str(error)).lower()}"
        ) from error
    global _served_here
    _served_here = True


def process_gone(pid: int) -> None:
    """A worker died: its gauges no longer count (its counters still do)."""
    if DIRECTORY_VARIABLE in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def enable() -> None:
    """In every process that serves the chat, at start-up: make the metrics real."""
    global connections, rooms, messages, deliveries, refusals, closes, rate_limited
    global outbox_overflows, broadcast_seconds, history_commit_seconds, resumes
    global backplane_up, backplane_publish_seconds
    if DIRECTORY_VARIABLE not in os.environ and not _served_here:
        logger.warning("metrics are served only by `python server.py --metrics-port`; none kept")
        return
    if connections is not OFF:
        return  # (a second app in this process)
    from prometheus_client import Counter, Gauge, Histogram

    prefix = "fennec_chat_"
    connections = Gauge(
        prefix + "connections", "Open WebSocket connections", ["endpoint"], multiprocess_mode="livesum"
    )
    rooms = Gauge(prefix + "rooms", "Rooms with members, on every process", multiprocess_mode="livemax")
    messages = Counter(prefix + "messages", "Chat messages accepted: stored and sent to their room")
    deliveries = Counter(prefix + "deliveries", "Events handed to a member's socket")
    refusals = Counter(prefix + "refusals", "Connections refused at the gate, by close code", ["code"])
    closes = Counter(
        prefix + "closes", "Admitted connections that ended, by close code (1006: none)", ["code"]
    )
    rate_limited = Counter(prefix + "rate_limited", "Frames refused or dropped by a rate limit", ["limit"])
    outbox_overflows = Counter(prefix + "outbox_overflows", "Members closed (1013) for falling behind")
    broadcast_seconds = Histogram(
        prefix + "broadcast_seconds", "Handing one room event to this process's members", buckets=FAST_BUCKETS
    )
    history_commit_seconds = Histogram(
        prefix + "history_commit_seconds",
        "From a message's arrival at the history to its commit",
        buckets=FAST_BUCKETS,
    )
    resumes = Counter(prefix + "resumes", "Reconnections with ?since=, by outcome", ["outcome"])
    backplane_up = Gauge(
        prefix + "backplane_up",
        "1 while the backplane carries events (0: Redis is away)",
        multiprocess_mode="livemin",
    )
    backplane_publish_seconds = Histogram(
        prefix + "backplane_publish_seconds",
        "One batch of commands to Redis, sent and answered",
        buckets=FAST_BUCKETS,
    )
    backplane_up.set(1)


async def count_rooms_forever(room_count: Callable[[], Awaitable[int]]) -> None:
    """Keep `rooms` up to date: counted every few seconds, not per join (with Redis, counting
    is a command, and every process reports the same total)."""
    while True:
        try:
            rooms.set(await room_count())
        except Exception as problem:  # Redis away: backplane_up says so; the count waits
            logger.debug("could not count the rooms: %r", problem)
        await asyncio.sleep(ROOMS_EVERY)
