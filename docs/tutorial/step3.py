"""Step 3: the whole protocol (rooms, usernames, joins and leaves, presence, typing, a lobby), and
an `error` event for each frame the server cannot use. Run it: python docs/tutorial/step3.py --port 8000"""

import contextlib
import json
from typing import Any
from urllib.parse import parse_qs

from fennec import Application, WebSocket, WebSocketException, WebSocketRouter
from step1 import event, serve  # python puts this file's folder on sys.path
from step2 import FanOutManager

MAX_MESSAGE, MAX_USERNAME = 2000, 32  # characters
router, manager, lobby_watchers = WebSocketRouter(), FanOutManager(), FanOutManager()
usernames: dict[str, str] = {}  # client_id → username, for every chat socket


def username(name: object) -> str | None:  # `name` trimmed, or None if it cannot be a username
    ok = isinstance(name, str) and 0 < len(name := name.strip()) <= MAX_USERNAME and name.isprintable()
    return name if ok else None


def rooms_update() -> dict[str, Any]:  # the rooms with someone in: Fennec forgets empty ones
    names = {room: sorted(usernames[cid] for cid in ids) for room, ids in manager.rooms.items()}
    rooms = {room: {"users": len(these), "usernames": these} for room, these in names.items()}
    return event("rooms_update", rooms=rooms)


async def announce(room: str, kind: str, client_id: str, message: str, **fields: Any) -> None:
    await manager.broadcast_json(event(kind, client_id=client_id, message=message, **fields), room=room)
    await lobby_watchers.broadcast_json(rooms_update())  # no room: to every socket of that manager


async def handle(client_id: str, room: str, frame: str) -> dict[str, Any] | None:
    """Carry out one frame from a chat socket; return an error for its sender, if any."""
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return event("error", code="invalid_json", message="the frame is not valid JSON")
    kind = data.get("type") if isinstance(data, dict) else None  # a list or a number has no type
    name = usernames[client_id]
    if kind == "message":
        if not isinstance(text := data.get("message"), str) or not 0 < len(text.strip()) <= MAX_MESSAGE:
            return event("error", code="invalid_message", message=f"a message has 1-{MAX_MESSAGE} characters")
        message = event("message", username=name, message=text.strip(), client_id=client_id)
        await manager.broadcast_json(message, room=room)
    elif kind == "set_username":
        if not (new := username(data.get("username"))):
            return event("error", code="invalid_username", message=f"1-{MAX_USERNAME} printable characters")
        usernames[client_id] = new
        changed = {"old_username": name, "new_username": new}
        await announce(room, "username_changed", client_id, f"{name} is now known as {new}", **changed)
    elif kind == "typing":  # to the others only: the typist knows
        typing = event("typing", username=name, client_id=client_id)
        await manager.broadcast_json(typing, room=room, exclude=client_id)
    else:
        return event("error", code="unknown_type", message="type must be message, set_username or typing")
    return None


@router.websocket("/ws/chat/{room}")
async def chat_room(websocket: WebSocket, room: str) -> None:
    await websocket.accept()
    if websocket.scope["path"] == "/ws/chat/{room}":  # asked as %7Broom%7D: Fennec 0.3.0 passes
        room = "{room}"  # the room of the previous path it matched, not this one
    client_id = await manager.connect(websocket)
    query = parse_qs(websocket.scope["query_string"].decode())  # Fennec has no accessor for it
    usernames[client_id] = name = username(query.get("username", [""])[0]) or f"User{client_id[:4]}"
    manager.join_room(client_id, room)
    welcome = f"Welcome to room '{room}'!"
    await manager.send_json(client_id, event("system", message=welcome, client_id=client_id))
    users = [{"client_id": cid, "username": usernames[cid]} for cid in manager.get_room_clients(room)]
    await manager.send_json(client_id, event("presence", room=room, users=users))
    await announce(room, "user_joined", client_id, f"{name} joined the room", username=name)
    with contextlib.suppress(WebSocketException):  # what receive_text raises once the browser left
        while client_id in manager.connections:  # until dropped for falling behind (step 2)
            if problem := await handle(client_id, room, await websocket.receive_text()):
                await manager.send_json(client_id, problem)
    await manager.disconnect(client_id)
    name = usernames.pop(client_id)
    await announce(room, "user_left", client_id, f"{name} left the room", username=name)


@router.websocket("/ws/lobby")
async def lobby(websocket: WebSocket) -> None:
    await websocket.accept()
    client_id = await lobby_watchers.connect(websocket)  # so that every announce() reaches it
    with contextlib.suppress(WebSocketException):
        while True:  # the list on arrival, then again for any frame
            await lobby_watchers.send_json(client_id, rooms_update())
            await websocket.receive_text()
    await lobby_watchers.disconnect(client_id)


app = Application(title="Chat, step 3")
app.include_websocket_router(router)

if __name__ == "__main__":
    serve(app)
