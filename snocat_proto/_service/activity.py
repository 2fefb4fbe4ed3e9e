"""Activity: what a running server or client reports to its observers.

These are the typed records behind the CLI's status view and ``--json`` lines
and any application's monitoring.  Plain values shared by both bindings; each
binding delivers them to subscribers without loss and without stalling its pump.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class Activity:
    """Base class; ``at`` is when it happened, in seconds since the epoch (wall clock,
    as in a log line, on servers and clients alike)."""

    at: float

    @property
    def kind(self) -> str:
        return _snake(type(self).__name__)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping with an ``event`` key naming the kind."""
        return {"event": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelConnected(Activity):
    tunnel_id: str
    peer: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelAuthenticated(Activity):
    tunnel_id: str
    name: str
    peer: str
    scheme: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelClosed(Activity):
    tunnel_id: str
    name: str | None
    peer: str
    code: int
    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PortGranted(Activity):
    tunnel_id: str
    name: str
    port: int
    addresses: tuple[str, ...]
    target: str
    #: ``"tcp"``, or ``"udp"`` for a UDP port (``--udp-target``, ``udp-datagrams``).
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortReleased(Activity):
    tunnel_id: str
    name: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortDenied(Activity):
    tunnel_id: str
    name: str
    reason: str
    #: What the public port was asked for (``HOST:PORT``).
    target: str = ""
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpened(Activity):
    tunnel_id: str
    stream_id: int
    address: str
    #: "in" when the peer opened it, "out" when we did.
    direction: str
    #: The tunnel's name (None before authentication, or where none is known).
    name: str | None = None
    #: Whose connection it carries, ``HOST:PORT`` (``[v6]:PORT``), when known: on the
    #: aggregator, the visitor; on a client, what the aggregator said (visitor-address).
    visitor: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRefused(Activity):
    tunnel_id: str
    address: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamClosed(Activity):
    tunnel_id: str
    stream_id: int
    address: str
    bytes_in: int
    bytes_out: int
    error: str | None
    #: As :class:`StreamOpened`'s.
    name: str | None = None
    visitor: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpFlowOpened(Activity):
    """A UDP flow (one visitor address on a public UDP port, docs/protocol.md 3.17)
    started: on the aggregator, a visitor's first datagram; on a client, the
    aggregator's flow setup it accepted."""

    tunnel_id: str
    flow_id: int
    #: The visitor, ``HOST:PORT`` (``[v6]:PORT``), and the UDP target, ``HOST:PORT``.
    visitor: str
    target: str
    name: str | None = None
    #: (Aggregator) the public UDP port it came to.
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpFlowClosed(Activity):
    """A UDP flow ended.  ``datagrams_in`` / ``bytes_in`` came from the tunnel,
    ``datagrams_out`` / ``bytes_out`` went into it (as :class:`StreamClosed`'s bytes);
    ``drops`` counts this side's datagrams of the flow that were not sent, by reason
    (``too_big``, ``over_rate``, ``congested``, ...).  ``cause``: ``idle``, ``peer
    closed``, ``reset``, ``refused``, ``evicted`` (the quietest flow at the flow limit,
    ended for a new visitor), ``closed`` (by this side: its port or socket closed) or
    ``tunnel closed``."""

    tunnel_id: str
    flow_id: int
    visitor: str
    target: str
    datagrams_in: int
    datagrams_out: int
    bytes_in: int
    bytes_out: int
    cause: str
    drops: dict[str, int]
    name: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpDropped(Activity):
    """Datagrams of a UDP port dropped outside any flow, by reason, counted over
    the port's lease and told as it ends: ``flow_limit`` (a visitor had no flow and
    the tunnel had ``udp_max_flows``), and the tunnel's receive side (``over_rate``,
    ``unknown_flow``, ``malformed``, ``not_agreed``) while the port was held."""

    tunnel_id: str
    port: int
    drops: dict[str, int]
    name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NamePublished(Activity):
    """(Aggregator) A tunnel publishes ``target`` by name: ``service`` (``http``,
    ``tls``) visitors of the ``addresses`` (``NAME.DOMAIN:PORT``) go to it."""

    tunnel_id: str
    name: str
    service: str
    addresses: tuple[str, ...]
    target: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NameWithdrawn(Activity):
    """(Aggregator) A tunnel no longer publishes ``service`` by name."""

    tunnel_id: str
    name: str
    service: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconnecting(Activity):
    attempt: int
    delay: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListeningOn(Activity):
    """A server bound its QUIC socket (or a client its local one)."""

    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TokensReplaced(Activity):
    """A server took a new set of tokens (a reload); ``closed`` names the tunnels it
    closed because their token was revoked or changed."""

    names: int
    closed: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetChanged(Activity):
    """(A node of a fleet) The fleet's registry changed: ``change`` is one of
    ``node_joined``, ``node_left``, ``tunnel_registered``, ``tunnel_updated``,
    ``tunnel_deregistered``, ``port_claimed``, ``port_released`` (docs/fleet.md);
    ``node`` is the node it happened on.  A port's change says whether the port is a
    ``"tcp"`` or a ``"udp"`` one (``protocol``; None for the other changes)."""

    change: str
    node: str
    name: str | None = None
    tunnel_id: str | None = None
    ports: tuple[int, ...] = ()
    protocol: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetDegraded(Activity):
    """(A node of a fleet) The registry is unreachable: tunnels and streams go on,
    new claims wait for it."""

    node: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetRecovered(Activity):
    """(A node of a fleet) The registry is reachable again; its state is rebuilt."""

    node: str
