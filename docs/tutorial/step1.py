"""Step 1: one chat room, written with Fennec's own WebSocket API and nothing else.

Run it: python docs/tutorial/step1.py --port 8000

Every browser connected to /ws/chat/{room} gets every message sent to that room.
"""

import argparse
from datetime import datetime, timezone
from typing import Any

import uvicorn
from fennec import Application, WebSocket, WebSocketException, WebSocketManager, WebSocketRouter

router = WebSocketRouter()
# Fennec's manager remembers every socket by id, and which ids are in which room.
manager = WebSocketManager()


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server event. Each has a type and a timestamp: UTC, with an explicit offset, so that
    browsers in every time zone read it the same way."""
    return {"type": kind, **fields, "timestamp": datetime.now(timezone.utc).isoformat()}


@router.websocket("/ws/chat/{room}")
async def chat_room(websocket: WebSocket, room: str) -> None:
    # Complete the handshake first: until then the browser can receive nothing.
    await websocket.accept()
    client_id = await manager.connect(websocket)  # registered under a fresh uuid4
    manager.join_room(client_id, room)
    username = f"User{client_id[:4]}"  # a name to show until step 3 lets people pick one
    # Only the newcomer is welcomed; the client_id lets it recognise its own messages later.
    welcome = f"Welcome to room '{room}'!"
    await manager.send_json(client_id, event("system", message=welcome, client_id=client_id))
    try:
        while True:
            data = await websocket.receive_json()  # raises WebSocketException on disconnect
            if data.get("type") == "message":
                text = str(data.get("message", ""))
                message = event("message", username=username, message=text, client_id=client_id)
                # Everyone in the room, the sender included: its copy confirms the message arrived.
                await manager.broadcast_json(message, room=room)
    except WebSocketException:
        pass  # the browser went away: nobody left to answer
    finally:
        # Out of every room and forgotten, so that no broadcast tries this socket again.
        await manager.disconnect(client_id)


app = Application(title="Chat, step 1")
app.include_websocket_router(router)


def serve(app: Application) -> None:
    """Run `app` under uvicorn on --host and --port (steps 2 and 3 reuse this)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    serve(app)
