"""What the cluster backplane (`--redis-url redis+cluster://`) relies on from Redis Cluster 7.0,
pinned against a real cluster (tests/redis_cluster.py) through redis-py's plain per-node
connections and, where the exact bytes matter, a bare socket.

A room's keys and its channel share a {hash tag}, so they live in one slot, on one master: a
script on the room's keys can SPUBLISH the room's events, and the sharded subscribers of that
master (and of its replicas) hear them. What a subscriber sees when the slot moves or its master
dies is what the backplane must recover from:

- slot moved away: one unsolicited `sunsubscribe` push per channel of that slot, on the old master
  and its replicas, the connection left open; SSUBSCRIBE there again gets MOVED;
- while the slot moves: scripts on its keys get ASK, then TRYAGAIN on the new master if they
  declare the channel as a key, and what they publish there misses the old master's subscribers;
- master killed: the connection just ends (EOF, no push); a subscriber on the replica that takes
  over keeps its subscription.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from tests.redis_cluster import HOST, RedisCluster, slot_of

# The shape of the backplane's room scripts: store, then publish to the room's channel.
STORE_AND_PUBLISH = "redis.call('INCR', KEYS[1]) return redis.call('SPUBLISH', KEYS[2], ARGV[1])"
# The same with only the data key declared, the channel passed as an argument.
STORE_AND_PUBLISH_ARGV = "redis.call('INCR', KEYS[1]) return redis.call('SPUBLISH', ARGV[2], ARGV[1])"


def resp_push(kind: str, channel: str, count: int) -> bytes:
    """A pub/sub reply as RESP2 puts it on the wire."""
    return f"*3\r\n${len(kind)}\r\n{kind}\r\n${len(channel)}\r\n{channel}\r\n:{count}\r\n".encode()


class RawConnection:
    """A bare socket to one node: the exact bytes it sends, no client library in between."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.ended = False

    def send(self, *command: str) -> None:
        encoded = "".join(f"${len(part.encode())}\r\n{part}\r\n" for part in command)
        self.sock.sendall(f"*{len(command)}\r\n{encoded}".encode())

    def read(self, size: int, timeout: float = 5) -> bytes:
        """Up to `size` bytes: fewer if the node closes the connection (then `ended`) or is silent
        for `timeout` seconds."""
        data = b""
        self.sock.settimeout(timeout)
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except TimeoutError:
                break
            if not chunk:
                self.ended = True
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connections() -> Iterator[Callable[[int], RawConnection]]:
    opened: list[RawConnection] = []

    def open_one(port: int) -> RawConnection:
        opened.append(RawConnection(port))
        return opened[-1]

    yield open_one
    for connection in opened:
        connection.close()


@pytest.fixture
def subscribe() -> Iterator[Callable[[RedisCluster, int, str], PubSub]]:
    """A redis-py PubSub on one node, SSUBSCRIBEd to a channel (its confirmation consumed).

    Without retries: by default redis-py retries 10 times (backoff up to 1 s, some 4 s in all) to
    reconnect to a dead node before it raises the same error as here."""
    opened: list[tuple[redis.Redis, PubSub]] = []

    def subscribe_on(cluster: RedisCluster, port: int, channel: str) -> PubSub:
        # The client is kept: once collected, it would close its pool, the PubSub's connection too.
        node = redis.Redis(host=HOST, port=port, decode_responses=True, retry=Retry(NoBackoff(), 0))
        pubsub = node.pubsub()
        opened.append((node, pubsub))
        pubsub.ssubscribe(channel)
        confirmation = pubsub.get_message(timeout=2)
        assert confirmation == {"type": "ssubscribe", "pattern": None, "channel": channel, "data": 1}
        return pubsub

    yield subscribe_on
    for node, pubsub in opened:
        pubsub.close()
        node.close()


def smessage(channel: str, data: str) -> dict:
    return {"type": "smessage", "pattern": None, "channel": channel, "data": data}


def asking(port: int, *command: str | int):
    """`command` on one node right after ASKING, on the same connection (ASKING covers one command)."""
    with redis.Redis(host=HOST, port=port, decode_responses=True, single_connection_client=True) as node:
        node.execute_command("ASKING")
        return node.execute_command(*command)


def show(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n  {text}", end="")


def test_the_cluster_has_three_masters_each_with_a_replica_and_serves_every_slot(redis_cluster, room):
    masters = redis_cluster.masters()
    replicas = {redis_cluster.replica_of(master) for master in masters}
    assert masters == redis_cluster.ports[:3]
    assert replicas == set(redis_cluster.ports[3:])
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{masters[0]}"
    key = f"{{{room}}}:key"
    redis_cluster.client().set(key, "stored")
    with redis_cluster.node_client(redis_cluster.master_of(key)) as master:
        assert master.get(key) == "stored"
        assert "cluster_state:ok" in master.execute_command("CLUSTER", "INFO")


def test_a_script_on_a_rooms_keys_spublishes_to_the_rooms_channel_heard_on_its_master_and_replica(
    redis_cluster, room, subscribe
):
    sequence, events = f"{{{room}}}:seq", f"{{{room}}}:events"
    assert slot_of(sequence) == slot_of(events)
    master = redis_cluster.master_of(events)
    on_master = subscribe(redis_cluster, master, events)
    on_replica = subscribe(redis_cluster, redis_cluster.replica_of(master), events)

    with redis_cluster.node_client(master) as node:
        assert node.eval(STORE_AND_PUBLISH, 2, sequence, events, "hello") == 1  # receivers on that node
    # The cluster client routes the script by its first key.
    assert redis_cluster.client().eval(STORE_AND_PUBLISH, 2, sequence, events, "again") == 1

    for subscriber in (on_master, on_replica):
        assert subscriber.get_message(timeout=2) == smessage(events, "hello")
        assert subscriber.get_message(timeout=2) == smessage(events, "again")
    assert redis_cluster.client().get(sequence) == "2"


def test_a_script_on_a_rooms_keys_may_also_publish_unsharded_to_subscribers_on_every_node(
    redis_cluster, room
):
    sequence, lobby = f"{{{room}}}:seq", f"lobby-{room}"
    master = redis_cluster.master_of(sequence)
    elsewhere = [port for port in redis_cluster.ports if port != master]
    listeners = [redis_cluster.node_client(port).pubsub() for port in elsewhere]
    try:
        for listener in listeners:
            listener.subscribe(lobby)
            assert listener.get_message(timeout=2)["type"] == "subscribe"
        with redis_cluster.node_client(master) as node:
            node.eval(
                "redis.call('INCR', KEYS[1]) return redis.call('PUBLISH', ARGV[1], 'x')", 1, sequence, lobby
            )
        for listener in listeners:
            message = listener.get_message(timeout=2)
            assert message == {"type": "message", "pattern": None, "channel": lobby, "data": "x"}
    finally:
        for listener in listeners:
            listener.close()


def test_a_slot_moved_away_sends_its_sharded_subscribers_an_unsolicited_sunsubscribe_per_channel(
    redis_cluster, room, subscribe, connections, capsys
):
    events, typing = f"{{{room}}}:events", f"{{{room}}}:typing"
    source = redis_cluster.master_of(events)
    target = next(port for port in redis_cluster.masters() if port != source)
    raw = connections(source)
    raw.send("SSUBSCRIBE", events, typing)
    confirmed = resp_push("ssubscribe", events, 1) + resp_push("ssubscribe", typing, 2)
    assert raw.read(len(confirmed)) == confirmed
    on_source = subscribe(redis_cluster, source, events)
    on_replica = subscribe(redis_cluster, redis_cluster.replica_of(source), events)

    started = time.perf_counter()
    slot = redis_cluster.migrate_slot(events, target)
    show(capsys, f"migrate_slot: {time.perf_counter() - started:.3f} s until every node agreed")

    # Bare RESP2: one push per channel of the slot (in name order), with the count left; the
    # connection stays open, out of subscribed mode (a PING gets a plain +PONG).
    expected = resp_push("sunsubscribe", events, 1) + resp_push("sunsubscribe", typing, 0)
    assert raw.read(len(expected)) == expected
    raw.send("PING")
    assert raw.read(7) == b"+PONG\r\n"
    # Subscribing there again is redirected to the slot's new master.
    raw.send("SSUBSCRIBE", events)
    moved = f"-MOVED {slot} {HOST}:{target}\r\n".encode()
    assert raw.read(len(moved)) == moved
    assert not raw.ended

    # redis-py hands the push over as it would a reply to our own SUNSUBSCRIBE, on the old
    # master and on its replica alike...
    unsubscribed = {"type": "sunsubscribe", "pattern": None, "channel": events, "data": 0}
    assert on_source.get_message(timeout=2) == unsubscribed
    assert on_replica.get_message(timeout=2) == unsubscribed
    # ...but, as it did not ask for it, its PubSub still lists the channel (and would SSUBSCRIBE
    # it again on that node if it reconnected): forgetting it is up to the caller.
    assert events in on_source.shard_channels
    assert on_source.subscribed

    on_target = subscribe(redis_cluster, target, events)
    assert redis_cluster.client().spublish(events, "moved") == 1
    assert on_target.get_message(timeout=2) == smessage(events, "moved")
    assert on_source.get_message(timeout=0.2) is None


def test_while_a_slot_moves_a_rooms_script_is_redirected_and_what_it_publishes_misses_old_subscribers(
    redis_cluster, room, subscribe
):
    sequence, events = f"{{{room}}}:seq", f"{{{room}}}:events"
    slot = slot_of(events)
    redis_cluster.client().set(sequence, 0)
    source = redis_cluster.master_of(events)
    target = next(port for port in redis_cluster.masters() if port != source)
    on_source = subscribe(redis_cluster, source, events)
    seen: dict[str, object] = {}

    def midway(source: int, target: int) -> None:
        """The keys are on the target; the slot still belongs to the source."""
        with redis_cluster.node_client(source) as node:
            with pytest.raises(redis.exceptions.AskError) as asked:
                node.eval(STORE_AND_PUBLISH, 2, sequence, events, "refused")
            assert (asked.value.slot_id, asked.value.node_addr) == (slot, (HOST, target))
            # A bare SPUBLISH touches no key: the source still delivers it.
            assert node.spublish(events, "plain") == 1
        # On the target, a script that declares the channel as a key is told to try again
        # (the "key" is not there), and redis-py's cluster client soon gives up.
        with pytest.raises(redis.exceptions.TryAgainError, match="Multiple keys request during rehashing"):
            asking(target, "EVAL", STORE_AND_PUBLISH, 2, sequence, events, "try again")
        with pytest.raises(redis.exceptions.ClusterError, match="TTL exhausted"):
            redis_cluster.client().eval(STORE_AND_PUBLISH, 2, sequence, events, "given up")
        # One that declares only its data key runs there, and nobody hears what it publishes.
        seen["receivers"] = asking(target, "EVAL", STORE_AND_PUBLISH_ARGV, 1, sequence, "lost", events)

    redis_cluster.migrate_slot(events, target, midway=midway)

    assert seen["receivers"] == 0
    assert on_source.get_message(timeout=2) == smessage(events, "plain")
    assert on_source.get_message(timeout=2)["type"] == "sunsubscribe"
    assert on_source.get_message(timeout=0.2) is None
    assert redis_cluster.client().get(sequence) == "1"  # the script that ran stored its part


def test_a_killed_master_just_drops_its_sharded_subscribers_and_its_promoted_replica_takes_over(
    fresh_redis_cluster, room, subscribe, connections, capsys
):
    cluster = fresh_redis_cluster
    events = f"{{{room}}}:events"
    master = cluster.master_of(events)
    replica = cluster.replica_of(master)
    raw = connections(master)
    raw.send("SSUBSCRIBE", events)
    assert raw.read(len(confirmed := resp_push("ssubscribe", events, 1))) == confirmed
    on_master = subscribe(cluster, master, events)
    on_replica = subscribe(cluster, replica, events)

    started = time.perf_counter()
    promoted = cluster.fail_over(master)
    show(capsys, f"fail_over (SIGKILL): {time.perf_counter() - started:.2f} s until the replica served")
    assert promoted == replica
    assert cluster.master_of(events) == promoted

    # The connection just ends: no push, no error reply first.
    assert raw.read(100) == b""
    assert raw.ended
    # redis-py, reading that end, reconnects at once (even with no retries), and raises its failure.
    with pytest.raises(redis.ConnectionError) as failed:
        on_master.get_message(timeout=1)
    assert failed.value.args[0] == f"Error 111 connecting to {HOST}:{master}. Connection refused."

    # A subscriber on the replica keeps its subscription through the promotion, and a fresh
    # SSUBSCRIBE on the new master works.
    assert on_replica.get_message(timeout=0.2) is None
    on_promoted = subscribe(cluster, promoted, events)
    assert cluster.client().spublish(events, "after") == 2
    assert on_replica.get_message(timeout=2) == smessage(events, "after")
    assert on_promoted.get_message(timeout=2) == smessage(events, "after")

    # The old master, restarted, comes back as the new one's replica; then a clean shutdown
    # (SIGTERM) of the new master: its subscribers see the same end of connection.
    started = time.perf_counter()
    cluster.restart(master)
    show(capsys, f"restart: {time.perf_counter() - started:.2f} s until it rejoined as a replica")
    assert cluster.replica_of(promoted) == master
    raw = connections(promoted)
    raw.send("SSUBSCRIBE", events)
    assert raw.read(len(confirmed := resp_push("ssubscribe", events, 1))) == confirmed
    started = time.perf_counter()
    assert cluster.fail_over(promoted, signal.SIGTERM) == master
    show(capsys, f"fail_over (SIGTERM): {time.perf_counter() - started:.2f} s until the replica served")
    assert raw.read(100) == b""
    assert raw.ended


def test_a_script_declaring_keys_of_two_slots_is_refused_with_crossslot(redis_cluster, room):
    here, there = (
        f"{{{room}}}:seq",
        next(
            key
            for number in itertools.count()
            if slot_of(key := f"{{{room}-{number}}}:seq") != slot_of(f"{{{room}}}:seq")
        ),
    )
    with (
        redis_cluster.node_client(redis_cluster.master_of(here)) as node,
        pytest.raises(redis.exceptions.ClusterCrossSlotError) as refused,
    ):
        node.eval("return 1", 2, here, there)
    assert refused.value.args[0] == "Keys in request don't hash to the same slot"


def test_an_undeclared_key_of_another_slot_on_the_same_master_is_refused_only_to_a_script_with_a_shebang(
    redis_cluster, room
):
    """Without a `#!lua` line, Redis 7.0 runs a script in its compatible mode, where only keys of
    another master are refused: one that touches a key of another slot on its own master runs,
    until a migration puts that slot elsewhere."""
    events = f"{{{room}}}:events"
    master = redis_cluster.master_of(events)
    candidates = (f"{{{room}-{number}}}:events" for number in itertools.count())
    same_master = next(
        key
        for key in candidates
        if slot_of(key) != slot_of(events) and redis_cluster.master_of(key) == master
    )
    other_master = next(key for key in candidates if redis_cluster.master_of(key) != master)
    publish_argv = "return redis.call('SPUBLISH', ARGV[1], 'x')"
    with redis_cluster.node_client(master) as node:
        assert node.eval(publish_argv, 1, events, same_master) == 0
        assert node.eval("#!lua flags=allow-cross-slot-keys\n" + publish_argv, 1, events, same_master) == 0
        with pytest.raises(
            redis.ResponseError, match=r"^Script attempted to access keys that do not hash to the same slot"
        ):
            node.eval("#!lua\n" + publish_argv, 1, events, same_master)
        for script in (publish_argv, "#!lua\n" + publish_argv):
            with pytest.raises(
                redis.ResponseError, match=r"^Script attempted to access a non local key in a cluster node"
            ):
                node.eval(script, 1, events, other_master)
