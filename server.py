"""A real-time chat on Fennec: rooms, usernames, typing indicators and a lobby.

    python server.py            # then open http://localhost:8000/ in a few tabs
    python server.py --help     # every setting, with its environment variable

The lesson, top to bottom: two WebSocket endpoints and the app (docs/tutorial.md builds up to
it). What it leans on lives in fennec_chat/, a module per concern.
"""

from __future__ import annotations

from pathlib import Path

from fennec import WebSocket, WebSocketRouter

from fennec_chat import cli, protocol
from fennec_chat.collector import Freezer
from fennec_chat.fennec_fixes import ChatApplication, query_params
from fennec_chat.gate import Gate
from fennec_chat.http_routes import http_routes
from fennec_chat.manager import ChatManager, Connection, Moderation
from fennec_chat.moderation import WordFilter
from fennec_chat.protocol import ErrorCode
from fennec_chat.settings import Settings

settings = Settings.from_environ()  # `python server.py --flags` applies its flags on top
manager = ChatManager(settings)  # Fennec's WebSocketManager: connections, rooms, broadcast
gate = Gate(settings, manager)  # who may come in, and how fast they may go
words = WordFilter(settings)  # masks the words of --blocklist
ws_router = WebSocketRouter()


# --- A chat room: admit, greet, loop, goodbye ----------------------------------------------------


@ws_router.websocket("/ws/chat/{room}")
async def chat_room(websocket: WebSocket, room: str) -> None:
    # Accept first: a browser learns a close code and its reason only after the handshake.
    await websocket.accept()
    # Room name, origin, token, sockets per address. Leaving the block gives the seat back.
    async with gate.admitted(websocket, room) as admission:
        if admission is None:
            return  # refused: closed with a code and the reason
        join = protocol.parse_join(query_params(websocket), settings)  # ?username= ?since= ?session=
        name = words.mask(admission.identity.username or join.username or "")  # a token's name wins
        # Registered with Fennec's manager; on the way out the room hears `user_left`, once. A
        # reload is not a leave: the same tab (?session=) back within --leave-grace continues.
        async with manager.connected(websocket, room, admission.identity, join.session, name) as me:
            # Into the room (Fennec's join_room), then the welcome, who is here and what was said
            # (with ?since=, just what it missed) before anything live: no gap, no repeat; then the
            # room hears `user_joined` (`user_back`: a reload). False: dropped meanwhile (too slow).
            if not await me.enter_room(join):
                return
            limits = gate.limits(admission)
            async for frame in me.frames():  # raw frames: every bad one is answered
                # The frame budget first, before any parsing; then parse (never raises), mask
                # blocked words, and apply the per-command limits.
                command = limits.check_frame(frame) or limits.check(
                    words.apply(protocol.parse_command(frame, settings)), frame
                )
                match command:
                    case protocol.SendMessage():
                        await send_message(me, command)
                    case protocol.SetUsername():
                        await set_username(me, command)
                    case protocol.Typing():
                        await typing(me)
                    case protocol.Kick() | protocol.Unban() | protocol.DeleteMessage():
                        await moderate(me, command)
                    case protocol.LoadEarlier():
                        await load_earlier(me, command)
                    case protocol.Rejection():  # bad input is answered, never fatal
                        await manager.send_json(me.client_id, command.event())
                await gate.close_if_flooding(limits, me.client_id, "frames")  # warned and went on


# One handler per command. A chat message is *published*: numbered and stored first (so that a
# client that reconnects with ?since= gets exactly what it missed), then sent to everyone in the
# room, the sender included: its copy is the confirmation. Renames and typing notices are only
# *broadcast*: they matter now, not later, and nothing keeps them.


async def send_message(me: Connection, message: protocol.SendMessage) -> None:
    event = protocol.chat_message(
        manager.username(me.client_id), message.text, me.client_id, message.client_msg_id
    )
    await manager.publish(me.room, event, sender=me.client_id)


async def set_username(me: Connection, rename: protocol.SetUsername) -> None:
    if me.identity.username:
        await manager.send_json(
            me.client_id, protocol.error(ErrorCode.USERNAME_LOCKED, "your name comes from your token")
        )
    elif (old := manager.rename(me.client_id, rename.username)) != rename.username:
        await manager.broadcast_json(
            protocol.username_changed(old, rename.username, me.client_id), room=me.room
        )


async def typing(me: Connection) -> None:
    event = protocol.typing(manager.username(me.client_id), me.client_id)
    await manager.broadcast_json(event, room=me.room, exclude=me.client_id)  # not back to the typist


async def moderate(me: Connection, command: Moderation) -> None:
    # Kick (and keep out for --kick-ban seconds), unban, delete a message: admins only.
    if not me.identity.admin:
        refusal = protocol.error(ErrorCode.FORBIDDEN, f"only an admin may {command.verb}")
        await manager.send_json(me.client_id, refusal)
    elif problem := await manager.moderate(me.room, command, by=manager.username(me.client_id)):
        await manager.send_json(me.client_id, problem.event())


async def load_earlier(me: Connection, request: protocol.LoadEarlier) -> None:
    # Older messages, on request: only the asker gets them (an `error` with --no-history).
    await manager.send_earlier(me.client_id, me.room, request.before)


# --- The lobby: the list of active rooms, on connect, on request and after every change -------


@ws_router.websocket("/ws/lobby")
async def lobby(websocket: WebSocket) -> None:
    await websocket.accept()
    async with gate.admitted(websocket) as admission:
        if admission is None:
            return
        async with manager.connected(websocket) as me:
            await manager.watch_lobby(me.client_id)
            limits = gate.limits(admission)
            async for frame in me.frames():  # any text asks for the list
                if refusal := limits.check_frame(frame) or limits.check_request(frame):
                    await manager.send_json(me.client_id, refusal.event())
                else:
                    await manager.send_rooms_update(me.client_id)
                await gate.close_if_flooding(limits, me.client_id, "requests")


# --- The app: Fennec's Application with the routers, and what starts and stops with it ----------

app = ChatApplication(title="Fennec chat", docs_enabled=False)  # docs would load Swagger from a CDN
app.include_router(http_routes(manager, Path(__file__).with_name("client.html")))  # the page, /health
app.include_websocket_router(ws_router)
# The history (and Redis), the blocklist, and the long-lived objects out of the collector's way.
app.on_startup += [manager.start, words.start, Freezer().start]
app.on_shutdown.append(manager.shutdown)

if __name__ == "__main__":
    cli.main(app, settings, "server:app", Path(__file__).parent)  # flags, `token`, workers, TLS
