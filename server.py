"""Fennec WebSocket chat: rooms, usernames, typing indicators and a lobby, in one process.

    python server.py            # then open http://localhost:8000/ in a few tabs
    python server.py --help     # every setting, with its environment variable

Read this file top to bottom: the two WebSocket endpoints (accept, receive loop, broadcast,
cleanup), the two HTTP routes, then how it is served. The machinery (validation, the room
manager and its safe fan-out, settings) lives in the small `fennec_chat` package beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from fennec import Request, Response, Router, WebSocket, WebSocketRouter

from fennec_chat import protocol
from fennec_chat.application import ChatApplication
from fennec_chat.gate import Gate, Identity, Refusal, Tokens
from fennec_chat.http_guard import GuardedHttpProtocol
from fennec_chat.limits import Verdict
from fennec_chat.logs import log_config
from fennec_chat.manager import ChatManager
from fennec_chat.moderation import WordFilter
from fennec_chat.page import read_page
from fennec_chat.protocol import CloseCode, ErrorCode, JoinRequest, Rejection, check_username
from fennec_chat.settings import Settings, strict_int
from fennec_chat.wsprotocol import LeanWebSocketProtocol

CLIENT_PAGE = Path(__file__).with_name("client.html")

settings = Settings.from_environ()  # main() applies command-line flags on top
manager = ChatManager(settings)
gate = Gate(settings, manager)
words = WordFilter()  # --blocklist loads it at start
ws_router = WebSocketRouter()
http_router = Router()


# --- WebSocket endpoints -----------------------------------------------------------------------


@ws_router.websocket("/ws/chat/{room}")
async def chat_room(websocket: WebSocket, room: str) -> None:
    """One member of one room, from handshake to goodbye."""
    # Accept before refusing: a browser only sees a close code and reason after the handshake.
    await websocket.accept()
    # The room name, the page's origin, the token (with --jwt-secret), new rooms per sender and
    # sockets per address. Leaving the block gives the address's seat back, whatever happened.
    async with gate.admitted(websocket, room) as admission:
        if isinstance(admission, Refusal):
            await websocket.close(admission.code, admission.reason)
            return
        identity = admission.identity
        # A reconnecting tab names itself in the URL (so the room never sees "User-1a2b joined"
        # followed by a rename) and says where it left off (so it gets just what it missed).
        join = protocol.parse_join(query_params(websocket), settings)
        # Whose client_msg_ids these are: the token's user, else the tab, else this socket.
        author = f"user:{identity.username}" if identity.username else None
        if author is None and join.session:
            author = f"session:{join.session}"
        client_id = await manager.connect(websocket, author=author)
        try:
            if not await greet(client_id, room, identity, join):
                return  # dropped meanwhile: more room events piled up than its outbox may hold
            limits = gate.limits(admission)
            async for frame in incoming(websocket, client_id):
                if refused := limits.check_frame(frame):  # every frame, before it costs any parsing
                    verdict = refused
                else:
                    command = words.apply(protocol.parse_command(frame, settings))  # masks blocked words
                    if isinstance(command, protocol.Rejection) and command.code in protocol.UNREADABLE:
                        limits.charge_unreadable(frame)
                    verdict = limits.check(command)
                username = manager.username(client_id)
                match verdict.command:
                    case protocol.SendMessage(text=text, client_msg_id=client_msg_id):
                        # Stored and numbered, then sent to everyone in the room, the sender
                        # included: its copy is the confirmation.
                        event = protocol.chat_message(username, text, client_id, client_msg_id)
                        await manager.publish(room, event, sender=client_id)
                    case protocol.SetUsername() if identity.username:
                        locked = protocol.error(ErrorCode.USERNAME_LOCKED, "your name comes from your token")
                        await manager.send_json(client_id, locked)
                    case protocol.SetUsername(username=new_name) if new_name != username:
                        manager.rename(client_id, new_name)
                        event = protocol.username_changed(username, new_name, client_id)
                        await manager.broadcast_json(event, room=room)
                    case protocol.Typing():
                        event = protocol.typing(username, client_id)
                        await manager.broadcast_json(event, room=room, exclude=client_id)
                    case protocol.Kick(client_id=target) if identity.admin:
                        if problem := await manager.kick(room, target, by=username):
                            await manager.send_json(client_id, problem.event())
                    case protocol.Kick():
                        forbidden = protocol.error(ErrorCode.FORBIDDEN, "only an admin may kick")
                        await manager.send_json(client_id, forbidden)
                    case protocol.Rejection() as rejection:
                        # Bad input is answered, never fatal: the socket stays open and usable.
                        await manager.send_json(client_id, rejection.event())
                    case _:
                        pass  # an unchanged name, or typing notices beyond their limit: nothing to do
                if verdict.flooding:  # warned again and again: this is no longer a person typing
                    await manager.close(client_id, CloseCode.POLICY_VIOLATION, "flooding: too many frames")
        finally:
            # Tells the room `user_left` exactly once, whether the client closed, vanished, was
            # dropped for falling behind or was kicked.
            await manager.disconnect(client_id)


async def greet(client_id: str, room: str, identity: Identity, join: JoinRequest) -> bool:
    """Join the room and tell the newcomer where it is; False if it is gone meanwhile."""
    if name := identity.username or join.username:  # a token's name wins
        manager.rename(client_id, words.mask(name))
    manager.join_room(client_id, room)
    await manager.send_json(client_id, protocol.welcome(room, client_id, settings))
    await manager.send_json(client_id, protocol.presence(room, await manager.members(room)))
    # Earlier messages (or just the missed ones), then live ones: no gap, nothing twice.
    await manager.send_history(client_id, room, join.since, join.epoch)
    for problem in join.problems:
        await manager.send_json(client_id, problem.event())
    if not manager.is_connected(client_id):
        return False
    joined = protocol.user_joined(manager.username(client_id), client_id)
    await manager.broadcast_json(joined, room=room, exclude=client_id)
    return True


@ws_router.websocket("/ws/lobby")
async def lobby(websocket: WebSocket) -> None:
    """The list of active rooms: sent on connect, on any text from the client, and after changes."""
    await websocket.accept()
    async with gate.admitted(websocket) as admission:
        if isinstance(admission, Refusal):
            await websocket.close(admission.code, admission.reason)
            return
        client_id = await manager.connect(websocket)
        try:
            await manager.watch_lobby(client_id)
            limits = gate.limits(admission)
            async for frame in incoming(websocket, client_id):
                verdict = limits.check_frame(frame) or limits.check_request()
                if verdict is None and frame.get("text") is None:
                    limits.charge_unreadable(frame)
                    verdict = Verdict(
                        Rejection(ErrorCode.UNSUPPORTED_FRAME, "send text to get the room list")
                    )
                if verdict is None:
                    await manager.send_rooms_update(client_id)
                    continue
                assert isinstance(verdict.command, Rejection)
                await manager.send_json(client_id, verdict.command.event())
                if verdict.flooding:
                    await manager.close(client_id, CloseCode.POLICY_VIOLATION, "flooding: too many requests")
        finally:
            await manager.disconnect(client_id)


async def incoming(websocket: WebSocket, client_id: str) -> AsyncIterator[dict]:
    """Frames from one client, until it disconnects or the manager drops it.

    We read raw ASGI frames rather than Fennec's `receive_json()`: that one raises on bad
    JSON and silently skips binary frames, and every bad frame here deserves an answer.
    """
    while True:
        frame = await websocket.receive()
        if frame["type"] == "websocket.disconnect" or not manager.is_connected(client_id):
            return
        if frame["type"] == "websocket.receive":  # not the opening "websocket.connect"
            yield frame


def query_params(websocket: WebSocket) -> dict[str, str]:
    """The connect URL's query parameters (the first value of each)."""
    query = parse_qs(websocket.scope.get("query_string", b"").decode("latin-1"))
    return {name: values[0] for name, values in query.items()}


# --- HTTP routes -------------------------------------------------------------------------------


@http_router.get("/")
async def chat_page(request: Request) -> Response:
    """The chat page, so http://localhost:8000/?room=dev works as well as opening the file.

    Its Content-Security-Policy lets only its own script and style run (see fennec_chat/page.py).
    """
    page, headers = read_page(CLIENT_PAGE)
    return Response(page, headers=headers)


@http_router.get("/health")
async def health(request: Request) -> Response:
    stats = manager.stats()
    # 503 while the backplane (Redis) is away, so that a load balancer can send people elsewhere.
    healthy = stats["backplane"]["connected"]
    body = {"status": "ok" if healthy else "degraded", **stats, "tasks": len(asyncio.all_tasks())}
    headers = {"content-type": "application/json"}
    return Response(json.dumps(body), status_code=200 if healthy else 503, headers=headers)


# --- The application ---------------------------------------------------------------------------

# docs_enabled=False: Fennec's /docs page loads Swagger UI from a CDN, and this app never
# reaches for the internet.
app = ChatApplication(title="Fennec chat", docs_enabled=False)
app.include_router(http_router)
app.include_websocket_router(ws_router)
app.on_startup.append(manager.start)  # opens the message history and the backplane
app.on_shutdown.append(manager.shutdown)


async def load_blocklist() -> None:
    if settings.blocklist:
        words.load(settings.blocklist)


app.on_startup.append(load_blocklist)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:
        print(mint_token(argv[1:]))
        return
    settings.apply_flags(argv)
    GuardedHttpProtocol.configure(settings)
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "lifespan": "on",
        "http": GuardedHttpProtocol,  # uvicorn's httptools, + a deadline and a size limit per request
        "ws": LeanWebSocketProtocol,  # uvicorn's websockets-sansio, + write_now, - memory
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "ws_ping_interval": settings.ping_interval or None,
        "ws_ping_timeout": settings.ping_timeout or None,
        "timeout_graceful_shutdown": 5,
        "log_config": log_config(),
        "ssl_certfile": settings.ssl_certfile or None,
        "ssl_keyfile": settings.ssl_keyfile or None,
    }
    print_addresses(settings.host, settings.port, secure=bool(settings.ssl_certfile))

    # On Ctrl-C or SIGTERM uvicorn sends every socket a close frame (1012, "service restart"),
    # waits for the handlers to finish, then re-raises the signal. A stop we asked for is a
    # success, so the re-raised signal lands on a handler that does nothing and we exit 0.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    if settings.workers > 1:
        # Each worker imports this file afresh and reads its settings from the environment.
        settings.export_to(os.environ)
        uvicorn.run("server:app", workers=settings.workers, app_dir=str(Path(__file__).parent), **options)
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run()
    sys.exit(0 if server.started else 1)


def mint_token(argv: Sequence[str]) -> str:
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


def print_addresses(host: str, port: int, secure: bool) -> None:
    shown = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host
    shown = f"[{shown}]" if ":" in shown else shown
    web, ws = ("https", "wss") if secure else ("http", "ws")
    print(f"Fennec chat: open {web}://{shown}:{port}/ (add ?room=NAME to pick a room)")
    print(f"  chat room  {ws}://{shown}:{port}/ws/chat/{{room}}")
    print(f"  lobby      {ws}://{shown}:{port}/ws/lobby")
    if settings.jwt_secret:
        print("  every socket needs ?token= (python server.py token --username NAME)")
    if host in ("0.0.0.0", "::"):
        print("  listening on every network interface: other machines can connect too")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
