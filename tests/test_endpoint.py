"""The server endpoint: one socket's datagrams, many tunnels.

What must hold for an aggregator facing the internet: junk costs nothing (no tunnel,
no reply), unknown versions get Version Negotiation only when that cannot amplify,
Retry proves a client's address before any tunnel state exists, the tunnel limit
holds, and tunnels on one endpoint never see each other's bytes.
"""

from __future__ import annotations

import random

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, QuicProtocolVersion, pull_quic_header
from netsim import (
    CLIENT_ADDR,
    SERVER_ADDR,
    App,
    Link,
    Simulation,
    Writer,
    digest,
    payload,
    pump_all,
)

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import SimpleAckConnector, SimpleAckListener
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.endpoint import TOO_MANY_HANDSHAKES
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    StreamAccepted,
    StreamRequested,
)
from snocat_proto._wire.handshake_rate import HandshakeRate
from snocat_proto._wire.tunnel import TunnelConnection, TunnelState

OTHER_ADDR = ("10.0.0.3", 40000)
ADDRESS = RouteAddress.of("svc")
UNKNOWN_VERSION = 0x1A2A3A4A


def simple_sim(**kwargs: object) -> Simulation:
    return Simulation(
        server_auth=SimpleAckListener,
        client_auth=SimpleAckConnector(),
        **kwargs,  # type: ignore[arg-type]
    )


def authenticated(app: object) -> bool:
    return bool(app.of_type(AuthenticationCompleted))  # type: ignore[attr-defined]


def parse(datagram: bytes) -> object:
    return pull_quic_header(Buffer(data=datagram), host_cid_length=8)


def long_header_packet(
    *, version: int, size: int, dcid: bytes = b"D" * 8, scid: bytes = b"S" * 8
) -> bytes:
    """An Initial-shaped long-header packet of ``size`` bytes (payload is junk)."""
    head = bytes([0xC0]) + version.to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    head += b"\x00"  # token length
    rest = size - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + random.Random(size).randbytes(rest)


def assert_silent(sim: Simulation) -> None:
    assert len(sim.server) == 0
    assert sim.server.datagrams_to_send(sim.now) == []
    assert sim.server.get_timer() is None
    assert sim.server.next_event() is None


# Junk ------------------------------------------------------------------------------


def _junk() -> list[bytes]:
    rng = random.Random(7)
    short_header = [bytes([0x40 | rng.randrange(0x40)]) + rng.randbytes(n) for n in (30, 1200)]
    return [
        b"",
        b"\x00",
        b"\xc0",
        b"\xff\xff\xff\xff",
        bytes(1500),  # fixed bit zero
        rng.randbytes(5),
        *short_header,
        bytes([0x40]) + rng.randbytes(65_000),  # huge
        long_header_packet(version=1, size=1300)[:40],  # truncated Initial
        long_header_packet(version=1, size=600),  # an Initial too small to start a tunnel
        bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([21]) + bytes(1400),  # CID too long
    ]


@pytest.mark.parametrize("datagram", _junk(), ids=lambda d: f"{len(d)}B")
def test_junk_is_dropped_without_reply(datagram: bytes) -> None:
    sim = simple_sim()
    sim.server.receive_datagram(datagram, CLIENT_ADDR, sim.now)
    assert sim.server.dropped_datagrams == 1
    assert_silent(sim)


def test_random_datagrams_never_raise_or_start_tunnels() -> None:
    sim = simple_sim()
    rng = random.Random(11)
    for n in range(500):
        size = rng.choice([1, 2, 7, 20, 100, 1199, 1200, 1350, 4000])
        sim.server.receive_datagram(rng.randbytes(size), ("10.9.9.9", 1000 + n), sim.now)
    assert len(sim.server) == 0
    # Random long headers may name an unknown version; nothing else may be answered.
    for datagram, _addr in sim.server.datagrams_to_send(sim.now):
        header = parse(datagram)
        assert header.packet_type == QuicPacketType.VERSION_NEGOTIATION  # type: ignore[attr-defined]


def test_forged_packets_for_a_live_tunnel_do_not_disturb_it() -> None:
    sim = simple_sim()
    sim.run_until(lambda: authenticated(sim.server_app) and authenticated(sim.client_app))
    tunnel = sim.server_tunnel
    rng = random.Random(3)
    for cid in tunnel._quic.host_connection_ids:
        for size in (20, 60, 1200):
            forged = bytes([0x40 | rng.randrange(0x40)]) + cid + rng.randbytes(size)
            sim.server.receive_datagram(forged, CLIENT_ADDR, sim.now)
            sim.server.receive_datagram(forged, ("10.6.6.6", 666), sim.now)
    stream_id = sim.client.open_stream(ADDRESS)
    data = payload(100_000)
    sim.run_until(lambda: sim.client_app.of_type(StreamAccepted))
    pump_all(sim, [Writer(sim, sim.client, stream_id, data)])
    sim.run_until(lambda: stream_id in sim.server_app.ended)
    assert sim.server_app.received[stream_id] == data
    assert list(sim.server.tunnels) == [tunnel]
    assert tunnel.state is TunnelState.AUTHENTICATED


# Version negotiation ---------------------------------------------------------------


def test_unknown_version_gets_version_negotiation() -> None:
    sim = simple_sim()
    packet = long_header_packet(version=UNKNOWN_VERSION, size=1200, dcid=b"d" * 8, scid=b"s" * 8)
    sim.server.receive_datagram(packet, CLIENT_ADDR, sim.now)
    (reply,) = sim.server.datagrams_to_send(sim.now)
    datagram, addr = reply
    assert addr == CLIENT_ADDR
    assert len(datagram) < len(packet)  # no amplification
    header = parse(datagram)
    assert header.packet_type == QuicPacketType.VERSION_NEGOTIATION  # type: ignore[attr-defined]
    assert header.destination_cid == b"s" * 8  # type: ignore[attr-defined]
    assert header.source_cid == b"d" * 8  # type: ignore[attr-defined]
    assert QuicProtocolVersion.VERSION_1 in header.supported_versions  # type: ignore[attr-defined]
    assert UNKNOWN_VERSION not in header.supported_versions  # type: ignore[attr-defined]
    assert len(sim.server) == 0


@pytest.mark.parametrize("size", [60, 1199])
def test_small_unknown_version_packet_gets_nothing(size: int) -> None:
    sim = simple_sim()
    packet = long_header_packet(version=UNKNOWN_VERSION, size=size)
    sim.server.receive_datagram(packet, CLIENT_ADDR, sim.now)
    assert sim.server.dropped_datagrams == 1
    assert_silent(sim)


def test_version_negotiation_packets_are_never_answered() -> None:
    sim = simple_sim()
    packet = bytes([0x80]) + bytes(4) + b"\x08" + b"d" * 8 + b"\x08" + b"s" * 8
    packet += (1).to_bytes(4, "big") * 300
    sim.server.receive_datagram(packet, CLIENT_ADDR, sim.now)
    assert sim.server.dropped_datagrams == 1
    assert_silent(sim)


# Retry -----------------------------------------------------------------------------


def test_retry_comes_before_any_tunnel_and_the_connection_completes() -> None:
    sim = simple_sim(retry=True)
    first_flight = sim.client.datagrams_to_send(sim.now)
    assert first_flight
    for datagram, addr in first_flight:
        assert addr == SERVER_ADDR
        sim.server.receive_datagram(datagram, CLIENT_ADDR, sim.now)
    assert len(sim.server) == 0  # no state for an unproven address
    replies = sim.server.datagrams_to_send(sim.now)
    assert [parse(d).packet_type for d, _ in replies] == [QuicPacketType.RETRY] * len(first_flight)  # type: ignore[attr-defined]
    assert all(addr == CLIENT_ADDR for _, addr in replies)
    sim.client.receive_datagram(replies[0][0], SERVER_ADDR, sim.now)
    sim.run_until(lambda: authenticated(sim.server_app) and authenticated(sim.client_app))
    assert len(sim.server) == 1
    assert sim.server_tunnel.name == "10.0.0.2:50000"


def test_without_retry_the_first_initial_creates_the_tunnel() -> None:
    sim = simple_sim(retry=False)
    for datagram, _addr in sim.client.datagrams_to_send(sim.now):
        sim.server.receive_datagram(datagram, CLIENT_ADDR, sim.now)
    assert len(sim.server) == 1
    sim.run_until(lambda: authenticated(sim.server_app) and authenticated(sim.client_app))


def test_bad_retry_token_gets_invalid_token_close() -> None:
    sim = simple_sim(retry=True, client_token=b"forged-token-" * 5)
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=10)
    closed = sim.client_app.closed
    assert closed is not None
    assert closed.code == QuicErrorCode.INVALID_TOKEN and closed.by_peer
    assert len(sim.server) == 0
    assert not sim.server_app.events
    assert sim.server.dropped_datagrams == 0  # answered, not silently dropped


def test_retry_token_is_bound_to_the_client_address() -> None:
    sim = simple_sim(retry=True)
    for datagram, _addr in sim.client.datagrams_to_send(sim.now):
        sim.server.receive_datagram(datagram, CLIENT_ADDR, sim.now)
    ((retry, _),) = sim.server.datagrams_to_send(sim.now)
    sim.client.receive_datagram(retry, SERVER_ADDR, sim.now)
    with_token = sim.client.datagrams_to_send(sim.now)
    assert parse(with_token[0][0]).token  # type: ignore[attr-defined]
    # The same Initial, token and all, from another address is not let in.
    for datagram, _addr in with_token:
        sim.server.receive_datagram(datagram, OTHER_ADDR, sim.now)
    assert len(sim.server) == 0
    replies = sim.server.datagrams_to_send(sim.now)
    assert replies and all(addr == OTHER_ADDR for _, addr in replies)
    assert all(parse(d).packet_type == QuicPacketType.INITIAL for d, _ in replies)  # type: ignore[attr-defined]


# Many tunnels ----------------------------------------------------------------------


def test_max_tunnels_refuses_the_extra_ones() -> None:
    sim = Simulation(
        server_auth=SimpleAckListener,
        client_auth=SimpleAckConnector(),
        max_tunnels=1,
    )
    first = sim.clients[0]
    sim.run_until(lambda: authenticated(first.app), timeout=5)
    second = sim.add_client(OTHER_ADDR, SimpleAckConnector())
    sim.run_for(5.0)
    assert len(sim.server) == 1
    assert sim.server_tunnel.name == "10.0.0.2:50000"
    assert not authenticated(second.app)
    assert second.tunnel.state is TunnelState.HANDSHAKING
    assert sim.server.dropped_datagrams > 0
    sim.run_until(lambda: second.app.closed is not None, timeout=60)
    assert second.app.closed is not None and "handshake" in second.app.closed.reason
    assert first.app.closed is None
    # Once the first is gone, there is room again.
    first.tunnel.close(CloseCode.NORMAL, "done")
    sim.run_until(lambda: len(sim.server) == 0, timeout=10)
    sim.add_client(("10.0.0.4", 30000), SimpleAckConnector())
    sim.run_until(lambda: len(sim.server) == 1 and sim.server_tunnel.name is not None)
    assert sim.server_tunnel.name == "10.0.0.4:30000"


def test_an_address_over_its_handshake_rate_is_refused_until_it_slows_down() -> None:
    sim = Simulation(
        server_auth=SimpleAckListener,
        client_auth=SimpleAckConnector(),
        handshake_rate=HandshakeRate(per_second=0.5, burst=2),
    )
    same_host = [sim.add_client(("10.0.0.2", port), SimpleAckConnector()) for port in (2, 3)]
    other_host = sim.add_client(OTHER_ADDR, SimpleAckConnector())
    first, second, third = sim.clients[0], *same_host
    sim.run_until(lambda: third.app.closed is not None, timeout=5)
    closed = third.app.closed
    assert closed is not None and closed.by_peer and not closed.application
    assert (closed.code, closed.reason) == (QuicErrorCode.CONNECTION_REFUSED, TOO_MANY_HANDSHAKES)
    sim.run_until(lambda: all(authenticated(c.app) for c in (first, second, other_host)))
    assert sim.server.refused_handshakes == 1
    assert len(sim.server) == 3
    # The refused one never became a tunnel: three handshakes began.
    assert sim.server.started_handshakes == 3
    # Two seconds later the address has earned another handshake.
    sim.run_for(2.0)
    again = sim.add_client(("10.0.0.2", 4), SimpleAckConnector())
    sim.run_until(lambda: authenticated(again.app), timeout=5)
    assert sim.server.refused_handshakes == 1


def test_without_retry_there_is_no_handshake_rate() -> None:
    # An unproven source address may be forged: a limit would let anyone lock it out.
    sim = Simulation(
        server_auth=SimpleAckListener,
        client_auth=SimpleAckConnector(),
        retry=False,
        handshake_rate=HandshakeRate(per_second=0.5, burst=1),
    )
    for port in (2, 3, 4):
        sim.add_client(("10.0.0.2", port), SimpleAckConnector())
    sim.run_until(lambda: all(authenticated(c.app) for c in sim.clients), timeout=5)
    assert sim.server.refused_handshakes == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_two_clients_get_their_own_tunnels_and_bytes(seed: int) -> None:
    sim = simple_sim(link=Link(loss=0.03, jitter=0.01), seed=seed)
    one = sim.clients[0]
    two = sim.add_client(OTHER_ADDR, SimpleAckConnector())
    sim.run_until(
        lambda: len(sim.server) == 2 and all(t.name for t in sim.server.tunnels), timeout=10
    )
    assert authenticated(one.app) and authenticated(two.app)
    tunnels = {t.name: t for t in sim.server.tunnels}
    assert set(tunnels) == {"10.0.0.2:50000", "10.0.0.3:40000"}
    server_one, server_two = tunnels["10.0.0.2:50000"], tunnels["10.0.0.3:40000"]
    assert sim.server_app_of(server_one) is not sim.server_app_of(server_two)

    # Both clients open stream 0 and the server opens a stream to each, all at once.
    transfers: list[tuple[TunnelConnection, int, bytes, TunnelConnection]] = []
    for n, (client, server_tunnel) in enumerate(((one, server_one), (two, server_two))):
        up = client.tunnel.open_stream(RouteAddress.of("up", str(n)))
        down = server_tunnel.open_stream(RouteAddress.of("down", str(n)))
        sim.touch(server_tunnel)
        transfers.append((client.tunnel, up, payload(300_000, seed=10 + n), server_tunnel))
        transfers.append((server_tunnel, down, payload(300_000, seed=20 + n), client.tunnel))
    assert transfers[0][1] == transfers[2][1] == 0  # the same stream ID on both tunnels

    def app_of(tunnel: TunnelConnection) -> App:
        for client in (one, two):
            if tunnel is client.tunnel:
                return client.app
        return sim.server_app_of(tunnel)

    def accepted() -> bool:
        return all(
            any(isinstance(e, StreamAccepted) and e.stream_id == sid for e in app_of(sender).events)
            for sender, sid, _, _ in transfers
        )

    sim.run_until(accepted, timeout=10)
    writers = [Writer(sim, sender, sid, data) for sender, sid, data, _ in transfers]
    pump_all(sim, writers, timeout=60)
    sim.run_until(
        lambda: all(sid in app_of(receiver).ended for _, sid, _, receiver in transfers),
        timeout=60,
    )
    for _sender, sid, data, receiver in transfers:
        assert digest(app_of(receiver).received[sid]) == digest(data)
    requested = [
        [e.address for e in sim.server_app_of(t).of_type(StreamRequested)]  # type: ignore[attr-defined]
        for t in (server_one, server_two)
    ]
    assert requested == [[RouteAddress.of("up", "0")], [RouteAddress.of("up", "1")]]


def test_endpoint_close_closes_every_tunnel_and_refuses_new_ones() -> None:
    sim = simple_sim()
    two = sim.add_client(OTHER_ADDR, SimpleAckConnector())
    sim.run_until(lambda: authenticated(sim.client_app) and authenticated(two.app), timeout=10)
    sim.server.close(CloseCode.SHUTTING_DOWN, "aggregator restarting")
    sim.run_until(lambda: sim.client_app.closed is not None and two.app.closed is not None)
    expected = ConnectionTerminated(
        code=CloseCode.SHUTTING_DOWN, reason="aggregator restarting", by_peer=True, application=True
    )
    assert sim.client_app.closed == two.app.closed == expected
    late = sim.add_client(("10.0.0.5", 5555), SimpleAckConnector())
    sim.run_for(3.0)
    assert not authenticated(late.app)
    sim.run_until(lambda: len(sim.server) == 0, timeout=10)
    assert all(t.name != "10.0.0.5:5555" for t in sim.server.tunnels)


def test_a_failure_inside_one_tunnel_closes_that_tunnel_only() -> None:
    # A bug in one tunnel's handling (not a peer's ProtocolError, which is handled
    # inside) must not escape the endpoint and stop the other tunnels' pump.
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: sim.server_app.of_type(AuthenticationCompleted), timeout=5)
    tunnel = sim.server_tunnel

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    tunnel.receive_datagram = broken  # type: ignore[method-assign, assignment]
    tunnel.handle_timer = broken  # type: ignore[method-assign, assignment]
    sim.client.open_stream(RouteAddress.of("svc"))
    sim.touch(sim.client)
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=10)
    closed = sim.client_app.closed
    assert closed is not None and closed.code == CloseCode.INTERNAL_ERROR
    assert closed.application
    assert any(isinstance(e, RuntimeError) for e in sim.server.internal_errors)
    assert sim.server.failed_tunnels == 1  # counted once, however often it raised
    # The broken tunnel is dropped after its close went out: its timer, which raises
    # every time, must not keep the endpoint busy (a livelock on the fake clock).
    sim.run_for(60.0)
    assert len(sim.server) == 0
    assert sim.server_app.closed is not None


def test_a_tunnel_that_cannot_even_close_is_still_reported_and_dropped() -> None:
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: sim.server_app.of_type(AuthenticationCompleted), timeout=5)
    tunnel = sim.server_tunnel

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    for name in ("receive_datagram", "handle_timer", "datagrams_to_send", "close"):
        setattr(tunnel, name, broken)
    sim.client.open_stream(RouteAddress.of("svc"))
    sim.touch(sim.client)
    sim.run_until(lambda: sim.server_app.closed is not None, timeout=10)
    assert sim.server_app.closed == ConnectionTerminated(
        code=CloseCode.INTERNAL_ERROR,
        reason="internal error in the aggregator",
        by_peer=False,
        application=True,
    )
    assert len(sim.server) == 0
    # The client hears nothing more and gives up by its idle timeout.
    sim.run_until(lambda: sim.client_app.closed is not None, timeout=40)
