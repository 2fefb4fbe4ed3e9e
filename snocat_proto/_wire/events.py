"""The events a tunnel connection reports to its application.

Immutable values with one base class (h11 ``_events.py``).  Events that ask for a
decision (:class:`CredentialRequired`, :class:`StreamRequested`) are answered with a
method call on the connection, whenever the application is ready: the core waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from .address import RouteAddress
from .udp_flows import FlowEnd, UdpTarget

__all__ = [
    "STREAM_EVENTS",
    "AuthenticationCompleted",
    "ConnectionTerminated",
    "CredentialRequired",
    "DataReceived",
    "FlowDatagramReceived",
    "FlowEnded",
    "FlowOpened",
    "FlowRequested",
    "HandshakeCompleted",
    "StreamAccepted",
    "StreamEnded",
    "StreamRejected",
    "StreamRequested",
    "StreamReset",
    "StreamWritable",
    "TunnelEvent",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelEvent:
    """Base class of everything :meth:`TunnelConnection.next_event` returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeCompleted(TunnelEvent):
    """The QUIC/TLS handshake finished; authentication starts now."""

    alpn: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialRequired(TunnelEvent):
    """(Listen side, token scheme) Look up the secret of ``name``, then call
    :meth:`TunnelConnection.supply_credential` (``None`` for an unknown name)."""

    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthenticationCompleted(TunnelEvent):
    """Authentication succeeded; streams may now be opened in both directions.

    ``name`` is the authenticated identity: the token's tunnel name, or under the
    SimpleAck compat scheme the peer's socket address (on the Listen side) or ``""``
    (on the Connect side, which SimpleAck tells nothing).  ``features`` are the wire
    additions both sides agreed on (always none with SimpleAck, so with snocat 0.8)."""

    name: str
    scheme: str
    features: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRequested(TunnelEvent):
    """The peer opened a stream to ``address``: call ``accept_stream`` or ``refuse_stream``."""

    stream_id: int
    address: RouteAddress


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamAccepted(TunnelEvent):
    """A stream we opened was accepted by the peer; data may flow both ways."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRejected(TunnelEvent):
    """A stream we opened was refused, or failed before it was accepted."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived(TunnelEvent):
    """Service bytes arrived.  Call ``acknowledge_received_data(stream_id, len(data))``
    once they are consumed, or the peer runs out of credit and stops."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(TunnelEvent):
    """The peer finished its direction of the stream (FIN); ours stays open."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset(TunnelEvent):
    """The stream was aborted; no more data will flow either way.

    ``by_peer`` tells whether the peer reset it or the core did (a negotiation
    failure or timeout); ``reason`` says which."""

    stream_id: int
    code: int
    by_peer: bool
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamWritable(TunnelEvent):
    """A stream whose send buffer was full has room again (see ``send_capacity``)."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionTerminated(TunnelEvent):
    """The tunnel is over; this is always its last event.

    ``application`` is True for an application close, whose ``code`` is one of
    :class:`~snocat_proto.codes.CloseCode`, and False for a QUIC transport error
    (idle timeout, TLS alert 0x100 + alert, flow-control violation...), whose codes
    overlap ours."""

    code: int
    reason: str
    by_peer: bool
    application: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowRequested(TunnelEvent):
    """(``udp-datagrams``) The peer opened a UDP flow: its datagrams are for ``target``
    and come from ``visitor`` (an IP address text and a port, as the peer saw them).
    Call ``accept_flow`` or ``refuse_flow``; until then its datagrams are dropped."""

    flow_id: int
    target: UdpTarget
    visitor: tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowOpened(TunnelEvent):
    """A flow we opened was accepted; what was queued for it has gone out."""

    flow_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowDatagramReceived(TunnelEvent):
    """One UDP payload arrived on a flow (unreliable: some never do, none twice)."""

    flow_id: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowEnded(TunnelEvent):
    """A flow is over (refused, ended by the peer, reset, or idle); its ID is never
    used again on this tunnel.  None follows ``close_flow`` or ``refuse_flow``, and
    none comes for each flow when the tunnel ends: :class:`ConnectionTerminated`
    ends them all."""

    flow_id: int
    cause: FlowEnd
    reason: str


#: The events that concern one stream (they carry ``stream_id``): a binding routes
#: them to its stream object, and the rest to the application.
STREAM_EVENTS = (
    DataReceived,
    StreamEnded,
    StreamReset,
    StreamWritable,
    StreamAccepted,
    StreamRejected,
)
