"""The chat page, served with headers that keep it to itself."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def page_headers(page: bytes) -> dict[str, str]:
    """Headers for client.html.

    The Content-Security-Policy allows the page's own inline script and style (by their
    hashes, so that no injected one runs), WebSocket connections to this server only (the
    page never talks to another one), and nothing else.
    """
    hashes = {b"script": [], b"style": []}
    for kind, body in INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {' '.join(hashes[b'script'])}",
            f"style-src {' '.join(hashes[b'style'])}",
            "img-src data:",
            "connect-src 'self'",  # CSP3: 'self' covers ws:// and wss:// to this very host
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "content-type": "text/html; charset=utf-8",
        "content-security-policy": policy,
        "x-content-type-options": "nosniff",
        # A token in the page's URL must not travel on to other sites.
        "referrer-policy": "no-referrer",
        "cache-control": "no-cache",
    }


def read_page(path: Path) -> tuple[bytes, dict[str, str]]:
    page = path.read_bytes()
    return page, page_headers(page)
