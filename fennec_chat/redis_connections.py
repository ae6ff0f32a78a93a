"""Which Redis: one server (`redis://`) or a Redis Cluster (`redis+cluster://`), chosen by URL.

The backplane asks this module for its clients and for a subscriber, and otherwise does not care
which it has: the commands are the same, and the key names (redis_scripts.RedisKeys) put all of
one room's keys in one hash slot of a cluster, so each room's scripts run on one shard.

On a cluster, room events travel on sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7): a message
reaches only the shard that holds its room, where classic PUBLISH is copied to every node.
redis-py's ClusterPubSub follows a moved slot on its own, silently; a subscription that moves
may miss what was published meanwhile, so `ShardedSubscriber` reports the move instead, and the
backplane reconnects and catches up from each room's history (`since`), as after any outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

OPTIONS: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": 2, "socket_timeout": 5}
READ_CONNECTIONS = 32  # one server: at most, for one process's reads; more wait for a free one
READ_CONNECTIONS_PER_NODE = 256  # a cluster: redis-py raises past it rather than wait
# What a lost Redis raises: redis-py's cluster errors are not all RedisErrors.
UNAVAILABLE = (RedisError, RedisClusterException, OSError)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The plain URL of a cluster's first node for `redis+cluster://…`; None for one server."""
    scheme, separator, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    return f"{plain}://{rest}" if separator and plain else None


class Connections:
    """The clients of one backplane: reads (a pool), and connections of their own that never
    retry by themselves (a failed publish is reported to its sender, who may send again with
    the same client_msg_id; a silent retry could store it twice)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.node_url = cluster_url(url)
        self.cluster = self.node_url is not None
        self.reads: Any = self._reads()

    def _reads(self) -> Any:
        if self.node_url is not None:
            return RedisCluster.from_url(self.node_url, max_connections=READ_CONNECTIONS_PER_NODE, **OPTIONS)
        # A crowd joining at once waits for a free connection rather than failing: redis-py's
        # own pool raises "Too many connections" past 100 commands in flight.
        pool = redis.BlockingConnectionPool.from_url(
            self.url, max_connections=READ_CONNECTIONS, timeout=OPTIONS["socket_timeout"], **OPTIONS
        )
        return redis.Redis(connection_pool=pool)

    def own(self) -> Any:
        """A connection (on a cluster: a client) of its own, which never retries."""
        no_retry = Retry(NoBackoff(), 0)
        if self.node_url is None:
            return redis.from_url(self.url, retry=no_retry, single_connection_client=True, **OPTIONS)
        # Every node the reads client knows, so that a new client finds the cluster even when
        # the node named in the URL is the one that failed.
        known = [ClusterNode(node.host, node.port) for node in self.reads.get_nodes()]
        return RedisCluster.from_url(self.node_url, startup_nodes=known, retry=no_retry, **OPTIONS)

    def subscriber(self) -> Any:
        return ShardedSubscriber(self.reads) if self.cluster else self.reads.pubsub()

    async def forget_stale(self) -> None:
        """After an outage: connections to a Redis that went away are stale."""
        with contextlib.suppress(Exception):
            if self.cluster:
                await self.reads.nodes_manager.initialize()  # where each slot lives now
            else:
                await self.reads.connection_pool.disconnect()


class ShardedSubscriber:
    """SSUBSCRIBE on the shard that holds each channel: one connection per shard, one reader
    task per connection, their messages merged into one inbox. Speaks like redis-py's PubSub
    (`subscribe`, `unsubscribe`, `get_message` with types `subscribe` and `message`), so the
    backplane's listener serves one server and a cluster alike.

    A subscription that ends without being asked to (its slot moved to another shard, which
    sends `sunsubscribe`) or a shard connection that fails is raised from `get_message`: the
    listener then starts over and catches up, so nothing published meanwhile is lost."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster
        self._shards: dict[str, Any] = {}  # node name → its PubSub
        self._readers: list[asyncio.Task] = []
        self._inbox: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self._leaving: Counter[str] = Counter()  # channel → SUNSUBSCRIBEs we sent, unconfirmed

    async def subscribe(self, *channels: str) -> None:
        if not self._shards:
            await self._cluster.initialize()
        for channel in channels:
            await self._shard_of(channel).ssubscribe(channel)

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            self._leaving[channel] += 1
            await self._shard_of(channel).sunsubscribe(channel)

    def _shard_of(self, channel: str) -> Any:
        node = self._cluster.get_node_from_key(channel)
        shard = self._shards.get(node.name)
        if shard is None:
            # No retries: a shard that fails is reported at once (redis-py's default retries
            # took 4 s), and the listener starts over.
            client = redis.Redis(host=node.host, port=node.port, retry=Retry(NoBackoff(), 0), **OPTIONS)
            shard = self._shards[node.name] = client.pubsub()
            self._readers.append(asyncio.create_task(self._read(shard), name=f"redis-shard-{node.name}"))
        return shard

    async def _read(self, shard: Any) -> None:
        try:
            while True:
                if not shard.subscribed:  # nothing to read yet (or any more)
                    await asyncio.sleep(0.05)
                    continue
                message = await shard.get_message(timeout=1.0)
                if message is not None:
                    self._inbox.put_nowait(self._translated(message))
        except asyncio.CancelledError:
            raise
        except UNAVAILABLE as error:
            self._inbox.put_nowait(error)

    def _translated(self, message: dict[str, Any]) -> dict[str, Any] | Exception:
        kind, channel = message["type"], message["channel"]
        if kind == "sunsubscribe":
            if self._leaving[channel] > 0:
                self._leaving[channel] -= 1
                if not self._leaving[channel]:
                    del self._leaving[channel]
                return {**message, "type": "unsubscribe"}
            return RedisError(f"the shard of {channel} stopped serving it (slot moved or failover)")
        return {**message, "type": {"smessage": "message", "ssubscribe": "subscribe"}.get(kind, kind)}

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for shard in self._shards.values():
            with contextlib.suppress(Exception):
                await shard.aclose()
