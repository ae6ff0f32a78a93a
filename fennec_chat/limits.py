"""Rate limits for one connection: token buckets for messages, typing notices and renames."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from . import protocol
from .protocol import ErrorCode, Rejection, SendMessage, SetUsername, Typing
from .settings import Settings


class TokenBucket:
    """`rate` tokens a second, up to `burst`; each action takes one. A rate of 0 means no limit."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Verdict:
    """What to do with a command: carry it out, drop it silently, or answer with an error."""

    command: protocol.Command | Rejection | None  # None: dropped without a word
    flooding: bool = False  # warned too often: close the connection


class RateLimits:
    """One connection's limits. Typing beyond its limit is dropped silently (it is only a hint);
    messages and renames beyond theirs get `rate_limited` with `retry_after`. A client that
    keeps going after many warnings is flooding, and is closed."""

    __slots__ = ("messages", "renames", "typing", "warnings")

    def __init__(self, settings: Settings) -> None:
        self.messages = TokenBucket(settings.rate_messages, settings.rate_messages_burst)
        self.typing = TokenBucket(settings.rate_typing, 1)
        self.renames = TokenBucket(settings.rate_renames, settings.rate_renames_burst)
        # Warnings refill one a second: only a client that ignores them runs out.
        self.warnings = TokenBucket(1.0 if settings.flood_warnings else 0, settings.flood_warnings)

    def check(self, command: protocol.Command | Rejection) -> Verdict:
        if isinstance(command, Typing):
            return Verdict(command if self.typing.take() == 0 else None)
        bucket = {SendMessage: self.messages, SetUsername: self.renames}.get(type(command))
        wait = bucket.take() if bucket is not None else 0.0
        if wait == 0:
            return Verdict(command)
        return self.refuse(wait, getattr(command, "client_msg_id", None))

    def check_request(self) -> Verdict | None:
        """A lobby refresh counts as a message: None if it may go ahead."""
        wait = self.messages.take()
        return None if wait == 0 else self.refuse(wait, None)

    def refuse(self, wait: float, client_msg_id: str | None) -> Verdict:
        retry_after = math.ceil(wait * 1000) / 1000
        rejection = Rejection(
            ErrorCode.RATE_LIMITED, f"slow down: try again in {retry_after} s", retry_after, client_msg_id
        )
        return Verdict(rejection, flooding=self.warnings.take() > 0)
