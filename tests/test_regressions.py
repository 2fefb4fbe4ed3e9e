"""Inputs the fuzzers found, kept as tests.

Each test replays one finding in the smallest form that shows it.  The first finding:
a peer that sent STOP_SENDING on a new stream before the stream's first byte made the
engine reset our direction; the tunnel then wrote the NYAN header on it and aioquic's
RuntimeError escaped ServerEndpoint.receive_datagram, stopping the aggregator's pump.

The crash files themselves are in the corpus (``fuzz/corpus/<harness>/found-*``), so
the corpus replay in tests/test_fuzz.py covers them too.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import anyio
import pytest
from aioquic import tls
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import K_TIME_THRESHOLD
from netsim import CLIENT_ADDR, SERVER_ADDR, Simulation

from fuzz.harnesses import HARNESSES
from fuzz.quic_harness import seal_one_rtt
from snocat_anyio import ServerConfig, TunnelServer
from snocat_anyio._host import TunnelHost
from snocat_anyio._udp import bind_udp
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    ClientCredentials,
    Rejected,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
    connect_authenticator,
)
from snocat_proto._wire.certificates import install_trust
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.endpoint import ClientEndpoint
from snocat_proto._wire.engine import quic_configuration
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    CredentialRequired,
    StreamAccepted,
    StreamRequested,
    StreamReset,
    TunnelEvent,
)
from snocat_proto._wire.framing import encode_frame
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.negotiation import HEADER
from snocat_proto._wire.proxy_protocol import ProxyHeaderParser, ProxyHeaderTooLarge
from snocat_proto._wire.tunnel import TunnelConnection

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"
STOP_SENDING = 0x05


# Harness findings (bugs in the harnesses' own expectations, kept as seeds) ---------


@pytest.mark.parametrize(
    ("harness", "name"),
    [
        # The grant, the 8 acknowledgement bytes and one byte more in one read: the
        # events of a read that fails are lost with it, in every split.
        ("proxyme_client", "found-grant-ack-then-extra"),
        # A long host name in the address the server opens a stream to.
        ("endpoint_handshaken", "found-server-opens-long-host"),
    ],
)
def test_harness_findings_replay(harness: str, name: str) -> None:
    HARNESSES[harness]((CORPUS / harness / name).read_bytes())


# STOP_SENDING before a peer stream's first byte ------------------------------------


def stop_then_open(stream_id: int) -> bytes:
    """Two frames in one packet: STOP_SENDING on a stream the peer never saw, then the
    stream's first bytes (its NYAN header and address), as any client can send them."""
    opening = HEADER + encode_frame(b"/svc")
    stream = bytes([0x0A, stream_id, len(opening)]) + opening  # STREAM with LEN, offset 0
    return bytes([STOP_SENDING, stream_id, 0x00]) + stream


def _inject(sim: Simulation) -> int:
    engine = sim.client._quic
    stream_id = engine.get_next_available_stream_id()
    sim.server.receive_datagram(
        seal_one_rtt(engine, stop_then_open(stream_id)), CLIENT_ADDR, sim.now
    )
    engine._local_next_stream_id_bidi = stream_id + 4  # the client's next stream is the next one
    return stream_id


def test_stop_sending_before_the_first_byte_does_not_crash_the_endpoint() -> None:
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: sim.server_app.of_type(AuthenticationCompleted), timeout=5)
    stopped = _inject(sim)
    sim.run_for(1.0)
    assert sim.server_app.closed is None
    # Nothing can be written on the stopped stream, not even a refusal: it is dropped.
    assert all(e.stream_id != stopped for e in sim.server_app.of_type(StreamRequested))  # type: ignore[attr-defined]
    # The tunnel still serves the next stream.
    good = sim.client.open_stream(RouteAddress.of("svc"))
    sim.run_until(lambda: sim.server_app.of_type(StreamRequested), timeout=5)
    assert any(e.stream_id == good for e in sim.server_app.of_type(StreamRequested))  # type: ignore[attr-defined]


def test_stop_sending_before_the_first_byte_of_a_held_stream() -> None:
    """The same before authentication: the stream is held, and the crash comes when
    authentication releases it."""
    limits = Limits()
    secret = b"alpha-secret-0123456789"
    sim = Simulation(
        server_auth=lambda peer: TokenListener(bytes(32), limits=limits),
        client_auth=TokenConnector("alpha", secret, limits=limits),
    )
    sim.server_app.hold_credentials = True
    sim.run_until(lambda: sim.server_app.of_type(CredentialRequired), timeout=5)
    _inject(sim)
    sim.run_for(0.5)
    server = sim.server_tunnel
    server.supply_credential(secret)
    sim.touch(server)
    sim.run_for(1.0)
    assert sim.server_app.of_type(AuthenticationCompleted) and sim.server_app.closed is None


@pytest.mark.anyio
async def test_stop_sending_before_the_first_byte_leaves_the_aggregator_serving(
    server_identity: Any,
) -> None:
    """What the finding means for the aggregator: one authenticated client's two frames
    stop the server's pump (serve() raises); another client then gets no service."""
    config = ServerConfig(
        certificate_pem=server_identity.certificate_pem,
        private_key_pem=server_identity.private_key_pem,
        quic_port=0,
        tokens={"alpha": b"alpha-secret-0123456789"},
    )
    credentials = ClientCredentials.token("alpha", b"alpha-secret-0123456789")

    async def dial(server: TunnelServer) -> tuple[TunnelConnection, TunnelHost, anyio.Event]:
        configuration = quic_configuration(is_client=True, limits=Limits(), server_name="localhost")
        install_trust(configuration, authority_pem=server_identity.certificate_pem, pinned=None)
        tunnel = TunnelConnection.connect(
            configuration,
            address=server.quic_address,
            authenticator=connect_authenticator(credentials, limits=Limits()),
            limits=Limits(),
            now=anyio.current_time(),
        )
        authenticated = anyio.Event()

        def on_event(t: TunnelConnection, event: TunnelEvent, stream: object) -> None:
            if isinstance(event, AuthenticationCompleted | ConnectionTerminated):
                authenticated.set()

        return (
            tunnel,
            TunnelHost(ClientEndpoint(tunnel), bind_udp("127.0.0.1", 0), on_event),
            authenticated,
        )

    sockets: list[Any] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            server: TunnelServer = await tg.start(TunnelServer(config).serve)
            hostile, host, authenticated = await dial(server)
            sockets.append(host.sock)
            tg.start_soon(host.run)
            await authenticated.wait()
            engine = hostile._quic
            stream_id = engine.get_next_available_stream_id()
            host.sock.sendto(seal_one_rtt(engine, stop_then_open(stream_id)), server.quic_address)
            await anyio.sleep(0.5)
            honest, honest_host, honest_ready = await dial(server)
            sockets.append(honest_host.sock)
            tg.start_soon(honest_host.run)
            with anyio.fail_after(5):
                await honest_ready.wait()
            assert honest.state.name == "AUTHENTICATED"
            await server.shutdown(grace=0.1)
            tg.cancel_scope.cancel()
    for sock in sockets:
        sock.close()


# STOP_SENDING on a stream we opened, then the peer accepts it ------------------------


def test_an_opened_stream_stopped_then_accepted_is_reset() -> None:
    """Found by ``client_handshaken``: an aggregator stopped the client's direction of a
    stream the client opened, then accepted it.  The client reported it accepted with
    its direction silently over: a write raised LocalProtocolError, and a StreamHandle
    waited for room forever.  As on any open stream, STOP_SENDING now ends the stream:
    StreamAccepted, then StreamReset by the peer with the peer's code."""
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.server_app.route = lambda address: None  # decided below
    sim.run_until(lambda: sim.client_app.of_type(AuthenticationCompleted), timeout=5)
    opened = sim.client.open_stream(RouteAddress.of("svc"))
    sim.run_until(lambda: sim.server_app.of_type(StreamRequested), timeout=5)
    server = sim.server_tunnel
    # One packet: aioquic writes a stream's STOP_SENDING before its data (the status).
    server._quic.stop_stream(opened, 9)
    server.accept_stream(opened)
    sim.touch(server)
    sim.run_until(
        lambda: any(e.stream_id == opened for e in sim.client_app.of_type(StreamReset)),  # type: ignore[attr-defined]
        timeout=5,
    )
    seen = [e for e in sim.client_app.events if getattr(e, "stream_id", None) == opened]
    assert seen == [
        StreamAccepted(stream_id=opened),
        StreamReset(stream_id=opened, code=9, by_peer=True, reason="peer stopped reading"),
    ]
    assert sim.client_app.closed is None
    HARNESSES["client_handshaken"](
        (CORPUS / "client_handshaken" / "found-stop-sending-then-accepted").read_bytes()
    )


# A close in the middle of a datagram's events: nothing may follow ConnectionTerminated ------


def _stream_frame(stream_id: int, offset: int, data: bytes) -> bytes:
    """A STREAM frame with offset and length (all three below 64: one-byte varints)."""
    return bytes([0x0E, stream_id, offset, len(data)]) + data


def test_nothing_follows_tunnel_closed_when_a_datagram_closes_the_tunnel_midway() -> None:
    """Found by ``client_handshaken``: one packet held two frames of a stream the client
    opened, an unsupported NYAN version and one byte more.  The first closed the tunnel
    (ConnectionTerminated queued); the second still reached the failed negotiation, and a
    StreamRejected followed ConnectionTerminated, which the API promises is the last event."""
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: sim.client_app.of_type(AuthenticationCompleted), timeout=5)
    opened = sim.client.open_stream(RouteAddress.of("svc"))
    frames = _stream_frame(opened, 0, b"NYAN\x01") + _stream_frame(opened, 5, b"x")
    sim.client.receive_datagram(seal_one_rtt(sim.server_tunnel._quic, frames), SERVER_ADDR, sim.now)
    sim.run_for(0.5)
    closed = sim.client_app.closed
    assert closed is not None and closed.code == CloseCode.UNSUPPORTED_VERSION
    assert sim.client_app.events[-1] == closed
    HARNESSES["client_handshaken"](
        (CORPUS / "client_handshaken" / "found-close-midway-then-more").read_bytes()
    )


# A token frame over the limit: the refused bytes stayed in the frame decoder ----------


def _oversized_frame() -> bytes:
    """A length prefix past ``max_auth_message_size``, then bytes the peer pushes after it."""
    return (5000).to_bytes(4, "big") + b"x" * 1000


@pytest.mark.parametrize("side", ["connector", "listener"])
def test_a_token_frame_over_the_limit_leaves_no_bytes_behind(side: str) -> None:
    """Found by ``client_handshaken``: a hostile aggregator's token result announcing
    more than the limit was refused, but the authenticator's frame decoder kept every
    byte of the read (up to a receive window) until the tunnel was dropped.  The
    listener (a hostile client's response) had the same flaw."""
    limits = Limits(max_auth_message_size=256)
    authenticator: TokenConnector | TokenListener
    if side == "connector":
        authenticator = TokenConnector("alpha", b"alpha-secret", limits=limits)
        authenticator.receive_data(b"snocat-token-v1".ljust(32, b"\0") + bytes(32))
    else:
        authenticator = TokenListener(bytes(32), limits=limits)
    authenticator.receive_data(_oversized_frame())
    assert authenticator.is_finished
    assert isinstance(list(iter(authenticator.next_event, None))[-1], Rejected)
    assert authenticator._frames.buffered == 0
    assert not authenticator._received


def test_a_token_result_over_the_limit_replays_in_the_client_harness() -> None:
    HARNESSES["client_handshaken"](
        (CORPUS / "client_handshaken" / "found-token-result-over-the-limit").read_bytes()
    )


# A loss timer kept due by a rounding error ------------------------------------------


def _rounding_case() -> tuple[float, float, float]:
    """``(rtt, now, sent_time)`` where aioquic's two loss tests disagree: the packet is
    not lost (``sent_time > now - delay``) yet its loss time has come (``sent_time +
    delay <= now``)."""
    rng = random.Random(0)
    for _ in range(1_000_000):
        rtt, now = rng.uniform(0.001, 0.1), 1000.0 + rng.random()
        delay = K_TIME_THRESHOLD * rtt
        sent = math.nextafter(now - delay, math.inf)
        if not sent <= now - delay and sent + delay <= now:
            return rtt, now, sent
    raise AssertionError("no rounding case found")


def test_a_loss_timer_due_by_a_rounding_error_does_not_stay_due() -> None:
    """Found by the tunnel pair model's livelock check (the simulated clock stuck at
    1000.174320706481): aioquic armed the loss timer for ``sent_time + delay`` but
    tested ``sent_time <= now - delay``; one rounding error apart, the timer stayed due
    with nothing lost, and a clock that does not move spun forever."""
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: sim.client_app.of_type(AuthenticationCompleted), timeout=5)
    sim.run_for(1.0)
    engine = sim.client._quic
    recovery = engine._loss
    rtt, now, sent = _rounding_case()
    recovery._rtt_initialized = True
    recovery._rtt_latest = recovery._rtt_smoothed = rtt
    space = engine._spaces[tls.Epoch.ONE_RTT]
    space.sent_packets.clear()
    space.ack_eliciting_in_flight = 0
    number = space.largest_acked_packet + 1
    space.sent_packets[number] = QuicSentPacket(
        epoch=tls.Epoch.ONE_RTT,
        in_flight=False,
        is_ack_eliciting=False,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=sent,
    )
    space.largest_acked_packet = number + 1
    space.loss_time = sent + K_TIME_THRESHOLD * rtt
    timer = engine.get_timer()
    assert timer is not None and timer <= now
    engine.handle_timer(now)
    assert number not in space.sent_packets  # declared lost
    timer = engine.get_timer()
    assert timer is None or timer > now


# A PROXY v1 line whose 107th byte is a CR ---------------------------------------------


def test_a_v1_proxy_line_judges_only_its_first_107_bytes() -> None:
    """Found by ``proxy_protocol``: a v1 line whose 107th byte was CR and whose 108th was
    not LF was refused as malformed when it arrived at once (the CR was judged by the
    byte after it) and as too long when it trickled in (107 bytes without CRLF).  Only
    the first 107 bytes decide now: too long, in every split."""
    line = b"PROXY UNKNOWN " + b"f" * 92 + b"\rJ"
    assert len(line) == 108
    whole = ProxyHeaderParser(limits=Limits())
    with pytest.raises(ProxyHeaderTooLarge):
        whole.feed(line)
    trickle = ProxyHeaderParser(limits=Limits())
    with pytest.raises(ProxyHeaderTooLarge):
        for i in range(len(line)):
            trickle.feed(line[i : i + 1])
    HARNESSES["proxy_protocol"](
        (CORPUS / "proxy_protocol" / "found-cr-as-the-107th-byte").read_bytes()
    )
