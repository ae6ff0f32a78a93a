"""Fixtures: a real server process on a free loopback port, and real WebSocket clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.async_api import async_playwright

from fennec_chat.redis_scripts import RedisKeys
from tests.browser import CHROMIUM_ARGS, chromium_path, optional_part_missing
from tests.redis_cluster import RedisCluster
from tests.redis_process import RedisProcess
from tests.server_process import ServerProcess, log_path

# These modules test the protocol itself: each of their tests runs on our fast WebSocket protocol
# and on uvicorn's stock one (--ws-protocol stock, which the server also falls back to when this
# uvicorn lacks what the fast one needs: fennec_chat/uvicorn_contract.py).
ON_BOTH_PROTOCOLS = {"test_chat_room", "test_bad_input", "test_fanout"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if "ws_protocol" in metafunc.fixturenames and module in ON_BOTH_PROTOCOLS:
        metafunc.parametrize("ws_protocol", ["fast", "stock"])


@pytest.fixture
def ws_protocol() -> str:
    return "fast"


@pytest.fixture(scope="session")
def fast_server() -> Iterator[ServerProcess]:
    process = ServerProcess([], {}, log_path("shared")).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def stock_server() -> Iterator[ServerProcess]:
    process = ServerProcess(["--ws-protocol", "stock"], {}, log_path("shared-stock")).start()
    yield process
    process.stop()


@pytest.fixture
def server(ws_protocol: str, request: pytest.FixtureRequest) -> ServerProcess:
    """A server shared by the tests that only need the defaults (each uses its own rooms)."""
    return request.getfixturevalue(f"{ws_protocol}_server")


@pytest.fixture(scope="session")
def limited_server() -> Iterator[ServerProcess]:
    """A shared server with the production rate limits, for the browser tests."""
    process = ServerProcess([], {}, log_path("limited"), limits=True).start()
    yield process
    process.stop()


@pytest.fixture
def start_server(request: pytest.FixtureRequest, ws_protocol: str) -> Iterator[Callable[..., ServerProcess]]:
    """Start a dedicated server with extra flags or environment; stopped after the test."""
    started: list[ServerProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, limits: bool = False, plain_uvicorn: bool = False
    ) -> ServerProcess:
        if ws_protocol != "fast":
            args = (*args, "--ws-protocol", ws_protocol)
        name = f"{request.node.name}-{len(started)}"
        process = ServerProcess(
            list(args), env or {}, log_path(name), limits=limits, plain_uvicorn=plain_uvicorn
        ).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    """A room name no other test uses."""
    readable = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[-40:]
    return f"t-{readable}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def browser():
    """A real Chromium (see tests/browser.py); skipped without one, except in CI."""
    executable = chromium_path()
    if executable is None:
        optional_part_missing("no Chromium found: install one or set CHAT_CHROMIUM to its path")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisProcess]:
    """A real redis-server on a free port (skipped without one, except in CI)."""
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


@dataclass
class RedisBackend:
    """Where a test's chat processes meet: one Redis or a Redis Cluster, under a key prefix."""

    url: str
    prefix: str
    server: RedisProcess | RedisCluster

    @property
    def cluster(self) -> bool:
        return isinstance(self.server, RedisCluster)

    @property
    def flags(self) -> tuple[str, ...]:
        return ("--redis-url", self.url, "--redis-prefix", self.prefix)

    def client(self) -> Any:
        return self.server.client()

    def key(self, room: str, what: str) -> str:
        """The name of one of a room's keys, as the server names it here."""
        return RedisKeys(self.prefix, cluster=self.cluster).room(room, what)


@pytest.fixture(params=["one-redis", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> RedisBackend:
    """The test runs twice: on one redis-server of its own, and on the shared Redis Cluster
    under a key prefix of its own (so that its processes never meet another test's)."""
    if request.param == "one-redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        return RedisBackend(server.url, "fennec-chat:", server)
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return RedisBackend(cluster.url, f"t-{uuid.uuid4().hex[:8]}:", cluster)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real Redis Cluster, 3 masters + 3 replicas (tests/redis_cluster.py), shared by the tests:
    each keeps to keys and channels of its own (a {hash tag} from the `room` fixture). Moving a
    slot (migrate_slot) leaves it whole; a test that kills a node takes `fresh_redis_cluster`."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_redis_cluster(tmp_path) -> Iterator[RedisCluster]:
    """A Redis Cluster of the test's own (about 2 s to start), for failovers and restarts."""
    cluster = RedisCluster(tmp_path / "redis-cluster").start()
    yield cluster
    cluster.stop()
