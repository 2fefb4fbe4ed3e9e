"""Notices: what a binding reports about one event, built once for both bindings.

A :class:`Notice` pairs the log line (a printf-style message, its arguments and
level) with the :mod:`~snocat_proto._service.activity` record of one event.  The builders
here decide both; a binding only delivers them (logs the line, publishes the
record).  Pure: the time of the event (``at``, the binding's clock, always the
first argument) is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from .._wire import events
from .._wire.codes import CloseCode
from .._wire.network import port_of
from .._wire.proxyme import ProxymeRequest
from .._wire.udp_flows import UdpTarget
from . import activity
from .aggregator import TunnelSession

__all__ = [
    "Counted",
    "Notice",
    "RelayResult",
    "Severity",
    "Tunnel",
    "client_port_denied",
    "client_port_granted",
    "client_port_released",
    "client_relayed",
    "client_stream_refused",
    "deliver",
    "error_message",
    "listening",
    "name_published",
    "name_routing_failed",
    "name_withdrawn",
    "port_denied",
    "port_granted",
    "port_released",
    "relayed",
    "served",
    "stream_closed",
    "stream_opened",
    "stream_refused",
    "tokens_replaced",
    "tunnel_authenticated",
    "tunnel_closed",
    "tunnel_connected",
    "udp_dropped",
    "udp_flow_closed",
    "udp_flow_opened",
]


class Severity(IntEnum):
    """How much an operator should care about a notice.  The values are the
    :mod:`logging` levels, so a binding passes them to its logger as they are."""

    DEBUG = 10
    INFO = 20
    WARNING = 30


class Tunnel(Protocol):
    """What the notices need of either side's session of one tunnel."""

    @property
    def tunnel_id(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def name(self) -> str | None: ...


@dataclass(slots=True)
class RelayResult:
    """What a binding's relay (tunnel stream <-> TCP socket) did: its byte counts,
    and the error that ended it, if one did."""

    sent_to_tunnel: int = 0
    received_from_tunnel: int = 0
    error: BaseException | None = None


class Counted(Protocol):
    """A stream with its byte counts, as both bindings' ``TunnelStream`` have them."""

    @property
    def stream_id(self) -> int: ...
    @property
    def address(self) -> object: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...


def deliver(
    notice: Notice,
    log: Callable[..., object],
    publish: Callable[[activity.Activity], object],
) -> None:
    """Hand ``notice`` to the binding: ``log(level, message, *args)`` (the binding's
    logger's ``log``) if it has a message, ``publish(record)`` if it has a record."""
    if notice.message:
        log(int(notice.level), notice.message, *notice.args)
    if notice.record is not None:
        publish(notice.record)


@dataclass(frozen=True, slots=True)
class Notice:
    """An activity record to publish and a log line (none if ``message`` is empty)."""

    record: activity.Activity | None
    message: str = ""
    args: tuple[object, ...] = ()
    level: Severity = Severity.INFO


# Tunnels (both sides; ``log=False``: the record only) ------------------------------


def tunnel_connected(at: float, session: Tunnel) -> Notice:
    return Notice(activity.TunnelConnected(at=at, tunnel_id=session.tunnel_id, peer=session.peer))


def tunnel_authenticated(
    at: float, session: Tunnel, event: events.AuthenticationCompleted, *, log: bool = True
) -> Notice:
    name, scheme = event.name, event.scheme
    return Notice(
        activity.TunnelAuthenticated(
            at=at, tunnel_id=session.tunnel_id, name=name, peer=session.peer, scheme=scheme
        ),
        "tunnel %s authenticated as %r (%s) from %s" if log else "",
        (session.tunnel_id, name, scheme, session.peer),
    )


def tunnel_closed(
    at: float, session: Tunnel, event: events.ConnectionTerminated, *, log: bool = True
) -> Notice:
    code, reason, by_peer = event.code, event.reason, event.by_peer
    label = session.name if session.name is not None else session.peer
    return Notice(
        activity.TunnelClosed(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.name,
            peer=session.peer,
            code=code,
            reason=reason,
            by_peer=by_peer,
        ),
        "tunnel %s (%s) closed%s: code %#x %s" if log else "",
        (session.tunnel_id, label, " by the peer" if by_peer else "", code, reason),
        # A refused or timed-out login is what an operator watches for.
        Severity.WARNING if event.application and code in _LOGIN_FAILURES else Severity.INFO,
    )


_LOGIN_FAILURES = frozenset({CloseCode.AUTHENTICATION_FAILED, CloseCode.AUTHENTICATION_TIMEOUT})


# Server ports ------------------------------------------------------------------


def port_granted(
    at: float,
    session: TunnelSession,
    port: int,
    addresses: tuple[str, ...],
    request: ProxymeRequest,
    protocol: str = "tcp",
) -> Notice:
    target = str(request.target())
    return Notice(
        activity.PortGranted(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.label,
            port=port,
            addresses=addresses,
            target=target,
            protocol=protocol,
        ),
        "tunnel %s (%s): %sport %s -> %s",
        (
            session.tunnel_id,
            session.label,
            _protocol_word(protocol),
            ", ".join(addresses),
            target,
        ),
    )


def _protocol_word(protocol: str) -> str:
    return "" if protocol == "tcp" else f"{protocol.upper()} "


def port_denied(
    at: float, session: TunnelSession, request: ProxymeRequest, reason: str, protocol: str = "tcp"
) -> Notice:
    return Notice(
        activity.PortDenied(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.label,
            reason=reason,
            target=str(request.target()),
            protocol=protocol,
        ),
        "tunnel %s (%s): %sport for %s denied: %s",
        (session.tunnel_id, session.label, _protocol_word(protocol), request.target(), reason),
    )


def port_released(at: float, session: TunnelSession, port: int, protocol: str = "tcp") -> Notice:
    return Notice(
        activity.PortReleased(
            at=at, tunnel_id=session.tunnel_id, name=session.label, port=port, protocol=protocol
        ),
        "tunnel %s (%s): %sport %d released",
        (session.tunnel_id, session.label, _protocol_word(protocol), port),
    )


# UDP flows (both sides) --------------------------------------------------------


def udp_flow_opened(
    at: float,
    tunnel_id: str,
    flow_id: int,
    visitor: str,
    target: object,
    *,
    name: str | None = None,
    port: int | None = None,
) -> Notice:
    """A UDP flow started (logged at debug level: one per visitor address)."""
    return Notice(
        activity.UdpFlowOpened(
            at=at,
            tunnel_id=tunnel_id,
            flow_id=flow_id,
            visitor=visitor,
            target=str(target),
            name=name,
            port=port,
        ),
        "tunnel %s: UDP flow %d from %s to %s",
        (tunnel_id, flow_id, visitor, target),
        Severity.DEBUG,
    )


def udp_flow_closed(
    at: float,
    tunnel_id: str,
    flow_id: int,
    visitor: str,
    target: object,
    counts: tuple[int, int, int, int],
    cause: str,
    drops: dict[str, int],
    *,
    name: str | None = None,
    port: int | None = None,
) -> Notice:
    """A UDP flow ended; ``counts`` is ``(datagrams_in, datagrams_out, bytes_in,
    bytes_out)``."""
    datagrams_in, datagrams_out, bytes_in, bytes_out = counts
    return Notice(
        activity.UdpFlowClosed(
            at=at,
            tunnel_id=tunnel_id,
            flow_id=flow_id,
            visitor=visitor,
            target=str(target),
            datagrams_in=datagrams_in,
            datagrams_out=datagrams_out,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            cause=cause,
            drops=dict(drops),
            name=name,
            port=port,
        ),
        "tunnel %s: UDP flow %d from %s ended (%s): %d/%d datagrams in/out, %d dropped",
        (tunnel_id, flow_id, visitor, cause, datagrams_in, datagrams_out, sum(drops.values())),
        Severity.DEBUG,
    )


def udp_dropped(
    at: float, tunnel_id: str, port: int, drops: dict[str, int], *, name: str | None = None
) -> Notice:
    """Datagrams of a UDP port dropped outside any flow, told as its lease ends."""
    return Notice(
        activity.UdpDropped(at=at, tunnel_id=tunnel_id, port=port, drops=dict(drops), name=name),
        "tunnel %s: UDP port %d dropped %s",
        (tunnel_id, port, ", ".join(f"{n} {r}" for r, n in sorted(drops.items()))),
        Severity.INFO,
    )


# Streams (both sides) ----------------------------------------------------------


def stream_refused(at: float, tunnel_id: str, address: object, reason: str) -> Notice:
    """A stream to ``address`` was refused (logged at debug level)."""
    return Notice(
        activity.StreamRefused(at=at, tunnel_id=tunnel_id, address=str(address), reason=reason),
        "tunnel %s: refused %s: %s",
        (tunnel_id, address, reason),
        Severity.DEBUG,
    )


def stream_opened(
    at: float,
    tunnel_id: str,
    stream_id: int,
    address: object,
    direction: str,
    *,
    name: str | None = None,
    visitor: str | None = None,
) -> Notice:
    return Notice(
        activity.StreamOpened(
            at=at,
            tunnel_id=tunnel_id,
            stream_id=stream_id,
            address=str(address),
            direction=direction,
            name=name,
            visitor=visitor,
        )
    )


def stream_closed(
    at: float,
    tunnel_id: str,
    stream_id: int,
    address: object,
    bytes_in: int,
    bytes_out: int,
    error: BaseException | str | None,
    describe: Callable[[BaseException], str] = repr,
    *,
    name: str | None = None,
    visitor: str | None = None,
) -> Notice:
    """A stream ended; ``error`` (an exception is reported by ``describe``) or None."""
    return Notice(
        activity.StreamClosed(
            at=at,
            tunnel_id=tunnel_id,
            stream_id=stream_id,
            address=str(address),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            error=error if error is None or isinstance(error, str) else describe(error),
            name=name,
            visitor=visitor,
        )
    )


def relayed(
    at: float,
    tunnel_id: str,
    stream_id: int,
    address: object,
    result: RelayResult,
    describe: Callable[[BaseException], str] = repr,
    *,
    name: str | None = None,
    visitor: str | None = None,
) -> Notice:
    """A relayed stream ended (:func:`stream_closed` with the relay's counts)."""
    return stream_closed(
        at,
        tunnel_id,
        stream_id,
        address,
        result.received_from_tunnel,
        result.sent_to_tunnel,
        result.error,
        describe,
        name=name,
        visitor=visitor,
    )


def served(at: float, tunnel_id: str, stream: Counted, error: str | None) -> Notice:
    """A stream served by a route handler ended (:func:`stream_closed`, its counts)."""
    return stream_closed(
        at,
        tunnel_id,
        stream.stream_id,
        stream.address,
        stream.bytes_received,
        stream.bytes_sent,
        error,
    )


def name_published(
    at: float,
    session: TunnelSession,
    service: str,
    addresses: tuple[str, ...],
    request: ProxymeRequest,
) -> Notice:
    """(Aggregator) A tunnel publishes a target by name."""
    target = str(request.target())
    return Notice(
        activity.NamePublished(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.label,
            service=service,
            addresses=addresses,
            target=target,
        ),
        "tunnel %s (%s): %s by name at %s -> %s",
        (session.tunnel_id, session.label, service, ", ".join(addresses), target),
    )


def name_withdrawn(at: float, session: TunnelSession, service: str) -> Notice:
    """(Aggregator) A tunnel no longer publishes ``service`` by name."""
    return Notice(
        activity.NameWithdrawn(
            at=at, tunnel_id=session.tunnel_id, name=session.label, service=service
        ),
        "tunnel %s (%s): %s by name withdrawn",
        (session.tunnel_id, session.label, service),
    )


def name_routing_failed(
    at: float, listener: str, visitor: str, failure: str, detail: str
) -> Notice:
    """(Aggregator) A shared listener (or a public port) did not forward a visitor:
    only a debug line (the counts are ``snocat_name_routing_failures_total``)."""
    return Notice(
        None,
        "%s listener: not forwarding %s (%s): %s",
        (listener, visitor, failure, detail),
        Severity.DEBUG,
    )


def tokens_replaced(at: float, names: int, closed: tuple[str, ...]) -> Notice:
    """A server took a new set of tokens and closed the tunnels it no longer admits."""
    detail = f"; closed {', '.join(closed)}" if closed else ""
    return Notice(
        activity.TokensReplaced(at=at, names=names, closed=closed),
        "tokens reloaded: %d tunnel names%s",
        (names, detail),
    )


def listening(at: float, address: str) -> Notice:
    """A server bound its QUIC socket."""
    return Notice(
        activity.ListeningOn(at=at, address=address), "listening on %s (QUIC)", (address,)
    )


def client_relayed(
    at: float,
    tunnel_id: str,
    stream_id: int,
    address: object,
    result: RelayResult,
    *,
    name: str | None = None,
    visitor: str | None = None,
) -> Notice:
    """The client's :func:`relayed`: errors are reported by :func:`error_message`."""
    return relayed(
        at, tunnel_id, stream_id, address, result, error_message, name=name, visitor=visitor
    )


def error_message(error: BaseException) -> str:
    """The client's way to report a stream's error: its message, else its type."""
    return str(error) or type(error).__name__


# Client ports and streams ------------------------------------------------------


def _protocol_of(target: object) -> str:
    return "udp" if isinstance(target, UdpTarget) else "tcp"


def client_port_granted(
    at: float, session: Tunnel, addresses: tuple[str, ...], target: object
) -> Notice:
    return Notice(
        activity.PortGranted(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.name or "",
            port=port_of(addresses),
            addresses=addresses,
            target=str(target),
            protocol=_protocol_of(target),
        )
    )


def client_port_released(
    at: float, session: Tunnel, addresses: tuple[str, ...], target: object = None
) -> Notice:
    return Notice(
        activity.PortReleased(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.name or "",
            port=port_of(addresses),
            protocol=_protocol_of(target),
        )
    )


def client_port_denied(at: float, session: Tunnel, reason: str, target: object) -> Notice:
    return Notice(
        activity.PortDenied(
            at=at,
            tunnel_id=session.tunnel_id,
            name=session.name or "",
            reason=reason,
            target=str(target),
            protocol=_protocol_of(target),
        ),
        "no public port for %s: %s",
        (target, reason),
        Severity.WARNING,
    )


def client_stream_refused(at: float, tunnel_id: str, address: object, reason: str) -> Notice:
    return Notice(
        activity.StreamRefused(at=at, tunnel_id=tunnel_id, address=str(address), reason=reason),
        "refused stream %s: %s",
        (address, reason),
        Severity.WARNING,  # a visitor got nothing: a dead target, or a route not allowed
    )
