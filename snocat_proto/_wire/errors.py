"""The exceptions of the protocol core.

One root, :class:`ProtocolError`, with two branches in the manner of h11:
:class:`LocalProtocolError` when *our* caller misuses the API, and
:class:`RemoteProtocolError` when the *peer* sent something we cannot accept.
Nothing else escapes a parser: bytes from the network never surface as
``IndexError``, ``UnicodeDecodeError``, ``struct.error`` or ``json.JSONDecodeError``.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error the core raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """The application asked for something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class FrameTooLarge(RemoteProtocolError):
    """A length-prefixed frame announced more bytes than the configured limit."""


class UnsupportedVersion(RemoteProtocolError):
    """The peer's NYAN version byte is above the highest version we speak (0)."""


class AuthenticationFailed(RemoteProtocolError):
    """The peer did not prove who it is (or spoke another authentication scheme)."""


class SendBufferFull(LocalProtocolError):
    """More data was offered to a stream than its send buffer may hold."""
