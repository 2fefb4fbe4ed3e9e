"""The exceptions a binding raises to its users.

Written once: ``snocat_sync/_errors.py`` is generated from this module, so each
binding has classes of its own (``snocat_anyio.SnocatError`` is not
``snocat_sync.SnocatError``).  Stream errors subclass the binding's own family, named
in its ``_error_bases``: anyio's ``BrokenResourceError`` in snocat_anyio, the
built-in ``ConnectionError`` family (as a socket's would) in snocat_sync.
"""

from __future__ import annotations

from snocat_proto._service.stream_handle import FailureKind, StreamFailure

from ._error_bases import StreamRefusedBase, StreamResetBase, TunnelClosedBase


class SnocatError(Exception):
    """Root of the binding's errors."""


class TunnelClosedError(TunnelClosedBase, SnocatError):
    """The tunnel carrying a stream closed (``code`` and ``reason`` say why)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"tunnel closed (code {code:#x}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class StreamResetError(StreamResetBase, SnocatError):
    """The stream was aborted by the peer (``by_peer``) or by the protocol core."""

    def __init__(self, code: int, reason: str, *, by_peer: bool) -> None:
        super().__init__(f"stream reset (code {code:#x}): {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


# SnocatError first: in snocat_anyio the base is Exception, which must come after it.
class StreamRefusedError(SnocatError, StreamRefusedBase):
    """The peer refused to open a stream to the requested route address."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_error(failure: StreamFailure) -> StreamResetError | TunnelClosedError:
    """The exception that reports a stream's ``failure`` to the binding's users."""
    if failure.kind is FailureKind.TUNNEL_CLOSED:
        return TunnelClosedError(failure.code, failure.reason)
    return StreamResetError(failure.code, failure.reason, by_peer=failure.by_peer)


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
