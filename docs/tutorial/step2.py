"""Step 2: step 1's room with a fan-out that no client can stall or break.
Run it: python docs/tutorial/step2.py --port 8000"""

import asyncio
import contextlib
import json

from fennec import Application, WebSocket, WebSocketException, WebSocketManager, WebSocketRouter
from step1 import event, serve  # python puts this file's folder on sys.path

OUTBOX_SIZE = 100  # events a client may fall behind before the server gives up on it
TRY_AGAIN_LATER = 1013  # the close code that tells a browser: come back in a while


async def write(websocket: WebSocket, outbox: asyncio.Queue[str | int]) -> None:
    """Send the outbox's texts until a close code comes. A slow network stalls this task only."""
    with contextlib.suppress(OSError, WebSocketException):  # the socket is gone: nothing to do
        while isinstance(item := await outbox.get(), str):
            await websocket.send_text(item)
        await websocket.close(item)  # a no-op if the browser has closed the connection already


class FanOutManager(WebSocketManager):
    """Fennec's manager with an outbox (a bounded queue) and a writer task per client."""

    def __init__(self) -> None:
        super().__init__()
        self.outboxes: dict[str, asyncio.Queue[str | int]] = {}
        self.writers: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references

    async def connect(self, websocket: WebSocket, client_id: str | None = None) -> str:
        client_id = await super().connect(websocket, client_id)
        outbox = self.outboxes[client_id] = asyncio.Queue(maxsize=OUTBOX_SIZE)
        self.writers.add(writer := asyncio.create_task(write(websocket, outbox)))
        writer.add_done_callback(self.writers.discard)
        return client_id

    async def disconnect(self, client_id: str, code: int = 1000) -> None:
        await super().disconnect(client_id)  # Fennec's: out of every room, socket forgotten
        if (outbox := self.outboxes.pop(client_id, None)) is not None:
            while not outbox.empty():  # nobody will read what is left: make room for the code
                outbox.get_nowait()
            outbox.put_nowait(code)

    async def send_message(self, client_id: str, message: str) -> None:
        # Never awaits a socket: the text waits in the outbox until the writer sends it.
        if (outbox := self.outboxes.get(client_id)) is not None:
            try:
                outbox.put_nowait(message)
            except asyncio.QueueFull:  # it stopped reading: out of the room, then closed with 1013
                await self.disconnect(client_id, TRY_AGAIN_LATER)

    async def send_json(self, client_id: str, data: object) -> None:
        await self.send_message(client_id, json.dumps(data))  # Fennec's would await the socket

    async def broadcast(self, message: str, room: str | None = None, exclude: str | None = None) -> None:
        # A copy of the recipients, not the live set: dropping a client changes the room.
        recipients = self.get_room_clients(room) if room else set(self.connections)
        for client_id in recipients - {exclude}:
            await self.send_message(client_id, message)
        # Nothing above awaited anything, so no writer has run yet. Let them run before the next
        # event: else a burst of frames from one sender would fill every outbox in the room.
        await asyncio.sleep(0)


router = WebSocketRouter()
manager = FanOutManager()


@router.websocket("/ws/chat/{room}")
async def chat_room(websocket: WebSocket, room: str) -> None:
    # Step 1's handler, but for one check: only the manager changed.
    await websocket.accept()
    client_id = await manager.connect(websocket)
    manager.join_room(client_id, room)
    username = f"User{client_id[:4]}"
    welcome = f"Welcome to room '{room}'!"
    await manager.send_json(client_id, event("system", message=welcome, client_id=client_id))
    try:
        while True:
            data = await websocket.receive_json()
            if client_id not in manager.connections:
                break  # dropped for falling behind: it may not talk to the room either
            if data.get("type") == "message":
                text = str(data.get("message", ""))
                message = event("message", username=username, message=text, client_id=client_id)
                await manager.broadcast_json(message, room=room)
    except WebSocketException:
        pass
    finally:
        await manager.disconnect(client_id)


app = Application(title="Chat, step 2")
app.include_websocket_router(router)

if __name__ == "__main__":
    serve(app)
