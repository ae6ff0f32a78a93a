"""The HTTP side, on Fennec's `Router`: the page, and /health for a load balancer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fennec import Request, Response, Router

from .page import read_page

if TYPE_CHECKING:
    from .manager import ChatManager


def http_routes(manager: ChatManager, page: Path) -> Router:
    """`GET /` (the page at `page`, read at each request) and `GET /health`."""
    router = Router()

    @router.get("/")
    async def chat_page(request: Request) -> Response:
        """The page, served with a Content-Security-Policy that lets only its own script run."""
        body, headers = read_page(page)
        return Response(body, headers=headers)

    @router.get("/health")
    async def health(request: Request) -> Response:
        """ok, or degraded (HTTP 503) while Redis is away: a load balancer then sends people elsewhere."""
        report = manager.health()
        status = 200 if report["status"] == "ok" else 503
        return Response(json.dumps(report), status_code=status, headers={"content-type": "application/json"})

    return router
