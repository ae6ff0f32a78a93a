"""The fast path cannot silently rot: every uvicorn and websockets internal our two uvicorn
protocols use is named in fennec_chat/uvicorn_contract.py, still there, and, should a release
take one away, the server says which and runs on uvicorn's own protocol instead."""

from __future__ import annotations

import inspect
import re
import textwrap
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from fennec_chat import uvicorn_contract, uvicorn_http, uvicorn_websocket
from fennec_chat.uvicorn_contract import HTTP_PROTOCOL, WEBSOCKET_PROTOCOL, Internal, broken
from tests.server_process import ROOT, ServerProcess, log_path


def test_every_internal_our_uvicorn_protocols_use_is_still_there():
    assert broken(WEBSOCKET_PROTOCOL) == [], "the fast WebSocket protocol: pin uvicorn/websockets back"
    assert broken(HTTP_PROTOCOL) == [], "the bounded HTTP protocol: pin uvicorn back"


def names_touched(ours: type, through: str = "self") -> set[str]:
    """Every `self.<name>` (or `self.conn.<name>`) our class's source uses."""
    source = inspect.getsource(ours)
    return set(re.findall(rf"\b{re.escape(through)}\.(\w+)", source))


def defined_by(ours: type) -> set[str]:
    """Names our subclass brings itself: its own methods and class attributes, and the instance
    attributes it assigns that its uvicorn base does not have."""
    base = ours.__mro__[1]
    own = set(vars(ours))
    assigned = set(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]+)?=[^=]", inspect.getsource(ours)))
    base_source = uvicorn_contract._source(base)
    return own | {name for name in assigned if not re.search(rf"\bself\.{name}\b", base_source)}


def contract_of(internals: tuple[Internal, ...], where: str) -> set[str]:
    [internal] = [internal for internal in internals if internal.where.endswith(where)]
    return set(internal.methods) | set(internal.attributes)


@pytest.mark.parametrize(
    ("ours", "internals", "base"),
    [
        (uvicorn_websocket.WriteNowWebSocketProtocol, WEBSOCKET_PROTOCOL, ":WebSocketsSansIOProtocol"),
        (uvicorn_http.BoundedHttpProtocol, HTTP_PROTOCOL, ":HttpToolsProtocol"),
    ],
)
def test_the_contract_names_every_uvicorn_internal_our_protocols_touch(ours, internals, base):
    """Edit a protocol to use one more internal and this fails until the contract lists it."""
    touched = names_touched(ours) - defined_by(ours) - {"__class__"}
    unlisted = touched - contract_of(internals, base)
    # What our class inherits without touching uvicorn's internals (asyncio.Protocol's API).
    unlisted -= set(dir(ours.__mro__[-2]))
    assert unlisted == set(), f"{ours.__name__} uses {sorted(unlisted)}: add them to uvicorn_contract.py"
    # And every method it overrides: renamed upstream, an override would silently never run.
    base_class = ours.__mro__[1]
    overridden = {name for name, value in vars(ours).items() if callable(value) and hasattr(base_class, name)}
    overridden -= set(dir(object))
    assert overridden - contract_of(internals, base) == set()


def test_the_contract_names_every_part_of_the_websockets_connection_we_use():
    used = names_touched(uvicorn_websocket.WriteNowWebSocketProtocol, "self.conn")
    assert used - contract_of(WEBSOCKET_PROTOCOL, ":ServerProtocol") == set()


def test_a_missing_or_changed_internal_is_named():
    """The checker can fail: each way an internal goes away is said in words."""
    where = "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol"
    problems = broken(
        (
            Internal("uvicorn.protocols.websockets.no_such_module:Protocol"),
            Internal(where, methods={"handle_pong_flood": ()}),
            Internal(where, methods={"connection_lost": ("exception", "why")}),
            Internal(where, attributes=("pong_budget",)),
            Internal(where, stand_ins={"queue": ("put_nowait",)}),  # uvicorn also calls get and empty
            Internal(where, writers=("send", "shutdown")),  # and seven more methods write
        )
    )
    assert problems == [
        "uvicorn.protocols.websockets.no_such_module:Protocol is gone",
        "WebSocketsSansIOProtocol.handle_pong_flood() is gone",
        "WebSocketsSansIOProtocol.connection_lost takes (exc), not (exception, why)",
        "WebSocketsSansIOProtocol.pong_budget is gone",
        "WebSocketsSansIOProtocol now calls queue.empty, get()",
        "WebSocketsSansIOProtocol writes to its transport from handle_close, handle_connect, "
        "handle_parser_exception, handle_ping, keepalive_timeout, send, send_500_response, "
        "send_keepalive_ping, shutdown",
    ]


async def test_a_uvicorn_lacking_an_internal_gets_one_warning_and_the_stock_protocol_which_works(
    tmp_path: Path, room: str
):
    # A uvicorn release without `keepalive_timeout`, as far as our check can tell.
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            from uvicorn.protocols.websockets import websockets_sansio_impl
            websockets_sansio_impl.WebSocketsSansIOProtocol.keepalive_timeout = None
            """
        )
    )
    server = ServerProcess([], {"PYTHONPATH": str(tmp_path)}, log_path("contract-broken")).start()
    try:
        warnings = [line for line in server.log().splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1, warnings
        assert "WebSocketsSansIOProtocol.keepalive_timeout() is gone" in warnings[0]
        assert "running on uvicorn's own" in warnings[0]
        assert server.health()["ws_protocol"] == "stock"
        alice = await server.connect(f"/ws/chat/{room}?username=alice")
        await alice.joined()
        bob = await server.connect(f"/ws/chat/{room}?username=bob")
        await bob.joined()
        await bob.send(type="message", message="still works")
        assert (await alice.wait_for("message"))["message"] == "still works"
    finally:
        server.stop()


def test_the_fast_protocol_is_the_default_and_stock_is_asked_for_by_flag(server, stock_server):
    assert server.health()["ws_protocol"] == "fast"
    assert stock_server.health()["ws_protocol"] == "stock"
    for process in (server, stock_server):
        assert "warning:" not in process.log()


def test_the_installed_packages_are_the_ones_the_lock_file_says():
    """`make` installs with requirements.lock as constraints: what runs is what CI tested. On a
    machine where this fails, `make test` (or `make run`) reinstalls them."""
    drifted = []
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, locked = line.partition("==")
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != locked:
            drifted.append(f"{name} {installed} (locked {locked})")
    assert drifted == [], drifted


def test_uvicorn_and_websockets_are_pinned_to_what_the_fast_path_was_built_against():
    declared = (ROOT / "pyproject.toml").read_text()
    assert '"uvicorn[standard]>=0.54,<0.55"' in declared  # the minor version the contract was made for
    assert '"websockets>=17.4,<18"' in declared  # a dependency of ours, not only uvicorn's
