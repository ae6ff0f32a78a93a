"""A WebSocket client on a bare socket, for clients that misbehave on purpose: half-sent
requests, pings without reading, pongs never sent. A real library would not let us."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


def connect(port: int, source: str = "127.0.0.1", receive_buffer: int | None = None) -> socket.socket:
    """A TCP connection to the server from `source` (any 127.x.y.z works on Linux loopback)."""
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting, so that the window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


def upgrade_request(path: str, host: str = "127.0.0.1") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def handshake(sock: socket.socket, path: str) -> None:
    """Send the upgrade request and read the 101 response (nothing after it)."""
    sock.sendall(upgrade_request(path))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {response!r}")
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """A masked client frame (every client frame must be masked)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return header + mask + masked


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next server frame (unmasked): (opcode, payload)."""
    first, second = _read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _read_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _read_exactly(sock, 8))
    return first & 0x0F, _read_exactly(sock, length)


def close_code(payload: bytes) -> tuple[int, str]:
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode()


def read_until_close(sock: socket.socket, timeout: float) -> tuple[int, str] | None:
    """Read frames (answering nothing) until a close frame; None if the connection just ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            opcode, payload = read_frame(sock)
        except (ConnectionError, OSError):
            return None
        if opcode == CLOSE:
            return close_code(payload)
    raise TimeoutError("no close frame")


def read_http_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
