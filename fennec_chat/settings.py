"""Every knob of the chat server in one place: defaults, environment variables and flags.

A flag beats its environment variable, which beats the default.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import textwrap
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_DB = str(Path(__file__).resolve().parent.parent / "chat.db")  # beside server.py


def setting(default: Any, env: str, help: str, shown: str | None = None) -> Any:
    """A settings field that knows its environment variable and its --help text (`shown`: the
    default as --help says it, when the value itself would not say it)."""
    return field(default=default, metadata={"env": env, "help": help, "shown": shown})


@dataclass
class Settings:
    host: str = setting(
        "127.0.0.1", "HOST", "interface to listen on; 0.0.0.0 exposes the chat to your network"
    )
    port: int = setting(8000, "PORT", "TCP port to listen on")
    log_level: str = setting("info", "CHAT_LOG_LEVEL", "uvicorn log level: debug, info, warning, error")

    max_message_chars: int = setting(2000, "CHAT_MAX_MESSAGE_CHARS", "longest chat message, after trimming")
    max_username_chars: int = setting(32, "CHAT_MAX_USERNAME_CHARS", "longest username, after trimming")
    max_room_chars: int = setting(64, "CHAT_MAX_ROOM_CHARS", "longest room name")
    max_frame_bytes: int = setting(
        64 * 1024, "CHAT_MAX_FRAME_BYTES", "larger WebSocket messages are refused with close code 1009"
    )
    outbox_limit: int = setting(
        256, "CHAT_OUTBOX_LIMIT", "events queued for one slow client before it is closed with 1013"
    )
    outbox_bytes: int = setting(
        1024 * 1024, "CHAT_OUTBOX_BYTES", "bytes queued for one slow client before it is closed with 1013"
    )
    handshake_timeout: float = setting(
        5.0,
        "CHAT_HANDSHAKE_TIMEOUT",
        "seconds a connection may take to send its whole request or WebSocket handshake (0: no limit)",
    )
    lobby_interval: float = setting(
        0.25,
        "CHAT_LOBBY_INTERVAL",
        "seconds between two rooms_update pushes to the lobby (changes are coalesced)",
    )
    ping_interval: float = setting(
        20.0, "CHAT_PING_INTERVAL", "seconds between keepalive pings; 0 turns them off"
    )
    ping_timeout: float = setting(
        20.0, "CHAT_PING_TIMEOUT", "seconds to wait for a pong before dropping a client"
    )
    leave_grace: float = setting(
        5.0,
        "CHAT_LEAVE_GRACE",
        "seconds a member whose connection dropped (or who reloaded: 1001) stays, shown away, before "
        "the room hears it left; its tab's ?session= coming back continues it unnoticed (0: off)",
    )
    history: bool = setting(
        True, "CHAT_HISTORY", "keep message history (--no-history: none, no ids, no resume)"
    )
    db: str = setting(
        DEFAULT_DB, "CHAT_DB", "SQLite file for the history; ':memory:' keeps it in memory only"
    )
    history_retention: int = setting(
        1000, "CHAT_HISTORY_RETENTION", "messages kept per room (older ones are pruned)"
    )
    history_on_join: int = setting(50, "CHAT_HISTORY_ON_JOIN", "messages a newcomer receives in `history`")
    history_resume_max: int = setting(
        500, "CHAT_HISTORY_RESUME_MAX", "most messages sent to a client resuming with ?since="
    )
    history_days: float = setting(
        30.0,
        "CHAT_HISTORY_DAYS",
        "forget the history of a room nobody has written in for this many days (0: keep)",
    )
    max_rooms: int = setting(10_000, "CHAT_MAX_ROOMS", "rooms with people in them at once (0: no cap)")
    room_creation_rate: float = setting(
        30.0,
        "CHAT_ROOM_CREATION_RATE",
        "new rooms one address (or token identity) may open per minute (0: no limit)",
    )
    redis_url: str = setting(
        "",
        "REDIS_URL",
        "share rooms, presence and history with other processes through Redis (redis://...), "
        "or a Redis Cluster through any of its nodes (redis+cluster://host:port)",
    )
    redis_prefix: str = setting("fennec-chat:", "CHAT_REDIS_PREFIX", "prefix of every Redis key and channel")
    redis_heartbeat: float = setting(
        5.0, "CHAT_REDIS_HEARTBEAT", "seconds between heartbeats; a silent process's users leave after ~3"
    )
    workers: int = setting(1, "CHAT_WORKERS", "uvicorn worker processes (more than 1 needs --redis-url)")
    allowed_origins: str = setting(
        "",
        "CHAT_ALLOWED_ORIGINS",
        "comma-separated origins whose pages may connect, '*' for any, 'null' for a page opened from disk",
        shown="this server's own, and 'null' when it listens on loopback only",
    )
    jwt_secret: str = setting(
        "", "CHAT_JWT_SECRET", "require a signed token (?token=) on every socket; the token names the user"
    )
    rate_messages: float = setting(
        5.0, "CHAT_RATE_MESSAGES", "messages per second per connection (0: no limit)"
    )
    rate_messages_burst: int = setting(10, "CHAT_RATE_MESSAGES_BURST", "messages allowed in a burst")
    rate_messages_per_address: float = setting(
        50.0,
        "CHAT_RATE_MESSAGES_PER_ADDRESS",
        "messages per second from one client address, all its sockets together (0: no limit)",
    )
    rate_frames: float = setting(
        20.0,
        "CHAT_RATE_FRAMES",
        "frames of any kind per second per connection, bursts of twice that (0: no limit)",
    )
    rate_typing: float = setting(
        1.0, "CHAT_RATE_TYPING", "typing notices per second (more are dropped; 0: no limit)"
    )
    rate_renames: float = setting(0.3, "CHAT_RATE_RENAMES", "renames per second (0: no limit)")
    rate_renames_burst: int = setting(3, "CHAT_RATE_RENAMES_BURST", "renames allowed in a burst")
    flood_warnings: int = setting(
        20,
        "CHAT_FLOOD_WARNINGS",
        "rate_limited warnings (refilled 1/s) before a connection is closed (0: never)",
    )
    max_connections_per_ip: int = setting(
        50, "CHAT_MAX_CONNECTIONS_PER_IP", "sockets one client address may hold (0: no limit)"
    )
    blocklist: str = setting(
        "", "CHAT_BLOCKLIST", "file of words (one a line) masked with * in messages and names"
    )
    ssl_certfile: str = setting("", "CHAT_SSL_CERTFILE", "certificate (PEM) to serve https:// and wss://")
    ssl_keyfile: str = setting("", "CHAT_SSL_KEYFILE", "private key (PEM) of --ssl-certfile")
    ws_protocol: str = setting(
        "fast",
        "CHAT_WS_PROTOCOL",
        "'fast': ours (writes an event to every socket at once, less memory, bounded pongs), or uvicorn's "
        "own if this uvicorn lacks what it needs (a warning says what); 'stock': uvicorn's own",
    )
    kick_ban: float = setting(
        300.0,
        "CHAT_KICK_BAN",
        "seconds a kicked user (its token's name) may not come back to that room (0: may at once)",
    )
    metrics_port: int = setting(
        0,
        "CHAT_METRICS_PORT",
        "serve Prometheus metrics on this port, a listener of their own (0: no metrics; README, Metrics)",
    )
    metrics_host: str = setting(
        "127.0.0.1", "CHAT_METRICS_HOST", "interface of --metrics-port; loopback keeps them private"
    )
    ws_compression: bool = setting(
        False,
        "CHAT_WS_COMPRESSION",
        "accept permessage-deflate, which browsers offer (without context takeover: each broadcast is "
        "compressed once): it costs 1.25 times the CPU per delivery and 0.2 KiB more per idle connection, "
        "for a few bytes saved on short chat messages (README, Benchmarks)",
    )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Defaults, overridden by the environment variables that are set."""
        settings = cls()
        for f in fields(cls):
            raw = environ.get(f.metadata["env"], "")
            if raw != "":
                try:
                    setattr(settings, f.name, _convert(raw, f.default))
                except ValueError as error:
                    cls.argument_parser().error(f"{f.metadata['env']}={raw!r}: {error}")
        try:
            settings.check()
        except ValueError as error:
            cls.argument_parser().error(str(error))
        return settings

    def apply_flags(self, argv: Sequence[str]) -> None:
        """Override these settings with command-line flags (exits with usage on a bad flag)."""
        parser = self.argument_parser()
        parser.parse_args(argv, namespace=self)
        try:
            self.check()
        except ValueError as error:
            parser.error(str(error))

    def export_to(self, environ: MutableMapping[str, str]) -> None:
        """Write every setting to its environment variable (for worker processes)."""
        for f in fields(self):
            value = getattr(self, f.name)
            environ[f.metadata["env"]] = (
                ("true" if value else "false") if isinstance(value, bool) else str(value)
            )

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        parser = ArgumentParser(
            prog="server.py",
            usage=USAGE,
            description=DESCRIPTION,
            epilog=COMMANDS,
            formatter_class=HelpFormatter,
        )
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            shown = f.metadata["shown"] or _shown(f.default)
            help_text = f"{f.metadata['help']} (default: {shown}; env {f.metadata['env']})"
            if isinstance(f.default, bool):
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            else:
                parser.add_argument(
                    flag,
                    type=_parser_for(f.default),
                    default=argparse.SUPPRESS,
                    metavar=f.name.upper(),
                    help=help_text,
                )
        return parser

    def check(self) -> None:
        """Refuse values that would make the server misbehave, rather than fail later."""
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} {getattr(self, name)} is not between 0 and 65535")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError("--metrics-port must differ from --port: metrics have a listener of their own")
        for name in (
            "max_message_chars",
            "max_username_chars",
            "max_room_chars",
            "max_frame_bytes",
            "outbox_limit",
            "outbox_bytes",
            "history_retention",
            "workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "lobby_interval",
            "ping_interval",
            "ping_timeout",
            "history_on_join",
            "history_resume_max",
            "handshake_timeout",
            "history_days",
            "leave_grace",
            "max_rooms",
            "kick_ban",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in (
            "rate_messages",
            "rate_typing",
            "rate_renames",
            "rate_messages_per_address",
            "rate_frames",
            "room_creation_rate",
            "flood_warnings",
            "max_connections_per_ip",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        if self.ws_protocol not in ("fast", "stock"):
            raise ValueError(f"ws_protocol must be 'fast' or 'stock', not {self.ws_protocol!r}")
        if self.redis_heartbeat <= 0:
            raise ValueError("redis_heartbeat must be positive")
        scheme = self.redis_url.partition("://")[0].lower()
        if self.redis_url and scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise ValueError(
                f"--redis-url must start with redis://, rediss://, unix:// or redis+cluster://, "
                f"not {self.redis_url.partition('://')[0]!r}://"
            )
        if scheme.endswith("+cluster") and ("{" in self.redis_prefix or "}" in self.redis_prefix):
            raise ValueError("--redis-prefix must not hold { or } on a Redis Cluster: they make hash tags")
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                "--workers needs --redis-url: each worker is a separate process, and without Redis "
                "they would not share rooms, presence or history"
            )


USAGE = "%(prog)s [OPTION ...]   or   %(prog)s token --username NAME [--admin] [--ttl SECONDS]"
DESCRIPTION = """\
The Fennec WebSocket chat server. Every option has an environment variable; a flag beats its
variable, which beats the default."""
COMMANDS = """\
commands:
  token --username NAME [--admin] [--ttl SECONDS] [--jwt-secret SECRET]
                        print a signed token for ?token=, for a server started with
                        --jwt-secret (or CHAT_JWT_SECRET); server.py token --help says more"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage line short enough to read above an error, and a guess at a
    misspelt flag."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            flags = [flag for action in self._actions for flag in action.option_strings]
            words = message.removeprefix("unrecognized arguments: ").split()
            guesses = [
                guess
                for word in words
                if word.startswith("--")
                for guess in difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.75)
            ]
            if guesses:
                message += f" (did you mean {' or '.join(guesses)}?)"
        super().error(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and the commands as written; options' help wrapped, never at a hyphen
    (`--redis-` and `url` on two lines read as two things)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _shown(default: Any) -> str:
    """A default as --help says it."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default) if default != "" else "none"


INTEGER = re.compile(r"-?[0-9]+")
DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def strict_int(raw: str) -> int:
    """ASCII digits only: int() would also take '١٢', ' 7 ' and '1_000'."""
    if not INTEGER.fullmatch(raw):
        raise ValueError(f"expected a whole number, got {raw!r}")
    return int(raw)


def strict_float(raw: str) -> float:
    """A finite decimal number: float() would also take 'nan', 'inf', '1e309' and ' 5_0 '."""
    if not DECIMAL.fullmatch(raw) or not math.isfinite(number := float(raw)):
        raise ValueError(f"expected a number such as 5 or 0.5, got {raw!r}")
    return number


# argparse names the type in its error: "invalid number value: 'nan'".
strict_int.__name__ = "whole number"
strict_float.__name__ = "number"


def _parser_for(default: Any) -> Callable[[str], Any]:
    if isinstance(default, int):
        return strict_int
    if isinstance(default, float):
        return strict_float
    return str


def _convert(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true or false")
    return _parser_for(default)(raw)
