"""Limits and deadlines against hostile peers, in memory (netsim), on a fake clock.

Each test has a peer break one limit (or stall past one deadline) and checks three
things: the peer is refused with a reason, what it could hold stayed bounded, and an
honest peer on the same endpoint was not disturbed.  The limits whose tests live
elsewhere (address size, pending requests, negotiation timeout, idle timeout, the
tunnel limit, frame sizes of the codecs) are listed in docs/security.md.

Misbehaving clients are made by driving the client's QUIC engine below its tunnel
(netsim's ``RawStreams``) and, where the engine itself would obey a limit, by lying
to it about the peer's limits.
"""

from __future__ import annotations

import inspect
import random

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from netsim import (
    CLIENT_ADDR,
    SERVER_ADDR,
    App,
    Client,
    RawStreams,
    Simulation,
    client_configuration,
    digest,
    payload,
    send_all,
)

from fuzz.quic_harness import seal_initial
from snocat_proto._service.config import ServerConfig
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    Authenticator,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
)
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.endpoint import ServerEndpoint
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    DataReceived,
    HandshakeCompleted,
    StreamAccepted,
    StreamRequested,
)
from snocat_proto._wire.framing import encode_frame
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.negotiation import HEADER
from snocat_proto._wire.tunnel import TunnelConnection

HONEST_ADDR = ("10.0.0.9", 9999)
SECRET = b"alpha-secret-0123456789"
ADDRESS = RouteAddress.of("svc")


class SilentConnector(Authenticator):
    """Completes the QUIC handshake, then never answers the hello."""

    scheme = "silent"

    def _process(self) -> None:
        pass

    def _on_eof(self) -> None:
        pass


class OversizedTokenConnector(Authenticator):
    """Answers the token hello with a frame far over ``max_auth_message_size``."""

    scheme = "token"

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def _process(self) -> None:
        if len(self._received) >= 64 and not self._outgoing and not self.is_finished:
            self._outgoing += encode_frame(b"{" + b" " * self._size + b"}")
            self._received.clear()

    def _on_eof(self) -> None:
        self._fail("refused")


def token_sim(client_auth: Authenticator, **kwargs: object) -> Simulation:
    limits = kwargs.pop("limits", None) or Limits()
    assert isinstance(limits, Limits)
    sim = Simulation(
        server_auth=lambda peer: TokenListener(random.randbytes(32), limits=limits),
        client_auth=client_auth,
        limits=limits,
        **kwargs,  # type: ignore[arg-type]
    )
    sim.server_app.credentials = {"alpha": SECRET}
    return sim


def add_honest(sim: Simulation) -> Client:
    return sim.add_client(HONEST_ADDR, TokenConnector("alpha", SECRET, limits=sim.limits))


def server_tunnel_of(sim: Simulation, address: tuple[str, int]) -> TunnelConnection | None:
    for tunnel in sim.server.tunnels:
        if tunnel.peer_address == address:
            return tunnel
    return None


def server_app_of(sim: Simulation, address: tuple[str, int]) -> App:
    tunnel = server_tunnel_of(sim, address)
    assert tunnel is not None, f"no server tunnel for {address}"
    return sim.server_app_of(tunnel)


def authenticated(app: App) -> bool:
    return bool(app.of_type(AuthenticationCompleted))


def honest_transfer(sim: Simulation, honest: Client, size: int = 200_000) -> None:
    """The honest client sends ``size`` bytes on a new stream; they arrive intact."""
    sim.run_until(lambda: authenticated(honest.app), timeout=10)
    stream_id = honest.tunnel.open_stream(ADDRESS)
    sim.run_until(lambda: honest.app.of_type(StreamAccepted), timeout=10)
    data = payload(size, seed=size)
    send_all(sim, honest.tunnel, stream_id, data)
    app = server_app_of(sim, HONEST_ADDR)
    sim.run_until(lambda: stream_id in app.ended, timeout=30)
    assert digest(app.received[stream_id]) == digest(data)
    assert honest.app.closed is None and app.closed is None


def transport_close(app: App) -> ConnectionTerminated:
    closed = app.closed
    assert closed is not None and not closed.application
    return closed


# 1. Authentication deadline ---------------------------------------------------------


def test_the_auth_deadline_covers_a_handshake_that_stalls() -> None:
    """A client that proves its address (Retry) and then stops mid-handshake holds a
    tunnel for at most ``auth_timeout`` plus the closing period, then nothing."""
    limits = Limits(auth_timeout=3.0)
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector(), limits=limits)
    sim.run_until(lambda: len(sim.server) == 1, timeout=5)
    created = sim.now
    sim.clients.clear()  # the client vanishes: nothing more from it, nothing reaches it
    sim.run_until(lambda: sim.server_app.closed is not None, timeout=10)
    closed = sim.server_app.closed
    assert closed is not None and closed.code == CloseCode.AUTHENTICATION_TIMEOUT
    assert "handshake" in closed.reason
    assert limits.auth_timeout <= sim.now - created <= limits.auth_timeout + 0.1
    sim.run_until(lambda: len(sim.server) == 0, timeout=10)
    assert sim.server.get_timer() is None


def test_the_auth_deadline_runs_while_the_application_looks_up_the_secret() -> None:
    limits = Limits(auth_timeout=4.0)
    patient = Limits(auth_timeout=60.0)  # the client would wait much longer
    sim = token_sim(
        TokenConnector("alpha", SECRET, limits=patient), limits=limits, client_limits=patient
    )
    sim.server_app.hold_credentials = True  # the lookup never returns
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=10)
    client_closed, server_closed = sim.client_app.closed, sim.server_app.closed
    assert server_closed is not None and client_closed is not None
    assert client_closed.by_peer and not server_closed.by_peer
    assert server_closed.code == client_closed.code == CloseCode.AUTHENTICATION_TIMEOUT
    assert "authentication did not complete within 4 s" in client_closed.reason
    assert not authenticated(sim.server_app)
    sim.run_until(lambda: len(sim.server) == 0, timeout=10)


# 2. What an unauthenticated peer may hold ------------------------------------------


def test_an_unauthenticated_peer_holds_at_most_the_pre_auth_window() -> None:
    """Four streams of 200 KB each, before authentication: the server holds at most
    64 KiB of them, the application sees none, and all of it is gone at the deadline."""
    limits = Limits(auth_timeout=5.0)
    sim = token_sim(SilentConnector(), limits=limits)
    sim.run_until(lambda: sim.server_app.of_type(HandshakeCompleted), timeout=5)
    raw = RawStreams(sim.client)
    streams = [raw.open(HEADER + encode_frame(b"/svc") + payload(200_000, n)) for n in range(4)]
    sim.run_for(2.0)
    server = sim.server_tunnel
    held = sum(len(s.held) for s in server._streams.values())
    assert 0 < held <= Limits().pre_auth_receive_window
    assert len(server._streams) == len(streams) == Limits().pre_auth_max_streams
    # The rest waits in the client's send buffers: flow control holds it back.
    assert sum(sim.client._quic.send_buffered(sid) for sid in streams) >= 4 * 200_000 - held
    assert not sim.server_app.of_type(StreamRequested)
    assert not sim.server_app.of_type(DataReceived)
    sim.run_until(lambda: len(sim.server) == 0, timeout=15)
    assert sim.server_app.closed is not None
    assert sim.server_app.closed.code == CloseCode.AUTHENTICATION_TIMEOUT


@pytest.mark.parametrize("violation", ["streams", "data"])
def test_an_unauthenticated_peer_over_a_limit_is_cut_off_and_others_are_unaffected(
    violation: str,
) -> None:
    """A client that ignores the pre-authentication limits (it lies to its own engine
    about them) is closed with the QUIC transport error; an honest client on the same
    endpoint authenticates and transfers as if nothing happened."""
    sim = token_sim(SilentConnector())
    honest = add_honest(sim)
    sim.run_until(lambda: authenticated(honest.app), timeout=5)
    hostile = server_app_of(sim, CLIENT_ADDR)
    engine = sim.client._quic
    raw = RawStreams(sim.client)
    if violation == "streams":
        engine._remote_max_streams_bidi = 1000
        for _ in range(Limits().pre_auth_max_streams + 1):
            raw.open(HEADER)
        expected = QuicErrorCode.STREAM_LIMIT_ERROR
    else:
        engine._remote_max_data = 10_000_000
        raw.open(payload(Limits().pre_auth_receive_window + 10_000))
        expected = QuicErrorCode.FLOW_CONTROL_ERROR
    sim.run_until(lambda: hostile.closed is not None and sim.client_app.closed, timeout=5)
    closed = transport_close(hostile)
    assert closed.code == expected and closed.reason
    client_closed = transport_close(sim.client_app)
    assert client_closed.code == expected and client_closed.by_peer
    assert not hostile.of_type(StreamRequested)
    honest_transfer(sim, honest)


def test_an_authenticated_peer_over_max_streams_is_cut_off_and_others_are_unaffected() -> None:
    limits = Limits(max_streams_per_tunnel=8)
    sim = token_sim(TokenConnector("alpha", SECRET, limits=limits), limits=limits)
    honest = add_honest(sim)
    sim.server_app.route = lambda address: None  # undecided: every stream stays open
    sim.run_until(lambda: authenticated(sim.client_app) and authenticated(honest.app), timeout=5)
    hostile = server_app_of(sim, CLIENT_ADDR)
    server_app_of(sim, HONEST_ADDR).route = lambda address: True
    raw = RawStreams(sim.client)
    # Obeying the limit: eight streams at once are fine; a ninth waits in the engine.
    opened = [raw.open(HEADER + encode_frame(f"/{n}".encode())) for n in range(9)]
    sim.run_for(1.0)
    requested = [e.stream_id for e in hostile.of_type(StreamRequested)]  # type: ignore[attr-defined]
    assert requested == opened[:8] and hostile.closed is None
    # Ignoring it: the peer says it may open 1000; the tenth stream breaks the limit.
    sim.client._quic._remote_max_streams_bidi = 1000
    raw.open(HEADER + encode_frame(b"/over"))
    sim.run_until(lambda: hostile.closed is not None, timeout=5)
    assert transport_close(hostile).code == QuicErrorCode.STREAM_LIMIT_ERROR
    honest_transfer(sim, honest)


@pytest.mark.parametrize("window", ["stream", "tunnel"])
def test_an_authenticated_peer_over_a_receive_window_is_cut_off_and_others_are_unaffected(
    window: str,
) -> None:
    """The application reads nothing: a peer that sends past the stream's (or the
    tunnel's) receive window anyway is closed with FLOW_CONTROL_ERROR."""
    limits = Limits(stream_receive_window=64 * 1024, tunnel_receive_window=128 * 1024)
    sim = token_sim(TokenConnector("alpha", SECRET, limits=limits), limits=limits)
    honest = add_honest(sim)
    sim.run_until(lambda: authenticated(sim.client_app) and authenticated(honest.app), timeout=5)
    hostile = server_app_of(sim, CLIENT_ADDR)
    hostile.consume = False
    engine = sim.client._quic
    engine._remote_max_data = 10**9
    raw = RawStreams(sim.client)
    streams = [raw.open(HEADER + encode_frame(b"/svc")) for _ in range(3)]
    per_stream = 100_000 if window == "stream" else 60_000  # 3 x 60 KB > 128 KiB
    for stream_id in streams[: 1 if window == "stream" else 3]:
        engine._streams[stream_id].max_stream_data_remote = 10**9
        raw.send(stream_id, payload(per_stream, stream_id))
    sim.run_until(lambda: hostile.closed is not None, timeout=5)
    assert transport_close(hostile).code == QuicErrorCode.FLOW_CONTROL_ERROR
    held = sum(len(data) for data in hostile.received.values())
    assert held <= limits.tunnel_receive_window
    honest_transfer(sim, honest)


def test_an_oversized_token_response_is_refused_with_a_reason() -> None:
    limits = Limits()
    sim = token_sim(OversizedTokenConnector(limits.max_auth_message_size * 4), limits=limits)
    honest = add_honest(sim)
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=5)
    closed = sim.client_app.closed
    assert closed is not None and closed.application
    assert closed.code == CloseCode.AUTHENTICATION_FAILED
    assert "too large" in closed.reason or "1024" in closed.reason
    honest_transfer(sim, honest)


def test_a_peer_that_vanishes_is_forgotten_after_the_idle_timeout() -> None:
    """Keep-alive pings do not keep a dead peer's tunnel: the idle timeout ends it."""
    sim = token_sim(TokenConnector("alpha", SECRET, limits=Limits()))
    sim.run_until(lambda: authenticated(sim.server_app), timeout=5)
    gone = sim.now
    sim.clients.clear()
    sim.run_until(lambda: len(sim.server) == 0, timeout=60)
    closed = transport_close(sim.server_app)
    assert "idle" in closed.reason.lower()
    assert 30.0 <= sim.now - gone <= 45.0


# 3. Amplification: what an address that has not proven itself can make us send -----


def test_retry_is_on_by_default() -> None:
    assert inspect.signature(ServerEndpoint).parameters["retry"].default is True
    assert ServerConfig.__dataclass_fields__["retry"].default is True


def _parse(datagram: bytes) -> object:
    return pull_quic_header(Buffer(data=datagram), host_cid_length=8)


def _spoofed_initials(rng: random.Random) -> list[bytes]:
    """What an attacker can send with a victim's source address and without its token."""
    client = TunnelConnection.connect(
        client_configuration(Limits()),
        address=SERVER_ADDR,
        authenticator=SimpleAckConnector(),
        limits=Limits(),
        now=0.0,
    )
    real = [d for d, _ in client.datagrams_to_send(0.0)]
    dcid, scid = rng.randbytes(8), rng.randbytes(8)
    return [
        *real,  # a real client Initial (ClientHello)
        seal_initial(dcid, scid, rng.randbytes(40), b"\x06\x00\x10" + rng.randbytes(16)),
        real[0][:1] + rng.randbytes(1199),  # garbage behind an Initial's first byte
        bytes([0xC0]) + (0x0A0A0A0A).to_bytes(4, "big") + rng.randbytes(1300),  # unknown version
        rng.randbytes(60),
    ]


def test_with_retry_an_unvalidated_address_gets_less_than_it_sent() -> None:
    """Retry is on by default.  Spoofed Initials, forged tokens, unknown versions and
    junk from 100 addresses: every address is sent at most what it sent (far under
    the 3x of RFC 9000), no tunnel is created, and nothing more follows in time."""
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    server = sim.server
    rng = random.Random(5)
    received: dict[tuple[str, int], int] = {}
    sent: dict[tuple[str, int], int] = {}
    for n in range(100):
        victim = (f"198.51.100.{n}", 1000 + n)
        for datagram in _spoofed_initials(rng):
            received[victim] = received.get(victim, 0) + len(datagram)
            server.receive_datagram(datagram, victim, sim.now)
        for datagram, address in server.datagrams_to_send(sim.now):
            sent[address] = sent.get(address, 0) + len(datagram)
            kind = _parse(datagram).packet_type  # type: ignore[attr-defined]
            assert kind in (
                QuicPacketType.RETRY,
                QuicPacketType.INITIAL,  # INVALID_TOKEN close
                QuicPacketType.VERSION_NEGOTIATION,
            )
    assert len(server) == 0 and server.get_timer() is None
    assert set(sent) <= set(received)
    for address, count in sent.items():
        assert count <= received[address], (address, count, received[address])


def test_with_retry_a_real_client_gets_at_most_three_times_until_validated() -> None:
    """The honest path: before the server has seen the client's token (its address
    proven), the client was sent at most three times what it sent."""
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    before: dict[str, int] = {"in": 0, "out": 0}
    original_receive = sim.server.receive_datagram
    original_send = sim.server.datagrams_to_send

    def receive(data: bytes, addr: tuple[str, int], now: float) -> None:
        if len(sim.server) == 0:
            before["in"] += len(data)
        original_receive(data, addr, now)

    def send(now: float) -> list[tuple[bytes, tuple[str, int]]]:
        datagrams = original_send(now)
        if len(sim.server) == 0:
            before["out"] += sum(len(d) for d, _ in datagrams)
        return datagrams

    sim.server.receive_datagram = receive  # type: ignore[method-assign]
    sim.server.datagrams_to_send = send  # type: ignore[method-assign]
    sim.run_until(lambda: authenticated(sim.client_app), timeout=5)
    assert 0 < before["out"] <= 3 * before["in"]


def _unvalidated_exchange(*, close_counts: bool) -> tuple[int, int]:
    """Retry off: a client sends its first flight and never answers again.  Returns
    (bytes in, bytes out) for its address over a minute of the server's timers."""
    sim = Simulation(
        server_auth=SimpleAckListener,
        client_auth=SimpleAckConnector(),
        retry=False,
        limits=Limits(auth_timeout=10.0),
    )
    first = [d for d, _ in sim.client.datagrams_to_send(sim.now)]
    sim.clients.clear()
    bytes_in = sum(len(d) for d in first)
    bytes_out = 0
    for datagram in first:
        sim.server.receive_datagram(datagram, CLIENT_ADDR, sim.now)
    now = sim.now
    while True:
        closing = any(t._quic._close_pending for t in sim.server.tunnels)
        out = sim.server.datagrams_to_send(now)
        if close_counts or not closing:
            bytes_out += sum(len(d) for d, _ in out)
        while sim.server.next_event() is not None:
            pass
        timer = sim.server.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        sim.server.handle_timer(now)
    assert len(sim.server) == 0
    return bytes_in, bytes_out


def test_without_retry_the_engine_keeps_an_unvalidated_address_under_three_times() -> None:
    """With Retry turned off, the engine's own anti-amplification limit applies: data,
    retransmissions and probes stay within 3x.  (The closing CONNECTION_CLOSE is not
    counted here: see the strict test below.)"""
    bytes_in, bytes_out = _unvalidated_exchange(close_counts=False)
    assert 0 < bytes_out <= 3 * bytes_in


def test_without_retry_even_the_close_stays_under_three_times() -> None:
    bytes_in, bytes_out = _unvalidated_exchange(close_counts=True)
    assert bytes_out <= 3 * bytes_in
