"""Application error codes carried in QUIC CONNECTION_CLOSE and RESET_STREAM frames.

snocat 0.8 defines none and closes with 0; every non-zero code here is our addition.
A compat peer sees them only as numbers with a reason phrase.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why a whole tunnel was closed (QUIC application CONNECTION_CLOSE)."""

    NORMAL = 0x0
    AUTHENTICATION_FAILED = 0x10
    AUTHENTICATION_TIMEOUT = 0x11
    UNSUPPORTED_VERSION = 0x12
    PROTOCOL_VIOLATION = 0x13
    LIMIT_EXCEEDED = 0x14
    SHUTTING_DOWN = 0x15
    REFUSED = 0x16
    INTERNAL_ERROR = 0x17
    #: A newer tunnel authenticated under the same name took this one's place.
    TAKEN_OVER = 0x18


class StreamCode(IntEnum):
    """Why one stream was reset or stopped (RESET_STREAM / STOP_SENDING)."""

    NO_ERROR = 0x0
    CANCELLED = 0x1
    PROTOCOL_VIOLATION = 0x2
    REFUSED = 0x3
    TIMEOUT = 0x4
    LIMIT_EXCEEDED = 0x5
    TARGET_UNREACHABLE = 0x6
