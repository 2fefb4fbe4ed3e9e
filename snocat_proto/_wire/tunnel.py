"""One tunnel: a QUIC connection that authenticates, then carries negotiated streams.

:class:`TunnelConnection` wraps the engine's sans-IO ``QuicConnection`` the way
aioquic's ``h3/connection.py`` does, and offers the same surface to its adapter:
``receive_datagram``, ``datagrams_to_send``, ``get_timer``, ``handle_timer`` and
``next_event``, plus the calls an application makes (open, accept, refuse, send,
reset, close).  It owns, for every tunnel:

* the authentication channel (stream 1, the Listen side's first stream);
* the NYAN negotiation of every other stream, in both roles;
* receive credit (the peer may send only what the application has consumed plus a
  window) and bounded send buffers (see :meth:`send_capacity`);
* its deadlines: authentication, negotiation and keep-alive;
* with ``udp-datagrams`` agreed, its UDP flows: each flow's setup stream (the
  application hears of the flow, never of the stream), and its QUIC DATAGRAM frames,
  decided by a :class:`~snocat_proto._wire.udp_flows.FlowTable`.

Nothing here does I/O or reads a clock; ``now`` comes from the caller.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, ClassVar

from cryptography import x509

from . import events
from .address import RouteAddress
from .auth import Authenticated, Authenticator, Rejected, SecretRequired, TokenListener
from .codes import CloseCode, StreamCode
from .engine import ALPN, QuicConfiguration, QuicEngine, quic_events
from .errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SendBufferFull,
    UnsupportedVersion,
)
from .features import UDP_DATAGRAMS
from .limits import Limits
from .negotiation import (
    Accepted,
    AcceptorNegotiation,
    AddressReceived,
    OpenerNegotiation,
    Refused,
)
from .network import NetworkAddress
from .udp_flows import (
    PROXY_UDP,
    DatagramCounters,
    DropReason,
    FlowEnd,
    FlowRequest,
    FlowState,
    FlowTable,
    UdpTarget,
    encode_varint,
)

#: The authentication channel: the Listen side's first bidirectional stream.
AUTH_STREAM_ID = 1
#: Seconds without a packet from the peer after which the Connect side sends a PING.
#: It is the side behind a NAT, whose UDP mapping may lapse after 30 s of silence.
CONNECT_KEEPALIVE_INTERVAL = 15.0
#: The Listen side pings only as a fallback for peers that do not (snocat 0.8 clients
#: need not): later than the Connect side, so that between two snocat ends an idle
#: tunnel costs one PING and its ACK per interval, and an aggregator with thousands of
#: tunnels answers PINGs instead of sending its own (which costs it twice as much: a
#: loss-detection timer per PING).  Capped at 2/3 of the idle timeout, this is 20 s
#: with the default 30 s, and stays behind a client that pings every 25 s of 60.
LISTEN_KEEPALIVE_INTERVAL = 40.0


class Role(Enum):
    LISTEN = "listen"  # accepted the QUIC connection (the aggregator)
    CONNECT = "connect"  # dialed it (the client)


#: The longest silence a keep-alive waits for, as a share of the idle timeout both ends
#: agreed on: the PING must arrive, or be retransmitted, before the peer gives up.
_KEEPALIVE_SHARE = {Role.CONNECT: 1 / 2, Role.LISTEN: 2 / 3}


class TunnelState(Enum):
    HANDSHAKING = auto()
    AUTHENTICATING = auto()
    AUTHENTICATED = auto()
    CLOSED = auto()


class StreamState(Enum):
    HELD = auto()  # the peer opened it before authentication ended; bytes wait
    NEGOTIATING = auto()  # NYAN in progress
    DECIDING = auto()  # we are the acceptor; the application decides
    OPEN = auto()  # service bytes flow
    DONE = auto()  # over; kept until the engine has let go of its buffers


class StreamInput(Enum):
    AUTHENTICATED = auto()
    ADDRESS_RECEIVED = auto()
    PEER_ACCEPTED = auto()
    PEER_REFUSED = auto()
    APP_ACCEPTED = auto()
    APP_REFUSED = auto()
    BOTH_ENDED = auto()
    CLOSED = auto()
    ABORTED = auto()


_S = StreamState
_I = StreamInput
#: Every legal stream transition; a pair missing here is a bug or API misuse.
_STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.HELD, _I.AUTHENTICATED): _S.NEGOTIATING,
    (_S.NEGOTIATING, _I.ADDRESS_RECEIVED): _S.DECIDING,
    (_S.NEGOTIATING, _I.PEER_ACCEPTED): _S.OPEN,
    (_S.NEGOTIATING, _I.PEER_REFUSED): _S.DONE,
    (_S.DECIDING, _I.APP_ACCEPTED): _S.OPEN,
    (_S.DECIDING, _I.APP_REFUSED): _S.DONE,
    (_S.OPEN, _I.BOTH_ENDED): _S.DONE,
    (_S.OPEN, _I.CLOSED): _S.DONE,
    **{(state, _I.ABORTED): _S.DONE for state in StreamState if state is not _S.DONE},
}


@dataclass(slots=True, eq=False)
class _Stream:
    stream_id: int
    we_opened: bool
    state: StreamState
    negotiation: OpenerNegotiation | AcceptorNegotiation | None = None
    deadline: float | None = None
    #: Bytes that arrived before the application may see them (HELD / DECIDING).
    held: bytearray = field(default_factory=bytearray)
    held_end: bool = False
    #: Every byte the engine delivered on this stream, for credit accounting.
    received: int = 0
    #: Once DONE: the offset up to which the stream's credit was returned.
    released: int = 0
    local_ended: bool = False
    remote_ended: bool = False
    #: (A stream we opened) the peer's STOP_SENDING code, if it came during negotiation.
    stopped_code: int | None = None
    want_writable: bool = False

    @property
    def app_knows(self) -> bool:
        """Whether the application has heard of this stream (and must hear of its end)."""
        return self.we_opened or self.state in (StreamState.DECIDING, StreamState.OPEN)


class TunnelConnection:
    """Either side of one snocat tunnel.  See the module docstring."""

    def __init__(
        self,
        engine: QuicEngine,
        *,
        role: Role,
        authenticator: Authenticator | Mapping[str, Authenticator],
        limits: Limits,
        now: float,
        keepalive_interval: float | None,
    ) -> None:
        self._quic = engine
        self._role = role
        #: By ALPN: the handshake picks which one runs (a single one serves the ALPNs the
        #: configuration offers, ``ms-snocat-1`` unless told otherwise).
        self._authenticators: Mapping[str, Authenticator] = (
            dict.fromkeys(engine.configuration.alpn_protocols or [ALPN], authenticator)
            if isinstance(authenticator, Authenticator)
            else authenticator
        )
        self._authenticator = next(iter(self._authenticators.values()))
        self._limits = limits
        #: As configured; the period in force is known once the peer's idle timeout is.
        self._keepalive_setting = keepalive_interval
        self._keepalive_interval: float | None = None
        self._now = now
        self._state = TunnelState.HANDSHAKING
        self._name: str | None = None
        #: The wire additions both sides agreed on (set once authenticated).
        self._features: frozenset[str] = frozenset()
        self._auth_deadline: float | None = now + limits.auth_timeout
        self._auth_received = 0
        #: The auth channel's offset up to which credit was returned.
        self._auth_released = 0
        self._auth_eof = False
        self._rejection_code = int(CloseCode.AUTHENTICATION_FAILED)
        self._keepalive_at: float | None = None
        self._probe_interval = self._limits.silence_probe_interval
        #: (Connect side) When the probe or keep-alive now unanswered went out.
        self._probe_sent_at: float | None = None
        self._ping_uid = 0
        self._streams: dict[int, _Stream] = {}
        # Indexes of the streams, so that per-datagram work never scans them all:
        # by state (kept by _transition and _add_stream), and those waiting for room.
        self._by_state: dict[StreamState, dict[_Stream, None]] = {s: {} for s in StreamState}
        self._want_writable: dict[_Stream, None] = {}
        #: Streams we opened whose negotiation deadline starts at the next transmission.
        self._unclocked: list[int] = []
        #: Bytes unacknowledged in all streams' send buffers; None: to be counted again
        #: (acknowledgements, which arrive with datagrams, shrink it).
        self._buffered_total: int | None = 0
        #: Whether send buffers may have shrunk since writers were last told of room.
        self._room_changed = False
        self._events: deque[events.TunnelEvent] = deque()
        self._close_reported = False
        self._connection_id_changes: list[tuple[bool, bytes]] = []
        #: The UDP flows, once ``udp-datagrams`` is in force (agreed, and both ends sent
        #: the DATAGRAM transport parameter); None otherwise.
        self._flows: FlowTable | None = None
        #: Events of flow streams, handled once the stream machinery is at rest.
        self._flow_inbox: list[events.TunnelEvent] = []
        #: DATAGRAM frames that came while no flow table existed (NOT_AGREED).
        self._datagrams_refused = 0
        self._quic_handlers: dict[type, Callable[[quic_events.QuicEvent], None]] = {
            quic_events.HandshakeCompleted: self._on_handshake_completed,
            quic_events.StreamDataReceived: self._on_stream_data,
            quic_events.StreamReset: self._on_stream_reset,
            quic_events.StopSendingReceived: self._on_stop_sending,
            quic_events.ConnectionTerminated: self._on_terminated,
            quic_events.ConnectionIdIssued: self._on_cid_issued,
            quic_events.ConnectionIdRetired: self._on_cid_retired,
            quic_events.DatagramFrameReceived: self._on_datagram,
        }

    @classmethod
    def connect(
        cls,
        configuration: QuicConfiguration,
        *,
        address: NetworkAddress,
        authenticator: Authenticator,
        limits: Limits,
        now: float,
        keepalive_interval: float | None = CONNECT_KEEPALIVE_INTERVAL,
    ) -> TunnelConnection:
        """The Connect side: dial ``address`` (the first datagrams are ready at once)."""
        if not configuration.is_client:
            raise LocalProtocolError("the Connect side needs a client configuration")
        engine = QuicEngine(configuration=configuration, limits=limits)
        engine.connect(address, now=now)
        return cls(
            engine,
            role=Role.CONNECT,
            authenticator=authenticator,
            limits=limits,
            now=now,
            keepalive_interval=keepalive_interval,
        )

    # Properties --------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> TunnelState:
        return self._state

    @property
    def name(self) -> str | None:
        """The authenticated name (None before authentication)."""
        return self._name

    @property
    def peer_address(self) -> NetworkAddress | None:
        return self._quic.get_peer_address()

    @property
    def is_terminated(self) -> bool:
        """The engine has finished closing: no more datagrams, timers or events follow."""
        return self._quic.is_terminated and not self._events

    @property
    def features(self) -> frozenset[str]:
        """The wire additions both sides agreed on (none before authentication, and
        none with a snocat 0.8 peer)."""
        return self._features

    @property
    def host_connection_id(self) -> bytes:
        """The connection ID the peer addresses us by now (a client's pump routes by it)."""
        return self._quic.host_cid

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented in the handshake, once it is complete."""
        return self._quic.peer_certificate

    # The adapter's surface ---------------------------------------------------

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        self._now = now
        self._quic.receive_datagram(data, addr, now)
        self._buffers_changed()
        self._process()
        self._arm_keepalive(now)
        self._probe_sent_at = None  # the peer is there
        if not self._streams and self._state is TunnelState.AUTHENTICATED:
            # Nothing to batch acknowledgements with (typically a keep-alive PING):
            # answer in this flush rather than after a timer of its own.
            self._quic.acknowledge_now(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        self._now = now
        datagrams = self._quic.datagrams_to_send(now)
        if self._unclocked:
            self._start_negotiation_clocks(now)
        self._purge_finished_streams()
        return datagrams

    def get_timer(self) -> float | None:
        if self._quic.is_terminated:
            return None
        deadlines = [self._quic.get_timer()]
        if self._state in (TunnelState.HANDSHAKING, TunnelState.AUTHENTICATING):
            deadlines.append(self._auth_deadline)
        elif self._state is TunnelState.AUTHENTICATED:
            deadlines.append(self._keepalive_at)
            deadlines.append(self._peer_gone_at())
            deadlines.extend(s.deadline for s in self._by_state[StreamState.NEGOTIATING])
            if self._flows is not None:
                deadlines.append(self._flows.get_timer())
        return min((d for d in deadlines if d is not None), default=None)

    def _peer_gone_at(self) -> float | None:
        """When the peer counts as gone: a probe, a keep-alive (Connect side) or a
        stream opened (either side) that nothing, retransmissions included, answered
        in time."""
        if self._probe_sent_at is None:
            return None
        return self._probe_sent_at + self._limits.probe_answer_timeout

    def handle_timer(self, now: float) -> None:
        self._now = now
        quic_timer = self._quic.get_timer()
        if quic_timer is not None and quic_timer <= now:
            self._quic.handle_timer(now)
        if self._state in (TunnelState.HANDSHAKING, TunnelState.AUTHENTICATING):
            if self._auth_deadline is not None and now >= self._auth_deadline:
                self._auth_deadline = None
                stage = (
                    "the QUIC handshake"
                    if self._state is TunnelState.HANDSHAKING
                    else "authentication"
                )
                self.close(
                    CloseCode.AUTHENTICATION_TIMEOUT,
                    f"{stage} did not complete within {self._limits.auth_timeout:g} s",
                )
        elif self._state is TunnelState.AUTHENTICATED:
            for stream in list(self._by_state[StreamState.NEGOTIATING]):
                if (
                    stream.state is StreamState.NEGOTIATING
                    and stream.deadline is not None
                    and now >= stream.deadline
                ):
                    self._abort(stream, StreamCode.TIMEOUT, "stream negotiation timed out")
            if self._flows is not None:
                self._expire_flows(self._flows, now)
            gone_at = self._peer_gone_at()
            if gone_at is not None and now >= gone_at:
                self.close(
                    CloseCode.NORMAL,
                    f"no answer from the peer to a keep-alive or a stream opened within "
                    f"{self._limits.probe_answer_timeout:g} s",
                )
            elif self._keepalive_at is not None and now >= self._keepalive_at:
                self._ping_uid += 1
                self._quic.send_ping(self._ping_uid)
                self._keepalive_at = None
                if self._role is Role.CONNECT and self._probe_sent_at is None:
                    self._probe_sent_at = now
                assert self._keepalive_interval is not None  # armed only when it is set
                self._probe_interval = min(2 * self._probe_interval, self._keepalive_interval)
        self._process()

    def _arm_keepalive(self, now: float) -> None:
        """Count the silence from ``now``, when a datagram arrived."""
        interval = self._keepalive_interval
        if interval is None:
            return
        if self._streams and self._role is Role.CONNECT:
            interval = min(interval, self._probe_interval)
        self._keepalive_at = now + interval

    def _emit(self, event: events.TunnelEvent) -> None:
        """Queue ``event`` for the application, unless :class:`ConnectionTerminated` was queued:
        it is always the last event (a close in the middle of a datagram's events, such
        as an unsupported NYAN version, must not be followed by that datagram's rest)."""
        if self._close_reported:
            return
        if self._flows is not None and self._is_flow_event(event, self._flows):
            self._flow_inbox.append(event)
            return
        self._events.append(event)

    def next_event(self) -> events.TunnelEvent | None:
        try:
            return self._events.popleft()
        except IndexError:
            return None

    def pop_connection_id_changes(self) -> list[tuple[bool, bytes]]:
        """``(issued, cid)`` pairs since the last call: the server endpoint's routing table."""
        changes, self._connection_id_changes = self._connection_id_changes, []
        return changes

    # The application's calls -------------------------------------------------

    def supply_credential(self, secret: bytes | None) -> None:
        """Answer :class:`~snocat_proto.events.CredentialRequired` (None: unknown name)."""
        self._token_listener().supply_credential(secret)
        self._drain_authenticator()
        self._run_flow_inbox()

    def reject_credential(self, reason: str, code: int = CloseCode.REFUSED) -> None:
        """Answer :class:`CredentialRequired` with a refusal the peer is told.

        For refusals that are not about the credential (the aggregator is full, it is
        shutting down), pass a ``code`` such as ``LIMIT_EXCEEDED`` or ``SHUTTING_DOWN``
        so that the client can tell them from a wrong token and retry later."""
        self._rejection_code = int(code)
        self._token_listener().reject(reason)
        self._drain_authenticator()

    def _token_listener(self) -> TokenListener:
        if not isinstance(self._authenticator, TokenListener):
            raise LocalProtocolError(
                "only the Listen side of token authentication takes credentials"
            )
        return self._authenticator

    def open_stream(self, address: RouteAddress) -> int:
        """Open a stream to ``address`` on the peer; returns its stream ID.

        :class:`StreamAccepted` or :class:`StreamRejected` follows.
        """
        self._require_authenticated()
        negotiation = OpenerNegotiation(address, limits=self._limits)
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, negotiation.initial_data())
        self._buffers_changed()
        self._add_stream(
            _Stream(
                stream_id=stream_id,
                we_opened=True,
                state=StreamState.NEGOTIATING,
                negotiation=negotiation,
                # The clock starts when the open goes out (datagrams_to_send): the
                # last time this tunnel saw may be a keep-alive interval ago.
                deadline=None,
            )
        )
        self._unclocked.append(stream_id)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a :class:`StreamRequested`; bytes that came early are delivered now.

        A no-op when the peer aborted the stream before the decision (it may not know)."""
        pending = self._pending_decision(stream_id)
        if pending is None:
            return
        stream, negotiation = pending
        self._transition(stream, StreamInput.APP_ACCEPTED)
        self._quic.send_stream_data(stream_id, negotiation.accept())
        self._buffers_changed()
        stream.negotiation = None
        held, stream.held = bytes(stream.held), bytearray()
        if held:
            self._emit(events.DataReceived(stream_id=stream_id, data=held))
        if stream.held_end:
            self._remote_end(stream)

    def refuse_stream(self, stream_id: int) -> None:
        """Refuse a :class:`StreamRequested` (status 01, then the stream is dropped).

        A no-op when the peer aborted the stream before the decision."""
        pending = self._pending_decision(stream_id)
        if pending is None:
            return
        stream, negotiation = pending
        self._transition(stream, StreamInput.APP_REFUSED)
        self._quic.send_stream_data(stream_id, negotiation.refuse(), end_stream=True)
        stream.local_ended = True
        self._stop_receiving(stream, StreamCode.NO_ERROR)
        self._finish(stream)

    def send_capacity(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` takes now.  Below a useful size, a
        :class:`StreamWritable` event follows once acknowledgements free room."""
        stream = self._stream(stream_id)
        if stream.state is not StreamState.OPEN or stream.local_ended:
            return 0
        capacity = self._capacity(stream)
        if capacity < self._writable_threshold:
            self._wait_writable(stream)
        return capacity

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send service bytes (and optionally end our direction)."""
        stream = self._stream(stream_id)
        if stream.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {stream_id} is not open ({stream.state.name})")
        if stream.local_ended:
            raise LocalProtocolError(f"stream {stream_id} was already ended")
        if data:
            capacity = self._capacity(stream)
            if len(data) > capacity:
                raise SendBufferFull(
                    f"{len(data)} bytes offered to stream {stream_id}, room for {capacity}"
                )
        self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        if self._buffered_total is not None:
            self._buffered_total += len(data)
        if end_stream:
            stream.local_ended = True
            if stream.remote_ended:
                self._transition(stream, StreamInput.BOTH_ENDED)
                self._finish(stream)
        elif self._capacity(stream) < self._writable_threshold:
            self._wait_writable(stream)

    def acknowledge_received_data(self, stream_id: int, amount: int) -> None:
        """The application consumed ``amount`` bytes of ``stream_id``: grant the peer credit."""
        if amount < 0:
            raise LocalProtocolError("cannot acknowledge a negative amount")
        stream = self._streams.get(stream_id)
        if stream is not None and stream.state is not StreamState.DONE:
            self._quic.acknowledge_received(stream_id, amount)

    def credit_update_due(self, stream_id: int) -> bool:
        """Whether what was acknowledged has made a window update due, so that the
        adapter should transmit now rather than with its next datagram."""
        return self._quic.credit_update_due(stream_id)

    def close_stream(self, stream_id: int) -> None:
        """Done with a stream: end our direction (written data is still delivered) and
        stop the peer's if it has not ended.  No event follows.  Idempotent."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.DONE:
            return
        if stream.state is not StreamState.OPEN:
            self.reset_stream(stream_id, StreamCode.CANCELLED)
            return
        if not stream.local_ended:
            self._quic.send_stream_data(stream_id, b"", end_stream=True)
            stream.local_ended = True
        self._stop_receiving(stream, StreamCode.NO_ERROR)
        self._transition(stream, StreamInput.CLOSED)
        self._finish(stream)

    def reset_stream(self, stream_id: int, code: int = StreamCode.CANCELLED) -> None:
        """Abort both directions of a stream.  The peer sees a reset; we get no event."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.DONE:
            return
        self._transition(stream, StreamInput.ABORTED)
        self._reset_both(stream, code)
        self._finish(stream)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the tunnel; :class:`ConnectionTerminated` follows.  Idempotent."""
        self._quic.close(error_code=int(code), reason_phrase=reason)
        self._report_close()

    # The application's calls: UDP flows (udp-datagrams, docs/protocol.md 3.17) -

    @property
    def flows_enabled(self) -> bool:
        """Whether UDP flows may be used: ``udp-datagrams`` agreed, DATAGRAM frames on."""
        return self._flows is not None

    def open_flow(self, target: UdpTarget, visitor: tuple[str, int], now: float) -> int | None:
        """Open a flow of ``visitor``'s datagrams to ``target`` on the peer; its ID, or
        None at ``Limits.udp_max_flows`` (counted as a FLOW_LIMIT drop).  At the limit
        the quietest flow of ours, if quiet for ``Limits.udp_flow_evict_after``, is
        ended first to make room (:class:`FlowEnded`, ``EVICTED``).

        Datagrams sent on it queue until :class:`FlowOpened`; :class:`FlowEnded`
        follows instead if the peer refuses."""
        flows = self._require_flows()
        evicted = flows.evictable(now)
        if evicted is not None:
            self._end_flow_here(
                evicted,
                flows.end(evicted),
                FlowEnd.EVICTED,
                f"the quietest of {self._limits.udp_max_flows} flows, quiet for "
                f"{self._limits.udp_flow_evict_after:g} s or more: ended for a new one",
            )
        flow_id = flows.open(now)
        if flow_id is None:
            return None
        try:
            stream_id = self.open_stream(FlowRequest(flow_id, target, visitor).to_address())
        except Exception:
            flows.end(flow_id)  # e.g. an address over max_address_size: no flow after all
            raise
        flows.bind(flow_id, stream_id)
        return flow_id

    def accept_flow(self, flow_id: int, now: float) -> None:
        """Accept a :class:`FlowRequested` (the application checked its target).  A
        no-op for a flow that ended meanwhile (its :class:`FlowEnded` is queued)."""
        stream_id = self._require_flows().accept(flow_id, now)
        if stream_id is not None:
            self.accept_stream(stream_id)
            self._run_flow_inbox()

    def refuse_flow(self, flow_id: int) -> None:
        """Refuse a :class:`FlowRequested` (status 01).  A no-op for an ended flow."""
        flows = self._require_flows()
        if flows.state(flow_id) not in (None, FlowState.REQUESTED):
            raise LocalProtocolError(f"flow {flow_id} is not awaiting a decision")
        stream_id = flows.end(flow_id)
        if stream_id is not None:
            self.refuse_stream(stream_id)

    def close_flow(self, flow_id: int) -> None:
        """End a flow: its stream ends, so the peer ends it too.  No event follows;
        queued datagrams are dropped.  Idempotent."""
        if self._flows is None:
            return
        stream_id = self._flows.end(flow_id)
        if stream_id is not None:
            self.close_stream(stream_id)

    def flow_payload_limit(self, flow_id: int) -> int:
        """The largest UDP payload :meth:`send_flow_datagram` takes on ``flow_id`` now
        (the path's DATAGRAM room less the flow ID); 0 without flows."""
        if self._flows is None:
            return 0
        return max(0, self._quic.max_datagram_payload() - len(encode_varint(flow_id)))

    def send_flow_datagram(self, flow_id: int, data: bytes, now: float) -> DropReason | None:
        """Send one UDP payload on a flow: None if it went to QUIC (or, while the flow's
        setup is under way, to its queue); else why it was dropped, and counted.

        Never fragmented nor retransmitted: a payload over :meth:`flow_payload_limit`
        is :attr:`DropReason.TOO_BIG`.  Call the adapter's flush afterwards."""
        flows = self._flows
        if flows is None or self._state is not TunnelState.AUTHENTICATED:
            self._datagrams_refused += 1
            return DropReason.NOT_AGREED
        quic = self._quic
        verdict = flows.outgoing(
            flow_id,
            data,
            now,
            max_datagram=quic.max_datagram_payload(),
            congested=quic.datagrams_queued >= self._limits.udp_send_queue,
        )
        if isinstance(verdict, bytes):
            quic.send_datagram(verdict)
            return None
        return verdict

    def datagram_counters(self) -> DatagramCounters:
        """Datagrams sent, delivered and dropped (by reason) on this tunnel so far."""
        drops: dict[DropReason, int] = {}
        sent = received = 0
        if self._flows is not None:
            drops.update(self._flows.drops)
            sent, received = self._flows.sent, self._flows.received
        for reason, amount in (
            (DropReason.NOT_AGREED, self._datagrams_refused),
            (DropReason.TOO_BIG, self._quic.stranded_datagrams),
        ):
            if amount:
                drops[reason] = drops.get(reason, 0) + amount
        return DatagramCounters(sent=sent, received=received, drops=drops)

    # Internals: QUIC events --------------------------------------------------

    def _process(self) -> None:
        while (event := self._quic.next_event()) is not None:
            handler = self._quic_handlers.get(type(event))
            if handler is not None:
                handler(event)
        self._run_flow_inbox()
        self._report_close()
        self._check_writable()

    def _on_handshake_completed(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.HandshakeCompleted)
        if self._state is not TunnelState.HANDSHAKING:
            return
        self._state = TunnelState.AUTHENTICATING
        # Limits.auth_timeout counts from here; the handshake had its own auth_timeout.
        self._auth_deadline = self._now + self._limits.auth_timeout
        self._emit(events.HandshakeCompleted(alpn=event.alpn_protocol))
        authenticator = self._authenticators.get(event.alpn_protocol or "")
        if authenticator is None:
            expected = " or ".join(self._authenticators)
            self.close(CloseCode.PROTOCOL_VIOLATION, f"expected ALPN {expected}")
            return
        self._authenticator = authenticator
        authenticator.handshake_done(peer_certificate=self._quic.peer_certificate)
        # The Listen side's hello goes out on its first stream: the auth channel.
        assert self._role is Role.CONNECT or (
            self._quic.get_next_available_stream_id() == AUTH_STREAM_ID
        )
        self._drain_authenticator()

    def _on_stream_data(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.StreamDataReceived)
        stream_id, data, end = event.stream_id, event.data, event.end_stream
        if stream_id == AUTH_STREAM_ID:
            self._on_auth_data(data, end)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._new_peer_stream(stream_id)
            if stream is None:
                self._quic.acknowledge_received(stream_id, len(data))
                return
        stream.received += len(data)
        self._probe_interval = self._limits.silence_probe_interval
        self._feed(stream, data, end)

    def _on_stream_reset(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.StreamReset)
        self._on_peer_abort(event.stream_id, event.error_code, "reset by peer")

    def _on_stop_sending(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.StopSendingReceived)
        if event.stream_id == AUTH_STREAM_ID:
            return  # the peer read all it wanted of the auth channel; its answer may follow
        stream = self._streams.get(event.stream_id)
        if stream is not None and stream.we_opened and stream.state is StreamState.NEGOTIATING:
            # A refusing acceptor sends its status, FIN and STOP_SENDING at once (the
            # reference drops the stream), and STOP_SENDING may be read first: our
            # direction is over (the engine reset it), but the verdict is still to come.
            stream.local_ended = True
            stream.stopped_code = event.error_code
            return
        self._on_peer_abort(event.stream_id, event.error_code, "peer stopped reading")

    def _on_peer_abort(self, stream_id: int, code: int, reason: str) -> None:
        if stream_id == AUTH_STREAM_ID:
            if self._state is not TunnelState.AUTHENTICATED:
                self._authenticator.receive_eof()
                self._drain_authenticator()
            return
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is StreamState.DONE:
            return
        app_knew, opener_waiting = stream.app_knows, stream.state is StreamState.NEGOTIATING
        self._transition(stream, StreamInput.ABORTED)
        self._reset_both(stream, StreamCode.CANCELLED)
        self._finish(stream)
        if opener_waiting and stream.we_opened:
            self._emit(
                events.StreamRejected(stream_id=stream_id, reason=f"{reason} during negotiation")
            )
        elif app_knew:
            self._emit(
                events.StreamReset(stream_id=stream_id, code=code, by_peer=True, reason=reason)
            )

    def _on_terminated(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.ConnectionTerminated)
        self._report_close()

    def _on_cid_issued(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.ConnectionIdIssued)
        self._connection_id_changes.append((True, event.connection_id))

    def _on_cid_retired(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.ConnectionIdRetired)
        self._connection_id_changes.append((False, event.connection_id))

    def _report_close(self) -> None:
        if self._close_reported:
            return
        close = self._quic.close_reason
        if close is None:
            return
        code, reason, by_peer, application = close
        self._state = TunnelState.CLOSED
        self._emit(
            events.ConnectionTerminated(
                code=code, reason=reason, by_peer=by_peer, application=application
            )
        )
        self._close_reported = True

    # Internals: UDP flows ----------------------------------------------------

    def _require_flows(self) -> FlowTable:
        if self._flows is None:
            raise LocalProtocolError(
                "UDP flows need an authenticated tunnel that agreed on udp-datagrams "
                f"(tunnel is {self._state.name}, features {sorted(self._features)})"
            )
        return self._flows

    def _is_flow_event(self, event: events.TunnelEvent, flows: FlowTable) -> bool:
        """Whether ``event`` belongs to a flow's stream (the application never sees those)."""
        stream_id = getattr(event, "stream_id", None)
        if stream_id is None:
            return False
        if flows.flow_of_stream(stream_id) is not None:
            return True
        return isinstance(event, events.StreamRequested) and event.address.startswith(PROXY_UDP)

    def _run_flow_inbox(self) -> None:
        """Turn flow streams' events into flow events, now that no stream is mid-change
        (a flow's handling ends streams, which must not happen inside the transition
        that reported them)."""
        while self._flow_inbox and self._flows is not None:
            inbox, self._flow_inbox = self._flow_inbox, []
            for event in inbox:
                self._FLOW_STREAM_HANDLERS[type(event)](self, self._flows, event)

    def _on_flow_requested(self, flows: FlowTable, event: events.TunnelEvent) -> None:
        assert isinstance(event, events.StreamRequested)
        try:
            request = FlowRequest.from_address(event.address)
        except RemoteProtocolError:
            request = None
        # A malformed address, an ID of ours or in use, or the flow limit: refused (01),
        # as any address no service takes.
        if request is None or flows.request(request.flow_id, event.stream_id, self._now):
            self.refuse_stream(event.stream_id)
            return
        self._emit(
            events.FlowRequested(
                flow_id=request.flow_id, target=request.target, visitor=request.visitor
            )
        )

    def _on_flow_accepted(self, flows: FlowTable, event: events.TunnelEvent) -> None:
        assert isinstance(event, events.StreamAccepted)
        flow_id = flows.flow_of_stream(event.stream_id)
        assert flow_id is not None
        for datagram in flows.opened(flow_id, self._now):
            if self._quic.datagrams_queued >= self._limits.udp_send_queue:
                flows.count(DropReason.CONGESTED)
            else:
                self._quic.send_datagram(datagram)
                flows.note_sent()
        self._emit(events.FlowOpened(flow_id=flow_id))

    def _on_flow_stream_over(self, flows: FlowTable, event: events.TunnelEvent) -> None:
        assert isinstance(event, events.StreamRejected | events.StreamReset | events.StreamEnded)
        stream_id = event.stream_id
        flow_id = flows.flow_of_stream(stream_id)
        if flow_id is None:
            return  # the flow ended earlier in this batch
        flows.end(flow_id)
        if isinstance(event, events.StreamRejected):
            cause, reason = FlowEnd.REFUSED, event.reason
        elif isinstance(event, events.StreamReset):
            clean = event.by_peer and event.code == StreamCode.NO_ERROR
            cause = FlowEnd.PEER_CLOSED if clean else FlowEnd.RESET
            reason = f"{event.reason} (code {event.code:#x})"
        else:
            cause, reason = FlowEnd.PEER_CLOSED, "the peer ended the flow's stream"
            self.close_stream(stream_id)  # end ours too: the flow is over both ways
        self._emit(events.FlowEnded(flow_id=flow_id, cause=cause, reason=reason))

    def _on_flow_stream_data(self, flows: FlowTable, event: events.TunnelEvent) -> None:
        # A flow's stream carries no service bytes (reserved): read and forgotten.
        assert isinstance(event, events.DataReceived)
        self.acknowledge_received_data(event.stream_id, len(event.data))

    def _on_flow_stream_writable(self, flows: FlowTable, event: events.TunnelEvent) -> None:
        pass  # nothing is ever written on a flow's stream after its negotiation

    #: What becomes of each event of a flow's stream (see :meth:`_run_flow_inbox`).
    _FLOW_STREAM_HANDLERS: ClassVar[
        dict[type[events.TunnelEvent], Callable[[TunnelConnection, FlowTable, Any], None]]
    ] = {
        events.StreamRequested: _on_flow_requested,
        events.StreamAccepted: _on_flow_accepted,
        events.StreamRejected: _on_flow_stream_over,
        events.StreamReset: _on_flow_stream_over,
        events.StreamEnded: _on_flow_stream_over,
        events.DataReceived: _on_flow_stream_data,
        events.StreamWritable: _on_flow_stream_writable,
    }

    def _expire_flows(self, flows: FlowTable, now: float) -> None:
        timer = flows.get_timer()
        if timer is None or timer > now:
            return
        timeout = self._limits.udp_flow_idle_timeout
        for flow_id, stream_id in flows.handle_timer(now):
            self._end_flow_here(
                flow_id, stream_id, FlowEnd.IDLE, f"no datagram either way for {timeout:g} s"
            )

    def _end_flow_here(
        self, flow_id: int, stream_id: int | None, cause: FlowEnd, reason: str
    ) -> None:
        """A flow this side ended (already out of the table): its stream ends, so the
        peer ends it too, and the application hears :class:`FlowEnded`."""
        if stream_id is not None:
            self.close_stream(stream_id)
        self._emit(events.FlowEnded(flow_id=flow_id, cause=cause, reason=reason))

    def _on_datagram(self, event: quic_events.QuicEvent) -> None:
        assert isinstance(event, quic_events.DatagramFrameReceived)
        flows = self._flows
        if flows is None:
            self._datagrams_refused += 1  # before authentication, or not agreed
            return
        delivered = flows.incoming(event.data, self._now)
        if isinstance(delivered, DropReason):
            return
        flow_id, payload = delivered
        self._probe_interval = self._limits.silence_probe_interval
        self._emit(events.FlowDatagramReceived(flow_id=flow_id, data=payload))

    # Internals: authentication -----------------------------------------------

    def _on_auth_data(self, data: bytes, end: bool) -> None:
        self._auth_received += len(data)
        if self._auth_received > self._auth_released:
            # Only what was not paid for when the channel was released (out-of-order bytes).
            self._quic.acknowledge_received(
                AUTH_STREAM_ID, self._auth_received - self._auth_released
            )
            self._auth_released = self._auth_received
        self._auth_eof = self._auth_eof or end
        if self._state is TunnelState.AUTHENTICATED or self._authenticator.is_finished:
            return
        if data:
            self._authenticator.receive_data(data)
        if end:
            self._authenticator.receive_eof()
        self._drain_authenticator()

    def _drain_authenticator(self) -> None:
        if self._state is TunnelState.HANDSHAKING:
            return  # the auth channel opens with the handshake's end
        outgoing = self._authenticator.data_to_send()
        if outgoing:
            self._quic.send_stream_data(AUTH_STREAM_ID, outgoing)
        while (event := self._authenticator.next_event()) is not None:
            if isinstance(event, SecretRequired):
                self._emit(events.CredentialRequired(name=event.name))
            elif isinstance(event, Authenticated):
                self._on_authenticated(event.name, event.features)
            elif isinstance(event, Rejected):
                self.close(self._rejection_code, event.reason)

    def _on_authenticated(self, name: str, features: frozenset[str]) -> None:
        if self._state is not TunnelState.AUTHENTICATING:
            return
        self._state = TunnelState.AUTHENTICATED
        self._name = name
        self._auth_deadline = None
        if self._keepalive_setting is not None:
            share = _KEEPALIVE_SHARE[self._role]
            self._keepalive_interval = min(self._keepalive_setting, share * self._quic.idle_timeout)
            self._arm_keepalive(self._now)
        # The channel is done: FIN our side, stop the peer's if it is still open.
        if self._quic.can_send(AUTH_STREAM_ID):
            self._quic.send_stream_data(AUTH_STREAM_ID, b"", end_stream=True)
        if not self._auth_eof:
            self._quic.stop_stream(AUTH_STREAM_ID, StreamCode.NO_ERROR)
        self._auth_released = self._quic.release_stream(AUTH_STREAM_ID, self._auth_received)
        self._quic.open_windows(
            connection_window=self._limits.tunnel_receive_window,
            max_streams=self._limits.max_streams_per_tunnel,
        )
        if UDP_DATAGRAMS in features:
            if self._quic.datagrams_negotiated:
                parity = 1 if self._role is Role.LISTEN else 0
                self._flows = FlowTable(limits=self._limits, local_parity=parity)
            else:
                # Agreed, but one end did not send max_datagram_frame_size: as if not.
                features = features - {UDP_DATAGRAMS}
        self._features = features
        self._emit(
            events.AuthenticationCompleted(
                name=name, scheme=self._authenticator.scheme, features=features
            )
        )
        for stream in list(self._streams.values()):
            if stream.state is StreamState.HELD:
                self._release_held(stream)

    def _require_authenticated(self) -> None:
        if self._state is not TunnelState.AUTHENTICATED:
            raise LocalProtocolError(
                f"streams can be opened only after authentication (tunnel is {self._state.name})"
            )

    # Internals: streams ------------------------------------------------------

    def _new_peer_stream(self, stream_id: int) -> _Stream | None:
        if self._state is TunnelState.CLOSED:
            return None
        if self._state is not TunnelState.AUTHENTICATED:
            # Its bytes wait; the unauthenticated windows bound how many there can be.
            stream = _Stream(stream_id=stream_id, we_opened=False, state=StreamState.HELD)
            self._add_stream(stream)
            return stream
        pending = sum(
            1
            for state in (StreamState.NEGOTIATING, StreamState.DECIDING)
            for s in self._by_state[state]
            if not s.we_opened
        )
        if pending >= self._limits.max_pending_requests:
            # Keep a DONE record, so that its later bytes are discarded rather than
            # taken for a new stream once the limit has room again.
            stream = _Stream(stream_id=stream_id, we_opened=False, state=StreamState.DONE)
            self._add_stream(stream)
            self._quic.reset_stream(stream_id, StreamCode.LIMIT_EXCEEDED)
            self._quic.stop_stream(stream_id, StreamCode.LIMIT_EXCEEDED)
            self._finish(stream)
            return stream
        stream = _Stream(stream_id=stream_id, we_opened=False, state=StreamState.NEGOTIATING)
        self._add_stream(stream)
        self._start_acceptor(stream)
        return stream

    def _add_stream(self, stream: _Stream) -> None:
        self._streams[stream.stream_id] = stream
        self._by_state[stream.state][stream] = None

    def _start_negotiation_clocks(self, now: float) -> None:
        for stream_id in self._unclocked:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.deadline is None:
                stream.deadline = now + self._limits.negotiation_timeout
                if self._probe_sent_at is None:
                    # The open is a probe too: a live peer acknowledges it within a
                    # round trip, so silence until probe_answer_timeout means it is
                    # gone (either side: an aggregator learns of a killed client here).
                    self._probe_sent_at = now
        self._unclocked.clear()

    def _start_acceptor(self, stream: _Stream) -> None:
        if not self._quic.can_send(stream.stream_id):
            # STOP_SENDING came before the first byte: the engine already reset our side.
            self._transition(stream, StreamInput.ABORTED)
            self._reset_both(stream, StreamCode.CANCELLED)
            self._finish(stream)
            return
        negotiation = AcceptorNegotiation(limits=self._limits)
        stream.negotiation = negotiation
        stream.deadline = self._now + self._limits.negotiation_timeout
        self._quic.send_stream_data(stream.stream_id, negotiation.initial_data())
        self._buffers_changed()

    def _release_held(self, stream: _Stream) -> None:
        self._transition(stream, StreamInput.AUTHENTICATED)
        self._start_acceptor(stream)
        held, stream.held = bytes(stream.held), bytearray()
        self._feed(stream, held, stream.held_end)

    def _feed(self, stream: _Stream, data: bytes, end: bool) -> None:
        state = stream.state
        if state is StreamState.HELD or state is StreamState.DECIDING:
            stream.held += data
            stream.held_end = stream.held_end or end
        elif state is StreamState.NEGOTIATING:
            self._negotiate(stream, data, end)
        elif state is StreamState.OPEN:
            if data:
                self._emit(events.DataReceived(stream_id=stream.stream_id, data=data))
            if end:
                self._remote_end(stream)
        elif stream.received > stream.released:
            # DONE: nobody will read these bytes; give back the credit not yet returned
            # (bytes that arrived out of order were paid for when the stream finished).
            self._quic.acknowledge_received(stream.stream_id, stream.received - stream.released)
            stream.released = stream.received

    def _negotiate(self, stream: _Stream, data: bytes, end: bool) -> None:
        negotiation = stream.negotiation
        assert negotiation is not None
        try:
            result = negotiation.receive_data(data) if data else None
            if result is None and end:
                negotiation.receive_eof()
        except UnsupportedVersion as exc:
            self._quic.acknowledge_received(stream.stream_id, len(data))
            self.close(CloseCode.UNSUPPORTED_VERSION, exc.reason)
            return
        except ProtocolError as exc:
            self._quic.acknowledge_received(stream.stream_id, len(data))
            self._fail_negotiation(stream, exc.reason)
            return
        remainder = getattr(result, "remainder", b"")
        self._quic.acknowledge_received(stream.stream_id, len(data) - len(remainder))
        stream_id = stream.stream_id
        if isinstance(result, Accepted):
            self._transition(stream, StreamInput.PEER_ACCEPTED)
            stream.negotiation = None
            self._emit(events.StreamAccepted(stream_id=stream_id))
            if stream.stopped_code is not None:
                # Accepted after it stopped our direction: as on any open stream, the
                # stream is over (else the application could never write, nor be told).
                self._on_peer_abort(stream_id, stream.stopped_code, "peer stopped reading")
                return
            self._feed(stream, remainder, end)
        elif isinstance(result, Refused):
            self._transition(stream, StreamInput.PEER_REFUSED)
            if self._quic.can_send(stream_id):
                self._quic.send_stream_data(stream_id, b"", end_stream=True)
            stream.local_ended = True
            self._stop_receiving(stream, StreamCode.NO_ERROR)
            self._finish(stream)
            self._emit(
                events.StreamRejected(
                    stream_id=stream_id, reason=f"peer refused the route (status {result.status})"
                )
            )
        elif isinstance(result, AddressReceived):
            self._transition(stream, StreamInput.ADDRESS_RECEIVED)
            stream.deadline = None
            self._emit(events.StreamRequested(stream_id=stream_id, address=result.address))
            self._feed(stream, remainder, end)

    def _fail_negotiation(self, stream: _Stream, reason: str) -> None:
        we_opened = stream.we_opened
        self._abort(stream, StreamCode.PROTOCOL_VIOLATION, reason, notify=we_opened)

    def _abort(self, stream: _Stream, code: int, reason: str, *, notify: bool = True) -> None:
        """The core gives up on a stream (negotiation failure or timeout)."""
        was_negotiating = stream.state is StreamState.NEGOTIATING
        app_knew = stream.app_knows
        self._transition(stream, StreamInput.ABORTED)
        self._reset_both(stream, code)
        self._finish(stream)
        if not (notify and app_knew):
            return
        if was_negotiating and stream.we_opened:
            self._emit(events.StreamRejected(stream_id=stream.stream_id, reason=reason))
        else:
            self._emit(
                events.StreamReset(
                    stream_id=stream.stream_id, code=code, by_peer=False, reason=reason
                )
            )

    def _remote_end(self, stream: _Stream) -> None:
        stream.remote_ended = True
        self._emit(events.StreamEnded(stream_id=stream.stream_id))
        if stream.local_ended:
            self._transition(stream, StreamInput.BOTH_ENDED)
            self._finish(stream)

    def _reset_both(self, stream: _Stream, code: int) -> None:
        if self._quic.stream_is_open(stream.stream_id):
            self._quic.reset_stream(stream.stream_id, int(code))
            self._stop_receiving(stream, code)

    def _stop_receiving(self, stream: _Stream, code: int) -> None:
        if not stream.remote_ended and self._quic.stream_is_open(stream.stream_id):
            # ValueError: the engine already discarded its receive side.
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(stream.stream_id, int(code))

    def _finish(self, stream: _Stream) -> None:
        """The stream is DONE for us: give back its credit; the record stays until the
        engine drops the stream, so its unacknowledged bytes still count as buffered."""
        stream.negotiation = None
        stream.held = bytearray()
        stream.want_writable = False
        self._want_writable.pop(stream, None)
        self._buffers_changed()  # a reset drops the stream's send buffer
        stream.released = self._quic.release_stream(stream.stream_id, stream.received)

    def _purge_finished_streams(self) -> None:
        finished = self._by_state[StreamState.DONE]
        if not finished:
            return
        done = [s for s in finished if not self._quic.stream_is_open(s.stream_id)]
        for stream in done:
            del self._streams[stream.stream_id]
            del finished[stream]
        if done:
            self._buffers_changed()

    def _transition(self, stream: _Stream, event: StreamInput) -> None:
        try:
            state = _STREAM_TRANSITIONS[stream.state, event]
        except KeyError:
            raise LocalProtocolError(
                f"stream {stream.stream_id}: {event.name} is not possible in {stream.state.name}"
            ) from None
        del self._by_state[stream.state][stream]
        self._by_state[state][stream] = None
        stream.state = state

    def _pending_decision(self, stream_id: int) -> tuple[_Stream, AcceptorNegotiation] | None:
        """The stream a decision is for and its negotiation, or None if the peer
        aborted it meanwhile.  Raises for a stream that awaits no decision."""
        stream = self._streams.get(stream_id)
        if stream is None and self._quic.stream_was_discarded(stream_id):
            return None
        if stream is not None and stream.state is StreamState.DONE and not stream.we_opened:
            return None
        stream = self._stream(stream_id)
        if not isinstance(stream.negotiation, AcceptorNegotiation):
            raise LocalProtocolError(f"stream {stream_id} is not awaiting a decision")
        return stream, stream.negotiation

    def _stream(self, stream_id: int) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise LocalProtocolError(f"unknown stream {stream_id}") from None

    # Internals: send buffers -------------------------------------------------

    @property
    def _writable_threshold(self) -> int:
        return min(self._limits.stream_send_buffer // 2, self._limits.writable_threshold)

    def _shared_room(self) -> int:
        """What ``tunnel_send_buffer`` leaves for all streams together."""
        buffered_total = self._buffered_total
        if buffered_total is None:
            buffered_total = sum(self._quic.send_buffered(sid) for sid in self._streams)
            self._buffered_total = buffered_total
        return self._limits.tunnel_send_buffer - buffered_total

    def _capacity(self, stream: _Stream, shared: int | None = None) -> int:
        own = self._limits.stream_send_buffer - self._quic.send_buffered(stream.stream_id)
        return max(0, min(own, self._shared_room() if shared is None else shared))

    def _buffers_changed(self) -> None:
        self._buffered_total = None
        self._room_changed = True

    def _wait_writable(self, stream: _Stream) -> None:
        stream.want_writable = True
        self._want_writable[stream] = None

    def _check_writable(self) -> None:
        if not self._want_writable or not self._room_changed:
            return  # nobody waits, or nothing was acknowledged or dropped since the last look
        self._room_changed = False
        # Wake the waiters in the order they came, only as many as the tunnel's shared
        # room serves: each may take all the room it sees.  Waking every one (64
        # relays behind one full tunnel buffer) had all but the first find nothing
        # and wait again, at every acknowledgement.
        threshold = self._writable_threshold
        shared = self._shared_room()
        # With nothing in flight no acknowledgement will come to look again: a woken
        # writer that gives up without writing would strand the rest, so wake them all.
        idle = shared >= self._limits.tunnel_send_buffer
        woken = []
        for stream in self._want_writable:
            if shared < threshold:
                break
            if stream.state is not StreamState.OPEN:
                continue
            room = self._capacity(stream, shared)
            if room >= threshold:
                woken.append(stream)
                if not idle:
                    shared -= room
        for stream in woken:
            stream.want_writable = False
            del self._want_writable[stream]
            self._emit(events.StreamWritable(stream_id=stream.stream_id))
