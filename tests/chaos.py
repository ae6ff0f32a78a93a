"""A seeded chaos test of "nothing lost, nothing twice" (README, "History: reconnection that
loses nothing"), on real parts: one redis-server with append-only persistence, two
`python server.py --redis-url` processes, and page-like WebSocket clients (chaos_client.py) in
several rooms, while a schedule drawn from the seed kills and restarts the chat processes
(SIGKILL and SIGTERM), restarts (or kills) Redis, drops clients' connections and freezes their
reading.
Then the faults stop, everything settles, and chaos_checks.py compares every client's
transcript with the others', with its own sends and with the history in Redis.

    python -m tests.chaos --seed 7 --seconds 60 --rooms 3 --clients 4

The seed fixes the schedule (what, when, to whom) and every client's choices; the timing of the
processes does not repeat exactly, so a seed reproduces the same storm, not the same interleaving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos_checks import Checks, check_room
from tests.chaos_client import ChaosClient
from tests.redis_process import RedisProcess
from tests.server_process import ServerProcess, log_path

PROCESS_FAULTS = ("kill_chat", "term_chat", "restart_redis")
# Drawn with the others but not required in every storm: Redis killed, back from its AOF. With
# appendfsync everysec a crash keeps every acknowledged write unless fsync lags (a busy disk).
EXTRA_PROCESS_FAULTS = ("kill_redis",)
CLIENT_FAULTS = ("drop_client", "pause_client")
PREFIX = "fennec-chat:"  # the server's default --redis-prefix


@dataclass(frozen=True)
class Config:
    seed: int
    seconds: float = 20
    rooms: int = 2
    clients: int = 3  # per room
    per_second: float = 2.0  # messages each client writes, on average
    settle_timeout: float = 60  # after the faults, for everything to reconnect and confirm

    def command(self) -> str:
        return (
            f"python -m tests.chaos --seed {self.seed} --seconds {self.seconds:g} "
            f"--rooms {self.rooms} --clients {self.clients}"
        )


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start of the storm
    kind: str
    target: int  # a chat process (0, 1) or a client; nothing for Redis
    seconds: float  # how long it is down, or how long the client stops reading

    def __str__(self) -> str:
        target = "" if self.kind.endswith("_redis") else f" #{self.target}"
        return f"{self.at:6.2f} s  {self.kind}{target} ({self.seconds:.1f} s)"


def schedule(rng: random.Random, seconds: float, clients: int) -> list[Fault]:
    """Every kind at least once (kill_redis only if drawn), then more at random: a process fault
    every 6 s or so, a client fault every 1.5 s. Process faults run one after the other (a chat
    process cannot start while Redis is down), client faults whenever they come."""
    drawn = PROCESS_FAULTS + EXTRA_PROCESS_FAULTS
    process = list(PROCESS_FAULTS) + [rng.choice(drawn) for _ in range(int(seconds / 6) - 3)]
    client = list(CLIENT_FAULTS) + [rng.choice(CLIENT_FAULTS) for _ in range(int(seconds / 1.5) - 2)]
    faults = []
    for kind in process + client:
        at = rng.uniform(1, max(2.0, seconds - 2))
        target = rng.randrange(clients) if kind in CLIENT_FAULTS else rng.randrange(2)
        down = rng.uniform(1, 8) if kind == "pause_client" else rng.uniform(0, 3)
        faults.append(Fault(round(at, 2), kind, target, round(down, 1)))
    return sorted(faults, key=lambda fault: fault.at)


class Cluster:
    """Redis and two chat processes on fixed loopback ports, so that a restart comes back on the
    port the clients know."""

    def __init__(self, seed: int, directory: Path) -> None:
        self.redis = RedisProcess(directory / "redis")
        flags = [
            *("--redis-url", self.redis.url, "--redis-heartbeat", "0.5"),
            # A client that stops reading is given up on within seconds, not 40.
            *("--ping-interval", "2", "--ping-timeout", "3", "--outbox-limit", "64"),
            # Nothing is pruned: the test compares whole transcripts with the whole history.
            *("--history-retention", "100000", "--history-resume-max", "100000"),
        ]
        self.chats = [ServerProcess(flags, {}, log_path(f"chaos-{seed}-{name}")) for name in "ab"]

    def urls(self) -> list[str]:
        return [chat.ws_url for chat in self.chats]

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        await asyncio.gather(*(asyncio.to_thread(chat.start) for chat in self.chats))

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(chat.stop) for chat in self.chats))
        await asyncio.to_thread(self.redis.stop)

    async def inflict(self, fault: Fault) -> None:
        if fault.kind in ("restart_redis", "kill_redis"):
            if fault.kind == "restart_redis":
                await asyncio.to_thread(self.redis.stop)  # SIGTERM: the AOF is written out
            else:
                assert self.redis.process is not None
                self.redis.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(self.redis.process.wait)
            await asyncio.sleep(fault.seconds)
            await asyncio.to_thread(self.redis.start)
            return
        chat = self.chats[fault.target]
        assert chat.process is not None
        if fault.kind == "kill_chat":
            chat.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(chat.process.wait)
        else:
            await asyncio.to_thread(chat.stop)  # SIGTERM: uvicorn closes every socket with 1012
        await asyncio.sleep(fault.seconds)
        await asyncio.to_thread(chat.start)

    def tracebacks(self) -> list[str]:
        return [chat.log_path.name for chat in self.chats if "Traceback" in chat.log()]


@dataclass
class Report:
    config: Config
    faults: list[Fault]
    inflicted: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    checks: Checks = field(default_factory=Checks)
    notes: list[str] = field(default_factory=list)  # worth a look, not a violation
    timeline: list[str] = field(default_factory=list)  # when each process fault really began and ended
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.checks.failures

    def summary(self) -> str:
        lines = [f"chaos: {self.config.command()}  ({self.seconds:.1f} s)"]
        lines.append("faults: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.inflicted.items())))
        lines.append("clients: " + ", ".join(f"{what} {n}" for what, n in sorted(self.stats.items())))
        lines.append(f"checks made: {self.checks.made} ({self.checks.by_kind()})")
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"verdict: {'PASS' if self.ok else f'FAIL ({len(self.checks.failures)} violations)'}")
        return "\n".join(lines)

    def failure(self) -> str:
        """What reproduces it and what went wrong, for an assertion message."""
        shown = self.checks.failures[:40]
        more = len(self.checks.failures) - len(shown)
        return "\n".join(
            [
                f"the delivery guarantee broke under seed {self.config.seed}; reproduce with:",
                f"  {self.config.command()}",
                "schedule:",
                *(f"  {fault}" for fault in self.faults),
                "process faults as they happened (down, then back):",
                *(f"  {line}" for line in self.timeline),
                "violations:",
                *(f"  {failure}" for failure in shown),
                *([f"  … and {more} more"] if more > 0 else []),
                self.summary(),
            ]
        )


async def run(config: Config) -> Report:
    rng = random.Random(config.seed)
    clients_count = config.rooms * config.clients
    report = Report(config, schedule(rng, config.seconds, clients_count))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-") as directory:
        cluster = Cluster(config.seed, Path(directory))
        await cluster.start()
        try:
            await storm(config, cluster, rng, report)
        finally:
            await cluster.stop()
        report.notes += [f"a Traceback in {name}" for name in cluster.tracebacks()]
    report.seconds = time.monotonic() - started
    return report


async def storm(config: Config, cluster: Cluster, rng: random.Random, report: Report) -> None:
    rooms = [f"chaos-{config.seed}-{number}" for number in range(config.rooms)]
    clients = [
        ChaosClient(f"r{r}c{c}", room, cluster.urls, random.Random(rng.getrandbits(64)))
        for r, room in enumerate(rooms)
        for c in range(config.clients)
    ]
    connecting = [asyncio.create_task(client.run()) for client in clients]
    await until(lambda: all(client.position is not None for client in clients), 20, "every client joined")
    talking = [asyncio.create_task(client.talk(config.per_second)) for client in clients]
    freezes: list[asyncio.Task[bool]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def process_faults() -> None:  # one after the other: a restart waits for the last one
        for fault in (fault for fault in report.faults if fault.kind not in CLIENT_FAULTS):
            await asyncio.sleep(max(0.0, start + fault.at - loop.time()))
            began = loop.time() - start
            await cluster.inflict(fault)
            report.inflicted[fault.kind] += 1
            report.timeline.append(f"{began:6.2f} to {loop.time() - start:6.2f} s  {fault}")

    async def client_faults() -> None:  # on time, whatever the processes are going through
        for fault in (fault for fault in report.faults if fault.kind in CLIENT_FAULTS):
            await asyncio.sleep(max(0.0, start + fault.at - loop.time()))
            client = clients[fault.target]
            if fault.kind == "drop_client":
                report.inflicted[fault.kind if client.drop() else f"{fault.kind} (not connected)"] += 1
            else:
                freezes.append(asyncio.create_task(client.stop_reading(fault.seconds)))

    await asyncio.gather(process_faults(), client_faults())
    await asyncio.sleep(max(0.0, start + config.seconds - loop.time()))

    # The faults stop: nothing new is written, frozen clients read again, and everyone resends
    # and catches up until each client shows the room's whole history with nothing pending.
    for task in talking:
        task.cancel()
    for client in clients:
        client.quiescing = True
    for frozen in await asyncio.gather(*freezes):
        report.inflicted["pause_client" if frozen else "pause_client (not connected)"] += 1
    store = cluster.redis.client()
    last_ids = dict.fromkeys(rooms, 0)

    def settled() -> bool:
        last_ids.update({room: int(store.get(f"{PREFIX}room:{room}:last_id") or 0) for room in rooms})
        return all(client.settled(last_ids[client.room]) for client in clients)

    with contextlib.suppress(asyncio.TimeoutError):
        await until(settled, config.settle_timeout, "settled")
    await asyncio.sleep(0.5)  # a late copy, if any, arrives and is checked
    settled()
    for room in rooms:
        members = [client for client in clients if client.room == room]
        stream = store.xrange(f"{PREFIX}room:{room}:stream")
        epoch = store.get(f"{PREFIX}room:{room}:epoch") or ""
        check_room(report.checks, members, stream, epoch, last_ids[room])
    for client in clients:
        report.stats.update(client.stats)
        report.stats["messages written"] += len(client.sends)
        report.stats["confirmed once the faults stopped"] += sum(
            s.confirmed_late for s in client.sends.values()
        )
    await asyncio.gather(*(client.stop() for client in clients))
    for task in connecting:
        task.cancel()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - the condition is read from outside, not signalled
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise asyncio.TimeoutError(f"not {what} within {timeout} s") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="a random one (printed) if not given")
    parser.add_argument("--seconds", type=float, default=120, help="how long the faults go on")
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="clients per room")
    parser.add_argument("--per-second", type=float, default=2.0, help="messages per client per second")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    config = Config(seed, args.seconds, args.rooms, args.clients, args.per_second)
    print(f"chaos: seed {seed}", flush=True)
    report = asyncio.run(run(config))
    print(report.summary() if report.ok else report.failure())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
