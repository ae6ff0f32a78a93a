"""Fennec 0.3.0 still behaves the way fennec_chat/fennec_fixes.py works around.

Each test pins one upstream behaviour of *plain* Fennec (`fennec.Application`, `WebSocket`,
`WebSocketManager`…, never our subclasses), numbered like the caveats in the docstring of
fennec_chat/fennec_fixes.py. When a Fennec release changes one, its test fails, and the failure
message names the workaround that has become dead weight (or wrong) and should be deleted.

Some tests drive Fennec through the ASGI protocol itself, with plain `receive` and `send`
callables; the ones about what a client sees run a real uvicorn server (in a thread, on a free
loopback port, with uvicorn's websockets-sansio protocol as in production) and a real
`websockets` client.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
import uvicorn
from fennec import Application, Response, Router, WebSocket, WebSocketManager, WebSocketRouter
from fennec.websocket import WebSocketException
from packaging.requirements import Requirement
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

FIXES = "fennec_fixes.py"


# --- Plain ASGI callables and a plain Fennec app -------------------------------------------------


class Peer:
    """The server side of one ASGI connection: `receive` hands out queued events, `send`
    records what the app sends."""

    def __init__(self, *events: dict[str, Any]) -> None:
        self.incoming = list(events)
        self.received = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        return self.incoming.pop(0)

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def websocket_scope(path: str, query_string: bytes = b"") -> dict[str, Any]:
    return {"type": "websocket", "path": path, "query_string": query_string, "headers": []}


async def accept_then_fail(websocket: WebSocket) -> None:
    await websocket.accept()
    raise ValueError("handler bug")


async def fail_before_accepting(websocket: WebSocket) -> None:
    raise ValueError("handler bug")


def plain_fennec_app() -> Application:
    """Fennec's own `Application`, with its defaults (docs included), one HTTP route and the
    WebSocket endpoints the tests need."""
    app = Application()
    http = Router()

    @http.get("/thing")
    async def thing(request: Any) -> Response:
        return Response("thing", status_code=200, headers={"content-type": "text/plain"})

    app.include_router(http)
    ws = WebSocketRouter()
    ws.add_route("/ws/fail-after-accept", accept_then_fail)
    ws.add_route("/ws/fail-before-accept", fail_before_accepting)
    app.include_websocket_router(ws)
    return app


@pytest.fixture(scope="module")
def fennec_server() -> Iterator[str]:
    """A real uvicorn serving `plain_fennec_app()`; yields its host:port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()
    config = uvicorn.Config(
        plain_fennec_app(),
        lifespan="on",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_config=None,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn exited while starting"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.01)
    yield f"{host}:{port}"
    server.should_exit = True
    thread.join(10)
    listener.close()


async def raised_by(awaitable: Awaitable[Any]) -> Exception | None:
    """The exception `awaitable` raises, if any (so that a test can say what changed)."""
    try:
        await awaitable
    except Exception as error:
        return error
    return None


def http_request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- The version all of this was checked against ------------------------------------------------


def test_fennec_is_still_version_0_3_0():
    version = importlib.metadata.version("fennec-framework")
    assert version == "0.3.0", (
        f"fennec-framework is now {version}: re-check every caveat in the docstring of {FIXES} "
        "(and the README's 'Fennec 0.3.0 caveats'), then update the pin in pyproject.toml and here"
    )


# --- 1. Lifespan --------------------------------------------------------------------------------


async def test_fennec_lifespan_acknowledges_startup_and_shutdown_without_running_hooks():
    app = Application()
    hook_names = ("on_startup", "on_shutdown", "on_event", "add_event_handler", "lifespan", "startup")
    offered = [name for name in hook_names if hasattr(app, name)]
    assert offered == [], (
        f"Fennec's Application now offers {offered}: if it runs lifespan hooks itself, delete "
        f"ChatApplication.handle_lifespan and its on_startup/on_shutdown lists ({FIXES}, caveat 1)"
    )

    ran: list[str] = []

    async def hook() -> None:
        ran.append("hook")

    # Hooks put where ChatApplication keeps them are ignored by Fennec's own handle_lifespan.
    app.on_startup = [hook]  # type: ignore[attr-defined]
    app.on_shutdown = [hook]  # type: ignore[attr-defined]
    lifespan = Peer({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"})
    await asyncio.wait_for(app({"type": "lifespan"}, lifespan.receive, lifespan.send), 5)

    assert lifespan.sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert ran == [], (
        f"Fennec now runs lifespan hooks itself: delete ChatApplication.handle_lifespan ({FIXES}, caveat 1)"
    )


# --- 2. WebSocket refusals and handler failures ------------------------------------------------


async def test_fennec_closes_an_unknown_websocket_path_before_accepting():
    app = plain_fennec_app()
    peer = Peer({"type": "websocket.connect"})
    await asyncio.wait_for(app(websocket_scope("/ws/nowhere"), peer.receive, peer.send), 5)
    assert peer.sent == [{"type": "websocket.close", "code": 1000, "reason": "Not Found"}], (
        "Fennec now answers an unknown WebSocket path differently: if it accepts and closes with "
        "a code and reason a browser can read, delete the refusal in ChatApplication.handle_websocket "
        f"({FIXES}, caveat 2)"
    )


async def test_fennec_unknown_websocket_path_reaches_a_client_as_http_403_with_no_reason(fennec_server):
    try:
        ws = await connect(f"ws://{fennec_server}/ws/nowhere", open_timeout=5)
    except InvalidStatus as refused:
        response = refused.response
    else:
        await ws.close()
        response = None
    assert response is not None, (
        "An unknown WebSocket path now completes the handshake: if the client gets a close code "
        f"and reason, delete the refusal in ChatApplication.handle_websocket ({FIXES}, caveat 2)"
    )
    assert response.status_code == 403
    assert b"Not Found" not in response.body  # the reason Fennec gave never reaches the client


async def test_fennec_swallows_a_websocket_handler_exception_without_logging_it(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    app = plain_fennec_app()

    after_accept = Peer({"type": "websocket.connect"})
    await asyncio.wait_for(
        app(websocket_scope("/ws/fail-after-accept"), after_accept.receive, after_accept.send), 5
    )
    before_accept = Peer({"type": "websocket.connect"})
    await asyncio.wait_for(
        app(websocket_scope("/ws/fail-before-accept"), before_accept.receive, before_accept.send), 5
    )

    assert after_accept.sent == [
        {"type": "websocket.accept"},
        {"type": "websocket.close", "code": 1011, "reason": "Internal Error"},
    ], (
        "Fennec now closes a failed WebSocket handler differently: re-check the close in "
        f"ChatApplication.handle_websocket ({FIXES}, caveat 2)"
    )
    # Before the handshake Fennec's close() is a no-op: the app returns having sent nothing
    # (uvicorn then answers HTTP 500).
    assert before_accept.sent == []
    output = capsys.readouterr()
    traces = [record.getMessage() for record in caplog.records] + [output.out, output.err]
    assert not any("handler bug" in trace or "ValueError" in trace for trace in traces), (
        "Fennec now reports WebSocket handler exceptions: delete the logger.exception in "
        f"ChatApplication.handle_websocket ({FIXES}, caveat 2)"
    )
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [], (
        "Fennec now logs something when a WebSocket handler fails: if it names the exception, "
        f"delete the logger.exception in ChatApplication.handle_websocket ({FIXES}, caveat 2)"
    )


async def test_fennec_websocket_handler_failure_reaches_a_client_as_1011_internal_error(fennec_server):
    async with connect(f"ws://{fennec_server}/ws/fail-after-accept", open_timeout=5) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "Internal Error"), (
        "Fennec now closes a failed WebSocket handler differently: re-check the close in "
        f"ChatApplication.handle_websocket ({FIXES}, caveat 2)"
    )


# --- 3. Wrong method ---------------------------------------------------------------------------


def test_fennec_answers_a_wrong_method_with_404_like_an_unknown_path(fennec_server):
    wrong_method = http_request(f"http://{fennec_server}/thing", method="POST")
    unknown_path = http_request(f"http://{fennec_server}/nothing-here", method="POST")
    assert http_request(f"http://{fennec_server}/thing")[0] == 200
    assert wrong_method[0] == 404, (
        f"Fennec now answers a wrong method with {wrong_method[0]}: if that is 405 with Allow, "
        f"delete the 405 in ChatApplication.handle_http and _methods_for ({FIXES}, caveat 3)"
    )
    assert wrong_method[2] == unknown_path[2]
    assert "allow" not in {name.lower() for name in wrong_method[1]}
    assert "x-content-type-options" not in {name.lower() for name in wrong_method[1]}, (
        "Fennec now sends X-Content-Type-Options itself: delete send_nosniff in "
        f"ChatApplication.handle_http ({FIXES}, caveat 3)"
    )


# --- 4. /docs -----------------------------------------------------------------------------------


def test_fennec_serves_docs_from_a_cdn_by_default(fennec_server):
    assert inspect.signature(Application).parameters["docs_enabled"].default is True, (
        f"Fennec's docs are now off by default: drop docs_enabled=False in server.py ({FIXES}, caveat 4)"
    )
    status, _, body = http_request(f"http://{fennec_server}/docs")
    assert status == 200, (
        f"Application() no longer serves /docs: drop docs_enabled=False in server.py ({FIXES}, caveat 4)"
    )
    assert b"https://cdn.jsdelivr.net/" in body, (
        "Fennec's /docs page no longer loads Swagger UI from a CDN: docs_enabled=False in server.py "
        f"is no longer needed for that reason ({FIXES}, caveat 4)"
    )


# --- 5. receive_json ----------------------------------------------------------------------------


async def test_fennec_receive_json_raises_on_invalid_json():
    peer = Peer({"type": "websocket.receive", "text": "{not json"})
    websocket = WebSocket(websocket_scope("/ws"), peer.receive, peer.send)
    error = await raised_by(websocket.receive_json())
    assert isinstance(error, json.JSONDecodeError), (
        f"Fennec's receive_json no longer raises on invalid JSON (it gave {error!r}): if it also "
        f"returns binary frames, `incoming` can go back to receive_json ({FIXES}, caveat 5)"
    )


async def test_fennec_receive_json_skips_binary_frames_silently():
    peer = Peer(
        {"type": "websocket.receive", "bytes": b'{"type": "binary"}'},
        {"type": "websocket.receive", "text": '{"type": "text"}'},
    )
    websocket = WebSocket(websocket_scope("/ws"), peer.receive, peer.send)
    assert await websocket.receive_json() == {"type": "text"}, (
        "Fennec's receive_json now returns binary frames: if it also answers bad JSON without "
        f"raising, `incoming` can go back to receive_json ({FIXES}, caveat 5)"
    )
    assert peer.received == 2  # the binary frame was read and dropped
    assert peer.sent == []  # and the client was told nothing


# --- 6. WebSocketManager.broadcast --------------------------------------------------------------


class Client:
    """A real Fennec WebSocket, connected, over an ASGI send that records what it is given and
    can be made to block (a client that does not read) or to fail."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.entered = asyncio.Event()
        self.release: asyncio.Event | None = None
        self.websocket = WebSocket(websocket_scope("/ws"), self._receive, self._send)
        self.websocket.client_state = "connected"

    async def _receive(self) -> dict[str, Any]:
        raise AssertionError("not used")

    async def _send(self, message: dict[str, Any]) -> None:
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        self.texts.append(message["text"])


async def manager_with_clients(room: str | None, count: int = 4) -> tuple[WebSocketManager, list[Client]]:
    """A Fennec manager with `count` clients (in `room`, if any), listed in the order
    `broadcast` visits them (string hashing, hence set order, changes between runs)."""
    manager = WebSocketManager()
    by_id: dict[str, Client] = {}
    for _ in range(count):
        client = Client()
        client_id = await manager.connect(client.websocket)
        if room is not None:
            manager.join_room(client_id, room)
        by_id[client_id] = client
    order = list(manager.rooms[room]) if room is not None else list(manager.connections)
    return manager, [by_id[client_id] for client_id in order]


async def let_everything_run() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("room", ["lobby", None], ids=["room", "everyone"])
async def test_fennec_broadcast_stalls_everyone_behind_a_blocked_socket(room):
    manager, clients = await manager_with_clients(room)
    blocked, others = clients[0], clients[1:]
    blocked.release = asyncio.Event()

    broadcast = asyncio.create_task(manager.broadcast("hello", room=room))
    await asyncio.wait_for(blocked.entered.wait(), 5)
    await let_everything_run()
    try:
        assert not broadcast.done()
        assert [client.texts for client in others] == [[]] * len(others), (
            "Fennec's broadcast no longer waits for a blocked socket before the next: "
            f"FanOutManager may go back to Fennec's broadcast ({FIXES}, caveat 6)"
        )
    finally:
        blocked.release.set()
    await asyncio.wait_for(broadcast, 5)
    assert [client.texts for client in clients] == [["hello"]] * len(clients)


@pytest.mark.parametrize("room", ["lobby", None], ids=["room", "everyone"])
async def test_fennec_broadcast_stops_at_the_first_failing_socket(room):
    manager, clients = await manager_with_clients(room)
    dead = clients[1]  # the second one visited: the first shows the fan-out had begun
    dead.websocket.client_state = "disconnected"  # Fennec's own "WebSocket not connected" error

    error = await raised_by(manager.broadcast("hello", room=room))
    assert isinstance(error, WebSocketException), (
        f"Fennec's broadcast no longer raises the error of a dead socket (it gave {error!r}): "
        f"FanOutManager may go back to Fennec's broadcast ({FIXES}, caveat 6)"
    )
    assert "not connected" in str(error)
    assert clients[0].texts == ["hello"]
    assert [client.texts for client in clients[2:]] == [[]] * (len(clients) - 2), (
        "Fennec's broadcast no longer aborts the fan-out at a dead socket: "
        f"FanOutManager may go back to Fennec's broadcast ({FIXES}, caveat 6)"
    )


@pytest.mark.parametrize(
    ("room", "error"),
    [("lobby", "Set changed size during iteration"), (None, "dictionary changed size during iteration")],
    ids=["room", "everyone"],
)
async def test_fennec_broadcast_raises_when_someone_leaves_mid_broadcast(room, error):
    manager, clients = await manager_with_clients(room)
    blocked = clients[0]
    blocked.release = asyncio.Event()

    broadcast = asyncio.create_task(manager.broadcast("hello", room=room))
    await asyncio.wait_for(blocked.entered.wait(), 5)
    await manager.disconnect(clients[-1].websocket.client_id)  # a leave while the fan-out waits
    blocked.release.set()
    raised = await raised_by(asyncio.wait_for(broadcast, 5))
    assert isinstance(raised, RuntimeError), (
        f"Fennec's broadcast now survives a leave mid-broadcast (it gave {raised!r}): "
        f"FanOutManager may go back to Fennec's broadcast ({FIXES}, caveat 6)"
    )
    assert error in str(raised)
    assert [client.texts for client in clients[1:]] == [[]] * (len(clients) - 1), (
        "Fennec's broadcast now survives a leave mid-broadcast: "
        f"FanOutManager may go back to Fennec's broadcast ({FIXES}, caveat 6)"
    )


# --- 7. Query string ----------------------------------------------------------------------------


def test_fennec_websocket_has_no_query_params():
    peer = Peer()
    websocket = WebSocket(websocket_scope("/ws", b"username=ada"), peer.receive, peer.send)
    assert not hasattr(websocket, "query_params"), (
        f"Fennec's WebSocket now has query_params: delete query_params() and use it ({FIXES}, caveat 7)"
    )
    assert websocket.scope["query_string"] == b"username=ada"  # what our query_params() reads


# --- 8. Private and undocumented parts we read --------------------------------------------------


def test_fennec_application_keeps_websocket_routers_in_a_private_list():
    app = Application(docs_enabled=False)
    router = WebSocketRouter()
    app.include_websocket_router(router)
    assert getattr(app, "_websocket_routers", None) == [router], (
        "Application._websocket_routers is gone or changed: ChatApplication.handle_websocket "
        f"reads it ({FIXES}, caveat 8)"
    )


def test_fennec_router_routes_carry_a_regex_pattern_and_methods():
    app = Application(docs_enabled=False)
    router = Router()

    @router.get("/rooms/{room}")
    async def rooms(request: Any) -> Response:
        return Response("")

    app.include_router(router)
    routes = [route for route in app.router.routes if route.path == "/rooms/{room}"]
    assert len(routes) == 1, (
        f"Router.routes changed: ChatApplication._methods_for reads it ({FIXES}, caveat 8)"
    )
    route = routes[0]
    assert isinstance(route.pattern, re.Pattern), (
        "Route.pattern is no longer a compiled regex: ChatApplication._methods_for uses it "
        f"({FIXES}, caveat 8)"
    )
    assert route.pattern.match("/rooms/lobby")
    assert not route.pattern.match("/rooms/lobby/more")
    assert route.methods == ["GET"], (
        f"Route.methods changed: ChatApplication._methods_for reads it ({FIXES}, caveat 8)"
    )


async def test_fennec_websocket_router_match_leaves_path_params_on_a_shared_route():
    router = WebSocketRouter()

    @router.websocket("/ws/chat/{room}")
    async def chat(websocket: WebSocket, room: str) -> None:
        pass

    assert inspect.iscoroutinefunction(router.match)
    first = await router.match("/ws/chat/first")
    assert first is not None
    assert first.handler is chat
    assert first.path_params == {"room": "first"}
    second = await router.match("/ws/chat/second")
    assert second is first, (
        "WebSocketRouter.match now returns a fresh match: ChatApplication.handle_websocket no longer "
        f"needs to read path_params before anything awaits ({FIXES}, caveat 8)"
    )
    assert first.path_params == {"room": "second"}  # the first match's parameters are overwritten


async def test_fennec_websocket_router_hands_the_literal_template_path_the_last_match_params():
    """Found while pinning caveat 8: the exact-path branch of `WebSocketRouter.match` returns the
    shared route without resetting `path_params`. A client asking for /ws/chat/%7Broom%7D (which
    uvicorn decodes to the template itself) gets the room of the previous connection."""
    router = WebSocketRouter()

    @router.websocket("/ws/chat/{room}")
    async def chat(websocket: WebSocket, room: str) -> None:
        pass

    await router.match("/ws/chat/someone-elses-room")
    literal = await router.match("/ws/chat/{room}")
    assert literal is not None
    assert literal.path_params == {"room": "someone-elses-room"}, (
        "WebSocketRouter.match no longer hands the literal template path the previous match's "
        "parameters: the guard against it in ChatApplication.handle_websocket can go "
        f"({FIXES}, caveat 8)"
    )


def test_fennec_websocket_send_and_receive_are_the_raw_asgi_callables():
    peer = Peer()
    websocket = WebSocket(websocket_scope("/ws"), peer.receive, peer.send)
    assert websocket.send == peer.send, (
        "WebSocket.send is no longer the raw ASGI send: outbox.py's writer sends through it "
        f"({FIXES}, caveat 8)"
    )
    assert websocket.receive == peer.receive, (
        "WebSocket.receive is no longer the raw ASGI receive: `incoming` reads frames through it "
        f"({FIXES}, caveats 5 and 8)"
    )


# --- 9. bcrypt ----------------------------------------------------------------------------------


def test_fennec_security_imports_bcrypt_which_the_distribution_does_not_require():
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['bcrypt'] = None; import fennec.security"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert blocked.returncode != 0, (
        "fennec.security now imports without bcrypt: delete bcrypt from pyproject.toml's "
        f"dependencies ({FIXES}, caveat 9)"
    )
    assert "bcrypt" in blocked.stderr, blocked.stderr

    requirements = [Requirement(line) for line in importlib.metadata.requires("fennec-framework") or []]
    unconditional = [req.name.lower() for req in requirements if req.marker is None]
    assert "bcrypt" not in unconditional, (
        "fennec-framework now requires bcrypt itself: delete bcrypt from pyproject.toml's "
        f"dependencies ({FIXES}, caveat 9)"
    )
    # It is declared, but only in the optional `full` extra (with redis, websockets, psutil...).
    extras = [str(req.marker) for req in requirements if req.name.lower() == "bcrypt"]
    assert extras == ['extra == "full"']


# --- 10. HEAD -----------------------------------------------------------------------------------


async def test_fennec_routes_a_head_request_nowhere(fennec_server):
    assert http_request(f"http://{fennec_server}/thing")[0] == 200
    status, _, _ = http_request(f"http://{fennec_server}/thing", method="HEAD")
    assert status == 404, (
        f"Fennec now answers HEAD for a GET route with {status}: if that is 200 without a body, delete "
        f"the HEAD in ChatApplication.handle_http and _methods_for ({FIXES}, caveat 10)"
    )
    route = await plain_fennec_app().router.match("/thing", "HEAD")
    assert route is None, (
        "Fennec's Router.match now finds a GET route for HEAD: delete the HEAD in "
        f"ChatApplication.handle_http and _methods_for ({FIXES}, caveat 10)"
    )
