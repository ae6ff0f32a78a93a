"""A real WebSocket client for tests, with helpers to wait for and inspect chat events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class ChatClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.history: dict[str, Any] | None = None

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> ChatClient:
        kwargs.setdefault("open_timeout", 10)
        kwargs.setdefault("max_size", None)
        # Keep reading even when a test does not: a paused reader could not see the close frame.
        kwargs.setdefault("max_queue", None)
        return cls(await connect(url, **kwargs))

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def next(self, timeout: float = 5) -> dict[str, Any]:
        """The very next event, whatever it is."""
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def expect(self, type: str, timeout: float = 5, **fields: Any) -> dict[str, Any]:
        """The very next event, which must have this type and these field values."""
        event = await self.next(timeout)
        assert event["type"] == type, event
        for name, value in fields.items():
            assert event[name] == value, (name, event)
        return event

    async def wait_for(self, type: str, timeout: float = 5, **fields: Any) -> dict[str, Any]:
        """The first event of this type with these field values, skipping others."""

        async def first_match() -> dict[str, Any]:
            while True:
                event = await self.next(timeout)
                if event["type"] == type and all(event.get(k) == v for k, v in fields.items()):
                    return event

        return await asyncio.wait_for(first_match(), timeout)

    async def expect_silence(self, seconds: float = 0.3) -> None:
        """Nothing arrives for a while."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected event: {data}")

    async def joined(self, history: bool = True) -> tuple[str, dict[str, Any]]:
        """Read what a newcomer gets (system, presence, history); return (client_id, presence).

        The history event is kept in `self.history`.
        """
        welcome = await self.expect("system")
        presence = await self.expect("presence")
        if history:
            self.history = await self.expect("history")
        return welcome["client_id"], presence

    async def close_code(self, timeout: float = 5) -> tuple[int | None, str | None]:
        """Wait until the server closes the connection; return its close code and reason."""

        async def drain() -> None:
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass

        await asyncio.wait_for(drain(), timeout)
        received = self.ws.protocol.close_rcvd
        return (received.code, received.reason) if received else (None, None)

    async def close(self) -> None:
        await self.ws.close()

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame, like a crashed browser."""
        self.ws.transport.abort()
        await self.ws.wait_closed()
