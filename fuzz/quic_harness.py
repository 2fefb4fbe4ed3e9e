"""Harnesses that feed datagrams to a :class:`~snocat_proto.endpoint.ServerEndpoint`.

``endpoint_datagrams``
    Raw datagrams from a few source addresses, with Retry on or off.  A record may ask
    the harness to seal its bytes as a correctly protected client Initial (keys come
    from the destination connection ID, so anybody can), optionally carrying a Retry
    token the harness mints with the endpoint's own key: the fuzzer then reaches the
    TLS ClientHello parser and tunnel creation, not only the header checks.

``endpoint_handshaken``
    A real client completes the QUIC handshake with the endpoint in memory (and, if the
    input says so, authenticates); then the input is a script of what a hostile client
    does: open streams and write any bytes on them (the auth channel included), reset,
    stop, send *any 1-RTT frames* sealed with the client's real keys, from its own
    address or a new one (migration), let time pass.

Invariants (beyond "no exception escapes the endpoint"):

* an address that has not completed a handshake never receives more than three times
  the bytes it sent (RFC 9000 section 8; Retry and Version Negotiation included);
* a client that never authenticates under the token scheme never gets a stream
  request or data to the application, never has more than 4 streams or 64 KiB held,
  and is gone once its authentication deadline and the closing period have passed;
* an authenticated peer never has more than ``max_pending_requests`` requests pending;
* once the client goes quiet, every tunnel ends: the endpoint forgets it and arms no
  timer (nothing hangs, nothing grows).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import random
import ssl
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic.crypto import CryptoPair

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    Authenticator,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
)
from snocat_proto._wire.certificates import generate_self_signed, install_identity
from snocat_proto._wire.endpoint import ClientEndpoint, ServerEndpoint
from snocat_proto._wire.engine import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    NetworkAddress,
    QuicConfiguration,
    QuicEngine,
    quic_configuration,
)
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    CredentialRequired,
    DataReceived,
    StreamRequested,
    TunnelEvent,
)
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.tunnel import StreamState, TunnelConnection, TunnelState

__all__ = [
    "HARNESSES",
    "SERVER_CONFIGURATION",
    "TIME_STEPS",
    "RawPeer",
    "SilentAuthenticator",
    "aggregator_authenticator",
    "answer_as_aggregator",
    "client_configuration",
    "op_open",
    "op_reset",
    "op_send",
    "op_stop",
    "op_wait",
    "run_out",
    "script",
    "seal_initial",
    "seal_one_rtt",
    "server_configuration",
]

SERVER_ADDR: NetworkAddress = ("10.0.0.1", 4433)
ADDRESSES: tuple[NetworkAddress, ...] = (
    ("10.0.0.2", 50000),
    ("10.0.0.3", 40000),
    ("192.0.2.7", 1234),
    ("2001:db8::5", 443),
)
SECRET = b"correct-horse-battery-staple"
NAME = "alice"
#: Fixed, so that an input replays exactly; the fuzzer still cannot compute the MAC.
NONCE = bytes(range(32))
#: Small windows and limits, so that short inputs reach every limit.
LIMITS = Limits(
    max_address_size=64,
    max_frame_size=256,
    max_auth_message_size=256,
    max_streams_per_tunnel=8,
    max_pending_requests=3,
    stream_send_buffer=8 * 1024,
    tunnel_send_buffer=16 * 1024,
    stream_receive_window=8 * 1024,
    tunnel_receive_window=16 * 1024,
    auth_timeout=5.0,
    negotiation_timeout=2.0,
)
TIME_STEPS = (0.0, 0.001, 0.02, 0.1, 0.5, 1.0, 3.0, 10.0)

# aioquic logs every connection error it sees; here they are the point.
logging.getLogger("quic").setLevel(logging.CRITICAL)


def server_configuration(limits: Limits = LIMITS) -> QuicConfiguration:
    configuration = quic_configuration(is_client=False, limits=limits)
    install_identity(configuration, *_IDENTITY)
    return configuration


def client_configuration() -> QuicConfiguration:
    """A client's configuration that trusts the harness's self-signed server."""
    configuration = quic_configuration(is_client=True, limits=LIMITS, server_name="localhost")
    configuration.verify_mode = ssl.CERT_NONE
    return configuration


_IDENTITY = generate_self_signed(
    ["localhost"], now=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
)
SERVER_CONFIGURATION = server_configuration()


def aggregator_authenticator(token: bool) -> Callable[[str], Authenticator]:
    """The server endpoint's authenticator factory: token (for :data:`NAME`) or SimpleAck."""
    if token:
        return lambda peer_name: TokenListener(NONCE, limits=LIMITS)
    return SimpleAckListener


class _Traffic:
    """Bytes in and out per peer address, for the anti-amplification bound.

    Known issue (reported): aioquic writes a CONNECTION_CLOSE without checking the
    anti-amplification budget, so a tunnel that closes before its client's address is
    validated (e.g. the authentication deadline of a stalled handshake, Retry off) may
    overshoot 3x by that one close datagram.  Those bytes are counted apart, as
    ``close_bytes``, and the bound is checked without them.
    """

    def __init__(self) -> None:
        self.received: dict[NetworkAddress, int] = defaultdict(int)
        self.sent: dict[NetworkAddress, int] = defaultdict(int)
        self.close_bytes: dict[NetworkAddress, int] = defaultdict(int)

    def record(self, endpoint: ServerEndpoint, now: float) -> list[tuple[bytes, NetworkAddress]]:
        closing = {
            tunnel.peer_address
            for tunnel in endpoint.tunnels
            if tunnel._quic._close_pending and tunnel.peer_address is not None
        }
        datagrams = endpoint.datagrams_to_send(now)
        for datagram, address in datagrams:
            if address in closing:
                closing.discard(address)  # one close datagram per closing tunnel
                self.close_bytes[address] += len(datagram)
            else:
                self.sent[address] += len(datagram)
        return datagrams

    def check(self, validated: set[NetworkAddress]) -> None:
        for address, sent in self.sent.items():
            if address in validated:
                continue
            assert sent <= 3 * self.received[address], (
                f"{address} sent {self.received[address]} bytes and was sent {sent}"
            )


def answer_as_aggregator(
    endpoint: ServerEndpoint, route: Callable[[], bool | None]
) -> list[TunnelEvent]:
    """A plain application: credentials for ``alice``, routes as told, reads everything."""
    seen: list[TunnelEvent] = []
    while (item := endpoint.next_event()) is not None:
        tunnel, event = item
        seen.append(event)
        if isinstance(event, CredentialRequired):
            tunnel.supply_credential(SECRET if event.name == NAME else None)
        elif isinstance(event, StreamRequested):
            decision = route()
            if decision is True:
                tunnel.accept_stream(event.stream_id)
            elif decision is False:
                tunnel.refuse_stream(event.stream_id)
        elif isinstance(event, DataReceived):
            tunnel.acknowledge_received_data(event.stream_id, len(event.data))
        endpoint.mark_dirty(tunnel)
    return seen


# --- sealing packets ------------------------------------------------------------------


def _varint(value: int) -> bytes:
    buf = Buffer(capacity=8)
    buf.push_uint_var(value)
    return buf.data


def seal_initial(dcid: bytes, scid: bytes, token: bytes, plaintext: bytes, pn: int = 0) -> bytes:
    """A client Initial packet holding ``plaintext`` frames, padded to 1200 bytes."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=dcid, is_client=True, version=1)
    head = bytes([0xC1]) + (1).to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    head += _varint(len(token)) + token
    # 2-byte packet number, 2-byte length, 16-byte AEAD tag.
    room = SMALLEST_MAX_DATAGRAM_SIZE - len(head) - 2 - 2 - 16
    payload = plaintext + bytes(max(0, room - len(plaintext), 4 - len(plaintext)))
    length = 2 + len(payload) + 16
    header = head + (0x4000 | length).to_bytes(2, "big") + (pn & 0xFFFF).to_bytes(2, "big")
    return crypto.encrypt_packet(header, payload, pn)


def seal_one_rtt(engine: QuicEngine, frames: bytes) -> bytes:
    """A 1-RTT packet holding ``frames``, sealed with ``engine``'s own keys (either side's)."""
    crypto = engine._cryptos[tls.Epoch.ONE_RTT]
    pn = engine._packet_number
    engine._packet_number += 1  # the engine's own packets follow ours
    first = 0x40 | (crypto.key_phase << 2) | 0x03  # 4-byte packet number
    header = bytes([first]) + engine._peer_cid.cid + (pn & 0xFFFFFFFF).to_bytes(4, "big")
    # Header protection samples 16 bytes from 4 bytes past the packet number start.
    payload = frames + bytes(max(0, 4 - len(frames)))
    return crypto.encrypt_packet(header, payload, pn)


# --- raw datagrams ----------------------------------------------------------------------


@dataclass
class _Record:
    address: NetworkAddress
    advance: float
    seal: bool
    valid_token: bool
    payload: bytes


def _records(data: bytes) -> list[_Record]:
    records = []
    offset = 0
    while offset + 3 <= len(data):
        control = data[offset]
        size = int.from_bytes(data[offset + 1 : offset + 3], "big")
        payload = data[offset + 3 : offset + 3 + size]
        offset += 3 + size
        records.append(
            _Record(
                address=ADDRESSES[control & 0x03],
                advance=TIME_STEPS[(control >> 2) & 0x07],
                seal=bool(control & 0x20),
                valid_token=bool(control & 0x40),
                payload=payload,
            )
        )
    return records


def fuzz_endpoint_datagrams(data: bytes) -> None:
    """Datagrams into a fresh endpoint (first byte: options; then records, each
    ``control(1) length(2) payload``; a sealed record's payload is
    ``dcid(8) scid(8) frames``).  See the module docstring."""
    if not data:
        return
    options = data[0]
    retry = not options & 0x01
    endpoint = ServerEndpoint(
        SERVER_CONFIGURATION,
        authenticator_factory=aggregator_authenticator(bool(options & 0x02)),
        limits=LIMITS,
        retry=retry,
        max_tunnels=(None, 1, 2, 4)[(options >> 2) & 0x03],
        random_bytes=random.Random(data).randbytes,
    )
    traffic = _Traffic()
    now = 1000.0
    for number, record in enumerate(_records(data[1:])):
        now += record.advance
        datagram = record.payload
        if record.seal:
            dcid, scid = (datagram[:8] + bytes(8))[:8], (datagram[8:16] + bytes(8))[:8]
            token = b""
            if record.valid_token and endpoint._retry is not None:
                token = endpoint._retry._handler.create_token(
                    address=record.address,
                    original_destination_connection_id=bytes(8),
                    retry_source_connection_id=dcid,
                    now=now,
                )
            datagram = seal_initial(dcid, scid, token, datagram[16:], number)
        traffic.received[record.address] += len(datagram)
        endpoint.receive_datagram(datagram, record.address, now)
        _pump_endpoint(endpoint, traffic, now)
        traffic.check(set())
    run_out(endpoint, lambda at: _pump_endpoint(endpoint, traffic, at), now)
    traffic.check(set())


def _pump_endpoint(endpoint: ServerEndpoint, traffic: _Traffic, now: float) -> None:
    answer_as_aggregator(endpoint, lambda: True)
    traffic.record(endpoint, now)


def run_out(
    endpoint: ServerEndpoint | ClientEndpoint,
    pump: Callable[[float], None],
    now: float,
    within: float = 200.0,
) -> None:
    """Let time pass with no more input (``pump(now)`` drains the endpoint after each
    timer): within ``within`` seconds every tunnel must end, and no timer stay armed."""
    start, deadline = now, now + within
    steps = 0
    while (timer := endpoint.get_timer()) is not None:
        steps += 1
        assert timer <= deadline and steps < 10_000, (
            f"a timer is still armed {timer - start:.3f} s after the input ended"
        )
        now = max(now, timer)
        endpoint.handle_timer(now)
        pump(now)
    assert not list(endpoint.tunnels), "a tunnel outlived every deadline"
    assert endpoint.next_event() is None


# --- after a real handshake -------------------------------------------------------------


class SilentAuthenticator(Authenticator):
    """A side that completes QUIC but never says a word on the auth channel (a client
    that never answers the hello, an aggregator that never sends one)."""

    scheme = "silent"

    def _process(self) -> None:
        pass

    def _on_eof(self) -> None:
        pass


@dataclass
class _Pair:
    """The endpoint and one client whose engine the script drives directly."""

    endpoint: ServerEndpoint
    client: TunnelConnection
    token: bool
    authenticate: bool
    route: Callable[[], bool | None]
    now: float = 1000.0
    traffic: _Traffic = field(default_factory=_Traffic)
    events: list[TunnelEvent] = field(default_factory=list)
    raw_streams: list[int] = field(default_factory=list)
    raw: bool = False

    @property
    def engine(self) -> QuicEngine:
        return self.client._quic

    def server_tunnel(self) -> TunnelConnection | None:
        tunnels = list(self.endpoint.tunnels)
        return tunnels[0] if tunnels else None

    def exchange(self, rounds: int = 8) -> None:
        """Deliver datagrams both ways (no loss) until quiet or ``rounds`` are done."""
        for _ in range(rounds):
            moved = False
            outgoing = (
                self.engine.datagrams_to_send(self.now)
                if self.raw
                else self.client.datagrams_to_send(self.now)
            )
            for datagram, _address in outgoing:
                self.deliver(datagram, ADDRESSES[0])
                moved = True
            self.drain_client()
            for datagram, address in self.traffic.record(self.endpoint, self.now):
                moved = True
                if address == ADDRESSES[0]:
                    if self.raw:
                        self.engine.receive_datagram(datagram, SERVER_ADDR, self.now)
                    else:
                        self.client.receive_datagram(datagram, SERVER_ADDR, self.now)
            self.drain_client()
            if not moved:
                return

    def deliver(self, datagram: bytes, address: NetworkAddress) -> None:
        self.traffic.received[address] += len(datagram)
        self.endpoint.receive_datagram(datagram, address, self.now)
        self.events.extend(answer_as_aggregator(self.endpoint, self.route))
        self.check()

    def drain_client(self) -> None:
        if self.raw:
            while self.engine.next_event() is not None:
                pass
        else:
            while self.client.next_event() is not None:
                pass
        self.events.extend(answer_as_aggregator(self.endpoint, self.route))

    def advance(self, seconds: float) -> None:
        deadline = self.now + seconds
        for _ in range(1000):
            timers = [
                self.endpoint.get_timer(),
                (self.engine if self.raw else self.client).get_timer(),
            ]
            due = min((t for t in timers if t is not None), default=None)
            if due is None or due > deadline:
                break
            self.now = max(self.now, due)
            self.endpoint.handle_timer(self.now)
            client = self.engine if self.raw else self.client
            timer = client.get_timer()
            if timer is not None and timer <= self.now:
                client.handle_timer(self.now)
            self.exchange()
        self.now = max(self.now, deadline)
        self.check()

    def check(self) -> None:
        self.traffic.check({ADDRESSES[0]})
        tunnel = self.server_tunnel()
        if tunnel is None:
            return
        streams = tunnel._streams.values()
        if tunnel.state is not TunnelState.AUTHENTICATED:
            peer = [s for s in streams if not s.we_opened]
            assert len(peer) <= LIMITS.pre_auth_max_streams
            window = min(LIMITS.pre_auth_receive_window, LIMITS.tunnel_receive_window)
            assert sum(len(s.held) for s in peer) <= window
        pending = [
            s
            for s in streams
            if not s.we_opened and s.state in (StreamState.NEGOTIATING, StreamState.DECIDING)
        ]
        assert len(pending) <= LIMITS.max_pending_requests
        if self.token and not self.authenticate:
            assert tunnel.state is not TunnelState.AUTHENTICATED
            assert not any(
                isinstance(e, StreamRequested | DataReceived | AuthenticationCompleted)
                for e in self.events
            ), "an unauthenticated peer reached the application"


def _connect(options: int) -> _Pair:
    token, authenticate = bool(options & 0x01), bool(options & 0x02)
    decisions = (True, False, None, True)[(options >> 2) & 0x03]
    endpoint = ServerEndpoint(
        SERVER_CONFIGURATION,
        authenticator_factory=aggregator_authenticator(token),
        limits=LIMITS,
        retry=False,  # the raw harness covers Retry; here it would only cost a round trip
        random_bytes=random.Random(options).randbytes,
    )
    configuration = client_configuration()
    connector: Authenticator
    if not authenticate:
        connector = SilentAuthenticator()
    elif token:
        connector = TokenConnector(NAME, SECRET, limits=LIMITS)
    else:
        connector = SimpleAckConnector()
    client = TunnelConnection.connect(
        configuration, address=SERVER_ADDR, authenticator=connector, limits=LIMITS, now=1000.0
    )
    pair = _Pair(endpoint, client, token, authenticate, lambda: decisions)

    def ready() -> bool:
        tunnel = pair.server_tunnel()
        if tunnel is None or not client._quic._handshake_complete:
            return False
        if authenticate:
            return (
                client.state is TunnelState.AUTHENTICATED
                and tunnel.state is TunnelState.AUTHENTICATED
            )
        return tunnel.state is TunnelState.AUTHENTICATING

    complete_handshake(pair, ready)
    pair.raw = True  # from here on the script drives the client's engine
    return pair


# --- script ops, shared with fuzz.client_harness ----------------------------------------


class RawPeer(Protocol):
    """A harness whose hostile side's engine the script drives directly."""

    #: Streams the script may pick: those it opened, and (client harness) the peer's.
    raw_streams: list[int]

    @property
    def engine(self) -> QuicEngine: ...

    def exchange(self) -> None: ...

    def advance(self, seconds: float) -> None: ...


def complete_handshake(peer: RawPeer, ready: Callable[[], bool]) -> None:
    """Exchange datagrams, 10 ms apart, until ``ready()`` (or fail: it should take a few)."""
    for _ in range(40):
        peer.exchange()
        if ready():
            break
        peer.advance(0.01)
    assert ready(), "the in-memory handshake did not complete"


def script(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The ops of an input after its options byte: ``op(1) argument(1) length(2) payload``."""
    offset = 1
    while offset + 4 <= len(data):
        op, argument = data[offset], data[offset + 1]
        size = int.from_bytes(data[offset + 2 : offset + 4], "big")
        yield op, argument, data[offset + 4 : offset + 4 + size]
        offset += 4 + size


def op_open(peer: RawPeer, argument: int, payload: bytes) -> None:
    stream_id = peer.engine.get_next_available_stream_id()
    peer.raw_streams.append(stream_id)
    peer.engine.send_stream_data(stream_id, payload, end_stream=bool(argument & 0x01))


def pick_stream(peer: RawPeer, argument: int) -> int:
    if argument & 0x80 or not peer.raw_streams:
        return 1  # the authentication channel (the server's first stream)
    return peer.raw_streams[(argument >> 1) % len(peer.raw_streams)]


def op_send(peer: RawPeer, argument: int, payload: bytes) -> None:
    stream_id = pick_stream(peer, argument)
    if peer.engine.can_send(stream_id):
        peer.engine.send_stream_data(stream_id, payload, end_stream=bool(argument & 0x01))


def op_reset(peer: RawPeer, argument: int, payload: bytes) -> None:
    stream_id = pick_stream(peer, argument)
    if peer.engine.can_send(stream_id) and peer.engine.stream_is_open(stream_id):
        peer.engine.reset_stream(stream_id, payload[0] if payload else 0)


def op_stop(peer: RawPeer, argument: int, payload: bytes) -> None:
    stream_id = pick_stream(peer, argument)
    if peer.engine.stream_is_open(stream_id):
        with contextlib.suppress(ValueError):  # aioquic: the receive side already ended
            peer.engine.stop_stream(stream_id, payload[0] if payload else 0)


def _op_frames(pair: _Pair, argument: int, payload: bytes) -> None:
    if pair.engine._close_event is not None:
        return
    pair.deliver(seal_one_rtt(pair.engine, payload), ADDRESSES[argument & 0x03])


def op_wait(peer: RawPeer, argument: int, payload: bytes) -> None:
    peer.advance(TIME_STEPS[argument & 0x07])


def _op_server_opens(pair: _Pair, argument: int, payload: bytes) -> None:
    tunnel = pair.server_tunnel()
    if tunnel is not None and tunnel.state is TunnelState.AUTHENTICATED:
        # At most 12 characters (36 bytes of UTF-8): the address stays within the limit.
        text = payload.decode("utf-8", errors="replace")[:12]
        tunnel.open_stream(RouteAddress.of("proxy-tcp", "dns", text or "x", "tcp", "80"))
        pair.endpoint.mark_dirty(tunnel)


def _op_server_closes_stream(pair: _Pair, argument: int, payload: bytes) -> None:
    tunnel = pair.server_tunnel()
    if tunnel is None:
        return
    ids = sorted(tunnel._streams)
    if ids:
        stream_id = ids[argument % len(ids)]
        if argument & 0x80:
            tunnel.reset_stream(stream_id, 7)
        else:
            tunnel.close_stream(stream_id)
        pair.endpoint.mark_dirty(tunnel)


_OPS = (
    op_open,
    op_send,
    op_reset,
    op_stop,
    _op_frames,
    op_wait,
    _op_server_opens,
    _op_server_closes_stream,
)


def fuzz_endpoint_handshaken(data: bytes) -> None:
    """A script for a hostile client after a real handshake (first byte: options; then
    ops, each ``op(1) argument(1) length(2) payload``).  See the module docstring."""
    if not data:
        return
    _play(_connect(data[0]), data)


def _play(pair: _Pair, data: bytes) -> None:
    for op, argument, payload in script(data):
        _OPS[op % len(_OPS)](pair, argument, payload)
        pair.exchange()
        pair.check()
    # The client goes quiet: the server must wind everything down on its own.
    endpoint, traffic = pair.endpoint, pair.traffic
    run_out(endpoint, lambda at: _pump_endpoint(endpoint, traffic, at), pair.now)


HARNESSES: dict[str, Callable[[bytes], None]] = {
    "endpoint_datagrams": fuzz_endpoint_datagrams,
    "endpoint_handshaken": fuzz_endpoint_handshaken,
}
