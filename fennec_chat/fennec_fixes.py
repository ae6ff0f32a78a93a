"""Every workaround of a Fennec 0.3.0 behaviour, in one place.

Each one names the upstream behaviour it works around, and tests/test_fennec_caveats.py asserts
that Fennec 0.3.0 still behaves that way: when a Fennec release fixes one, its test fails and
says which workaround to delete. The README lists them under "Fennec 0.3.0 caveats".

1. `Application.handle_lifespan` acknowledges startup and shutdown without running anything:
   `ChatApplication` adds `on_startup` and `on_shutdown` hooks.
2. `Application.handle_websocket` refuses an unknown path before the handshake (a browser
   then sees only 1006, no reason) and swallows handler exceptions without a trace (1011
   "Internal Error" after the accept; before it, nothing, and uvicorn answers 500):
   `ChatApplication` accepts, closes with 1008 and a reason, and logs what failed. (Our
   handlers accept first, so nothing can fail before the accept.)
3. `Router.match` cannot tell a wrong method from an unknown path, so both get 404:
   `ChatApplication` answers 405 with `Allow`. (It also adds `nosniff` to every response.)
4. `Application(docs_enabled=True)`, the default, serves a /docs page that loads Swagger UI
   from a CDN: server.py passes `docs_enabled=False`.
5. `WebSocket.receive_json` raises on bad JSON and skips binary frames: `incoming` reads the
   ASGI frames themselves, so that every bad frame gets an answer.
6. `WebSocketManager.broadcast` awaits each socket in turn while iterating the live set of a
   room (or the `connections` dict): one slow client stalls everyone, one dead socket aborts
   the rest of the fan-out, a leave mid-broadcast raises "Set (or dictionary) changed size
   during iteration"; and `room=""` broadcasts to everyone. `FanOutManager` keeps the
   API and routes every send through `_deliver`, which never awaits a socket.
7. `WebSocket` has no accessor for the query string: `query_params`.
8. Private or undocumented parts read here: `Application._websocket_routers`, `Router.routes`
   (each route's `pattern` and `methods`), the path parameters `WebSocketRouter.match` leaves
   on the shared route object (copied at once: the next match overwrites them; and a request
   for the template path itself, `/ws/chat/%7Broom%7D`, matches exactly and would get the
   *previous* connection's room: it gets the literal `{room}`, which the gate refuses), and
   `WebSocket.send`,
   the raw ASGI send (outbox.py: `send_text` adds a state check and a coroutine per event).
9. `fennec.security` imports `bcrypt`, which fennec-framework 0.3.0 requires only in its
   `full` extra (with redis, prometheus-client, psutil…): pyproject.toml asks for bcrypt alone.
10. Fennec routes a HEAD request nowhere: `Router.get` registers GET alone and `Router.match`
    compares methods exactly, so `HEAD /` gets 404 where a GET gets 200. `ChatApplication`
    answers HEAD as GET without the body (and lists HEAD in `Allow`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from fennec import Application, WebSocket, WebSocketManager

from .protocol import CloseCode, encode

logger = logging.getLogger("fennec_chat")

Hook = Callable[[], Awaitable[None]]


class StartupError(RuntimeError):
    """A start-up hook's failure that whoever starts the server can fix (a file in use or
    unreadable, Redis unreachable): its message says what and how, and it is reported as that
    one line, without a traceback. Any other exception in a hook is a bug, and logged as one."""


class ChatApplication(Application):
    """Fennec's `Application` with lifespan hooks (1), readable WebSocket refusals and logged
    handler failures (2), 405 and `nosniff` (3), and HEAD (10)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []

    async def handle_lifespan(self, scope: dict, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for hook in self.on_startup:
                        await hook()
                except StartupError as error:  # the server logs the message: one line
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                except Exception:
                    logger.exception("startup failed")  # the message is in the traceback
                    await send({"type": "lifespan.startup.failed", "message": ""})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in reversed(self.on_shutdown):
                    try:
                        await hook()
                    except Exception:
                        logger.exception("shutdown hook failed")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle_http(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_nosniff(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        async def send_headers_only(message: dict[str, Any]) -> None:  # HEAD (10)
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send_nosniff(message)

        respond = send_nosniff
        method = scope["method"]
        if method == "HEAD":  # a GET without the body: same status and headers (10)
            scope = {**scope, "method": "GET"}
            respond = send_headers_only
        allowed = self._methods_for(scope["path"])
        if allowed and scope["method"] not in allowed:
            allow = ", ".join(sorted(allowed))
            body = f"{method} is not allowed here; use {allow}\n".encode()
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", allow.encode())]
            headers.append((b"content-length", str(len(body)).encode()))
            await respond({"type": "http.response.start", "status": 405, "headers": headers})
            await respond({"type": "http.response.body", "body": body})
            return
        await super().handle_http(scope, receive, respond)

    def _methods_for(self, path: str) -> set[str]:
        """The methods of the routes that match `path` (none: it is not one of ours), HEAD
        wherever there is GET (10)."""
        methods = {
            method for route in self.router.routes if route.pattern.match(path) for method in route.methods
        }
        return methods | {"HEAD"} if "GET" in methods else methods

    async def handle_websocket(self, scope: dict, receive: Callable, send: Callable) -> None:
        for router in self._websocket_routers:
            route = await router.match(scope["path"])
            if route is not None:
                break
        else:
            websocket = WebSocket(scope, receive, send)
            await websocket.accept()
            await websocket.close(
                CloseCode.POLICY_VIOLATION, "no such endpoint: use /ws/chat/{room} or /ws/lobby"
            )
            return

        websocket = WebSocket(scope, receive, send)
        if route.path == scope["path"]:  # the template itself (/ws/chat/%7Broom%7D): see (8)
            params = {name: f"{{{name}}}" for name in re.findall(r"\{(\w+)\}", route.path)}
        else:
            params = dict(route.path_params)  # read at once: the next match overwrites them
        try:
            await route.handler(websocket, **params)
        except Exception:
            logger.exception("WebSocket handler for %s failed", scope["path"])
            with contextlib.suppress(Exception):  # the socket may be gone already
                await websocket.close(CloseCode.INTERNAL_ERROR, "internal error")


async def incoming(
    websocket: WebSocket, is_open: Callable[[], bool], closed_with: Callable[[int], None] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The frames a client sends (ASGI `websocket.receive` events: `text` or `bytes`), until it
    disconnects (`closed_with` hears its close code; 1006: none) or `is_open()` turns false
    (the server dropped it). (5)"""
    while True:
        frame = await websocket.receive()
        if frame["type"] == "websocket.disconnect":
            if closed_with is not None:
                closed_with(frame.get("code", 1005))
            return
        if not is_open():
            return
        if frame["type"] == "websocket.receive":  # not the opening "websocket.connect"
            yield frame


def query_params(websocket: WebSocket) -> dict[str, str]:
    """The connect URL's query parameters, the first value of each. (7)"""
    query = parse_qs(websocket.scope.get("query_string", b"").decode("latin-1"))
    return {name: values[0] for name, values in query.items()}


class FanOutManager(WebSocketManager):
    """Fennec's `WebSocketManager` (its `connections` and `rooms`, `connect`, `join_room`,
    `send_json`, `broadcast_json`…) with sends that never await a socket. (6)

    Subclasses say how an encoded event reaches its recipients (`_deliver`) and how a room
    event reaches a room (`_publish_to_room`, through every process that serves it).
    """

    @abstractmethod
    def _deliver(self, text: str, recipients: Iterable[str]) -> None:
        """Hand one encoded event to each recipient, without waiting for any of them."""

    @abstractmethod
    def _publish_to_room(self, room: str, text: str, exclude: str | None) -> None:
        """Hand one encoded event to everyone in `room` but `exclude`."""

    async def send_message(self, client_id: str, message: str) -> None:
        self._deliver(message, (client_id,))

    async def send_json(self, client_id: str, data: Any) -> None:
        self._deliver(encode(data), (client_id,))

    async def broadcast(self, message: str, room: str | None = None, exclude: str | None = None) -> None:
        if room is None:  # everyone on this process: a snapshot, not the live set
            self._deliver(message, [cid for cid in self.connections if cid != exclude])
        else:
            self._publish_to_room(room, message, exclude)

    async def broadcast_json(self, data: Any, room: str | None = None, exclude: str | None = None) -> None:
        await self.broadcast(encode(data), room, exclude)  # encoded once, whatever the recipients
