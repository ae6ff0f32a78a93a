"""Who may open a socket: the page's origin, a signed token, and a cap per client address.

Every check runs after the WebSocket handshake, so that a refused browser sees the close code
and its reason; a refusal before the handshake reaches it only as 1006, with no reason.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fennec.exceptions import UnauthorizedException
from fennec.security import JWTHandler

from .protocol import CloseCode, Rejection, check_username
from .settings import Settings

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token says the client is. Without --jwt-secret everyone is anonymous."""

    username: str | None = None  # set by a token: the client may not rename itself
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    address: str
    identity: Identity


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    reason: str


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
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int | float):
            raise TokenProblem("token has no expiry")
        name = check_username(claims.get("username") or claims.get("sub"), settings)
        if isinstance(name, Rejection):
            raise TokenProblem(f"token username: {name.reason}")
        return Identity(username=name, admin=claims.get("role") == "admin")


def _unpadded_b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class Gate:
    """Admits sockets: origin, then token, then the number of sockets from the same address."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._open: Counter[str] = Counter()  # client address → sockets open

    @property
    def tokens(self) -> Tokens | None:
        return Tokens(self.settings.jwt_secret) if self.settings.jwt_secret else None

    def admit(self, scope: dict[str, Any]) -> Admission | Refusal:
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
        address = (scope.get("client") or ("unknown", 0))[0]
        cap = self.settings.max_connections_per_ip
        if cap and self._open[address] >= cap:
            reason = f"too many connections from your address (at most {cap})"
            return Refusal(CloseCode.TRY_AGAIN_LATER, reason)
        self._open[address] += 1
        return Admission(address, identity)

    def release(self, admission: Admission) -> None:
        self._open[admission.address] -= 1
        if self._open[admission.address] <= 0:
            del self._open[admission.address]


def origin_problem(scope: dict[str, Any], settings: Settings) -> str | None:
    """Why a browser page from this Origin may not connect (cross-site WebSocket hijacking),
    or None. Clients that send no Origin are not browsers, and are not asked."""
    origin = _header(scope, "origin")
    if origin is None:
        return None
    if settings.allowed_origins:
        allowed = {item.strip().rstrip("/") for item in settings.allowed_origins.split(",")}
        return None if "*" in allowed or origin in allowed else f"origin {origin} is not allowed"
    if origin == "null":  # a page opened from disk
        return None
    parts = urlsplit(origin)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    own_port = (scope.get("server") or ("", None))[1]
    if parts.hostname in LOOPBACK_HOSTS and port == own_port:
        return None
    # The page's own host, as the browser named it. Not on a loopback-only server: there, a
    # hostname other than localhost is a DNS-rebinding attack, not our page.
    if settings.host not in LOOPBACK_HOSTS and parts.netloc == _header(scope, "host"):
        return None
    return f"origin {origin} is not allowed (see --allowed-origins)"


def _header(scope: dict[str, Any], name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope.get("headers", []):
        if key == wanted:
            return value.decode("latin-1")
    return None


def _query(scope: dict[str, Any]) -> dict[str, str]:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {name: values[0] for name, values in query.items()}
