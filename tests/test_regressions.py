"""Inputs the fuzzers found, kept as tests.

Each test replays one finding in the smallest form that shows it.  The first finding:
a peer that sent STOP_SENDING on a new stream before the stream's first byte made the
engine reset our direction; the tunnel then wrote the NYAN header on it and aioquic's
RuntimeError escaped ServerEndpoint.receive_datagram, stopping the aggregator's pump.

The crash files themselves are in the corpus (``fuzz/corpus/<harness>/found-*``), so
the corpus replay in tests/test_fuzz.py covers them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from netsim import CLIENT_ADDR, Simulation

from fuzz.harnesses import HARNESSES
from fuzz.quic_harness import seal_one_rtt
from snocat_anyio.host import TunnelHost
from snocat_anyio.server import ServerConfig, TunnelServer
from snocat_proto.address import RouteAddress
from snocat_proto.auth import (
    ClientCredentials,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
    connect_authenticator,
)
from snocat_proto.certificates import install_trust
from snocat_proto.client_endpoint import ClientEndpoint
from snocat_proto.config import Limits
from snocat_proto.engine import quic_configuration
from snocat_proto.events import (
    CredentialRequired,
    StreamRequested,
    TunnelAuthenticated,
    TunnelClosed,
    TunnelEvent,
)
from snocat_proto.framing import encode_frame
from snocat_proto.negotiation import HEADER
from snocat_proto.tunnel import TunnelConnection
from snocat_sync.udp import bind_udp

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
    engine = sim.client.engine
    stream_id = engine.get_next_available_stream_id()
    sim.server.receive_datagram(
        seal_one_rtt(engine, stop_then_open(stream_id)), CLIENT_ADDR, sim.now
    )
    engine._local_next_stream_id_bidi = stream_id + 4  # the client's next stream is the next one
    return stream_id


def test_stop_sending_before_the_first_byte_does_not_crash_the_endpoint() -> None:
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: sim.server_app.of_type(TunnelAuthenticated), timeout=5)
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
    assert sim.server_app.of_type(TunnelAuthenticated) and sim.server_app.closed is None


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
            if isinstance(event, TunnelAuthenticated | TunnelClosed):
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
            engine = hostile.engine
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
