"""Length-prefixed frames: a 4-byte big-endian unsigned length, then the payload.

This module owns the frame codec that NYAN (the route address) and ``proxyme``
(subject and grant) use, and nothing about what the payloads mean.

:class:`FrameDecoder` is incremental and bounded. It checks the length header of
the frame at the head of its buffer as soon as the four header bytes are there, so
an oversized frame is refused before any of its payload is buffered. It does *not*
look past the head frame: the bytes after the last frame a protocol expects belong
to the next layer (service bytes after the NYAN address, for instance) and must not
be judged as frame headers. Callers take them with :meth:`FrameDecoder.take_remainder`.
"""

from __future__ import annotations

from .errors import FrameTooLarge, LocalProtocolError

__all__ = ["LENGTH_PREFIX_SIZE", "MAX_FRAME_PAYLOAD", "FrameDecoder", "encode_frame"]

#: Bytes of the big-endian length that precedes every payload.
LENGTH_PREFIX_SIZE = 4
#: The largest payload a 4-byte length can announce.
MAX_FRAME_PAYLOAD = 2**32 - 1

# Consumed bytes are dropped from the front of the buffer only once they are both
# numerous and at least half of it, so draining many small frames stays linear.
_COMPACT_THRESHOLD = 64 * 1024


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length; :class:`LocalProtocolError` above 2**32-1 bytes."""
    size = len(payload)
    if size > MAX_FRAME_PAYLOAD:
        raise LocalProtocolError(f"frame payload of {size} bytes does not fit a 4-byte length")
    return size.to_bytes(LENGTH_PREFIX_SIZE, "big") + bytes(payload)


class FrameDecoder:
    """Turns a byte stream into frame payloads, refusing any above ``max_size``."""

    __slots__ = ("_buffer", "_max_size", "_offset")

    def __init__(self, max_size: int) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int):
            raise LocalProtocolError("FrameDecoder max_size must be an int")
        if not 0 <= max_size <= MAX_FRAME_PAYLOAD:
            raise LocalProtocolError(f"FrameDecoder max_size out of range: {max_size}")
        self._max_size = max_size
        self._buffer = bytearray()
        self._offset = 0

    @property
    def max_size(self) -> int:
        """The largest payload this decoder accepts."""
        return self._max_size

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a frame or remainder."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> None:
        """Add received bytes; :class:`FrameTooLarge` if the head frame is oversized."""
        if data:
            self._buffer += data
        self._head_length()

    def next_frame(self) -> bytes | None:
        """The next complete payload, or ``None`` until more bytes arrive."""
        length = self._head_length()
        if length is None:
            return None
        start = self._offset + LENGTH_PREFIX_SIZE
        end = start + length
        if end > len(self._buffer):
            return None
        payload = bytes(self._buffer[start:end])
        self._consume_to(end)
        return payload

    def take_remainder(self) -> bytes:
        """Return and forget every buffered byte that was not returned as a frame."""
        remainder = bytes(self._buffer[self._offset :])
        self._buffer.clear()
        self._offset = 0
        return remainder

    def _head_length(self) -> int | None:
        offset = self._offset
        if len(self._buffer) - offset < LENGTH_PREFIX_SIZE:
            return None
        length = int.from_bytes(self._buffer[offset : offset + LENGTH_PREFIX_SIZE], "big")
        if length > self._max_size:
            raise FrameTooLarge(
                f"frame announces {length} bytes, more than the limit of {self._max_size}"
            )
        return length

    def _consume_to(self, end: int) -> None:
        if end == len(self._buffer):
            self._buffer.clear()
            self._offset = 0
        elif end >= _COMPACT_THRESHOLD and 2 * end >= len(self._buffer):
            del self._buffer[:end]
            self._offset = 0
        else:
            self._offset = end
