"""Rate limits: token buckets for frames, messages, typing notices, renames and new rooms.

A limit belongs to whoever sends, not to the socket: a socket is free to close and reopen, so
the buckets that matter live in a `Ledger` keyed by the sender (the token's identity, else the
client address) and survive reconnects. Only the frame budget and the typing hint are per socket.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from . import metrics, protocol
from .protocol import ErrorCode, LoadEarlier, Rejection, SendMessage, SetUsername, Typing
from .settings import Settings


class TokenBucket:
    """`rate` tokens a second, up to `burst`; an action takes some. A rate of 0 means no limit."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, cost: float = 1.0) -> float:
        """Take `cost` tokens: 0.0 if there were enough, else the seconds until there will be."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def charge(self, cost: float) -> None:
        """Take `cost` tokens even if that leaves a debt (at most a burst's worth), which the
        next actions wait for: the price of a frame that turned out to be useless."""
        if self.rate > 0:
            self._refill()
            self.tokens = max(-self.burst, self.tokens - cost)

    def is_full(self) -> bool:
        return self.rate <= 0 or self.tokens + (time.monotonic() - self.updated) * self.rate >= self.burst


NO_LIMIT = TokenBucket(0, 1)  # a rate of 0 never changes: every limit that is off shares this one


def bucket(rate: float, burst: float) -> TokenBucket:
    return TokenBucket(rate, burst) if rate > 0 else NO_LIMIT


class Ledger:
    """Token buckets that belong to senders, kept across their connections.

    A bucket that has filled up again is forgotten (a new one would be the same), so the ledger
    holds only the senders that were busy within the last minute or so, whatever their number.
    """

    SWEEP_EVERY = 30.0  # seconds

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._swept = time.monotonic()

    def bucket(self, kind: str, sender: str, rate: float, burst: float) -> TokenBucket:
        if time.monotonic() - self._swept > self.SWEEP_EVERY:
            self.sweep()
        bucket = self._buckets.get((kind, sender))
        if bucket is None:
            bucket = self._buckets[kind, sender] = TokenBucket(rate, burst)
        return bucket

    def sweep(self) -> None:
        self._swept = time.monotonic()
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if not bucket.is_full()}

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class Sender:
    """Who is sending, for the limits: a token's user, else nobody in particular from an address."""

    address: str
    user: str | None = None  # the token's username, with --jwt-secret

    @property
    def key(self) -> str:
        return f"user:{self.user}" if self.user is not None else f"address:{self.address}"


class RateLimits:
    """One connection's limits. Every frame takes from the connection's frame budget; messages
    and renames from their sender's buckets (and messages also from their address's, shared by
    everyone behind it). Typing beyond its limit is dropped silently (it is only a hint); the
    rest gets `rate_limited` with `retry_after`. A sender that keeps going after many warnings is
    `flooding`, and its connection is closed.

    Shared buckets are looked up in the ledger at each use, not kept: the ledger forgets full
    buckets, and a kept one would then no longer be the one the sender's other sockets use.
    """

    __slots__ = (
        "address_key",
        "flooding",
        "frames",
        "ledger",
        "messages",
        "renames",
        "sender",
        "settings",
        "typing",
        "warnings",
    )

    FRAME_BYTES = 4096  # a frame costs one from the budget per started 4 KiB...
    UNREADABLE_BYTES = 1024  # ...and one per KiB if it turns out not to be a command at all

    def __init__(self, settings: Settings, ledger: Ledger, sender: Sender) -> None:
        self.settings = settings
        self.ledger = ledger
        self.sender = sender
        self.flooding = False  # warned too often: close the connection
        self.address_key = f"address:{sender.address}" if settings.rate_messages_per_address else None
        self.frames = bucket(settings.rate_frames, 2 * settings.rate_frames)
        self.typing = bucket(settings.rate_typing, 1)
        # Anonymous: nothing tells two people behind one address apart but their sockets, so
        # their own budgets (and warnings) are the socket's; the address's budget is shared.
        self.messages = bucket(settings.rate_messages, settings.rate_messages_burst)
        self.renames = bucket(settings.rate_renames, settings.rate_renames_burst)
        # Warnings refill one a second: only a sender that ignores them runs out.
        self.warnings = bucket(1.0 if settings.flood_warnings else 0, settings.flood_warnings)

    def _own(self, kind: str, own: TokenBucket) -> TokenBucket:
        """The sender's bucket of this kind: a token's user shares it across its sockets."""
        if self.sender.user is None or own.rate <= 0:
            return own
        return self.ledger.bucket(kind, self.sender.key, own.rate, own.burst)

    def check_frame(self, frame: dict[str, Any]) -> Rejection | None:
        """Before a frame is even parsed: None if the connection's frame budget allows it."""
        if self.frames.rate <= 0:
            return None
        size = len(frame.get("text") or frame.get("bytes") or "")
        wait = self.frames.take(1 + size // self.FRAME_BYTES)
        return None if wait == 0 else self.refuse(wait, None, "too many frames", "frames")

    def check(
        self, command: protocol.Command | Rejection, frame: dict[str, Any]
    ) -> protocol.Command | Rejection | None:
        """The command if it may go ahead, a `Rejection` to answer, or None: dropped silently."""
        if isinstance(command, Rejection):
            if command.code in protocol.UNREADABLE and self.frames.rate > 0:  # it costs its full size
                self.frames.charge(
                    len(frame.get("text") or frame.get("bytes") or "") // self.UNREADABLE_BYTES
                )
            return command
        if isinstance(command, Typing):
            if self.typing.take() == 0:
                return command
            metrics.rate_limited.labels("typing").inc()
            return None
        if isinstance(command, SendMessage | LoadEarlier):  # a page of history costs a message
            wait = self._own("messages", self.messages).take()
            if not wait and self.address_key is not None:  # shared by everyone behind the address
                per_address = self.settings.rate_messages_per_address
                wait = self.ledger.bucket("messages", self.address_key, per_address, 2 * per_address).take()
            what, limit = (
                ("messages", "messages")
                if isinstance(command, SendMessage)
                else ("requests for history", "history")
            )
        elif isinstance(command, SetUsername):
            wait, what, limit = self._own("renames", self.renames).take(), "renames", "renames"
        else:
            return command
        if wait == 0:
            return command
        return self.refuse(wait, getattr(command, "client_msg_id", None), f"too many {what}", limit)

    def check_request(self, frame: dict[str, Any]) -> Rejection | None:
        """A lobby refresh (any text frame) counts as a message: None if it may go ahead."""
        if frame.get("text") is None:
            return Rejection(ErrorCode.UNSUPPORTED_FRAME, "send text to get the room list")
        wait = self.messages.take()
        return None if wait == 0 else self.refuse(wait, None, "too many requests", "lobby")

    def refuse(self, wait: float, client_msg_id: str | None, what: str, limit: str) -> Rejection:
        """A `rate_limited` answer (`limit`: which, for the metrics)."""
        metrics.rate_limited.labels(limit).inc()
        retry_after = math.ceil(wait * 1000) / 1000
        reason = f"slow down, {what}: try again in {retry_after} s"
        if self._own("warnings", self.warnings).take() > 0:
            self.flooding = True
        return Rejection(ErrorCode.RATE_LIMITED, reason, retry_after, client_msg_id)


def room_creation_bucket(ledger: Ledger, settings: Settings, sender: Sender) -> TokenBucket:
    """New rooms a sender may open: `room_creation_rate` a minute, as a burst too."""
    per_minute = settings.room_creation_rate
    return ledger.bucket("rooms", sender.key, per_minute / 60, per_minute)
