"""`python server.py`: flags, the `token` command, and serving the app with uvicorn (workers,
TLS, signals), so that server.py can stay the lesson.

A start that fails is one line on stderr and exit 1, never a traceback: what can be checked
before serving (the certificate, the port) is checked here, and what fails in the app's
start-up hooks (the history file, Redis, the blocklist) raises `StartupError`, whose message
uvicorn logs. The banner that says where to go is printed once the server listens.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from . import metrics, uvicorn_contract
from .fennec_fixes import StartupError
from .gate import Tokens
from .logs import log_config
from .protocol import Rejection, check_username
from .settings import Settings, strict_int

logger = logging.getLogger("uvicorn.error")  # start-up failures read like uvicorn's own lines


def main(
    app: Any, settings: Settings, app_module: str, app_dir: Path, argv: Sequence[str] | None = None
) -> None:
    """Serve `app` (importable as `app_module`, from `app_dir`, for --workers)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:
        print(mint_token(argv[1:], settings))
        return
    settings.apply_flags(argv)
    protocols = uvicorn_protocols(settings)  # before the export: it may set --ws-protocol stock
    workers = settings.workers > 1
    if workers:  # each worker imports the app afresh and reads its settings from the environment
        settings.export_to(os.environ)
        sys.path.insert(0, str(app_dir))
    config = uvicorn.Config(
        app_module if workers else app, workers=settings.workers, **uvicorn_options(settings, protocols)
    )
    try:
        check_certificate(settings)
        listener = bind(settings)  # uvicorn listens on it once the app has started
        if settings.metrics_port:  # before the workers start: they count into its directory
            metrics.serve(settings.metrics_host, settings.metrics_port, workers)
    except StartupError as error:
        fail(str(error))
    port = listener.getsockname()[1]  # the one the system picked, for --port 0

    # On Ctrl-C or SIGTERM uvicorn sends every socket a close frame (1012, "service restart"),
    # waits for the handlers to finish, then re-raises the signal. A stop we asked for is a
    # success: the re-raised signal, or one that comes before uvicorn listens for them, exits 0.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    if workers:
        supervisor = Workers(config, [listener], announce=lambda: print_addresses(settings, port))
        supervisor.run()
        sys.exit(1 if supervisor.failed else 0)
    server = Server(config, announce=lambda: print_addresses(settings, port))
    try:
        server.run(sockets=[listener])
    except SystemExit as stop:
        if stop.code != STARTUP_FAILURE:  # uvicorn's when the app did not start: it said why
            raise
    sys.exit(0 if server.started else 1)


class Server(uvicorn.Server):
    """uvicorn's server, which calls `announce` once it listens (and only if it does)."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[], None]) -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the app's start-up hooks, then listening
        if self.started and not self.should_exit:  # (not when stopped while starting)
            self.announce()


class Workers(Multiprocess):
    """uvicorn's supervisor of worker processes, which calls `announce` once every worker
    serves, and notes whether one failed to start (then it stops them all, and exits 1)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], announce: Callable[[], None]):
        super().__init__(config, sockets)
        self.announce = announce
        self.announced = False
        self.failed = False

    def keep_subprocess_alive(self) -> None:  # every half second
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        # uvicorn replaces a worker that died or did not answer in time, and says so at info level.
        for pid in before - {process.pid for process in self.processes}:
            logger.warning("worker %s died or stopped answering: replaced; its connections were lost", pid)
            metrics.process_gone(pid)
        if any(process.exitcode == STARTUP_FAILURE for process in self.processes):
            self.failed = True
        elif (
            not self.announced
            and not self.should_exit.is_set()
            and all(process.is_ready(timeout=1) for process in self.processes)
        ):
            self.announced = True
            self.announce()


def fail(message: str) -> NoReturn:
    logger.error(message)
    sys.exit(1)


def check_certificate(settings: Settings) -> None:
    """--ssl-certfile and --ssl-keyfile: readable, and a certificate with its key."""
    if not settings.ssl_certfile:
        return
    for flag, path in (("--ssl-certfile", settings.ssl_certfile), ("--ssl-keyfile", settings.ssl_keyfile)):
        try:
            Path(path).read_bytes()
        except OSError as error:
            raise StartupError(f"cannot read {flag} {path}: {error.strerror or error}") from error

    def encrypted_key() -> str:
        raise EncryptedKey  # uvicorn will ask for its passphrase, as OpenSSL always has

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            settings.ssl_certfile, settings.ssl_keyfile, password=encrypted_key
        )
    except EncryptedKey:
        pass
    except ssl.SSLError as error:
        raise StartupError(
            f"--ssl-certfile {settings.ssl_certfile} and --ssl-keyfile {settings.ssl_keyfile} are not "
            f"a certificate and its private key, in PEM ({error.reason or error})"
        ) from error


class EncryptedKey(Exception):
    pass


def bind(settings: Settings) -> socket.socket:
    """The listening socket's address, taken now (uvicorn starts listening on it once the app
    has started; with --workers every worker listens on this one)."""
    host, port = settings.host, settings.port
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        hint = (
            " (is the chat already running? --port picks another)" if error.errno == errno.EADDRINUSE else ""
        )
        raise StartupError(
            f"cannot listen on {where}: {(error.strerror or str(error)).lower()}{hint}"
        ) from error
    listener.set_inheritable(True)
    return listener


def uvicorn_protocols(settings: Settings) -> dict[str, Any]:
    """Our HTTP and WebSocket protocols, each unless this uvicorn or websockets lacks an internal
    it needs (uvicorn_contract.py): then uvicorn's own, and one warning line that says what is
    missing. `--ws-protocol stock` asks for uvicorn's own WebSocket protocol."""
    chosen: dict[str, Any] = {"http": "httptools", "ws": "websockets-sansio"}
    if missing := uvicorn_contract.broken(uvicorn_contract.HTTP_PROTOCOL):
        warn(
            f"the bounded HTTP protocol needs what this uvicorn lacks ({'; '.join(missing)}): running on "
            "uvicorn's own, without the request deadline and size limit (README: pinned versions)"
        )
    else:
        from .uvicorn_http import BoundedHttpProtocol  # uvicorn's httptools, + a deadline and a size limit

        BoundedHttpProtocol.configure(settings)
        chosen["http"] = BoundedHttpProtocol
    if settings.ws_protocol != "fast":
        return chosen
    if missing := uvicorn_contract.broken(uvicorn_contract.WEBSOCKET_PROTOCOL):
        settings.ws_protocol = "stock"
        warn(
            f"the fast WebSocket protocol needs what this uvicorn or websockets lacks "
            f"({'; '.join(missing)}): running on uvicorn's own, slower (README: pinned versions)"
        )
    else:
        from .uvicorn_websocket import WriteNowWebSocketProtocol  # websockets-sansio, + write_now, - memory

        chosen["ws"] = WriteNowWebSocketProtocol
    return chosen


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def uvicorn_options(settings: Settings, protocols: dict[str, Any]) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        **protocols,
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ping_interval or None,
        "ws_ping_timeout": settings.ping_timeout or None,
        "timeout_graceful_shutdown": 5,
        # uvicorn kills a worker that does not answer its supervisor for 5 s. A worker holding
        # thousands of connections on a busy machine can be that slow and still be fine;
        # killing it drops them all.
        "timeout_worker_healthcheck": 30,
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


def print_addresses(settings: Settings, port: int | None = None) -> None:
    """The banner: where to open the chat, its endpoints, and where its history goes."""
    host, port = settings.host, port or settings.port
    shown = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host
    shown = f"[{shown}]" if ":" in shown else shown
    web, ws = ("https", "wss") if settings.ssl_certfile else ("http", "ws")
    print(f"Fennec chat: open {web}://{shown}:{port}/ (add ?room=NAME to pick a room)")
    print(f"  chat room  {ws}://{shown}:{port}/ws/chat/{{room}}")
    print(f"  lobby      {ws}://{shown}:{port}/ws/lobby")
    print(f"  history    {history_place(settings)}")
    if settings.jwt_secret:
        print("  every socket needs ?token= (server.py token --username NAME)")
    if host in ("0.0.0.0", "::"):
        print("  listening on every network interface: other machines can connect too")
    sys.stdout.flush()


def history_place(settings: Settings) -> str:
    if not settings.history:
        return "off (--no-history): messages are not kept"
    if settings.redis_url:
        return "in Redis (--redis-url)"
    if settings.db == ":memory:" or settings.db.startswith("file::memory:"):
        return "in memory only: gone when the server stops"
    return f"{settings.db} (--db :memory: keeps it in memory only)"
