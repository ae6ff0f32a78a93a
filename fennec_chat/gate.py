"""Who may open a socket: the page's origin, a signed token, a cap per client address, and
how fast one sender may open new rooms; and the sockets that flood, closed.

Every check runs after the WebSocket handshake, so that a refused browser sees the close code
and its reason; a refusal before the handshake reaches it only as 1006, with no reason.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from fennec.exceptions import UnauthorizedException
from fennec.security import JWTHandler

from . import metrics
from .limits import Ledger, RateLimits, Sender, room_creation_bucket
from .protocol import CloseCode, Rejection, check_username, room_name_problem
from .settings import Settings

if TYPE_CHECKING:
    from fennec import WebSocket

    from .manager import ChatManager

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token says the client is. Without --jwt-secret everyone is anonymous."""

    username: str | None = None  # set by a token: the client may not rename itself
    admin: bool = False


ANONYMOUS = Identity()


@dataclass(frozen=True, slots=True)
class Admission:
    address: str
    identity: Identity

    @property
    def sender(self) -> Sender:
        return Sender(self.address, self.identity.username)


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    reason: str

    def __post_init__(self) -> None:
        # A close frame's reason may hold 123 bytes; a longer one would fail to send.
        if len(self.reason.encode()) > 123:
            object.__setattr__(self, "reason", self.reason.encode()[:120].decode(errors="ignore") + "...")


class TokenProblem(Exception):
    """Why a token is not accepted. The message never contains the token."""


class Tokens:
    """Signed tokens (JWT, HS256) made and checked with Fennec's own `JWTHandler`."""

    ALGORITHM = "HS256"

    def __init__(self, secret: str) -> None:
        self._jwt = JWTHandler(secret_key=secret, algorithm=self.ALGORITHM)

    def mint(self, username: str, admin: bool = False, ttl: int = 3600) -> str:
        claims: dict[str, Any] = {"sub": username, "username": username}
        if admin:
            claims["role"] = "admin"
        return self._jwt.encode(claims, expires_in=ttl)

    def verify(self, token: str, settings: Settings) -> Identity:
        # Fennec's handler signs with HS256 whatever the header claims, so the header's algorithm
        # is checked here: a token that says "none" or "HS512" was not made by us.
        try:
            header = json.loads(_unpadded_b64decode(token.split(".")[0]))
        except (ValueError, IndexError):
            raise TokenProblem("malformed token") from None
        if not isinstance(header, dict) or header.get("alg") != self.ALGORITHM:
            raise TokenProblem(f"token algorithm must be {self.ALGORITHM}")
        try:
            claims = self._jwt.decode(token)
        except UnauthorizedException as problem:
            raise TokenProblem(problem.message.lower()) from None
        expiry = claims.get("exp") if isinstance(claims, dict) else None
        # NaN and 1e309 (infinity) are numbers that never compare as past: no expiry at all.
        if isinstance(expiry, bool) or not isinstance(expiry, int | float) or not math.isfinite(expiry):
            raise TokenProblem("token has no expiry")
        # Reserved names ("admin") are the operator's to give: a token may carry one.
        name = check_username(claims.get("username") or claims.get("sub"), settings, reserved_ok=True)
        if isinstance(name, Rejection):
            raise TokenProblem(f"token username: {name.reason}")
        return Identity(username=name, admin=claims.get("role") == "admin")


def _unpadded_b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class Gate:
    """Admits sockets: room name, origin, token, new rooms per sender, then sockets per address;
    gives each its rate limits, and closes one that floods.

    `admitted` is the one way in: an async context manager entered before anything else can
    fail, whose exit gives the address's seat back whatever happened inside.
    """

    def __init__(self, settings: Settings, manager: ChatManager) -> None:
        self.settings = settings
        self.manager = manager
        self.ledger = Ledger()  # rate limits that outlive sockets, by sender

    @property
    def tokens(self) -> Tokens | None:
        return Tokens(self.settings.jwt_secret) if self.settings.jwt_secret else None

    def admitted(self, websocket: WebSocket, room: str | None = None) -> Admitted:
        """`async with gate.admitted(websocket, room) as admission:` the admission of an accepted
        socket (`room` is None for the lobby), or None: it was refused and closed with the
        reason. Leaving the block gives the seat back."""
        return Admitted(self, websocket, room)

    def limits(self, admission: Admission) -> RateLimits:
        return RateLimits(self.settings, self.ledger, admission.sender)

    async def close_if_flooding(self, limits: RateLimits, client_id: str, what: str) -> None:
        """After each frame: a sender warned again and again is no longer a person typing."""
        if limits.flooding:
            await self.manager.close(client_id, CloseCode.POLICY_VIOLATION, f"flooding: too many {what}")

    async def admit(self, scope: dict[str, Any], room: str | None) -> Admission | Refusal:
        if room is not None and (problem := room_name_problem(room, self.settings)):
            return Refusal(CloseCode.POLICY_VIOLATION, problem)
        if problem := origin_problem(scope, self.settings):
            return Refusal(CloseCode.POLICY_VIOLATION, problem)
        identity = Identity()
        if (tokens := self.tokens) is not None:
            token = _query(scope).get("token")
            if not token:
                return Refusal(CloseCode.POLICY_VIOLATION, "a token is required: add ?token=")
            try:
                identity = tokens.verify(token, self.settings)
            except TokenProblem as problem:
                return Refusal(CloseCode.POLICY_VIOLATION, f"invalid token: {problem}")
        backplane = self.manager.backplane
        if (
            room is not None
            and identity.username is not None
            and (until := await backplane.bans.banned_until(room, identity.username)) is not None
        ):
            ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
            return Refusal(CloseCode.BANNED, f"you are banned from this room until {ends}")
        admission = Admission((scope.get("client") or ("unknown", 0))[0], identity)
        cap = self.settings.max_connections_per_ip
        if not await backplane.take_seat(admission.address, cap):
            reason = f"too many connections from your address (at most {cap})"
            return Refusal(CloseCode.TRY_AGAIN_LATER, reason)
        # From here on the seat is taken: a refusal gives it back, an admission is given back by
        # the caller (`admitted` does, on its way out).
        if room is not None and (refusal := await self._new_room_refusal(room, admission.sender)):
            backplane.release_seat(admission.address)
            return refusal
        return admission

    async def _new_room_refusal(self, room: str, sender: Sender) -> Refusal | None:
        """Opening a room nobody is in costs the sender one of its new rooms, and needs space."""
        settings = self.settings
        if not (settings.max_rooms or settings.room_creation_rate) or room in self.manager.rooms:
            return None
        if await self.manager.backplane.has_room(room):  # open on another process
            return None
        if settings.max_rooms and await self.manager.backplane.room_count() >= settings.max_rooms:
            reason = f"the server has too many rooms open ({settings.max_rooms}): join an existing one"
            return Refusal(CloseCode.TRY_AGAIN_LATER, reason)
        if settings.room_creation_rate:
            wait = room_creation_bucket(self.ledger, settings, sender).take()
            if wait > 0:
                reason = f"too many new rooms: try again in {math.ceil(wait)} s or join an existing room"
                return Refusal(CloseCode.TRY_AGAIN_LATER, reason)
        return None


class Admitted:
    """The `async with` of `Gate.admitted`: a class rather than a generator, because it lives as
    long as the connection and a generator's frame would cost every idle connection more."""

    __slots__ = ("admission", "gate", "room", "websocket")

    def __init__(self, gate: Gate, websocket: WebSocket, room: str | None) -> None:
        self.gate, self.websocket, self.room = gate, websocket, room
        self.admission: Admission | Refusal | None = None

    async def __aenter__(self) -> Admission | None:
        """The admission, or None: refused, and closed with the refusal's code and reason."""
        self.admission = await self.gate.admit(self.websocket.scope, self.room)
        if isinstance(self.admission, Refusal):
            metrics.refusals.labels(str(int(self.admission.code))).inc()
            await self.websocket.close(self.admission.code, self.admission.reason)
            return None
        return self.admission

    async def __aexit__(self, *exc_info: object) -> None:
        if isinstance(self.admission, Admission):
            self.gate.manager.backplane.release_seat(self.admission.address)


def origin_problem(scope: dict[str, Any], settings: Settings) -> str | None:
    """Why a browser page from this Origin may not connect (cross-site WebSocket hijacking),
    or None. Clients that send no Origin are not browsers, and are not asked."""
    origin = _header(scope, "origin")
    if origin is None:
        return None
    # A close reason holds at most 123 bytes: 60 ASCII characters of the origin, at most.
    shown = origin.encode("ascii", "backslashreplace").decode()[:60]
    if settings.allowed_origins:
        allowed = {item.strip().rstrip("/") for item in settings.allowed_origins.split(",")}
        return None if "*" in allowed or origin in allowed else f"origin {shown} is not allowed"
    if origin == "null":
        # A page opened from disk sends "null", and so does a sandboxed frame on any web site.
        # On a loopback-only server only this machine's pages reach us; beyond it, ask for it.
        if settings.host in LOOPBACK_HOSTS:
            return None
        return "origin null (a page opened from disk) needs --allowed-origins null on this server"
    try:
        parts = urlsplit(origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # "http://localhost:99999", "http://[::1": not an origin a browser sends
        return f"malformed origin {shown!r}"
    own_port = (scope.get("server") or ("", None))[1]
    if parts.hostname in LOOPBACK_HOSTS and port == own_port:
        return None
    # The page's own host, as the browser named it. Not on a loopback-only server: there, a
    # hostname other than localhost is a DNS-rebinding attack, not our page.
    if settings.host not in LOOPBACK_HOSTS and parts.netloc == _header(scope, "host"):
        return None
    return f"origin {shown} is not allowed (see --allowed-origins)"


def _header(scope: dict[str, Any], name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope.get("headers", []):
        if key == wanted:
            return value.decode("latin-1")
    return None


def _query(scope: dict[str, Any]) -> dict[str, str]:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {name: values[0] for name, values in query.items()}
