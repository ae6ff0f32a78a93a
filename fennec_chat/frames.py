"""The bytes of a server's WebSocket frames, built once per broadcast and shared by every socket
that can take them.

A server's frames are never masked (RFC 6455, section 5.3), so one event's frame is the same
bytes for every plain recipient. Compressed frames can be shared too, when compression has no
context takeover (RFC 7692, section 7.1.1): each message is then deflated on its own, and its
bytes depend only on the window size the recipient agreed to.
"""

from __future__ import annotations

import zlib
from typing import Any

# A frame's header bytes, by its second byte (the length, or 126/127: 2 or 8 bytes follow).
HEADER_BYTES = [2] * 126 + [4, 10]

TEXT = 0x81  # FIN + opcode 1 (text)
COMPRESSED_TEXT = 0xC1  # FIN + RSV1 (permessage-deflate: this message is compressed) + text
EMPTY_BLOCK = b"\x00\x00\xff\xff"  # what a sync flush ends with; RFC 7692 leaves it out


def text_frame(data: bytes) -> bytes:
    """`data` (UTF-8) as one final, unmasked text frame (RFC 6455, section 5.2)."""
    return frame(TEXT, data)


def frame(first_byte: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((first_byte, length)) + payload
    if length < 65536:
        return bytes((first_byte, 126)) + length.to_bytes(2, "big") + payload
    return bytes((first_byte, 127)) + length.to_bytes(8, "big") + payload


def deflated(text_frame: bytes, window_bits: int, settings: dict[str, Any]) -> bytes:
    """A text frame's message compressed on its own, as permessage-deflate without context
    takeover sends it (RFC 7692, section 7.2.1)."""
    payload = memoryview(text_frame)[HEADER_BYTES[text_frame[1]] :]
    compressor = zlib.compressobj(wbits=-window_bits, **settings)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(EMPTY_BLOCK)
    return frame(COMPRESSED_TEXT, data[:-4])


class DeflatedOnce:
    """The compressed forms of the frame being broadcast, one per window size: a broadcast
    passes the same `text_frame` object to every socket, so it is compressed once per window
    size rather than once per recipient. It keeps only the latest frame's."""

    __slots__ = ("_by_window", "_source")

    def __init__(self) -> None:
        self._source: bytes | None = None
        self._by_window: dict[int, bytes] = {}

    def get(self, text_frame: bytes, window_bits: int, settings: dict[str, Any]) -> bytes:
        if text_frame is not self._source:
            self._source = text_frame
            self._by_window.clear()
        found = self._by_window.get(window_bits)
        if found is None:
            found = self._by_window[window_bits] = deflated(text_frame, window_bits, settings)
        return found
