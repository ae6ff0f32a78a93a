"""The reference: the same chat protocol on the websockets library's own asyncio server.

It fans out with `websockets.broadcast()`: one encoding, no await per client, straight onto
each connection's transport. That is about as lean as a Python WebSocket server gets, which
makes it the yardstick for `make bench`. It keeps no history and checks nothing.

    python bench/reference_server.py --port 9000 [--compression]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import datetime, timezone

from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: dict[str, set[ServerConnection]] = {}


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def encode(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


async def chat(websocket: ServerConnection) -> None:
    room = websocket.request.path.rsplit("/", 1)[-1].split("?")[0]
    client_id = str(uuid.uuid4())
    username = f"User-{client_id[:8]}"
    members = rooms.setdefault(room, set())
    members.add(websocket)
    await websocket.send(
        encode(
            {
                "type": "system",
                "message": f"Welcome to room '{room}'!",
                "client_id": client_id,
                "timestamp": now(),
            }
        )
    )
    joined = {
        "type": "user_joined",
        "username": username,
        "client_id": client_id,
        "message": f"{username} joined the room",
        "timestamp": now(),
    }
    broadcast(members - {websocket}, encode(joined))
    try:
        async for text in websocket:
            try:
                data = json.loads(text)
            except ValueError:
                continue
            kind = data.get("type")
            if kind == "message":
                event = {
                    "type": "message",
                    "username": username,
                    "message": data.get("message"),
                    "client_id": client_id,
                    "timestamp": now(),
                }
                broadcast(members, encode(event))
            elif kind == "typing":
                broadcast(
                    members - {websocket},
                    encode(
                        {"type": "typing", "username": username, "client_id": client_id, "timestamp": now()}
                    ),
                )
    finally:
        members.discard(websocket)
        if not members:
            rooms.pop(room, None)
        left = {
            "type": "user_left",
            "username": username,
            "client_id": client_id,
            "message": f"{username} left the room",
            "timestamp": now(),
        }
        broadcast(members, encode(left))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--compression", action="store_true", help="accept permessage-deflate, as websockets does by default"
    )
    args = parser.parse_args()
    async with serve(
        chat, "127.0.0.1", args.port, compression="deflate" if args.compression else None, max_size=65536
    ):
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
