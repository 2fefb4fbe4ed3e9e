"""UDP flows over QUIC DATAGRAM frames: the ``udp-datagrams`` addition.

**Addition (not in snocat 0.8), negotiated** (docs/protocol.md 3.17).  A *flow* is one
visitor address on a published UDP port; its datagrams travel as QUIC DATAGRAM frames
(RFC 9221), unreliable on purpose, each prefixed with the flow's ID.  This module owns,
without I/O and without a clock (``now`` comes in):

* the flow ID codec: a QUIC variable-length integer (RFC 9000 section 16) before the
  payload, the way RFC 9298 prefixes its context IDs;
* the flow-setup route address, ``/proxy-udp/<flow-id>/<target>/from/<visitor>``, that
  a flow's opener negotiates (NYAN, section 2.4) on a stream of its own: the acceptor's
  status byte accepts or refuses the flow, and the end of that stream ends it;
* :class:`FlowTable`, the flows of one tunnel: IDs allocated in increasing order and
  never reused, a bounded number of flows, a bounded queue per flow while its setup is
  under way, idle expiry (:meth:`FlowTable.get_timer` / :meth:`FlowTable.handle_timer`),
  a token bucket per direction on datagrams and bytes per second (a flood must not
  starve the tunnel's streams), and a count of dropped datagrams per :class:`DropReason`.

The tunnel (:mod:`~snocat_proto._wire.tunnel`) runs the streams and the QUIC engine and
asks the table what to do; nothing here knows either.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto

from .address import RouteAddress
from .auth import SCHEME_TOKEN
from .errors import LocalProtocolError, RemoteProtocolError
from .features import UDP_DATAGRAMS
from .limits import Limits
from .network import format_host_port
from .targets import ProxyTcpTarget, TargetKind, parse_port

__all__ = [
    "MAX_FLOW_ID",
    "PROXY_UDP",
    "DatagramCounters",
    "DropReason",
    "FlowEnd",
    "FlowRequest",
    "FlowState",
    "FlowTable",
    "UdpTarget",
    "advertise_datagrams",
    "canonical_visitor",
    "decode_flow_datagram",
    "decode_varint",
    "encode_flow_datagram",
    "encode_varint",
    "parse_visitor_segments",
    "visitor_segments",
]

#: The first segment of every flow-setup route address.
PROXY_UDP = "proxy-udp"
#: The largest QUIC variable-length integer, so the largest flow ID.
MAX_FLOW_ID = (1 << 62) - 1

_UDP = "udp"
_FROM = "from"
_IP4 = "ip4"
_IP6 = "ip6"
#: Decimal digits of MAX_FLOW_ID (19): longer text is refused before int() sees it.
_MAX_FLOW_ID_DIGITS = len(str(MAX_FLOW_ID))
#: The byte bucket always holds at least one datagram of the largest size QUIC allows.
_MIN_BYTE_BURST = 65536


# --- the flow ID codec ----------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """``value`` as a QUIC variable-length integer, in its shortest form."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FLOW_ID:
        raise LocalProtocolError(f"a varint is an int in 0..2**62-1, not {value!r}")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


_VARINT_MASKS = {1: 0x3F, 2: 0x3FFF, 4: 0x3FFF_FFFF, 8: MAX_FLOW_ID}


def decode_varint(data: bytes) -> tuple[int, int]:
    """``(value, length)`` of the varint that starts ``data``.  Any of the four lengths
    is read (QUIC allows a longer form than needed); :class:`RemoteProtocolError` if
    ``data`` is empty or ends inside it."""
    if not data:
        raise RemoteProtocolError("the datagram is empty: it has no flow ID")
    length = 1 << (data[0] >> 6)
    if len(data) < length:
        raise RemoteProtocolError(
            f"the datagram ends inside its flow ID ({len(data)} of {length} bytes)"
        )
    return int.from_bytes(data[:length], "big") & _VARINT_MASKS[length], length


def encode_flow_datagram(flow_id: int, payload: bytes) -> bytes:
    """A DATAGRAM frame's payload: the flow ID, then the UDP payload (any length, 0 too)."""
    return encode_varint(flow_id) + payload


def decode_flow_datagram(data: bytes) -> tuple[int, bytes]:
    """``(flow_id, payload)`` from a DATAGRAM frame's payload."""
    flow_id, length = decode_varint(data)
    return flow_id, data[length:]


def advertise_datagrams(scheme: str, offered: frozenset[str]) -> bool:
    """Whether a side should send ``max_datagram_frame_size`` in its handshake
    (``quic_configuration(datagrams=...)``): only if it is configured for the token
    scheme and offers ``udp-datagrams``.  The transport parameter goes out before
    authentication, and a snocat 0.8 peer can only ever succeed with SimpleAck, so a
    tunnel that 0.8 can complete never carries it (docs/protocol.md 3.17)."""
    return scheme == SCHEME_TOKEN and UDP_DATAGRAMS in offered


# --- the flow-setup address -----------------------------------------------------------


def _parse_flow_id(text: str) -> int | None:
    if not text or len(text) > _MAX_FLOW_ID_DIGITS or not text.isascii() or not text.isdigit():
        return None
    if len(text) > 1 and text[0] == "0":
        return None  # one spelling per ID
    value = int(text)
    return value if value <= MAX_FLOW_ID else None


def canonical_visitor(host: object, port: object) -> tuple[str, int]:
    """A visitor as a route address names it: IP address text without a zone, a port."""
    if not isinstance(host, str):
        raise LocalProtocolError(f"a visitor host is an IP address text, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise LocalProtocolError(f"a visitor port is an int in 1..65535, not {port!r}")
    try:
        # A zone (fe80::1%eth0) names an interface of the aggregator: nothing to the peer.
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise LocalProtocolError(f"a visitor host is an IP address, not {host[:64]!r}") from None
    return str(ip), port


@dataclass(frozen=True, slots=True)
class UdpTarget:
    """Where a flow's datagrams go at the acceptor: a host and a UDP port.

    The host kinds and checks are those of ``proxy-tcp`` (:class:`ProxyTcpTarget`):
    ``LOCAL`` (this host, ``host`` None), ``IP4``/``IP6`` (stored canonical) and the
    ``DNS`` kinds; in an address the protocol segment reads ``udp``.
    """

    kind: TargetKind
    host: str | None
    port: int

    def __post_init__(self) -> None:
        checked = ProxyTcpTarget(self.kind, self.host, self.port)  # raises LocalProtocolError
        object.__setattr__(self, "host", checked.host)

    @classmethod
    def parse_host_port(cls, text: str) -> UdpTarget:
        """``--udp-target`` text: ``1.2.3.4:53``, ``[::1]:53`` or ``name:53``."""
        parsed = ProxyTcpTarget.parse_host_port(text)
        return cls(parsed.kind, parsed.host, parsed.port)

    def segments(self) -> tuple[str, ...]:
        if self.kind is TargetKind.LOCAL:
            return (_UDP, str(self.port))
        assert self.host is not None
        return (self.kind.value, self.host, _UDP, str(self.port))

    @classmethod
    def from_segments(cls, segments: tuple[str, ...]) -> UdpTarget:
        if len(segments) == 2 and segments[0] == _UDP:
            kind, host, port_text = TargetKind.LOCAL, None, segments[1]
        elif len(segments) == 4 and segments[2] == _UDP:
            found = next(
                (k for k in TargetKind if k is not TargetKind.LOCAL and k.value == segments[0]),
                None,
            )
            if found is None:
                raise RemoteProtocolError(f"unknown UDP target type {segments[0][:32]!r}")
            kind, host, port_text = found, segments[1], segments[3]
        else:
            raise RemoteProtocolError("a UDP target is udp/<port> or <type>/<host>/udp/<port>")
        port = parse_port(port_text)
        if port is None:
            raise RemoteProtocolError(f"invalid UDP port {port_text[:32]!r}")
        try:
            return cls(kind, host, port)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"invalid UDP target: {exc.reason}") from None

    def connect_host(self) -> str:
        """The host to resolve or send to (``localhost`` for a LOCAL target)."""
        return ProxyTcpTarget(self.kind, self.host, self.port).connect_host()

    def __str__(self) -> str:
        return format_host_port(self.connect_host(), self.port)


@dataclass(frozen=True, slots=True)
class FlowRequest:
    """What a flow's setup stream names: its ID, where its datagrams go, and the
    visitor whose datagrams they are (an IP address text, zone dropped, and a port)::

        /proxy-udp/<flow-id>/dns/<host>/udp/<port>/from/ip4/<address>/udp/<port>
    """

    flow_id: int
    target: UdpTarget
    visitor: tuple[str, int]

    def __post_init__(self) -> None:
        encode_varint(self.flow_id)  # raises LocalProtocolError for a bad ID
        if not isinstance(self.target, UdpTarget):
            raise LocalProtocolError(f"target must be a UdpTarget, not {self.target!r}")
        visitor: object = self.visitor
        if not isinstance(visitor, tuple) or len(visitor) < 2:
            raise LocalProtocolError(f"visitor must be (host, port), not {visitor!r}")
        object.__setattr__(self, "visitor", canonical_visitor(visitor[0], visitor[1]))

    def to_address(self) -> RouteAddress:
        target = self.target.segments()
        return RouteAddress(
            (PROXY_UDP, str(self.flow_id), *target, *visitor_segments(self.visitor))
        )

    @classmethod
    def from_address(cls, address: RouteAddress) -> FlowRequest | None:
        """The request an address names: ``None`` if it is not a ``proxy-udp`` address,
        :class:`RemoteProtocolError` if it is one but malformed."""
        segments = address.segments
        if not segments or segments[0] != PROXY_UDP:
            return None
        rest = segments[2:]
        # The target is 2 or 4 segments, the visitor always 4, "from" between them.
        if len(segments) < 2 or len(rest) not in (7, 9) or rest[-5] != _FROM:
            raise RemoteProtocolError(
                "a proxy-udp address is /proxy-udp/<flow-id>/<target>/from/<ip4|ip6>/"
                f"<address>/udp/<port>, not {str(address)[:128]!r}"
            )
        flow_id = _parse_flow_id(segments[1])
        if flow_id is None:
            raise RemoteProtocolError(f"invalid flow ID {segments[1][:32]!r}")
        target = UdpTarget.from_segments(rest[:-5])
        return cls(flow_id, target, parse_visitor_segments(rest[-4:], address))


def visitor_segments(visitor: tuple[str, int]) -> tuple[str, ...]:
    """``from/<ip4|ip6>/<address>/udp/<port>``: a UDP visitor in a route address (3.17.3;
    also the fleet's relayed flows, 3.16.1).  ``visitor`` is canonical (no zone)."""
    host, port = canonical_visitor(visitor[0], visitor[1])
    return (_FROM, _IP6 if ":" in host else _IP4, host, _UDP, str(port))


def parse_visitor_segments(segments: tuple[str, ...], address: RouteAddress) -> tuple[str, int]:
    """The visitor that the last four segments (after ``from``) name, canonical;
    :class:`RemoteProtocolError` if they are not an IP address of its family and a port."""
    if len(segments) != 4:
        raise RemoteProtocolError(f"invalid visitor address in {str(address)[:128]!r}")
    family, host, protocol, port_text = segments
    port = parse_port(port_text)
    if family not in (_IP4, _IP6) or protocol != _UDP or port is None or "%" in host:
        raise RemoteProtocolError(f"invalid visitor address in {str(address)[:128]!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise RemoteProtocolError(f"invalid visitor address {host[:64]!r}") from None
    if (ip.version == 6) != (family == _IP6):
        raise RemoteProtocolError(f"visitor address {host[:64]!r} is not {family}")
    return str(ip), port


# --- the flow table -------------------------------------------------------------------


class DropReason(Enum):
    """Why a datagram was dropped (each is counted, none is an error)."""

    #: No flows on the tunnel now: before authentication, after its close, or it did
    #: not agree on ``udp-datagrams``.
    NOT_AGREED = auto()
    #: A DATAGRAM frame too short to hold a flow ID.
    MALFORMED = auto()
    #: For no flow that is live (never opened, ended, or not accepted yet by us).
    UNKNOWN_FLOW = auto()
    #: Larger than a DATAGRAM frame to the peer may be now; never fragmented.
    TOO_BIG = auto()
    #: Over the tunnel's datagram or byte rate in that direction.
    OVER_RATE = auto()
    #: The flow's setup is under way and its queue is full.
    QUEUE_FULL = auto()
    #: The tunnel's datagrams already wait for room in the congestion window.
    CONGESTED = auto()
    #: A new flow was needed and the tunnel has as many as it may.
    FLOW_LIMIT = auto()
    #: Queued for a flow whose setup failed.
    FLOW_ENDED = auto()


class FlowEnd(Enum):
    """How a flow ended, in :class:`~snocat_proto._wire.events.FlowEnded`."""

    REFUSED = "refused"  # the peer refused it (status 01), or its setup failed
    PEER_CLOSED = "peer closed"  # the peer ended its stream (FIN, or STOP_SENDING 0)
    RESET = "reset"  # the stream was reset with an error code
    IDLE = "idle"  # no datagram either way for Limits.udp_flow_idle_timeout
    #: (Opener) made room at the flow limit for a new visitor: the quietest flow, quiet
    #: for at least Limits.udp_flow_evict_after (as conntrack drops early).
    EVICTED = "evicted"


class FlowState(Enum):
    OPENING = auto()  # we opened it; the peer has not accepted yet (datagrams queue)
    REQUESTED = auto()  # the peer opened it; our application has not decided
    OPEN = auto()  # datagrams flow both ways


class _FlowInput(Enum):
    PEER_ACCEPTED = auto()
    APP_ACCEPTED = auto()


#: Every state change of a flow but its end (any state may end, and the flow is gone).
_FLOW_TRANSITIONS: dict[tuple[FlowState, _FlowInput], FlowState] = {
    (FlowState.OPENING, _FlowInput.PEER_ACCEPTED): FlowState.OPEN,
    (FlowState.REQUESTED, _FlowInput.APP_ACCEPTED): FlowState.OPEN,
}


@dataclass(frozen=True, slots=True)
class DatagramCounters:
    """A snapshot of one tunnel's datagrams: handed to QUIC, delivered, and dropped."""

    sent: int
    received: int
    drops: Mapping[DropReason, int]

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


class _Bucket:
    """A token bucket on datagrams and bytes: ``rate`` a second, ``burst`` seconds deep."""

    __slots__ = ("_at", "_byte_cap", "_byte_rate", "_bytes", "_count", "_count_cap", "_rate")

    def __init__(self, *, per_second: float, bytes_per_second: float, burst: float) -> None:
        self._rate = per_second
        self._byte_rate = bytes_per_second
        self._count_cap = max(1.0, per_second * burst)
        self._byte_cap = max(float(_MIN_BYTE_BURST), bytes_per_second * burst)
        self._count = self._count_cap
        self._bytes = self._byte_cap
        self._at: float | None = None

    def take(self, size: int, now: float) -> bool:
        at = self._at
        if at is None or now > at:
            if at is not None:
                elapsed = now - at
                self._count = min(self._count_cap, self._count + elapsed * self._rate)
                self._bytes = min(self._byte_cap, self._bytes + elapsed * self._byte_rate)
            self._at = now
        if self._count < 1.0 or self._bytes < size:
            return False
        self._count -= 1.0
        self._bytes -= size
        return True


@dataclass(slots=True, eq=False)
class _Flow:
    flow_id: int
    state: FlowState
    last_active: float
    stream_id: int | None = None
    #: (OPENING) datagrams waiting for the peer's acceptance, already charged to the rate.
    queue: deque[bytes] = field(default_factory=deque)


class FlowTable:
    """The UDP flows of one tunnel; see the module docstring.

    ``local_parity`` is the low bit of the IDs this side allocates: 1 on the Listen
    side, 0 on the Connect side (as QUIC's stream IDs), so both may open flows and
    never pick the same ID.
    """

    def __init__(self, *, limits: Limits, local_parity: int) -> None:
        if local_parity not in (0, 1):
            raise LocalProtocolError("local_parity is 0 (Connect side) or 1 (Listen side)")
        self._limits = limits
        self._next_id = local_parity
        self._parity = local_parity
        self._flows: dict[int, _Flow] = {}
        self._by_stream: dict[int, int] = {}
        #: ``(deadline, flow_id)``; a flow's real deadline may be later (lazily re-armed).
        self._timers: list[tuple[float, int]] = []
        self._send = _Bucket(
            per_second=limits.udp_datagrams_per_second,
            bytes_per_second=limits.udp_bytes_per_second,
            burst=limits.udp_rate_burst,
        )
        self._receive = _Bucket(
            per_second=limits.udp_datagrams_per_second,
            bytes_per_second=limits.udp_bytes_per_second,
            burst=limits.udp_rate_burst,
        )
        self._drops: dict[DropReason, int] = {}
        #: No flow can be evicted before this (the last search found none quiet enough).
        self._evict_not_before = -float("inf")
        self.sent = 0
        self.received = 0

    def __len__(self) -> int:
        return len(self._flows)

    def state(self, flow_id: int) -> FlowState | None:
        flow = self._flows.get(flow_id)
        return None if flow is None else flow.state

    def flow_of_stream(self, stream_id: int) -> int | None:
        return self._by_stream.get(stream_id)

    def stream_of(self, flow_id: int) -> int | None:
        flow = self._flows.get(flow_id)
        return None if flow is None else flow.stream_id

    @property
    def drops(self) -> Mapping[DropReason, int]:
        return dict(self._drops)

    def count(self, reason: DropReason, amount: int = 1) -> DropReason:
        """Count ``amount`` datagrams dropped for ``reason``; returns it."""
        if amount:
            self._drops[reason] = self._drops.get(reason, 0) + amount
        return reason

    def note_sent(self) -> None:
        self.sent += 1

    # Opening and ending --------------------------------------------------------------

    def open(self, now: float) -> int | None:
        """A new flow of ours (OPENING): its ID, or None at the flow limit (the datagram
        that needed it counts as dropped, :attr:`DropReason.FLOW_LIMIT`)."""
        if len(self._flows) >= self._limits.udp_max_flows or self._next_id > MAX_FLOW_ID:
            self.count(DropReason.FLOW_LIMIT)
            return None
        flow_id = self._next_id
        self._next_id += 2
        self._add(_Flow(flow_id, FlowState.OPENING, now))
        return flow_id

    def evictable(self, now: float) -> int | None:
        """At the flow limit, the flow of ours to end for a new one: the open one quiet
        longest, if quiet for ``Limits.udp_flow_evict_after``; else None.  A flood at
        the limit costs one search per ``udp_flow_evict_after``, not one per datagram."""
        if len(self._flows) < self._limits.udp_max_flows or now < self._evict_not_before:
            return None
        quiet_for = self._limits.udp_flow_evict_after
        ours = [
            flow
            for flow in self._flows.values()
            if flow.flow_id & 1 == self._parity and flow.state is FlowState.OPEN
        ]
        if not ours:
            self._evict_not_before = now + quiet_for
            return None
        quietest = min(ours, key=lambda flow: flow.last_active)
        if now - quietest.last_active < quiet_for:
            self._evict_not_before = quietest.last_active + quiet_for
            return None
        return quietest.flow_id

    def bind(self, flow_id: int, stream_id: int) -> None:
        """The stream that carries the flow's setup (and whose end ends it)."""
        flow = self._flow(flow_id)
        if flow.stream_id is not None:
            raise LocalProtocolError(f"flow {flow_id} already has stream {flow.stream_id}")
        flow.stream_id = stream_id
        self._by_stream[stream_id] = flow_id

    def request(self, flow_id: int, stream_id: int, now: float) -> str | None:
        """The peer opened flow ``flow_id`` on ``stream_id`` (REQUESTED); or why it must
        be refused: an ID of our parity or already live, or the flow limit."""
        if flow_id & 1 == self._parity:
            return f"flow ID {flow_id} is one this side allocates"
        if flow_id in self._flows:
            return f"flow ID {flow_id} is already in use"
        if len(self._flows) >= self._limits.udp_max_flows:
            self.count(DropReason.FLOW_LIMIT)
            return f"this side has {len(self._flows)} flows, its limit"
        self._add(_Flow(flow_id, FlowState.REQUESTED, now, stream_id))
        self._by_stream[stream_id] = flow_id
        return None

    def accept(self, flow_id: int, now: float) -> int | None:
        """Our application accepted a REQUESTED flow; its stream ID (None if it ended)."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return None
        self._advance(flow, _FlowInput.APP_ACCEPTED)
        flow.last_active = now
        return flow.stream_id

    def opened(self, flow_id: int, now: float) -> list[bytes]:
        """The peer accepted a flow we opened: the datagrams queued meanwhile, to send."""
        flow = self._flow(flow_id)
        self._advance(flow, _FlowInput.PEER_ACCEPTED)
        flow.last_active = now
        queued, flow.queue = list(flow.queue), deque()
        return queued

    def end(self, flow_id: int) -> int | None:
        """Forget a flow (its queued datagrams are dropped: FLOW_ENDED); its stream ID,
        or None if it was not live.  Idempotent."""
        flow = self._flows.pop(flow_id, None)
        if flow is None:
            return None
        self.count(DropReason.FLOW_ENDED, len(flow.queue))
        if flow.stream_id is not None:
            self._by_stream.pop(flow.stream_id, None)
        return flow.stream_id

    # Datagrams -----------------------------------------------------------------------

    def outgoing(
        self, flow_id: int, payload: bytes, now: float, *, max_datagram: int, congested: bool
    ) -> bytes | DropReason | None:
        """A datagram our application sends on ``flow_id``: the DATAGRAM payload to hand
        to QUIC now, None if it was queued (the flow's setup is under way), or why it
        was dropped (counted).  ``max_datagram``: the largest DATAGRAM payload that
        fits now; ``congested``: QUIC's datagram queue is full."""
        flow = self._flows.get(flow_id)
        if flow is None or flow.state is FlowState.REQUESTED:
            return self.count(DropReason.UNKNOWN_FLOW)
        datagram = encode_varint(flow_id) + payload
        if len(datagram) > max_datagram:
            return self.count(DropReason.TOO_BIG)
        opening = flow.state is FlowState.OPENING
        if opening and len(flow.queue) >= self._limits.udp_flow_queue:
            return self.count(DropReason.QUEUE_FULL)
        if not opening and congested:
            return self.count(DropReason.CONGESTED)
        if not self._send.take(len(datagram), now):
            return self.count(DropReason.OVER_RATE)
        flow.last_active = now
        if opening:
            flow.queue.append(datagram)
            return None
        self.sent += 1
        return datagram

    def incoming(self, datagram: bytes, now: float) -> tuple[int, bytes] | DropReason:
        """A DATAGRAM frame's payload from the peer: ``(flow_id, payload)`` to deliver,
        or why it was dropped (counted).  A flow we opened takes datagrams before its
        acceptance arrives: the peer accepted it before it sent them."""
        try:
            flow_id, length = decode_varint(datagram)
        except RemoteProtocolError:
            return self.count(DropReason.MALFORMED)
        flow = self._flows.get(flow_id)
        if flow is None or flow.state is FlowState.REQUESTED:
            return self.count(DropReason.UNKNOWN_FLOW)
        if not self._receive.take(len(datagram), now):
            return self.count(DropReason.OVER_RATE)
        flow.last_active = now
        self.received += 1
        return flow_id, datagram[length:]

    # Idle expiry ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest moment a flow may have been idle too long (it may turn out not)."""
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> list[tuple[int, int | None]]:
        """Forget every flow idle for ``Limits.udp_flow_idle_timeout``: their
        ``(flow_id, stream_id)``, for the caller to end their streams."""
        timeout = self._limits.udp_flow_idle_timeout
        expired: list[tuple[int, int | None]] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, flow_id = heapq.heappop(timers)
            flow = self._flows.get(flow_id)
            if flow is None:
                continue
            deadline = flow.last_active + timeout
            if deadline <= now:
                expired.append((flow_id, self.end(flow_id)))
            else:
                heapq.heappush(timers, (deadline, flow_id))
        return expired

    # Internals -----------------------------------------------------------------------

    def _add(self, flow: _Flow) -> None:
        self._flows[flow.flow_id] = flow
        deadline = flow.last_active + self._limits.udp_flow_idle_timeout
        heapq.heappush(self._timers, (deadline, flow.flow_id))
        if len(self._timers) > 4 * len(self._flows) + 64:
            # Mostly entries of flows that ended: keep one per live flow.
            self._timers = [(t, i) for t, i in self._timers if i in self._flows]
            heapq.heapify(self._timers)

    def _flow(self, flow_id: int) -> _Flow:
        flow = self._flows.get(flow_id)
        if flow is None:
            raise LocalProtocolError(f"unknown flow {flow_id}")
        return flow

    def _advance(self, flow: _Flow, event: _FlowInput) -> None:
        state = _FLOW_TRANSITIONS.get((flow.state, event))
        if state is None:
            raise LocalProtocolError(
                f"flow {flow.flow_id}: {event.name} is not possible in {flow.state.name}"
            )
        flow.state = state
