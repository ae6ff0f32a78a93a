"""Fennec's Application with the two things a long-running WebSocket server needs from it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fennec import Application, WebSocket

from .protocol import CloseCode

logger = logging.getLogger("fennec_chat")

Hook = Callable[[], Awaitable[None]]


class ChatApplication(Application):
    """A Fennec `Application` with startup/shutdown hooks, readable WebSocket refusals, 405s
    and `nosniff` on every response.

    Fennec 0.3.0 acknowledges ASGI lifespan events without running anything, refuses an
    unknown WebSocket path before the handshake (a browser then sees only code 1006, no
    reason), swallows handler exceptions without a trace, and answers a known path with the
    wrong method with 404. This class fixes all four.
    """

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
                except Exception as error:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
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

        allowed = self._methods_for(scope["path"])
        if allowed and scope["method"] not in allowed:
            body = f"{scope['method']} is not allowed here; use {', '.join(sorted(allowed))}\n".encode()
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"allow", ", ".join(sorted(allowed)).encode()),
            ]
            await send_nosniff({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await super().handle_http(scope, receive, send_nosniff)

    def _methods_for(self, path: str) -> set[str]:
        """The methods of the routes that match `path` (none: it is not one of ours)."""
        return {
            method for route in self.router.routes if route.pattern.match(path) for method in route.methods
        }

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
        try:
            await route.handler(websocket, **route.path_params)
        except Exception:
            logger.exception("WebSocket handler for %s failed", scope["path"])
            with contextlib.suppress(Exception):  # the socket may be gone already
                await websocket.close(CloseCode.INTERNAL_ERROR, "internal error")
