"""An admin's moderation, beyond the word filter (moderation.py): a kick that keeps the kicked
out of the room for --kick-ban seconds (bans.py), lifting such a ban, and deleting a message
from the history and from every screen. The manager's moderation side (`manager.moderate`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import protocol
from .backplane import RoomEvent
from .protocol import ErrorCode

if TYPE_CHECKING:
    from .manager import ChatManager

Moderation = protocol.Kick | protocol.Unban | protocol.DeleteMessage  # what only admins may do


class RoomModeration:
    def __init__(self, manager: ChatManager) -> None:
        self.manager = manager

    async def apply(self, room: str, command: Moderation, by: str) -> protocol.Rejection | None:
        """An admin's command (the caller checked): what went wrong, if anything."""
        if isinstance(command, protocol.Kick):
            return await self.kick(room, command.client_id, by)
        if isinstance(command, protocol.Unban):
            return await self.unban(room, command.username, by)
        return await self.delete_message(room, command.message_id)

    async def kick(self, room: str, target: str, by: str) -> protocol.Rejection | None:
        """Remove a client from the room, on whichever process it is: the room gets a system
        line, the client a close frame (4001, "kicked"), and then its user_left. Its name (a
        token's, since only admins kick and admins need tokens) may not come back for
        --kick-ban seconds: banned first, so that an instant reconnection finds the ban."""
        manager = self.manager
        members = {user["client_id"]: user for user in await manager.members(room)}
        if target not in members:
            return protocol.Rejection(ErrorCode.NOT_FOUND, "nobody with that client_id is in this room")
        name = members[target]["username"]
        if manager.settings.kick_ban:
            await manager.backplane.bans.ban(room, name, time.time() + manager.settings.kick_ban)
        notice = protocol.encode(protocol.kicked(name, target, by))
        manager.backplane.publish(RoomEvent(room, notice, kick=target))
        # Away (a reload, on any process): its grace ends now, and a return will be a new join.
        left = protocol.encode(protocol.user_left(name, target))
        manager.backplane.end_grace(room, target, "", left)
        return None

    async def unban(self, room: str, username: str, by: str) -> protocol.Rejection | None:
        """Let a kicked user back before its ban ends; the room hears who did."""
        manager = self.manager
        if not await manager.backplane.bans.unban(room, username):
            return protocol.Rejection(ErrorCode.NOT_FOUND, f"{username} is not banned from this room")
        manager.backplane.publish(RoomEvent(room, protocol.encode(protocol.unbanned(username, by))))
        return None

    async def delete_message(self, room: str, message_id: int) -> protocol.Rejection | None:
        """Remove a message from the history (no newcomer or resume sees it again) and tell the
        room, whose pages take it off the screen."""
        manager = self.manager
        if manager.history is None:
            return protocol.Rejection(ErrorCode.HISTORY_UNAVAILABLE, "this server keeps no history")
        if not await manager.history.delete(room, message_id):
            return protocol.Rejection(ErrorCode.NOT_FOUND, "no message with that id in this room")
        manager.backplane.publish(
            RoomEvent(room, protocol.encode(protocol.message_deleted(room, message_id)))
        )
        return None
