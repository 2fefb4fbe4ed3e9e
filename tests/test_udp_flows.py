"""UDP flows over QUIC DATAGRAM frames (``udp-datagrams``, docs/protocol.md 3.17).

First the codecs and the sans-IO :class:`FlowTable` on their own, then two peers on
the in-memory network (tests/netsim.py, fake clock, seeded loss, duplication and
reordering): datagrams both ways and checked one by one, many flows at once, sizes
over the path's limit, a flood held to the rate while a stream transfer completes,
idle expiry, peers that did not agree on the addition, and malformed DATAGRAM frames.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections import Counter

import pytest
from aioquic.quic.connection import QuicConnection
from hypothesis import given
from hypothesis import strategies as st
from netsim import CLIENT_ADDR, App, Link, Simulation, Writer, digest, payload

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    SCHEME_SIMPLE_ACK,
    SCHEME_TOKEN,
    SimpleAckConnector,
    SimpleAckListener,
    TokenConnector,
    TokenListener,
)
from snocat_proto._wire.engine import quic_configuration
from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    CredentialRequired,
    DataReceived,
    FlowEnded,
    FlowOpened,
    FlowRequested,
    StreamAccepted,
    StreamRejected,
    StreamRequested,
    TunnelEvent,
)
from snocat_proto._wire.features import FEATURES, UDP_DATAGRAMS
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.targets import TargetKind
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_proto._wire.udp_flows import (
    MAX_FLOW_ID,
    DropReason,
    FlowEnd,
    FlowRequest,
    FlowState,
    FlowTable,
    UdpTarget,
    advertise_datagrams,
    decode_flow_datagram,
    decode_varint,
    encode_flow_datagram,
    encode_varint,
)

LIMITS = Limits()
SECRET = b"s3cret-for-udp-flows"
UDP_FEATURES = FEATURES | {UDP_DATAGRAMS}
TARGET = UdpTarget(TargetKind.DNS, "dns.example", 53)
VISITOR = ("203.0.113.7", 40000)


# 1. The codecs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (1, "01"),
        (63, "3f"),
        (64, "4040"),
        (16383, "7fff"),
        (16384, "80004000"),
        (2**30 - 1, "bfffffff"),
        (2**30, "c000000040000000"),
        (MAX_FLOW_ID, "ffffffffffffffff"),
        (151288809941952652, "c2197c5eff14e88c"),  # RFC 9000 appendix A.1
    ],
)
def test_flow_ids_are_quic_varints_in_their_shortest_form(value: int, wire: str) -> None:
    assert encode_varint(value) == bytes.fromhex(wire)
    assert decode_varint(bytes.fromhex(wire) + b"rest") == (value, len(wire) // 2)


def test_a_longer_varint_form_is_read_as_quic_allows() -> None:
    assert decode_varint(bytes.fromhex("4025")) == (37, 2)  # RFC 9000 A.1: 37 in 2 bytes
    assert decode_flow_datagram(bytes.fromhex("80000001") + b"x") == (1, b"x")


@pytest.mark.parametrize("wire", ["", "40", "80ffff", "c0000000000000"])
def test_a_datagram_without_a_whole_flow_id_is_refused(wire: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_flow_datagram(bytes.fromhex(wire))


@pytest.mark.parametrize("value", [-1, MAX_FLOW_ID + 1, True, 1.0, "1"])
def test_only_varint_values_encode(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_varint(value)  # type: ignore[arg-type]


@given(st.integers(0, MAX_FLOW_ID), st.binary(max_size=64))
def test_flow_datagrams_round_trip(flow_id: int, data: bytes) -> None:
    assert decode_flow_datagram(encode_flow_datagram(flow_id, data)) == (flow_id, data)


def test_the_flow_setup_address_names_the_flow_the_target_and_the_visitor() -> None:
    request = FlowRequest(7, TARGET, VISITOR)
    text = "/proxy-udp/7/dns/dns.example/udp/53/from/ip4/203.0.113.7/udp/40000"
    assert str(request.to_address()) == text
    assert FlowRequest.from_address(RouteAddress.parse(text)) == request
    local = FlowRequest(1, UdpTarget(TargetKind.LOCAL, None, 5353), ("2001:db8::1%eth0", 9))
    assert str(local.to_address()) == "/proxy-udp/1/udp/5353/from/ip6/2001:db8::1/udp/9"
    assert FlowRequest.from_address(local.to_address()) == local
    assert FlowRequest.from_address(RouteAddress.of("proxy-tcp", "tcp", "22")) is None


@pytest.mark.parametrize(
    "text",
    [
        "/proxy-udp",
        "/proxy-udp/7",
        "/proxy-udp/07/udp/53/from/ip4/1.2.3.4/udp/5",  # one spelling per ID
        "/proxy-udp/x/udp/53/from/ip4/1.2.3.4/udp/5",
        "/proxy-udp/4611686018427387904/udp/53/from/ip4/1.2.3.4/udp/5",  # 2**62
        "/proxy-udp/7/udp/0/from/ip4/1.2.3.4/udp/5",
        "/proxy-udp/7/tcp/53/from/ip4/1.2.3.4/udp/5",
        "/proxy-udp/7/dns/a/tcp/53/from/ip4/1.2.3.4/udp/5",
        "/proxy-udp/7/foo/a/udp/53/from/ip4/1.2.3.4/udp/5",
        "/proxy-udp/7/udp/53/to/ip4/1.2.3.4/udp/5",
        "/proxy-udp/7/udp/53/from/ip4/1.2.3.4/tcp/5",
        "/proxy-udp/7/udp/53/from/ip4/::1/udp/5",
        "/proxy-udp/7/udp/53/from/ip6/1.2.3.4/udp/5",
        "/proxy-udp/7/udp/53/from/ip6/fe80::1%eth0/udp/5",
        "/proxy-udp/7/udp/53/from/dns/example.com/udp/5",
        "/proxy-udp/7/udp/53/from/ip4/1.2.3.4/udp/0",
        "/proxy-udp/7/udp/53/from/ip4/1.2.3.4/udp/5/extra",
    ],
)
def test_a_malformed_flow_setup_address_is_a_protocol_error(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        FlowRequest.from_address(RouteAddress.parse(text))


def test_udp_targets_take_the_proxy_tcp_host_rules() -> None:
    assert UdpTarget.parse_host_port("[::0001]:53") == UdpTarget(TargetKind.IP6, "::1", 53)
    assert str(UdpTarget.parse_host_port("dns.example:53")) == "dns.example:53"
    assert UdpTarget(TargetKind.LOCAL, None, 53).connect_host() == "localhost"
    for bad in (
        (TargetKind.DNS, "a b", 53),
        (TargetKind.IP4, "1.2.3", 53),
        (TargetKind.DNS, "a", 0),
    ):
        with pytest.raises(LocalProtocolError):
            UdpTarget(*bad)
    with pytest.raises(LocalProtocolError):
        FlowRequest(1, TARGET, ("not-an-ip", 5))


def test_only_a_token_side_that_offers_the_addition_advertises_datagrams() -> None:
    assert advertise_datagrams(SCHEME_TOKEN, UDP_FEATURES)
    assert not advertise_datagrams(SCHEME_TOKEN, FEATURES)
    assert not advertise_datagrams(SCHEME_SIMPLE_ACK, UDP_FEATURES)  # a 0.8 peer's scheme
    assert quic_configuration(is_client=True, limits=LIMITS).max_datagram_frame_size is None
    assert (
        quic_configuration(is_client=True, limits=LIMITS, datagrams=True).max_datagram_frame_size
        == 65535
    )


# 2. The flow table on its own -----------------------------------------------------------


def table(**limits: float) -> FlowTable:
    return FlowTable(limits=Limits(**limits), local_parity=1)  # type: ignore[arg-type]


def test_flow_ids_have_our_parity_increase_and_are_never_reused() -> None:
    flows = table(udp_max_flows=3)
    ids = [flows.open(0.0) for _ in range(3)]
    assert ids == [1, 3, 5]
    assert flows.open(0.0) is None  # the limit
    assert flows.drops == {DropReason.FLOW_LIMIT: 1}
    flows.end(3)
    assert flows.open(0.0) == 7  # room again, and 3 stays retired
    assert FlowTable(limits=LIMITS, local_parity=0).open(0.0) == 0


def test_a_peer_flow_must_have_the_peer_parity_a_fresh_id_and_room() -> None:
    flows = table(udp_max_flows=2)
    assert flows.request(1, stream_id=0, now=0.0) is not None  # our parity
    assert flows.request(2, stream_id=0, now=0.0) is None
    assert flows.request(2, stream_id=4, now=0.0) is not None  # live already
    assert flows.request(4, stream_id=4, now=0.0) is None
    assert flows.request(6, stream_id=8, now=0.0) is not None  # the limit
    assert flows.drops == {DropReason.FLOW_LIMIT: 1}
    assert flows.state(2) is FlowState.REQUESTED
    assert flows.flow_of_stream(4) == 4 and flows.stream_of(2) == 0


def test_datagrams_queue_while_a_flow_opens_and_go_out_once_accepted() -> None:
    flows = table(udp_flow_queue=2)
    flow_id = flows.open(0.0)
    assert flow_id == 1
    flows.bind(flow_id, 1)
    out = [flows.outgoing(1, b"a%d" % i, 0.0, max_datagram=1200, congested=False) for i in range(3)]
    assert out == [None, None, DropReason.QUEUE_FULL]
    assert flows.opened(1, 0.1) == [b"\x01a0", b"\x01a1"]
    assert flows.outgoing(1, b"now", 0.2, max_datagram=1200, congested=False) == b"\x01now"
    assert flows.outgoing(1, b"x", 0.2, max_datagram=1200, congested=True) is DropReason.CONGESTED
    too_big = flows.outgoing(1, b"x" * 4, 0.2, max_datagram=4, congested=False)
    assert too_big is DropReason.TOO_BIG


def test_datagrams_of_a_flow_that_failed_to_open_are_counted_as_dropped() -> None:
    flows = table()
    flows.open(0.0)
    flows.outgoing(1, b"early", 0.0, max_datagram=1200, congested=False)
    assert flows.end(1) is None  # no stream was bound
    assert flows.end(1) is None  # idempotent
    assert flows.drops == {DropReason.FLOW_ENDED: 1}


def test_unknown_undecided_and_malformed_datagrams_are_counted() -> None:
    flows = table()
    flows.request(2, stream_id=0, now=0.0)
    assert flows.incoming(b"\x02x", 0.0) is DropReason.UNKNOWN_FLOW  # not accepted yet
    assert flows.outgoing(2, b"x", 0.0, max_datagram=1200, congested=False) is (
        DropReason.UNKNOWN_FLOW
    )
    assert flows.accept(2, 0.0) == 0
    assert flows.incoming(b"\x02x", 0.0) == (2, b"x")
    assert flows.incoming(b"\x04x", 0.0) is DropReason.UNKNOWN_FLOW
    assert flows.incoming(b"", 0.0) is DropReason.MALFORMED
    assert flows.incoming(b"\x80\x00", 0.0) is DropReason.MALFORMED
    assert flows.drops == {DropReason.UNKNOWN_FLOW: 3, DropReason.MALFORMED: 2}
    assert flows.received == 1
    with pytest.raises(LocalProtocolError):
        flows.accept(2, 0.0)  # decided already


def test_the_rate_holds_datagrams_and_bytes_in_each_direction() -> None:
    flows = table(udp_datagrams_per_second=100, udp_bytes_per_second=100_000, udp_rate_burst=0.1)
    flows.request(2, stream_id=0, now=0.0)
    flows.accept(2, 0.0)

    def burst(now: float, size: int, count: int) -> tuple[int, int]:
        sent = sum(
            isinstance(
                flows.outgoing(2, bytes(size), now, max_datagram=2**16, congested=False), bytes
            )
            for _ in range(count)
        )
        taken = sum(
            isinstance(flows.incoming(b"\x02" + bytes(size), now), tuple) for _ in range(count)
        )
        return sent, taken

    assert burst(0.0, 10, 50) == (10, 10)  # a tenth of a second's worth of datagrams
    assert burst(0.05, 10, 50) == (5, 5)  # refilled at 100 a second
    assert burst(10.0, 20_000, 10) == (3, 3)  # 64 KiB of bytes at most at once
    assert flows.drops[DropReason.OVER_RATE] == 2 * (40 + 45 + 7)


def test_idle_flows_expire_and_activity_moves_the_deadline() -> None:
    flows = table(udp_flow_idle_timeout=60)
    flows.request(2, stream_id=0, now=0.0)
    flows.accept(2, 0.0)
    flows.open(0.0)
    flows.bind(1, 1)
    assert flows.get_timer() == 60.0
    flows.incoming(b"\x02", 50.0)  # flow 2 was active at 50
    assert flows.handle_timer(59.9) == []
    assert flows.handle_timer(60.0) == [(1, 1)]
    assert flows.get_timer() == 110.0  # re-armed, lazily, at flow 2's real deadline
    assert flows.handle_timer(109.0) == []
    assert flows.handle_timer(110.0) == [(2, 0)]
    assert flows.get_timer() is None and len(flows) == 0


# 3. Two peers --------------------------------------------------------------------------


def udp_sim(
    *,
    server_features: frozenset[str] = UDP_FEATURES,
    client_features: frozenset[str] = UDP_FEATURES,
    server_datagrams: bool = True,
    client_datagrams: bool = True,
    limits: Limits = LIMITS,
    client_limits: Limits | None = None,
    link: Link | None = None,
    seed: int = 0,
    authenticate: bool = True,
) -> Simulation:
    """A token tunnel whose both sides (by default) offer ``udp-datagrams``."""
    sim = Simulation(
        server_auth=lambda peer: TokenListener(bytes(32), limits=limits, features=server_features),
        client_auth=TokenConnector(
            "alpha", SECRET, limits=client_limits or limits, features=client_features
        ),
        limits=limits,
        client_limits=client_limits,
        link=link,
        seed=seed,
        server_datagrams=server_datagrams,
        client_datagrams=client_datagrams,
    )
    sim.server_app.credentials = {"alpha": SECRET}
    if authenticate:
        sim.run_until(lambda: authenticated(sim.client_app) and authenticated(sim.server_app))
    return sim


def authenticated(app: App) -> bool:
    return bool(app.of_type(AuthenticationCompleted))


def flow_events(app: App, kind: type[TunnelEvent], flow_id: int | None = None) -> list[TunnelEvent]:
    return [
        e
        for e in app.events
        if isinstance(e, kind) and (flow_id is None or getattr(e, "flow_id", None) == flow_id)
    ]


def open_flow(sim: Simulation, visitor: tuple[str, int] = VISITOR, *, wait: bool = True) -> int:
    server = sim.server_tunnel
    flow_id = server.open_flow(TARGET, visitor, sim.now)
    assert flow_id is not None
    sim.touch(server)
    if wait:
        sim.run_until(
            lambda: (
                flow_events(sim.server_app, FlowOpened, flow_id)
                or flow_events(sim.server_app, FlowEnded, flow_id)
            ),
            timeout=10,
        )
    return flow_id


def send(sim: Simulation, tunnel: TunnelConnection, flow_id: int, data: bytes) -> DropReason | None:
    result = tunnel.send_flow_datagram(flow_id, data, sim.now)
    sim.touch(tunnel)
    return result


def test_a_flow_is_requested_accepted_and_carries_datagrams_both_ways() -> None:
    sim = udp_sim()
    client, server = sim.client, sim.server_tunnel
    assert client.features == server.features == UDP_FEATURES
    assert client.flows_enabled and server.flows_enabled
    flow_id = open_flow(sim)
    assert flow_id == 1  # the Listen side allocates odd IDs
    (requested,) = sim.client_app.of_type(FlowRequested)
    assert requested == FlowRequested(flow_id=1, target=TARGET, visitor=VISITOR)
    # The application never hears of the flow's stream.
    assert not sim.client_app.of_type(StreamRequested)
    assert not sim.server_app.of_type(StreamAccepted)
    assert send(sim, server, flow_id, b"query") is None
    assert send(sim, server, flow_id, b"") is None  # an empty UDP payload is one too
    sim.run_for(0.1)
    assert sim.client_app.flow_data[flow_id] == [b"query", b""]
    assert send(sim, client, flow_id, b"answer") is None
    sim.run_for(0.1)
    assert sim.server_app.flow_data[flow_id] == [b"answer"]
    assert server.datagram_counters().sent == 2 and client.datagram_counters().received == 2
    assert server.datagram_counters().dropped == client.datagram_counters().dropped == 0


def test_datagrams_sent_before_the_acceptance_wait_for_it_and_then_go() -> None:
    sim = udp_sim()
    server = sim.server_tunnel
    flow_id = open_flow(sim, wait=False)
    assert [send(sim, server, flow_id, b"early-%d" % i) for i in range(3)] == [None] * 3
    sim.run_until(lambda: len(sim.client_app.flow_data[flow_id]) == 3, timeout=5)
    assert sim.client_app.flow_data[flow_id] == [b"early-0", b"early-1", b"early-2"]
    assert flow_events(sim.server_app, FlowOpened, flow_id)


def _numbered(direction: int, seq: int, size: int, rng: random.Random) -> bytes:
    """A datagram that says which it is and proves it arrived intact."""
    body = rng.randbytes(size - 13)
    return struct.pack(">BI", direction, seq) + hashlib.sha256(body).digest()[:8] + body


def _check(data: bytes) -> tuple[int, int]:
    direction, seq = struct.unpack(">BI", data[:5])
    assert hashlib.sha256(data[13:]).digest()[:8] == data[5:13], "a datagram arrived damaged"
    return direction, seq


@pytest.mark.parametrize(
    "link",
    [Link(), Link(loss=0.02, duplicate=0.02, jitter=0.004)],
    ids=["clean", "lossy-duplicating-reordering"],
)
def test_ten_thousand_datagrams_of_mixed_sizes_each_way_arrive_intact_and_once(link: Link) -> None:
    sim = udp_sim(link=link, seed=7)
    client, server = sim.client, sim.server_tunnel
    flow_id = open_flow(sim)
    limit = server.flow_payload_limit(flow_id)
    # 1200 B packets: 1170 B of DATAGRAM payload with 8 B connection IDs, less the flow ID.
    assert limit == client.flow_payload_limit(flow_id) == 1169
    rng = random.Random(11)
    sizes = [13, 14, 100, 512, limit - 1, limit]
    count, per_step = 10_000, 40  # 4,000 a second each way, under the default rate
    sent: dict[int, set[int]] = {0: set(), 1: set()}
    for start in range(0, count, per_step):
        for seq in range(start, start + per_step):
            for direction, tunnel in ((0, server), (1, client)):
                size = rng.choice(sizes) if seq % 3 else rng.randint(13, limit)
                if send(sim, tunnel, flow_id, _numbered(direction, seq, size, rng)) is None:
                    sent[direction].add(seq)
        sim.run_for(0.01)
    sim.run_for(1.0)
    for direction, app, tunnel in ((0, sim.client_app, server), (1, sim.server_app, client)):
        arrived = [_check(data) for data in app.flow_data[flow_id]]
        seqs = Counter(seq for d, seq in arrived if d == direction)
        assert all(d == direction for d, _ in arrived)
        # QUIC discards duplicated packets: even the duplicating link delivers each once.
        assert not [s for s, n in seqs.items() if n > 1], "a datagram arrived twice"
        assert set(seqs) <= sent[direction]
        counters = tunnel.datagram_counters()
        assert counters.sent == len(sent[direction])
        assert counters.sent + counters.dropped == count  # each one went, or is counted
        if link.loss == 0:
            assert counters.dropped == 0 and len(seqs) == count
        else:
            # Every lost DATAGRAM frame is a congestion signal: the window shrinks and
            # what does not fit the send queue is dropped (never queued without bound).
            assert set(counters.drops) == {DropReason.CONGESTED}
            assert len(seqs) >= 0.9 * counters.sent, (len(seqs), counters.sent)


def test_a_hundred_concurrent_flows_each_keep_their_own_datagrams() -> None:
    sim = udp_sim()
    client, server = sim.client, sim.server_tunnel
    visitors = [(f"198.51.100.{i}", 20000 + i) for i in range(100)]
    flow_ids = [open_flow(sim, visitor, wait=False) for visitor in visitors]
    sim.run_until(lambda: len(sim.server_app.of_type(FlowOpened)) == 100, timeout=10)
    requested = {e.flow_id: e.visitor for e in sim.client_app.of_type(FlowRequested)}  # type: ignore[attr-defined]
    assert requested == dict(zip(flow_ids, visitors, strict=True))
    assert len(set(flow_ids)) == 100
    for round_ in range(3):
        for index, flow_id in enumerate(flow_ids):
            assert send(sim, server, flow_id, b"to %d #%d" % (flow_id, round_)) is None
            assert send(sim, client, flow_id, b"from %d #%d" % (flow_id, round_)) is None
            if index % LIMITS.udp_receive_batch == LIMITS.udp_receive_batch - 1:
                sim.flush()  # as a pump does after each batch it reads
        sim.run_for(0.05)
    sim.run_for(0.5)
    for flow_id in flow_ids:
        assert sim.client_app.flow_data[flow_id] == [b"to %d #%d" % (flow_id, r) for r in range(3)]
        assert sim.server_app.flow_data[flow_id] == [
            b"from %d #%d" % (flow_id, r) for r in range(3)
        ]
    assert server.datagram_counters().dropped == client.datagram_counters().dropped == 0


def test_an_oversized_datagram_is_refused_counted_and_blocks_nothing() -> None:
    sim = udp_sim()
    client, server = sim.client, sim.server_tunnel
    flow_id = open_flow(sim)
    limit = server.flow_payload_limit(flow_id)
    assert send(sim, server, flow_id, bytes(limit + 1)) is DropReason.TOO_BIG
    assert send(sim, server, flow_id, bytes(64 * 1024)) is DropReason.TOO_BIG
    assert send(sim, server, flow_id, b"after") is None
    assert send(sim, server, flow_id, bytes(limit)) is None
    sim.run_for(0.1)
    assert sim.client_app.flow_data[flow_id] == [b"after", bytes(limit)]
    assert server.datagram_counters().drops == {DropReason.TOO_BIG: 2}
    # One that was queued when it fitted but no longer does (the path shrank) is dropped
    # by the engine, never left to block the queue behind it.
    engine = client._quic
    engine.send_datagram(encode_flow_datagram(flow_id, bytes(limit + 10)))
    assert send(sim, client, flow_id, b"behind it") is None
    sim.run_for(0.1)
    assert sim.server_app.flow_data[flow_id] == [b"behind it"]
    assert client.datagram_counters().drops == {DropReason.TOO_BIG: 1}


def test_aioquic_would_hold_an_oversized_datagram_and_everything_behind_it() -> None:
    """Why the tunnel refuses what does not fit: aioquic keeps such a datagram at the
    head of its queue for ever (no later datagram leaves).  If an upgrade drops it or
    fragments it instead, this test says so."""
    sim = udp_sim()
    engine = sim.client._quic
    flow_id = open_flow(sim)
    limit = engine.max_datagram_payload()
    engine.send_datagram_frame(bytes(limit + 1))  # aioquic's own call, unchecked
    engine.send_datagram_frame(encode_flow_datagram(flow_id, b"stuck"))
    for _ in range(3):
        QuicConnection.datagrams_to_send(engine, sim.now)  # aioquic's, not the engine's
    assert engine.datagrams_queued == 2
    assert QuicConnection.datagrams_to_send(engine, sim.now + 1) == []


def _flooded_transfer(limits: Limits, *, flood: bool) -> tuple[float, int, Simulation]:
    """Seconds a 1 MB stream transfer takes over a 2 MB/s bottleneck while (or not) the
    same side offers 5 MB/s of datagrams on one flow; and how many of those arrived."""
    size = 1_000_000
    sim = udp_sim(limits=limits, seed=3, link=Link(bandwidth=2e6))
    server = sim.server_tunnel
    flow_id = open_flow(sim)
    stream_id = server.open_stream(RouteAddress.of("proxy-tcp", "tcp", "22"))
    sim.touch(server)
    sim.run_until(lambda: sim.server_app.of_type(StreamAccepted), timeout=5)
    data = payload(size, seed=5)
    writer = Writer(sim, server, stream_id, data)
    start = sim.now
    while not writer.pump() or len(sim.client_app.received[stream_id]) < size:
        if flood:
            for _ in range(5):
                send(sim, server, flow_id, bytes(1000))
        sim.flush()
        sim.run_for(0.001)
        assert sim.now - start < 30, "the stream transfer starved"
    assert digest(sim.client_app.received[stream_id]) == digest(data)
    elapsed = sim.now - start
    sim.run_for(0.1)  # what is still in flight lands
    return elapsed, len(sim.client_app.flow_data[flow_id]), sim


def test_a_flood_on_one_flow_is_held_to_the_rate_while_a_stream_transfer_completes() -> None:
    rate, burst = 200, 0.1
    limits = Limits(
        udp_datagrams_per_second=rate, udp_bytes_per_second=rate * 1200, udp_rate_burst=burst
    )
    quiet, _, _ = _flooded_transfer(limits, flood=False)
    flooded, delivered, sim = _flooded_transfer(limits, flood=True)
    assert quiet < 0.6  # the bottleneck: 0.5 s
    assert flooded < 1.3 * quiet, (quiet, flooded)
    assert 0 < delivered <= rate * (flooded + 0.1) + rate * burst, (delivered, flooded)
    counters = sim.server_tunnel.datagram_counters()
    assert counters.drops.keys() == {DropReason.OVER_RATE}
    assert counters.sent == delivered  # nothing lost: the rate keeps the queue short
    # The control: without the rate, DATAGRAM frames (written ahead of stream data in
    # every packet) take the bottleneck, and the same transfer takes several times longer.
    unlimited = Limits(udp_datagrams_per_second=1e9, udp_bytes_per_second=1e12)
    starved, _, _ = _flooded_transfer(unlimited, flood=True)
    assert starved > 3 * quiet, (quiet, starved)


def test_a_peer_that_ignores_the_rate_is_held_to_it_where_it_arrives() -> None:
    limits = Limits(udp_datagrams_per_second=100, udp_rate_burst=0.1)
    sim = udp_sim(limits=limits)
    flow_id = open_flow(sim)
    engine = sim.client._quic  # below the tunnel: no bucket of its own
    for _ in range(20):
        for _ in range(50):
            engine.send_datagram_frame(encode_flow_datagram(flow_id, b"flood"))
        sim.touch(sim.client)
        sim.run_for(0.01)
    sim.run_for(0.1)
    received = len(sim.server_app.flow_data[flow_id])
    assert 10 <= received <= 100 * (0.3 + 0.1) + 10
    assert sim.server_tunnel.datagram_counters().drops[DropReason.OVER_RATE] >= 1000 - received - 50


def test_an_idle_flow_ends_on_both_sides_and_an_active_one_does_not() -> None:
    sim = udp_sim()
    client, server = sim.client, sim.server_tunnel
    idle = open_flow(sim)
    busy = open_flow(sim, ("203.0.113.8", 1))
    send(sim, server, idle, b"once")
    for half_minute in range(6):  # a datagram each way every 30 s keeps the busy flow
        send(sim, server, busy, b"ping")
        send(sim, client, busy, b"pong")
        sim.run_for(30)
        assert bool(flow_events(sim.server_app, FlowEnded, idle)) == (half_minute >= 1)
    (server_end,) = flow_events(sim.server_app, FlowEnded, idle)
    (client_end,) = flow_events(sim.client_app, FlowEnded, idle)
    assert FlowEnd.IDLE in (server_end.cause, client_end.cause)  # type: ignore[attr-defined]
    assert not flow_events(sim.server_app, FlowEnded, busy)
    assert not flow_events(sim.client_app, FlowEnded, busy)
    assert send(sim, server, idle, b"late") is DropReason.UNKNOWN_FLOW
    assert len(sim.client_app.flow_data[busy]) == 6


def test_a_closed_flow_ends_at_the_peer_and_its_late_datagrams_are_dropped() -> None:
    sim = udp_sim()
    client, server = sim.client, sim.server_tunnel
    flow_id = open_flow(sim)
    client.close_flow(flow_id)
    client.close_flow(flow_id)  # idempotent
    sim.touch(client)
    sim.run_until(lambda: flow_events(sim.server_app, FlowEnded, flow_id), timeout=5)
    (ended,) = flow_events(sim.server_app, FlowEnded, flow_id)
    assert ended.cause is FlowEnd.PEER_CLOSED  # type: ignore[attr-defined]
    assert not flow_events(sim.client_app, FlowEnded)  # no event for our own close
    assert send(sim, server, flow_id, b"x") is DropReason.UNKNOWN_FLOW
    client._quic.send_datagram_frame(encode_flow_datagram(flow_id, b"late"))
    sim.touch(client)
    sim.run_for(0.1)
    assert not sim.server_app.flow_data[flow_id]
    assert server.datagram_counters().drops == {DropReason.UNKNOWN_FLOW: 2}
    # Nothing of the flow's stream is left on either side.
    sim.run_for(1)
    assert not client._streams and not server._streams


def test_a_refused_flow_ends_at_its_opener_and_drops_what_it_queued() -> None:
    sim = udp_sim()
    sim.client_app.flow_route = lambda request: request.target.port != 53
    server = sim.server_tunnel
    flow_id = open_flow(sim, wait=False)
    send(sim, server, flow_id, b"queued")
    sim.run_until(lambda: flow_events(sim.server_app, FlowEnded, flow_id), timeout=5)
    (ended,) = flow_events(sim.server_app, FlowEnded, flow_id)
    assert ended.cause is FlowEnd.REFUSED  # type: ignore[attr-defined]
    assert server.datagram_counters().drops == {DropReason.FLOW_ENDED: 1}
    assert not sim.client_app.flow_data


def test_the_flow_limit_holds_on_both_sides() -> None:
    sim = udp_sim(limits=Limits(udp_max_flows=3), client_limits=Limits(udp_max_flows=2))
    server = sim.server_tunnel
    # The client takes two: the third is refused there.
    flow_ids = [open_flow(sim, ("192.0.2.1", port)) for port in (1, 2, 3)]
    assert [bool(flow_events(sim.server_app, FlowOpened, f)) for f in flow_ids] == [1, 1, 0]
    (refused,) = flow_events(sim.server_app, FlowEnded, flow_ids[2])
    assert refused.cause is FlowEnd.REFUSED  # type: ignore[attr-defined]
    assert sim.client.datagram_counters().drops == {DropReason.FLOW_LIMIT: 1}
    # The server holds three at most: two open and one being set up.
    assert open_flow(sim, ("192.0.2.1", 4), wait=False)
    assert server.open_flow(TARGET, ("192.0.2.1", 5), sim.now) is None
    assert server.datagram_counters().drops == {DropReason.FLOW_LIMIT: 1}


def test_at_the_limit_the_quietest_flow_quiet_long_enough_makes_room() -> None:
    # Spoofed sources (one datagram each) fill the aggregator's flows; a real visitor
    # still gets one, by ending the quietest flow that has been quiet for
    # udp_flow_evict_after, never a flow that is busy.
    limits = Limits(udp_max_flows=3, udp_flow_evict_after=5.0)
    sim = udp_sim(limits=limits)
    server = sim.server_tunnel
    flow_ids = [open_flow(sim, ("192.0.2.1", port)) for port in (1, 2, 3)]
    # Too soon: every flow is fresh, so the new visitor is dropped as before.
    assert server.open_flow(TARGET, ("192.0.2.9", 9), sim.now) is None
    assert server.datagram_counters().drops == {DropReason.FLOW_LIMIT: 1}
    busy = flow_ids[1]
    for _ in range(7):  # flow 2 keeps talking; 1 and 3 fall quiet
        sim.run_for(1.0)
        assert server.send_flow_datagram(busy, b"still here", sim.now) is None
        sim.touch(server)
    newcomer = server.open_flow(TARGET, ("192.0.2.9", 9), sim.now)
    assert newcomer is not None
    sim.touch(server)
    sim.run_for(0.01)
    (ended,) = flow_events(sim.server_app, FlowEnded)
    assert ended.flow_id == flow_ids[0]  # type: ignore[attr-defined]  # quiet longest
    assert ended.cause is FlowEnd.EVICTED  # type: ignore[attr-defined]
    sim.run_until(lambda: bool(flow_events(sim.server_app, FlowOpened, newcomer)), timeout=10)
    # The evicted flow ended on the client too (its stream closed); the busy one lives.
    sim.run_until(lambda: bool(flow_events(sim.client_app, FlowEnded)), timeout=10)
    assert server.send_flow_datagram(busy, b"and still", sim.now) is None
    assert not flow_events(sim.server_app, FlowEnded, busy)


def test_a_setup_address_the_client_cannot_read_is_refused_not_fatal() -> None:
    sim = udp_sim()
    server = sim.server_tunnel
    bad = [
        RouteAddress.of("proxy-udp", "2", "udp", "53", "from", "ip4", "1.2.3.4", "udp", "5"),
        RouteAddress.of("proxy-udp", "9", "udp", "0", "from", "ip4", "1.2.3.4", "udp", "5"),
        RouteAddress.of("proxy-udp", "nine"),
    ]
    for address in bad:  # 2: an ID of the client's own parity
        server.open_stream(address)
    sim.touch(server)
    sim.run_for(0.5)
    assert len(sim.server_app.of_type(StreamRejected)) == 3
    assert not sim.client_app.of_type(FlowRequested) and not sim.client_app.of_type(StreamRequested)
    assert open_flow(sim)  # the tunnel goes on


def test_malformed_datagram_frames_are_dropped_and_counted() -> None:
    sim = udp_sim()
    flow_id = open_flow(sim)
    engine = sim.client._quic
    for frame in [b"", b"\x40", b"\x80\x00\x00", b"\xc0" + bytes(6), b"\x3fnobody", b"\x02mine"]:
        engine.send_datagram_frame(frame)
    engine.send_datagram_frame(b"\x40\x01" + b"long form")  # flow 1, read as QUIC allows
    engine.send_datagram_frame(encode_flow_datagram(flow_id, b"fine"))
    sim.touch(sim.client)
    sim.run_for(0.1)
    assert sim.server_app.flow_data[flow_id] == [b"long form", b"fine"]
    assert sim.server_tunnel.datagram_counters().drops == {
        DropReason.MALFORMED: 4,
        DropReason.UNKNOWN_FLOW: 2,
    }
    assert sim.server_app.closed is None and sim.client_app.closed is None


def test_a_peer_that_did_not_agree_gets_nothing_and_its_datagrams_are_dropped() -> None:
    # Both ends advertise DATAGRAM frames, but the client does not list udp-datagrams.
    sim = udp_sim(client_features=FEATURES)
    client, server = sim.client, sim.server_tunnel
    assert server.features == client.features == FEATURES
    assert not server.flows_enabled and not client.flows_enabled
    with pytest.raises(LocalProtocolError, match="udp-datagrams"):
        server.open_flow(TARGET, VISITOR, sim.now)
    assert server.send_flow_datagram(1, b"x", sim.now) is DropReason.NOT_AGREED
    client._quic.send_datagram_frame(b"\x01hello")
    sim.touch(client)
    sim.run_for(0.1)
    assert server.datagram_counters().drops == {DropReason.NOT_AGREED: 2}
    assert not any(type(e).__name__.startswith("Flow") for e in sim.server_app.events)
    # A proxy-udp stream is then only an address no service takes.
    sim.client_app.route = lambda address: False
    server.open_stream(FlowRequest(1, TARGET, VISITOR).to_address())
    sim.touch(server)
    sim.run_for(0.2)
    assert sim.client_app.of_type(StreamRequested)
    assert sim.server_app.closed is None and sim.client_app.closed is None


def test_datagrams_before_authentication_are_dropped() -> None:
    sim = udp_sim(authenticate=False)
    sim.server_app.hold_credentials = True
    sim.run_until(lambda: sim.server_app.of_type(CredentialRequired), timeout=5)
    server = sim.server_tunnel
    sim.client._quic.send_datagram_frame(b"\x01early")
    sim.touch(sim.client)
    sim.run_for(0.2)
    assert not authenticated(sim.server_app)
    assert server.datagram_counters().drops == {DropReason.NOT_AGREED: 1}
    server.supply_credential(SECRET)
    sim.touch(server)
    sim.run_until(lambda: authenticated(sim.client_app), timeout=5)
    assert open_flow(sim) == 1


def test_agreed_without_the_transport_parameter_counts_as_not_agreed() -> None:
    sim = udp_sim(client_datagrams=False)
    assert UDP_DATAGRAMS not in sim.client.features
    assert UDP_DATAGRAMS not in sim.server_tunnel.features
    assert not sim.client.flows_enabled and not sim.server_tunnel.flows_enabled
    # And the server never sends a DATAGRAM frame to a client that did not ask for them.
    assert sim.server_tunnel.send_flow_datagram(1, b"x", sim.now) is DropReason.NOT_AGREED


def test_a_snocat_08_tunnel_has_no_datagram_transport_parameter() -> None:
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: authenticated(sim.client_app) and authenticated(sim.server_app))
    for tunnel in (sim.client, sim.server_tunnel):
        assert tunnel._quic._remote_max_datagram_frame_size is None
        assert not tunnel.flows_enabled
    # Our engine never sends a DATAGRAM frame to a peer that did not ask for them, even
    # one queued with aioquic's own (unchecked) call ...
    engine = sim.client._quic
    engine.send_datagram_frame(b"\x01x")
    sim.touch(sim.client)
    sim.run_for(0.5)
    assert sim.server_app.closed is None and engine.datagrams_queued == 0
    # ... because one breaks QUIC (RFC 9221 section 3): here, bare aioquic sends it.
    engine.send_datagram_frame(b"\x01x")
    for data, _ in QuicConnection.datagrams_to_send(engine, sim.now):
        sim.server.receive_datagram(data, CLIENT_ADDR, sim.now)
    sim.run_until(lambda: sim.server_app.closed is not None, timeout=5)
    closed = sim.server_app.closed
    assert isinstance(closed, ConnectionTerminated) and not closed.application
    assert closed.code == 0xA  # PROTOCOL_VIOLATION


def test_early_bytes_on_a_flow_stream_are_read_and_forgotten() -> None:
    sim = udp_sim()
    flow_id = open_flow(sim)
    stream_id = sim.server_tunnel._flows.stream_of(flow_id)  # type: ignore[union-attr]
    assert stream_id is not None
    sim.client._quic.send_stream_data(stream_id, b"reserved")  # below the tunnel
    sim.touch(sim.client)
    sim.run_for(0.1)
    assert not sim.server_app.of_type(DataReceived)
    assert sim.server_tunnel._quic._consumed.get(stream_id, 0) >= len(b"reserved")
    assert send(sim, sim.server_tunnel, flow_id, b"still open") is None


def test_a_setup_nobody_decides_times_out_and_ends_on_both_sides() -> None:
    sim = udp_sim()
    sim.client_app.flow_route = lambda request: None  # the application never decides
    flow_id = open_flow(sim, wait=False)
    sim.run_until(lambda: sim.client_app.of_type(FlowRequested), timeout=5)
    assert sim.client.datagram_counters().drops == {}
    sim.run_for(LIMITS.negotiation_timeout + 1)
    (opener_end,) = flow_events(sim.server_app, FlowEnded, flow_id)
    assert opener_end.cause is FlowEnd.REFUSED  # type: ignore[attr-defined]
    assert "timed out" in opener_end.reason  # type: ignore[attr-defined]
    (acceptor_end,) = flow_events(sim.client_app, FlowEnded, flow_id)
    assert acceptor_end.cause is FlowEnd.RESET  # type: ignore[attr-defined]
    sim.client.accept_flow(flow_id, sim.now)  # too late: a no-op, as for streams
    sim.touch(sim.client)
    sim.run_for(0.1)
    assert sim.client_app.closed is None
