"""What our two uvicorn protocols lean on inside uvicorn and websockets, none of it public API.

`uvicorn_websocket.WriteNowWebSocketProtocol` (the fast path: write_now, less memory, bounded
pongs) and `uvicorn_http.BoundedHttpProtocol` (a deadline and a size limit per request) subclass
uvicorn's own protocol classes and use their attributes. A uvicorn or websockets release that
renames one of them would break sockets, or quietly bring back what the subclass fixed, with
nothing failing. So every internal they use is listed here, checked by
tests/test_uvicorn_contract.py, and checked again at startup: if one is missing, the server says
which and runs on uvicorn's stock protocol instead (everything works, only slower or without
the limit), rather than half-working.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Internal:
    """A class inside uvicorn or websockets, and what we use of it."""

    where: str  # "module:Class"
    # Methods we override or call, with their parameters after `self`, as we call them.
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Attributes we read or set on its instances: a class attribute, or assigned in its source.
    attributes: tuple[str, ...] = ()
    # Our object stands in for one of its attributes, offering only these methods: it must
    # call no other method of that attribute (attribute name → the methods offered).
    stand_ins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Every method of it that writes to the transport itself. write_now holds frames until the
    # end of the loop turn, so each of these must send them first (uvicorn_websocket.py); a
    # release that writes from one more place could put a frame after a close frame.
    writers: tuple[str, ...] = ()


WEBSOCKET_PROTOCOL = (
    Internal(
        "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol",
        methods={
            "__init__": ("config", "server_state", "app_state", "_loop"),
            "connection_made": ("transport",),
            "connection_lost": ("exc",),
            "data_received": ("data",),
            "handle_connect": ("event",),
            "handle_ping": (),
            "resume_writing": (),
            "keepalive_timeout": (),
            "on_task_complete": ("task",),
            "start_keepalive": (),
            "stop_keepalive": (),
            "send": ("message",),
            "shutdown": (),
        },
        attributes=(
            "conn",  # the websockets ServerProtocol
            "transport",
            "loop",
            "queue",  # replaced by our lighter Inbox
            "close_sent",
            "disconnected",
            "writable",
            "handshake_complete",
            "initial_response",
            "read_paused",
            "pong_timer",
            "pending_ping_payload",
            "ping_timeout",
            "close_timer",
            "scope",
            "config",  # its ws_per_message_deflate: --ws-compression
            "request",  # the upgrade request and response, let go of after the handshake
            "response",
        ),
        stand_ins={"queue": ("put_nowait", "get", "empty"), "writable": ("set", "clear", "is_set", "wait")},
        writers=(
            # We override these, and send what is held first:
            "send",
            "shutdown",
            "keepalive_timeout",
            # Reached only from data_received, which sends what is held first:
            "handle_close",
            "handle_parser_exception",
            "handle_ping",
            # Before write_now can hold anything, or order does not matter (a ping):
            "handle_connect",
            "send_500_response",
            "send_keepalive_ping",
        ),
    ),
    Internal(
        "websockets.server:ServerProtocol",
        methods={"send_close": ("code", "reason"), "data_to_send": ()},
        # available_extensions: replaced by permessage-deflate without context takeover
        attributes=("state", "close_rcvd", "extensions", "available_extensions"),
    ),
    Internal(
        "websockets.extensions.permessage_deflate:ServerPerMessageDeflateFactory",
        methods={
            "__init__": (
                "server_no_context_takeover",
                "client_no_context_takeover",
                "server_max_window_bits",
                "client_max_window_bits",
                "compress_settings",
            )
        },
    ),
    Internal(
        "websockets.extensions.permessage_deflate:PerMessageDeflate",
        # How a socket compresses, to share one compressed frame among those alike.
        attributes=("local_no_context_takeover", "local_max_window_bits", "compress_settings"),
    ),
    Internal("websockets.protocol:State", attributes=("OPEN",)),
    # Its headers, emptied once the handshake is done (the parser's generator keeps the request).
    Internal("websockets.http11:Request", attributes=("headers",)),
    Internal("websockets.datastructures:Headers"),
)

HTTP_PROTOCOL = (
    Internal(
        "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol",
        methods={
            "__init__": ("config", "server_state", "app_state", "_loop"),
            "connection_made": ("transport",),
            "connection_lost": ("exc",),
            "data_received": ("data",),
            "on_message_begin": (),
            "on_headers_complete": (),
            "on_message_complete": (),
            "_should_upgrade": (),
        },
        attributes=("client", "loop", "transport", "parser"),
    ),
)


def broken(internals: tuple[Internal, ...]) -> list[str]:
    """What no longer holds, each as a short phrase ([] when everything does)."""
    problems: list[str] = []
    for internal in internals:
        problems += _check(internal)
    return problems


def _check(internal: Internal) -> list[str]:
    module_name, _, class_name = internal.where.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return [f"{internal.where} is gone"]
    problems = []
    for method, parameters in internal.methods.items():
        function = getattr(found, method, None)
        if not callable(function):
            problems.append(f"{class_name}.{method}() is gone")
            continue
        have = tuple(name for name in inspect.signature(function).parameters if name != "self")
        if have[: len(parameters)] != parameters or any(
            inspect.signature(function).parameters[name].default is inspect.Parameter.empty
            for name in have[len(parameters) :]
        ):
            problems.append(f"{class_name}.{method} takes ({', '.join(have)}), not ({', '.join(parameters)})")
    if internal.writers:
        writers = _writers(found)
        if writers != set(internal.writers):
            problems.append(f"{class_name} writes to its transport from {', '.join(sorted(writers))}")
    source = _source(found)
    fields = {field.name for field in dataclasses.fields(found)} if dataclasses.is_dataclass(found) else set()
    for attribute in internal.attributes:
        if attribute in fields:
            continue
        if not hasattr(found, attribute) and not re.search(rf"self\.{attribute}\b[^=\n]*=[^=]", source):
            problems.append(f"{class_name}.{attribute} is gone")
    for attribute, offered in internal.stand_ins.items():
        used = set(re.findall(rf"self\.{attribute}\.(\w+)", source)) - set(offered)
        if used:
            problems.append(f"{class_name} now calls {attribute}.{', '.join(sorted(used))}()")
    return problems


def _writers(found: type) -> set[str]:
    """The methods of a class (and of its bases from the same package) that write to the
    transport."""
    package = found.__module__.split(".")[0]
    methods = inspect.getmembers(found, inspect.isfunction)
    return {
        name
        for name, function in methods
        if function.__module__.split(".")[0] == package
        and "self.transport.write(" in inspect.getsource(function)
    }


def _source(found: Any) -> str:
    """The source of a class and of its bases from the same package."""
    package = found.__module__.split(".")[0]
    parts = []
    for cls in inspect.getmro(found) if inspect.isclass(found) else ():
        if cls.__module__.split(".")[0] == package:
            try:
                parts.append(inspect.getsource(cls))
            except (OSError, TypeError):
                continue
    return "\n".join(parts)
