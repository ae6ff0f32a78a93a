"""`python server.py`: flags, the `token` command, and serving the app with uvicorn (workers,
TLS, signals), so that server.py can stay the lesson."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from .gate import Tokens
from .logs import log_config
from .protocol import Rejection, check_username
from .settings import Settings, strict_int
from .uvicorn_http import BoundedHttpProtocol
from .uvicorn_websocket import WriteNowWebSocketProtocol


def main(
    app: Any, settings: Settings, app_module: str, app_dir: Path, argv: Sequence[str] | None = None
) -> None:
    """Serve `app` (importable as `app_module`, from `app_dir`, for --workers)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:
        print(mint_token(argv[1:], settings))
        return
    settings.apply_flags(argv)
    BoundedHttpProtocol.configure(settings)
    options = uvicorn_options(settings)
    print_addresses(settings)

    # On Ctrl-C or SIGTERM uvicorn sends every socket a close frame (1012, "service restart"),
    # waits for the handlers to finish, then re-raises the signal. A stop we asked for is a
    # success, so the re-raised signal lands on a handler that does nothing and we exit 0.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    if settings.workers > 1:
        # Each worker imports the app afresh and reads its settings from the environment.
        settings.export_to(os.environ)
        uvicorn.run(app_module, workers=settings.workers, app_dir=str(app_dir), **options)
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run()
    sys.exit(0 if server.started else 1)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        "http": BoundedHttpProtocol,  # uvicorn's httptools, + a deadline and a size limit per request
        "ws": WriteNowWebSocketProtocol,  # uvicorn's websockets-sansio, + write_now, - memory
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ping_interval or None,
        "ws_ping_timeout": settings.ping_timeout or None,
        "timeout_graceful_shutdown": 5,
        "log_config": log_config(),
        "ssl_certfile": settings.ssl_certfile or None,
        "ssl_keyfile": settings.ssl_keyfile or None,
    }


def mint_token(argv: Sequence[str], settings: Settings) -> str:
    """`python server.py token --username alice [--admin] [--ttl 3600]`: a token for local use."""
    parser = argparse.ArgumentParser(prog="server.py token", description=mint_token.__doc__)
    parser.add_argument("--username", required=True)
    parser.add_argument("--admin", action="store_true", help="may kick people out of rooms")
    parser.add_argument("--ttl", type=strict_int, default=3600, help="seconds until it expires")
    parser.add_argument("--jwt-secret", default=settings.jwt_secret, help="default: $CHAT_JWT_SECRET")
    args = parser.parse_args(argv)
    if not args.jwt_secret:
        parser.error("no secret: pass --jwt-secret or set CHAT_JWT_SECRET (the server's)")
    if args.ttl <= 0:
        parser.error(f"--ttl must be a positive number of seconds, not {args.ttl}")
    name = check_username(args.username, settings, reserved_ok=True)
    if isinstance(name, Rejection):  # the server would refuse a token with this name
        parser.error(f"--username: {name.reason}")
    return Tokens(args.jwt_secret).mint(name, admin=args.admin, ttl=args.ttl)


def print_addresses(settings: Settings) -> None:
    host, port = settings.host, settings.port
    shown = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host
    shown = f"[{shown}]" if ":" in shown else shown
    web, ws = ("https", "wss") if settings.ssl_certfile else ("http", "ws")
    print(f"Fennec chat: open {web}://{shown}:{port}/ (add ?room=NAME to pick a room)")
    print(f"  chat room  {ws}://{shown}:{port}/ws/chat/{{room}}")
    print(f"  lobby      {ws}://{shown}:{port}/ws/lobby")
    if settings.jwt_secret:
        print("  every socket needs ?token= (python server.py token --username NAME)")
    if host in ("0.0.0.0", "::"):
        print("  listening on every network interface: other machines can connect too")
    sys.stdout.flush()
