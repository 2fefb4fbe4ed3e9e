"""The exceptions snocat_anyio raises to its users.

Stream errors subclass anyio's own, so code written for any anyio ``ByteStream``
handles them without knowing snocat.
"""

from __future__ import annotations

import anyio


class SnocatError(Exception):
    """Root of snocat_anyio's errors."""


class TunnelClosedError(anyio.BrokenResourceError, SnocatError):
    """The tunnel carrying a stream closed (``code`` and ``reason`` say why)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"tunnel closed (code {code:#x}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class StreamResetError(anyio.BrokenResourceError, SnocatError):
    """The stream was aborted by the peer (``by_peer``) or by the protocol core."""

    def __init__(self, code: int, reason: str, *, by_peer: bool) -> None:
        super().__init__(f"stream reset (code {code:#x}): {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


class StreamRefusedError(SnocatError):
    """The peer refused to open a stream to the requested route address."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthenticationError(SnocatError):
    """The tunnel could not authenticate: wrong token, scheme mismatch, timeout."""


class ConnectError(SnocatError):
    """The aggregator could not be reached, or its certificate was not trusted."""


class TunnelNotFoundError(SnocatError, LookupError):
    """No authenticated tunnel has the name an outbound stream was routed to."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no tunnel named {name!r} is connected")
        self.name = name


class FeedOverflowError(SnocatError):
    """An activity subscription fell too far behind and was closed; records after
    the ones it had queued were not delivered to it."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the activity subscription fell {limit} records behind and was closed; "
            "subscribe again (or read faster)"
        )
        self.limit = limit


class PortRefusedError(SnocatError):
    """The aggregator could not give a target the public port it needs (none free,
    or the one asked for is taken or outside its range), and the client gave up."""
