"""A real Redis Cluster on loopback: 3 masters and 3 replicas, each redis-server in a directory of
its own, for the tests (and benchmarks) of the cluster backplane (`--redis-url redis+cluster://`).

Besides starting and stopping it, `RedisCluster` does to the cluster what production does to it:
kill a master so that its replica takes over (`fail_over`), bring the old one back (`restart`),
move a slot to another master (`migrate_slot`). Each of these waits until every live node agrees
on the new layout, or raises with what was still missing and the nodes' log tails.

Every node has its own cluster bus port (`cluster-port`, Redis >= 7.0) instead of the default
port + 10000: free ports from the ephemeral range are often above 55535, where + 10000 overflows.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redis.cluster
from redis.crc import key_slot

from tests.browser import optional_part_missing
from tests.server_process import free_port

SLOTS = 16384
HOST = "127.0.0.1"


def redis_cli_path() -> str | None:
    return executable("CHAT_REDIS_CLI", "redis-cli")


def redis_server_path() -> str | None:
    return executable("CHAT_REDIS_SERVER", "redis-server")


def executable(variable: str, name: str) -> str | None:
    """$variable if set (None if there is no such file), else `name` on PATH."""
    configured = os.environ.get(variable)
    if configured:
        return configured if os.path.exists(configured) else None
    return shutil.which(name)


def slot_of(key: str) -> int:
    """The hash slot of `key` (its {hash tag} only, if it has one), as CLUSTER KEYSLOT says."""
    return key_slot(key.encode())


@dataclass
class Node:
    """One redis-server of the cluster: its ports, directory and process."""

    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class NodeView:
    """One line of a node's CLUSTER NODES: what that node believes about another one."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: frozenset[int] = field(default_factory=frozenset)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def parse_cluster_nodes(text: str) -> dict[str, NodeView]:
    """CLUSTER NODES, by node id. Slots being migrated (`[slot->-id]`, `[slot-<-id]`) are left
    out: they still belong to the node that lists them as a plain number or range."""
    views: dict[str, NodeView] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, address, flags, master, _, _, _, link, *slot_fields = line.split()
        port = int(address.split("@")[0].rsplit(":", 1)[1] or 0)
        slots: set[int] = set()
        for entry in slot_fields:
            if entry.startswith("["):
                continue
            start, _, end = entry.partition("-")
            slots.update(range(int(start), int(end or start) + 1))
        views[node_id] = NodeView(
            node_id=node_id,
            port=port,
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            connected=link == "connected",
            slots=frozenset(slots),
        )
    return views


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for in time (the message says what was missing)."""


_running: weakref.WeakSet[RedisCluster] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """A safety net: a cluster a test forgot to stop does not outlive the test run."""
    for cluster in list(_running):
        cluster.stop()


class RedisCluster:
    """3 masters + 3 replicas (by default) on free loopback ports, with append-only persistence.

    `ports` lists every node in start order; the first `masters` were made masters at creation
    (failovers and restarts change who is master: ask `masters()`, `master_of(key)`).
    """

    def __init__(
        self,
        directory: Path,
        masters: int = 3,
        replicas_per_master: int = 1,
        node_timeout_ms: int = 1000,
        persistent: bool = True,
    ) -> None:
        """Nodes in subdirectories of `directory`; with `persistent`, append-only files there
        (a restarted node keeps its data), without (benchmarks) no persistence at all."""
        server, cli = redis_server_path(), redis_cli_path()
        if server is None or cli is None:
            optional_part_missing(
                "no redis-server or redis-cli found: install Redis >= 7.0 "
                "or set CHAT_REDIS_SERVER and CHAT_REDIS_CLI"
            )
        assert server is not None
        assert cli is not None
        self.server_executable = server
        self.cli_executable = cli
        self.directory = directory
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.persistent = persistent
        used: set[int] = set()
        self.nodes: list[Node] = []
        for number in range(masters * (1 + replicas_per_master)):
            port, bus_port = self._free_pair(used)
            self.nodes.append(Node(port, bus_port, directory / f"node-{number}"))

    # --- addresses and clients ------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def seed_port(self) -> int:
        """The first live node in start order (the first master, until it is killed)."""
        for node in self.nodes:
            if node.alive:
                return node.port
        raise ClusterError("no node of the cluster is running")

    @property
    def url(self) -> str:
        """What `--redis-url` takes to select cluster mode: one seed node, the rest discovered."""
        return f"redis+cluster://{HOST}:{self.seed_port}"

    @property
    def pids(self) -> list[int]:
        """The live redis-server processes (for their CPU time in /proc)."""
        return [node.process.pid for node in self.nodes if node.alive and node.process]

    def pid(self, port: int) -> int:
        """The process id of the node on `port` (for its CPU time in /proc)."""
        process = self.node(port).process
        if process is None:
            raise ClusterError(f"the node on {port} was never started")
        return process.pid

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster-aware client: it follows MOVED/ASK and reloads the layout after a failover."""
        return redis.cluster.RedisCluster(host=HOST, port=self.seed_port, decode_responses=True)

    def node_client(self, port: int, timeout: float = 2.0) -> redis.Redis:
        """A plain connection to one node (no redirections followed); close it when done."""
        return redis.Redis(
            host=HOST,
            port=port,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def node(self, port: int) -> Node:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no node of this cluster listens on {port}")

    # --- the layout, as the live nodes see it ---------------------------------------------------

    def view(self, port: int | None = None) -> dict[str, NodeView]:
        """CLUSTER NODES as seen by `port` (the seed by default)."""
        with self.node_client(port or self.seed_port) as client:
            return parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))

    def masters(self) -> list[int]:
        """The ports of the live masters that serve slots, in start order."""
        serving = {v.port for v in self.view().values() if v.is_master and v.slots and not v.failing}
        return [port for port in self.ports if port in serving and self.node(port).alive]

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        slot = slot_of(key)
        for entry in self.view().values():
            if slot in entry.slots and not entry.failing:
                return entry.port
        raise ClusterError(f"no live master serves slot {slot} (of {key!r})")

    def replica_of(self, master_port: int) -> int:
        """The port of a live replica of the master on `master_port`."""
        views = self.view()
        master_id = next((v.node_id for v in views.values() if v.port == master_port), None)
        if master_id is None:
            raise ClusterError(f"no node of the cluster is on {master_port}")
        for entry in views.values():
            if entry.master_id == master_id and not entry.failing and self.node(entry.port).alive:
                return entry.port
        raise ClusterError(f"the master on {master_port} has no live replica")

    def node_id(self, port: int) -> str:
        with self.node_client(port) as client:
            return client.execute_command("CLUSTER", "MYID")

    # --- life cycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> RedisCluster:
        """Start every node, create the cluster and wait until it is whole (`cluster_state:ok`
        everywhere, all slots served, every replica in sync, every node seeing the same layout)."""
        _running.add(self)
        try:
            for node in self.nodes:
                self._start_node(node)
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                self._wait_for_ping(node, deadline)
            self._create(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every node (the data is throwaway) and reap it: no process is left behind."""
        for node in self.nodes:
            if node.alive and node.process:
                node.process.kill()
        for node in self.nodes:
            if node.process:
                node.process.wait(10)
        _running.discard(self)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def fail_over(self, master_port: int, sig: signal.Signals = signal.SIGKILL, timeout: float = 30) -> int:
        """Stop the master on `master_port` with `sig` (SIGKILL: a crash; SIGTERM: a clean
        shutdown, which in Redis 7.0 hands nothing over either) and wait until its replica has
        taken over and the survivors agree and report `cluster_state:ok`. Returns the new
        master's port."""
        views = self.view(master_port)
        if not any(v.port == master_port and v.is_master and v.slots for v in views.values()):
            raise ClusterError(f"{master_port} is not a master serving slots")
        replica = self.replica_of(master_port)
        node = self.node(master_port)
        assert node.process is not None
        node.process.send_signal(sig)
        node.process.wait(15)

        def promoted() -> str | None:
            try:
                with self.node_client(replica) as client:
                    role = client.execute_command("ROLE")[0]
            except redis.RedisError as error:
                return f"the replica on {replica} did not answer: {error}"
            if role != "master":
                return f"the replica on {replica} is still a {role}"
            return self._disagreement()

        self._wait_until(promoted, timeout, f"the replica of {master_port} taking over")
        return replica

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start the node on `port` again (same directory, so the same node id and data; killed
        first if it is still running) and wait until it has rejoined: an old master comes back as
        a replica of the one that replaced it."""
        node = self.node(port)
        if node.alive and node.process:
            node.process.kill()
            node.process.wait(10)
        self._start_node(node)
        deadline = time.monotonic() + timeout
        self._wait_for_ping(node, deadline)
        self._wait_until(self._disagreement, deadline - time.monotonic(), f"{port} rejoining")

    def migrate_slot(
        self,
        key: str,
        to_port: int,
        timeout: float = 30,
        midway: Callable[[int, int], None] | None = None,
    ) -> int:
        """Move `key`'s slot, with its keys, to the master on `to_port`, as `redis-cli --cluster
        reshard` does: SETSLOT IMPORTING on the target, MIGRATING on the source, MIGRATE ... KEYS
        in batches, then SETSLOT NODE on the target, the source and every other master. Waits
        until every live node agrees. Returns the slot.

        `midway(source_port, target_port)`, if given, runs once the keys have moved and before
        the slot is handed over: the window in which the source answers ASK for them."""
        slot = slot_of(key)
        source = self.master_of(key)
        if source == to_port:
            return slot
        source_id, target_id = self.node_id(source), self.node_id(to_port)
        with self.node_client(to_port) as target, self.node_client(source) as origin:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            origin.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := origin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                origin.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *keys)
            if midway is not None:
                midway(source, to_port)
            target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            origin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.masters():
            if port not in (source, to_port):
                with self.node_client(port) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

        def moved() -> str | None:
            for port in self._live_ports():
                owner = [v.port for v in self.view(port).values() if slot in v.slots]
                if owner != [to_port]:
                    return f"{port} sees slot {slot} on {owner}"
            return self._disagreement()

        self._wait_until(moved, timeout, f"slot {slot} moving from {source} to {to_port}")
        return slot

    # --- internals ------------------------------------------------------------------------------

    @staticmethod
    def _free_pair(used: set[int]) -> tuple[int, int]:
        while True:
            pair = free_port(), free_port()
            if pair[0] != pair[1] and not used & set(pair):
                used.update(pair)
                return pair

    def _start_node(self, node: Node) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        node.process = subprocess.Popen(
            [
                self.server_executable,
                *("--port", str(node.port)),
                *("--bind", HOST),
                *("--dir", str(node.directory)),
                *("--logfile", str(node.log_path)),
                *("--cluster-enabled", "yes"),
                *("--cluster-config-file", "nodes.conf"),
                *("--cluster-port", str(node.bus_port)),
                *("--cluster-node-timeout", str(self.node_timeout_ms)),
                # A replica takes over however long its link was down: a test's cluster is
                # stopped and restarted at will, and its data is never stale in a way that matters.
                *("--cluster-replica-validity-factor", "0"),
                *("--appendonly", "yes" if self.persistent else "no"),
                *("--save", ""),
                # Redis 7.0 waits 5 s by default before a diskless full sync to a new replica.
                *("--repl-diskless-sync-delay", "0"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal does not kill it under a test's feet
        )

    def _wait_for_ping(self, node: Node, deadline: float) -> None:
        with self.node_client(node.port, timeout=1) as client:
            while time.monotonic() < deadline:
                if not node.alive:
                    raise ClusterError(
                        f"redis-server on {node.port} (bus {node.bus_port}) exited:\n{node.log_tail()}"
                    )
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)
        raise ClusterError(f"redis-server on {node.port} did not answer PING:\n{node.log_tail()}")

    def _create(self, deadline: float, attempts: int = 3) -> None:
        """redis-cli --cluster create, and wait until the layout it set has spread. redis-cli can
        give up on a check while gossip is still converging (then the wait sorts it out), or fail
        outright; then the nodes are reset and it is tried again."""
        output = ""
        for _attempt in range(attempts):
            command = [
                self.cli_executable,
                "--cluster",
                "create",
                *(f"{HOST}:{port}" for port in self.ports),
                *("--cluster-replicas", str(self.replicas_per_master)),
                "--cluster-yes",
            ]
            try:
                done = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    timeout=max(1.0, deadline - time.monotonic()),
                    env={**os.environ, "TERM": "dumb"},
                )
                output = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
            except subprocess.TimeoutExpired as error:
                output = f"redis-cli --cluster create timed out: {error}"
            try:
                remaining = min(deadline - time.monotonic(), 20)
                self._wait_until(self._disagreement, remaining, "the new cluster coming together")
                return
            except ClusterError as error:
                if time.monotonic() >= deadline:
                    raise ClusterError(f"{error}\nredis-cli said:\n{output}") from None
            self._reset_nodes()
        raise ClusterError(f"the cluster did not form in {attempts} attempts; redis-cli said:\n{output}")

    def _reset_nodes(self) -> None:
        """Every node back to an empty master that knows no other node (a new node id too)."""
        for port in self.ports:
            # A replica refuses (read-only): the reset empties it.
            with self.node_client(port) as client, contextlib.suppress(redis.ResponseError):
                client.execute_command("FLUSHALL")
        for port in self.ports:
            with self.node_client(port) as client:
                client.execute_command("CLUSTER", "RESET", "HARD")

    def _live_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.alive]

    def _disagreement(self) -> str | None:
        """None if the cluster is whole; else the first thing found wrong. Whole: every live node
        reports cluster_state:ok with all slots served, sees every other live node connected and
        healthy and the same masters, replicas and slots; every replica's link to its master is up;
        and only live nodes serve slots (a dead master's slots have moved)."""
        live = self._live_ports()
        layouts: dict[int, dict[int, tuple[str, int | None, frozenset[int]]]] = {}
        for port in live:
            try:
                with self.node_client(port) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    views = parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
                    replication = client.info("replication")
            except redis.RedisError as error:
                return f"{port} did not answer: {error}"
            if "cluster_state:ok" not in info or f"cluster_slots_ok:{SLOTS}" not in info:
                state = " ".join(
                    line for line in info.split() if line.startswith(("cluster_state", "cluster_slots"))
                )
                return f"{port} reports {state}"
            ports_by_id = {v.node_id: v.port for v in views.values()}
            layout: dict[int, tuple[str, int | None, frozenset[int]]] = {}
            for entry in views.values():
                if entry.port not in live:
                    if entry.slots:
                        return f"{port} sees the dead node {entry.port} serving slots"
                    continue
                if entry.failing or not (entry.connected or "myself" in entry.flags):
                    return f"{port} sees {entry.port} as {','.join(sorted(entry.flags))}"
                role = "master" if entry.is_master else "replica"
                master = ports_by_id.get(entry.master_id) if entry.master_id else None
                layout[entry.port] = (role, master, entry.slots)
            if set(layout) != set(live):
                return f"{port} knows {sorted(layout)} of the live nodes {sorted(live)}"
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return f"replica {port} is not in sync with its master yet"
            layouts[port] = layout
        first = layouts[live[0]]
        for port, layout in layouts.items():
            if layout != first:
                differing = sorted(p for p in first if layout.get(p) != first[p])
                return f"{port} and {live[0]} disagree about {differing}"
        if sum(len(slots) for role, _, slots in first.values() if role == "master") != SLOTS:
            return "the live masters do not serve every slot"
        return None

    def _wait_until(self, problem: Callable[[], str | None], timeout: float, what: str) -> None:
        deadline = time.monotonic() + max(timeout, 0)
        last: str | None = "not checked"
        while True:
            last = problem()
            if last is None:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        logs = "\n".join(f"--- node {node.port}:\n{node.log_tail(8)}" for node in self.nodes)
        raise ClusterError(f"{what}: not done in {timeout:.1f} s: {last}\n{logs}")
