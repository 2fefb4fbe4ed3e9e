"""A harness for the Connect side (a snocat client) facing a hostile aggregator.

``client_handshaken``
    A real client, built the way snocat_anyio's and snocat_sync's are (a
    :class:`~snocat_proto.tunnel.TunnelConnection` from ``connect()`` behind a
    :class:`~snocat_proto.client_endpoint.ClientEndpoint`), completes the QUIC handshake
    in memory with a real :class:`~snocat_proto.endpoint.ServerEndpoint` and, if the
    input says so, authenticates (token or SimpleAck); otherwise the aggregator never
    sends its hello.  Then the aggregator's engine is raw and the input is a script of
    what a hostile aggregator does: open streams toward the client with any bytes (a NYAN
    header and a route address the client may or may not allow, or anything), write,
    end, reset and stop any stream (the auth channel too), send *any 1-RTT frames* sealed
    with its real keys, from its own address or another; time passes.  The client's
    application acts too: it opens streams to the aggregator, decides requests as
    snocat's clients do (through an :class:`~snocat_proto.allowlist.AllowList`) or leaves
    them undecided, reads data or leaves it unread, writes, closes and resets streams.

Invariants (beyond "no exception escapes the client core"):

* the application hears of streams only after ``AuthenticationCompleted``, which comes
  only once the aggregator sent a valid hello (and, token scheme, a ``{"ok": true}``
  result) on the auth channel: a token aggregator that never sends one reaches nothing;
* what the client holds is bounded: before authentication at most 4 peer streams and
  the pre-auth window held; pending requests <= ``max_pending_requests``; bytes held
  for the application plus those delivered and not yet read within the stream and
  tunnel receive windows; the authenticator's and the send buffers within their limits;
* no stream outlives its negotiation deadline while negotiating; a refused request is
  over at once (no event for it follows; its record goes when the engine drops the
  stream, as every finished stream's does); an undecided one stays pending (the acceptor
  does not time its application, docs/protocol.md 3.4) and counts against the limit;
* the core writes the accept status only on a stream the application accepted, and the
  application accepts only targets of its allow-list (checked against an independent
  reading of the list); the refusal status only on a stream it refused;
* events name only streams the application knows; none follows a stream's reset or
  refusal, and nothing follows ``ConnectionTerminated``;
* once the aggregator goes quiet, the tunnel ends within the keep-alive interval plus
  its idle timeout and closing period, and no timer stays armed.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from snocat_proto._service.allowlist import AllowList
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    HELLO_SIZE,
    Authenticator,
    ClientCredentials,
    TokenConnector,
    connect_authenticator,
)
from snocat_proto._wire.codes import StreamCode
from snocat_proto._wire.endpoint import ClientEndpoint, ServerEndpoint
from snocat_proto._wire.engine import (
    NetworkAddress,
    QuicEngine,
    quic_events,
)
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    CredentialRequired,
    DataReceived,
    HandshakeCompleted,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamRequested,
    StreamReset,
    StreamWritable,
    TunnelEvent,
)
from snocat_proto._wire.framing import LENGTH_PREFIX_SIZE, encode_frame
from snocat_proto._wire.negotiation import HEADER
from snocat_proto._wire.proxyme import ProxymeRequest
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.tunnel import (
    AUTH_STREAM_ID,
    CONNECT_KEEPALIVE_INTERVAL,
    StreamState,
    TunnelConnection,
    TunnelState,
)

from .quic_harness import (
    ADDRESSES,
    LIMITS,
    NAME,
    SECRET,
    SERVER_ADDR,
    SERVER_CONFIGURATION,
    SilentAuthenticator,
    aggregator_authenticator,
    answer_as_aggregator,
    client_configuration,
    complete_handshake,
    op_open,
    op_reset,
    op_send,
    op_stop,
    op_wait,
    run_out,
    script,
    seal_one_rtt,
)

__all__ = ["CLIENT_ROUTES", "HARNESSES", "ROUTES", "TARGETS", "Policy"]

CLIENT_ADDR = ADDRESSES[0]
#: Where the aggregator's sealed frames come from: its own address, or another.
FRAME_SOURCES: tuple[NetworkAddress, ...] = (SERVER_ADDR, *ADDRESSES[1:])
#: The client's ``--target`` list, which is its allow-list.
TARGETS = ("127.0.0.1:5000", "example.com:443", "[::1]:22", "localhost:8080")
_ALLOW_LIST = AllowList(ProxyTcpTarget.parse_host_port(text) for text in TARGETS)
#: The same list as ``(host, port)``, for the independent reading in :func:`_allowed`.
_ALLOWED = {("127.0.0.1", 5000), ("example.com", 443), ("::1", 22), ("localhost", 8080)}
_IP_KINDS: dict[str, Callable[[str], object]] = {
    "ip4": ipaddress.IPv4Address,
    "ip6": ipaddress.IPv6Address,
}
_HOST_KINDS = ("dns", "dns4", "dns6", "ip4", "ip6")

#: Route addresses the aggregator's NYAN opens name (see :func:`_op_open`).
ROUTES = (
    RouteAddress.of("proxy-tcp", "ip4", "127.0.0.1", "tcp", "5000"),  # allowed
    RouteAddress.of("proxy-tcp", "dns", "EXAMPLE.com.", "tcp", "0443"),  # allowed, spelt oddly
    RouteAddress.of("proxy-tcp", "ip6", "0:0::1", "tcp", "22"),  # allowed: the same address
    RouteAddress.of("proxy-tcp", "tcp", "8080"),  # allowed: localhost
    RouteAddress.of("proxy-tcp", "ip4", "127.0.0.1", "tcp", "5001"),  # another port
    RouteAddress.of("proxy-tcp", "dns", "example.com.evil", "tcp", "443"),  # another host
    RouteAddress.of("proxyme", "0.0.1", "127.0.0.1", "5000"),  # not a proxy-tcp target
)
#: What the client's application opens toward the aggregator.
CLIENT_ROUTES = (
    ProxymeRequest(host="127.0.0.1", port=5000).to_address(),
    RouteAddress.of("proxy-tcp", "dns", "example.com", "tcp", "443"),
)
_PRE_AUTH_WINDOW = min(LIMITS.pre_auth_receive_window, LIMITS.tunnel_receive_window)
#: Negotiation bytes a stream's send buffer may hold beyond ``stream_send_buffer``:
#: the NYAN header, an address frame and a status byte.
_NEGOTIATION_BYTES = len(HEADER) + LENGTH_PREFIX_SIZE + LIMITS.max_address_size + 1
_AUTH_INPUT_BOUND = HELLO_SIZE + LENGTH_PREFIX_SIZE + LIMITS.max_auth_message_size
_TOKEN_HELLO_HEADER = b"snocat-token-v1".ljust(32, b"\0")
#: Timers due this soon are pacing, not time passing (see :meth:`_Session.exchange`).
_PACING = 0.001


def _allowed(address: RouteAddress) -> bool:
    """An independent reading of :data:`TARGETS` as an allow-list (docs/protocol.md
    2.6, 3.11): a ``proxy-tcp`` address whose port and host are configured, IP literals
    compared as addresses and names without case or a trailing dot."""
    segments = address.segments
    if len(segments) == 3 and segments[:2] == ("proxy-tcp", "tcp"):
        kind, host, port = "local", "localhost", segments[2]
    elif len(segments) == 5 and segments[0] == "proxy-tcp" and segments[3] == "tcp":
        kind, host, port = segments[1], segments[2], segments[4]
        if kind not in _HOST_KINDS:
            return False
    else:
        return False
    if not (port.isascii() and port.isdigit()):
        return False
    if kind in _IP_KINDS:
        try:
            host = str(_IP_KINDS[kind](host))
        except ValueError:
            return False
    return (host.lower().rstrip("."), int(port)) in _ALLOWED


def _valid_auth_input(token: bool, received: bytes) -> bool:
    """Whether the aggregator's bytes on the auth channel may authenticate the client
    (docs/protocol.md 2.3, 2.4): a ``HELO`` hello (SimpleAck), or a token hello followed
    by a result frame within the limit holding a JSON object with ``"ok": true``."""
    hello = received[:HELLO_SIZE]
    if len(hello) < HELLO_SIZE:
        return False
    if not token:
        return hello.startswith(b"HELO\0")
    if not hello.startswith(_TOKEN_HELLO_HEADER):
        return False
    rest = received[HELLO_SIZE:]
    if len(rest) < LENGTH_PREFIX_SIZE:
        return False
    size = int.from_bytes(rest[:LENGTH_PREFIX_SIZE], "big")
    payload = rest[LENGTH_PREFIX_SIZE : LENGTH_PREFIX_SIZE + size]
    if size > LIMITS.max_auth_message_size or len(payload) < size:
        return False
    try:
        result = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return isinstance(result, dict) and result.get("ok") is True


def _recording(authenticator: Authenticator, into: bytearray) -> Authenticator:
    """``authenticator``, with every byte the tunnel feeds it also appended to ``into``."""
    receive = authenticator.receive_data

    def receive_data(data: bytes) -> None:
        into.extend(data)
        receive(data)

    authenticator.receive_data = receive_data  # type: ignore[method-assign]
    return authenticator


class Policy(Enum):
    """How the client's application answers a :class:`StreamRequested`."""

    #: As snocat's clients with reachable targets: allowed ones accepted, others refused.
    AT_ONCE = 0
    #: Only when the script says (op 7), if ever.
    DEFERRED = 1
    #: Every target is down: everything is refused.
    REFUSE_ALL = 2
    #: Others refused at once; allowed ones wait for the script (a slow connect).
    CONNECTING = 3


@dataclass
class _App:
    """The client application: what it was told, and what it decided."""

    authenticated: bool = False
    closed: bool = False
    #: Every StreamRequested, by stream.
    requested: dict[int, RouteAddress] = field(default_factory=dict)
    #: Requests not decided yet, oldest first.
    pending: list[int] = field(default_factory=list)
    accepted: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    #: Streams it opened.
    opened: set[int] = field(default_factory=set)
    #: Streams data may flow on: accepted by it, or (those it opened) by the peer.
    open: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)
    local_ended: set[int] = field(default_factory=set)
    #: Reset, refused or closed: no event may name these any more.
    over: set[int] = field(default_factory=set)
    #: Bytes delivered (DataReceived) and not yet acknowledged, by stream.
    unread: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class _Session:
    """The client under test, and the aggregator whose engine the script drives."""

    client: TunnelConnection
    endpoint: ClientEndpoint
    server: ServerEndpoint
    token: bool
    policy: Policy
    auto_read: bool
    aggregator_reads: bool
    auth_input: bytearray
    now: float = 1000.0
    #: The aggregator's engine, once the script drives it (before: ``server`` does).
    aggregator: QuicEngine | None = None
    app: _App = field(default_factory=_App)
    #: Streams the script may pick: those the aggregator opened, then the client's.
    raw_streams: list[int] = field(default_factory=list)
    #: What the client wrote on each stream the aggregator opened (its NYAN answer).
    replies: defaultdict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))

    @property
    def engine(self) -> QuicEngine:
        """The aggregator's engine (once the script drives it)."""
        assert self.aggregator is not None
        return self.aggregator

    def go_raw(self) -> None:
        (tunnel,) = self.server.tunnels
        self.aggregator = tunnel._quic
        # A hostile aggregator gives the client whatever windows it likes.
        self.aggregator.open_windows(
            connection_window=LIMITS.tunnel_receive_window,
            max_streams=LIMITS.max_streams_per_tunnel,
        )

    # Moving datagrams ------------------------------------------------------------

    def exchange(self, rounds: int = 8) -> None:
        """Deliver datagrams both ways (no loss) until quiet or ``rounds`` are done.
        Pacing delays (aioquic spaces packets by microseconds) pass as if on the wire."""
        for _ in range(rounds):
            outgoing = self.endpoint.datagrams_to_send(self.now)
            self.check_records()
            for datagram, _address in outgoing:
                self.to_aggregator(datagram)
            incoming = self.from_aggregator()
            for datagram, _address in incoming:
                self.endpoint.receive_datagram(datagram, SERVER_ADDR, self.now)
                self.drain_client()
                self.check()
            if not outgoing and not incoming:
                due = self.next_timer()
                if due is None or due > self.now + _PACING:
                    return
                self.now = max(self.now, due)
                self.fire_timers()

    def to_aggregator(self, datagram: bytes) -> None:
        if self.aggregator is None:
            self.server.receive_datagram(datagram, CLIENT_ADDR, self.now)
            answer_as_aggregator(self.server, lambda: True)
            return
        self.aggregator.receive_datagram(datagram, CLIENT_ADDR, self.now)
        self.drain_aggregator()

    def from_aggregator(self) -> list[tuple[bytes, NetworkAddress]]:
        if self.aggregator is None:
            return self.server.datagrams_to_send(self.now)
        return self.aggregator.datagrams_to_send(self.now)

    def drain_aggregator(self) -> None:
        engine = self.engine
        while (event := engine.next_event()) is not None:
            if not isinstance(event, quic_events.StreamDataReceived):
                continue
            stream_id = event.stream_id
            if self.aggregator_reads:
                engine.acknowledge_received(stream_id, len(event.data))
            if stream_id % 4 == 0 and stream_id not in self.raw_streams:
                self.raw_streams.append(stream_id)  # the client opened it
            elif stream_id % 4 == 1 and stream_id != AUTH_STREAM_ID:
                self.replies[stream_id] += event.data

    def advance(self, seconds: float) -> None:
        deadline = self.now + seconds
        for _ in range(1000):
            due = self.next_timer()
            if due is None or due > deadline:
                break
            self.now = max(self.now, due)
            self.fire_timers()
            self.exchange()
        self.now = max(self.now, deadline)
        self.check()

    def next_timer(self) -> float | None:
        aggregator = (
            self.server.get_timer() if self.aggregator is None else self.aggregator.get_timer()
        )
        timers = [self.endpoint.get_timer(), aggregator]
        return min((t for t in timers if t is not None), default=None)

    def fire_timers(self) -> None:
        """Both sides handle the timers due by now."""
        if (timer := self.endpoint.get_timer()) is not None and timer <= self.now:
            self.endpoint.handle_timer(self.now)
            self.drain_client()
        if self.aggregator is None:
            self.server.handle_timer(self.now)
            answer_as_aggregator(self.server, lambda: True)
        elif (timer := self.aggregator.get_timer()) is not None and timer <= self.now:
            self.aggregator.handle_timer(self.now)
            self.drain_aggregator()

    # The client's application --------------------------------------------------

    def drain_client(self) -> None:
        while (item := self.endpoint.next_event()) is not None:
            self.on_event(item[1])

    def on_event(self, event: TunnelEvent) -> None:
        app = self.app
        assert not app.closed, f"{event!r} after ConnectionTerminated"
        if isinstance(event, HandshakeCompleted):
            return
        if isinstance(event, AuthenticationCompleted):
            assert not app.authenticated, "authenticated twice"
            assert _valid_auth_input(self.token, bytes(self.auth_input)), (
                f"authenticated on the aggregator's bytes {bytes(self.auth_input[:200])!r}"
            )
            app.authenticated = True
            return
        if isinstance(event, ConnectionTerminated):
            app.closed = True
            return
        assert not isinstance(event, CredentialRequired), "the Connect side asked for a secret"
        stream_id: int = event.stream_id  # type: ignore[attr-defined]
        assert stream_id not in app.over, f"{event!r} after the stream was over"
        if isinstance(event, StreamRequested):
            assert app.authenticated, "a stream request before authentication"
            assert stream_id % 4 == 1 and stream_id != AUTH_STREAM_ID, event
            assert stream_id not in app.requested, f"{event!r} twice"
            app.requested[stream_id] = event.address
            app.pending.append(stream_id)
            self.decide_at_once(stream_id)
            return
        assert stream_id in app.requested or stream_id in app.opened, (
            f"{event!r} names a stream the application never heard of"
        )
        if isinstance(event, DataReceived):
            assert app.authenticated, "data before authentication"
            assert stream_id in app.open, f"{event!r} on a stream nobody accepted"
            assert stream_id not in app.ended, f"{event!r} after the stream's end"
            app.unread[stream_id] += len(event.data)
            if self.auto_read:
                self.read(stream_id)
        elif isinstance(event, StreamAccepted | StreamRejected):
            assert stream_id in app.opened and stream_id not in app.open, event
            if isinstance(event, StreamAccepted):
                app.open.add(stream_id)
            else:
                app.over.add(stream_id)
        elif isinstance(event, StreamEnded):
            assert stream_id in app.open and stream_id not in app.ended, event
            app.ended.add(stream_id)
        elif isinstance(event, StreamReset):
            if stream_id in app.pending:
                app.pending.remove(stream_id)
            app.over.add(stream_id)
        else:
            assert isinstance(event, StreamWritable), event
            assert stream_id in app.open, event

    def decide_at_once(self, stream_id: int) -> None:
        allowed = isinstance(_ALLOW_LIST.check(self.app.requested[stream_id]), ProxyTcpTarget)
        if self.policy is Policy.DEFERRED or (self.policy is Policy.CONNECTING and allowed):
            return
        self.decide(stream_id, accept=allowed and self.policy is not Policy.REFUSE_ALL)

    def decide(self, stream_id: int, *, accept: bool) -> None:
        """Answer a request as snocat's clients do: only an allowed target is accepted."""
        app = self.app
        app.pending.remove(stream_id)
        target = _ALLOW_LIST.check(app.requested[stream_id])
        record = self.client._streams.get(stream_id)
        # Otherwise the peer aborted it meanwhile: a no-op, and StreamReset is queued.
        deciding = record is not None and record.state is StreamState.DECIDING
        if accept and isinstance(target, ProxyTcpTarget):
            self.client.accept_stream(stream_id)
            if deciding:
                app.accepted.add(stream_id)
                app.open.add(stream_id)
        else:
            self.client.refuse_stream(stream_id)
            if deciding:
                app.refused.add(stream_id)
                app.over.add(stream_id)

    def read(self, stream_id: int, amount: int | None = None) -> None:
        unread = self.app.unread[stream_id]
        amount = unread if amount is None else min(amount, unread)
        if amount:
            self.client.acknowledge_received_data(stream_id, amount)
            self.app.unread[stream_id] -= amount

    # Invariants -------------------------------------------------------------------

    def check_records(self) -> None:
        """Right after ``datagrams_to_send``: a finished stream's record lasts exactly as
        long as the engine's stream, and a live one's engine stream is there."""
        client = self.client
        if client.state is TunnelState.CLOSED:
            return
        for record in client._streams.values():
            assert client._quic.stream_is_open(record.stream_id), (
                f"stream {record.stream_id} ({record.state.name}) outlived the engine's"
            )

    def check(self) -> None:
        client, app = self.client, self.app
        records = list(client._streams.values())
        peer = [s for s in records if not s.we_opened]
        if not app.authenticated and client.state is not TunnelState.AUTHENTICATED:
            assert len(peer) <= LIMITS.pre_auth_max_streams, "too many streams before auth"
            assert sum(len(s.held) for s in peer) <= _PRE_AUTH_WINDOW, "held before auth"
        pending = [s for s in peer if s.state in (StreamState.NEGOTIATING, StreamState.DECIDING)]
        assert len(pending) <= LIMITS.max_pending_requests, "too many pending requests"
        held = {
            s.stream_id: len(s.held) + app.unread.get(s.stream_id, 0)
            for s in records
            if s.state is not StreamState.DONE
        }
        assert max(held.values(), default=0) <= LIMITS.stream_receive_window, held
        assert sum(held.values()) <= LIMITS.tunnel_receive_window, held
        authenticator = client._authenticator
        kept = len(authenticator._received)
        if isinstance(authenticator, TokenConnector):
            kept += authenticator._frames.buffered
        assert kept <= _AUTH_INPUT_BOUND, f"the authenticator holds {kept} bytes"
        buffered = [client._quic.send_buffered(s.stream_id) for s in records]
        assert max(buffered, default=0) <= LIMITS.stream_send_buffer + _NEGOTIATION_BYTES
        assert sum(buffered) <= LIMITS.tunnel_send_buffer + len(buffered) * _NEGOTIATION_BYTES
        if client.state is TunnelState.AUTHENTICATED:
            for s in client._by_state[StreamState.NEGOTIATING]:
                if s.deadline is None:
                    assert s.we_opened and s.stream_id in client._unclocked, s
                else:
                    assert s.deadline > self.now, f"stream {s.stream_id} outlived its deadline"
        for stream_id in app.refused:
            record = client._streams.get(stream_id)
            assert record is None or (record.state is StreamState.DONE and not record.held), (
                f"refused stream {stream_id} is {record.state.name}"
            )
        for stream_id, reply in self.replies.items():
            assert reply[: len(HEADER)] == HEADER[: len(reply)], f"{stream_id}: {reply[:16]!r}"
            if len(reply) <= len(HEADER):
                continue
            if reply[len(HEADER)] == 0:
                assert stream_id in app.accepted, f"stream {stream_id} accepted by the core"
                assert _allowed(app.requested[stream_id]), (
                    f"accepted a target outside the allow-list: {app.requested[stream_id]}"
                )
            else:
                assert stream_id in app.refused, f"stream {stream_id} refused by the core"

    def run_out(self) -> None:
        """The aggregator goes quiet: the client must end the tunnel on its own."""
        engine = self.client._quic
        within = (
            CONNECT_KEEPALIVE_INTERVAL
            + engine.idle_timeout
            + 3 * engine._loss.get_probe_timeout()
            + 1.0
        )

        def pump(now: float) -> None:
            self.now = now
            self.endpoint.datagrams_to_send(now)  # lost: nobody answers any more
            self.drain_client()
            self.check()

        run_out(self.endpoint, pump, self.now, within)
        assert self.app.closed, "the tunnel ended without ConnectionTerminated"


def _connect(options: int) -> _Session:
    token, authenticate = bool(options & 0x01), bool(options & 0x02)
    server = ServerEndpoint(
        SERVER_CONFIGURATION,
        authenticator_factory=(
            aggregator_authenticator(token) if authenticate else lambda _: SilentAuthenticator()
        ),
        limits=LIMITS,
        retry=False,
        random_bytes=random.Random(options).randbytes,
    )
    credentials = ClientCredentials.token(NAME, SECRET) if token else ClientCredentials.simple_ack()
    auth_input = bytearray()
    client = TunnelConnection.connect(
        client_configuration(),
        address=SERVER_ADDR,
        authenticator=_recording(connect_authenticator(credentials, limits=LIMITS), auth_input),
        limits=LIMITS,
        now=1000.0,
    )
    session = _Session(
        client=client,
        endpoint=ClientEndpoint(client),
        server=server,
        token=token,
        policy=Policy((options >> 2) & 0x03),
        auto_read=bool(options & 0x10),
        aggregator_reads=bool(options & 0x20),
        auth_input=auth_input,
    )

    def ready() -> bool:
        tunnels = list(server.tunnels)
        if not tunnels or not client._quic._handshake_complete:
            return False
        if authenticate:
            return (
                client.state is TunnelState.AUTHENTICATED
                and tunnels[0].state is TunnelState.AUTHENTICATED
            )
        return client.state is TunnelState.AUTHENTICATING

    complete_handshake(session, ready)
    session.go_raw()
    return session


# --- the script -------------------------------------------------------------------


def _op_open(session: _Session, argument: int, payload: bytes) -> None:
    """The aggregator opens a stream; with bit 1, a NYAN open of one of :data:`ROUTES`
    (bits 2-4; 7: the payload is the address) followed by the payload."""
    if argument & 0x02:
        choice = (argument >> 2) & 0x07
        if choice < len(ROUTES):
            payload = HEADER + encode_frame(ROUTES[choice].encode()) + payload
        else:
            payload = HEADER + encode_frame(payload)
    op_open(session, argument, payload)


def _op_frames(session: _Session, argument: int, payload: bytes) -> None:
    if session.engine._close_event is not None:
        return
    datagram = seal_one_rtt(session.engine, payload)
    session.endpoint.receive_datagram(datagram, FRAME_SOURCES[argument & 0x03], session.now)
    session.drain_client()


def _op_app_opens(session: _Session, argument: int, payload: bytes) -> None:
    if session.client.state is TunnelState.AUTHENTICATED:
        address = CLIENT_ROUTES[argument % len(CLIENT_ROUTES)]
        session.app.opened.add(session.client.open_stream(address))


def _op_app_decides(session: _Session, argument: int, payload: bytes) -> None:
    pending = session.app.pending
    if pending:
        session.decide(pending[(argument & 0x7F) % len(pending)], accept=not argument & 0x80)


def _op_app_reads(session: _Session, argument: int, payload: bytes) -> None:
    unread = sorted(stream_id for stream_id, n in session.app.unread.items() if n)
    if unread:
        stream_id = unread[(argument & 0x7F) % len(unread)]
        half = -(-session.app.unread[stream_id] // 2)
        session.read(stream_id, half if argument & 0x80 else None)


def _op_app_closes(session: _Session, argument: int, payload: bytes) -> None:
    app, client = session.app, session.client
    known = sorted(app.opened | set(app.requested))
    if not known:
        return
    stream_id = known[(argument & 0x7F) % len(known)]
    record = client._streams.get(stream_id)
    live = record is not None and record.state is not StreamState.DONE
    if argument & 0x80:
        client.reset_stream(stream_id, payload[0] if payload else StreamCode.CANCELLED)
    else:
        client.close_stream(stream_id)
    if live:
        app.over.add(stream_id)  # "no event follows"
        if stream_id in app.pending:
            app.pending.remove(stream_id)


def _repeated(argument: int, payload: bytes) -> bytes:
    """``payload`` 4**k times (bits 4-6): windows and buffers fill within short inputs."""
    return payload * (1 << 2 * ((argument >> 4) & 0x07))


def _op_send(session: _Session, argument: int, payload: bytes) -> None:
    """The aggregator writes (:func:`op_send`; bits 4-6 repeat the payload)."""
    op_send(session, argument & 0x8F, _repeated(argument, payload))


def _op_app_sends(session: _Session, argument: int, payload: bytes) -> None:
    """The application writes what the send buffer takes of the payload (bits 4-6
    repeat it) on a stream (bits 0-3), ending it with bit 7."""
    app, client = session.app, session.client
    writable = sorted(app.open - app.over - app.local_ended)
    if not writable:
        return
    stream_id = writable[(argument & 0x0F) % len(writable)]
    capacity = client.send_capacity(stream_id)
    end = bool(argument & 0x80)
    client.send_data(stream_id, _repeated(argument, payload)[:capacity], end_stream=end)
    if end:
        app.local_ended.add(stream_id)


_OPS: tuple[Callable[[_Session, int, bytes], None], ...] = (
    _op_open,
    _op_send,
    op_reset,
    op_stop,
    _op_frames,
    op_wait,
    _op_app_opens,
    _op_app_decides,
    _op_app_reads,
    _op_app_closes,
    _op_app_sends,
)


def fuzz_client_handshaken(data: bytes) -> None:
    """A script for a hostile aggregator and the client's application, after a real
    handshake (first byte: options, bit 0 token, bit 1 authenticate, bits 2-3
    :class:`Policy`, bit 4 the application reads everything, bit 5 the aggregator
    returns credit; then ops, each ``op(1) argument(1) length(2) payload``).  See the
    module docstring."""
    if not data:
        return
    session = _connect(data[0])
    for op, argument, payload in script(data):
        _OPS[op % len(_OPS)](session, argument, payload)
        session.exchange()
        session.check()
    session.run_out()


HARNESSES: dict[str, Callable[[bytes], None]] = {
    "client_handshaken": fuzz_client_handshaken,
}
