"""UDP over the tunnel end to end (``udp-datagrams``, docs/protocol.md 3.17): a real
aggregator with a UDP range, a real client with UDP targets, real QUIC handshakes over
loopback and real UDP sockets for the visitors and the targets, on asyncio and trio."""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from test_anyio_client import (
    STEP,
    aggregator,
    client_config,
    exchange,
    free_port_range,
    next_of,
    public_port,
    running_client,
    tcp_target,
    wait_until,
)
from test_faults import LossyRelay

from snocat_anyio import TunnelClient, TunnelServer
from snocat_anyio._errors import PortRefusedError
from snocat_proto._service import activity
from snocat_proto._service.aggregator import server_endpoint
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.auth import SCHEME_SIMPLE_ACK, ClientCredentials
from snocat_proto._wire.features import UDP_DATAGRAMS
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import port_of
from snocat_proto._wire.udp_flows import UdpTarget

pytestmark = pytest.mark.anyio


# Helpers ------------------------------------------------------------------------


def free_udp_range(count: int) -> PortRange:
    """``count`` consecutive ports free for TCP and UDP on 127.0.0.1 right now."""
    for _ in range(50):
        candidate = free_port_range(count)
        socks = []
        try:
            for port in candidate:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return candidate
    raise RuntimeError("no free UDP range")


@asynccontextmanager
async def udp_echo(
    transform: Callable[[bytes], bytes | None] | None = None,
) -> AsyncIterator[UdpTarget]:
    """A UDP target that answers each datagram with itself (or ``transform(data)``)."""
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as sock:
        port = sock.extra(anyio.abc.SocketAttribute.local_port)

        async def serve() -> None:
            async for data, addr in sock:
                reply = data if transform is None else transform(data)
                if reply is not None:
                    await sock.sendto(reply, *addr[:2])

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                yield UdpTarget.parse_host_port(f"127.0.0.1:{port}")
            finally:
                tg.cancel_scope.cancel()


def udp_port(client: TunnelClient, target: UdpTarget) -> int:
    return port_of(client.grants[target])


@asynccontextmanager
async def udp_setup(
    identity: Any,
    *,
    server: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
    transform: Callable[[bytes], bytes | None] | None = None,
) -> AsyncIterator[tuple[TunnelServer, TunnelClient, UdpTarget, int]]:
    async with (
        udp_echo(transform) as target,
        aggregator(identity, udp_port_range=free_udp_range(4), **(server or {})) as srv,
        running_client(
            client_config(srv, identity, (), udp_targets=(target,), **(client or {}))
        ) as cli,
    ):
        yield srv, cli, target, udp_port(cli, target)


def numbered(seq: int, size: int) -> bytes:
    """A datagram that says which it is and carries its own checksum."""
    body = random.Random(seq).randbytes(size)
    return struct.pack("!I", seq) + hashlib.sha256(body).digest()[:8] + body


def check(data: bytes) -> int:
    """The sequence number of an intact :func:`numbered` datagram (fails if damaged)."""
    seq = struct.unpack("!I", data[:4])[0]
    assert hashlib.sha256(data[12:]).digest()[:8] == data[4:12], f"datagram {seq} is damaged"
    assert data == numbered(seq, len(data) - 12)
    return int(seq)


async def exchange_datagrams(
    visitor: anyio.abc.ConnectedUDPSocket,
    sequence: range,
    sizes: Callable[[int], int],
    *,
    window: int = 32,
    wait: float = 1.0,
) -> tuple[set[int], int]:
    """Send each numbered datagram of ``sequence``, ``window`` at a time, and read the
    echoes: the sequence numbers that came back (each checked) and how many came back
    twice."""
    received: set[int] = set()
    duplicates = 0
    for start in range(sequence.start, sequence.stop, window):
        batch = range(start, min(start + window, sequence.stop))
        for seq in batch:
            await visitor.send(numbered(seq, sizes(seq)))
        with anyio.move_on_after(wait):
            while not all(seq in received for seq in batch):
                seq = check(await visitor.receive())
                duplicates += seq in received
                received.add(seq)
    return received, duplicates


async def visitor_socket(port: int) -> anyio.abc.ConnectedUDPSocket:
    return await anyio.create_connected_udp_socket("127.0.0.1", port, local_host="127.0.0.1")


# Forwarding ---------------------------------------------------------------------


async def test_ten_thousand_datagrams_of_mixed_sizes_come_back_intact(
    server_identity: Any,
) -> None:
    async with udp_setup(server_identity) as (server, client, target, port):
        assert port in server.udp_ports_in_use
        server_feed = server.activity.subscribe()
        rng = random.Random(7)
        sizes = {seq: rng.choice((0, 1, 20, 100, 512, 1000, 1150)) for seq in range(10_000)}
        async with await visitor_socket(port) as visitor:
            with anyio.fail_after(120):
                received, duplicates = await exchange_datagrams(
                    visitor, range(10_000), sizes.__getitem__
                )
        # Loopback loses nothing; the tunnel neither duplicates nor damages.
        assert duplicates == 0
        assert len(received) >= 9_990, 10_000 - len(received)
        opened = await next_of(server_feed, activity.UdpFlowOpened)
        assert opened.port == port and opened.target == f"127.0.0.1:{target.port}"
        granted = [g for g in client.grants if isinstance(g, UdpTarget)]
        assert granted == [target]


async def test_a_hundred_concurrent_visitors_each_get_their_own_datagrams(
    server_identity: Any,
) -> None:
    async with udp_setup(server_identity) as (server, _client, _target, port):
        server_feed = server.activity.subscribe()

        async def visitor(number: int) -> None:
            # 500 datagrams at once are more than the tunnel queues for the congestion
            # window (udp_send_queue): some are dropped, as UDP may; a visitor asks
            # again for what it missed, as a UDP application would.
            async with await visitor_socket(port) as sock:
                wanted = set(range(number * 1000, number * 1000 + 5))
                for _ in range(10):
                    for seq in sorted(wanted):
                        received, _ = await exchange_datagrams(
                            sock, range(seq, seq + 1), lambda s: 50 + s % 200, wait=0.5
                        )
                        wanted -= received
                    if not wanted:
                        break
                assert not wanted

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for number in range(100):
                    tg.start_soon(visitor, number)
        flows = set()
        with anyio.fail_after(STEP):
            async for record in server_feed:
                if isinstance(record, activity.UdpFlowOpened):
                    flows.add(record.visitor)
                    if len(flows) == 100:
                        break


def _dns_query(name: str, query_id: int) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)  # RD, one question
    labels = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", 1, 1)  # A, IN


def _dns_stub(query: bytes) -> bytes | None:
    """A one-record DNS server: every A question is answered 192.0.2.53."""
    query_id, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    end = query.index(b"\0", 12) + 5
    question = query[12:end]
    header = struct.pack("!HHHHHH", query_id, 0x8180, 1, 1, 0, 0)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + socket.inet_aton("192.0.2.53")
    return header + question + answer


async def test_a_dns_query_through_the_tunnel_is_answered(server_identity: Any) -> None:
    async with udp_setup(server_identity, transform=_dns_stub) as (_s, _c, _t, port):
        async with await visitor_socket(port) as visitor:
            with anyio.fail_after(STEP):
                await visitor.send(_dns_query("printer.office.example", 0x1234))
                answer = await visitor.receive()
        query_id, flags, _, ancount = struct.unpack("!HHHH", answer[:8])
        assert (query_id, flags & 0x8000, ancount) == (0x1234, 0x8000, 1)
        assert b"\x07printer\x06office\x07example\x00" in answer
        assert answer.endswith(socket.inet_aton("192.0.2.53"))


async def test_through_a_lossy_path_udp_loses_about_the_path_and_tcp_arrives_intact(
    server_identity: Any,
) -> None:
    """5 % loss each way: a datagram's round trip crosses the path twice (about 10 %
    lost), a TCP transfer on the same tunnel meanwhile arrives intact."""
    async with (
        udp_echo() as udp,
        tcp_target() as tcp,
        aggregator(server_identity, udp_port_range=free_udp_range(4)) as server,
        LossyRelay(server.quic_address, loss=0.05, seed=5) as relay,
        running_client(
            client_config(
                server,
                server_identity,
                (tcp,),
                udp_targets=(udp,),
                server_host=relay.address[0],
                server_port=relay.address[1],
                connect_timeout=15.0,
            )
        ) as client,
    ):
        port = udp_port(client, udp)
        results: dict[str, Any] = {}

        async def datagrams() -> None:
            async with await visitor_socket(port) as visitor:
                results["udp"] = await exchange_datagrams(
                    visitor, range(2_000), lambda s: 200, wait=0.5
                )

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(datagrams)
                await exchange(public_port(client), 1_000_000, 500_000, seed=3)
        received, duplicates = results["udp"]
        lost = 1 - len(received) / 2_000
        assert duplicates == 0
        # Two crossings at 5 %: 9.75 % expected; generous bounds for one run.
        assert 0.03 < lost < 0.25, lost
        assert relay.stats.dropped > 0
        assert len(server.tunnels()) == 1


# Bounds -------------------------------------------------------------------------


async def test_an_oversized_datagram_is_dropped_and_counted_and_idle_flows_expire(
    server_identity: Any,
) -> None:
    short = {"limits": Limits(udp_flow_idle_timeout=0.5)}
    # Only the aggregator's flows expire this soon: its own clock ends them (idle).
    async with udp_setup(server_identity, server=short) as (server, _c, _t, port):
        feed = server.activity.subscribe()
        async with await visitor_socket(port) as visitor:
            with anyio.fail_after(STEP):
                # Over the 16,384-byte ceiling path MTU discovery grows datagrams to.
                await visitor.send(b"x" * 17_000)
                await visitor.send(b"small")
                assert await visitor.receive() == b"small"
            closed = await next_of(feed, activity.UdpFlowClosed)
            assert closed.cause == "idle"
            assert closed.drops == {"too_big": 1}
            assert (closed.datagrams_out, closed.datagrams_in) == (1, 1)
            assert (closed.bytes_out, closed.bytes_in) == (5, 5)
            # The visitor's next datagram opens a new flow.
            with anyio.fail_after(STEP):
                await visitor.send(b"again")
                assert await visitor.receive() == b"again"
            reopened = await next_of(feed, activity.UdpFlowOpened)
            assert reopened.flow_id > closed.flow_id


async def test_spoofed_sources_at_the_flow_limit_give_way_to_a_real_visitor(
    server_identity: Any,
) -> None:
    """Eight one-datagram sources fill the tunnel's eight flows; a visitor that comes
    while they are fresh is dropped (flow_limit), one that comes once they have been
    quiet for udp_flow_evict_after ends the quietest and is answered."""
    tight = {"limits": Limits(udp_max_flows=8, udp_flow_evict_after=1.0)}
    async with udp_setup(server_identity, server=tight) as (server, _c, _t, port):
        feed = server.activity.subscribe()
        spoofed = [await visitor_socket(port) for _ in range(8)]
        for number, sock in enumerate(spoofed):
            await sock.send(b"spoof %d" % number)
            with anyio.fail_after(STEP):
                assert await sock.receive() == b"spoof %d" % number
        async with await visitor_socket(port) as real:
            await real.send(b"too soon")
            with anyio.move_on_after(0.3):
                await real.receive()
                raise AssertionError("a ninth flow while eight were fresh")
            await anyio.sleep(1.2)
            with anyio.fail_after(STEP):
                await real.send(b"hello")
                assert await real.receive() == b"hello"
        closed = await next_of(feed, activity.UdpFlowClosed)
        assert closed.cause == "evicted" and closed.visitor.endswith(
            str(spoofed[0].extra(anyio.abc.SocketAttribute.local_port))
        )
        for sock in spoofed:
            await sock.aclose()


async def test_without_path_mtu_discovery_1169_bytes_cross_and_1170_are_dropped(
    server_identity: Any,
) -> None:
    fixed: dict[str, Any] = {"path_mtu_discovery": False}
    short = {**fixed, "limits": Limits(udp_flow_idle_timeout=0.5)}
    async with udp_setup(server_identity, server=short, client=fixed) as (server, *_, port):
        feed = server.activity.subscribe()
        async with await visitor_socket(port) as visitor:
            with anyio.fail_after(STEP):
                await visitor.send(b"a" * 1170)  # the documented limit, plus one
                await visitor.send(b"b" * 1169)
                assert await visitor.receive() == b"b" * 1169
            closed = await next_of(feed, activity.UdpFlowClosed)
            assert closed.drops == {"too_big": 1}
            assert (closed.bytes_out, closed.bytes_in) == (1169, 1169)


async def test_path_mtu_discovery_raises_the_payload_limit_on_a_path_that_carries_it(
    server_identity: Any,
) -> None:
    # Loopback carries 64 KiB: within seconds 8,000-byte payloads fit one packet.
    async with udp_setup(server_identity) as (*_, port), await visitor_socket(port) as visitor:
        big = random.Random(8).randbytes(8_000)
        with anyio.fail_after(30):
            while True:
                await visitor.send(big)
                with anyio.move_on_after(0.25):
                    reply = await visitor.receive()
                    assert hashlib.sha256(reply).digest() == hashlib.sha256(big).digest()
                    break


async def test_a_flood_is_held_to_the_rate_while_tcp_keeps_flowing(server_identity: Any) -> None:
    slow: dict[str, Any] = {"limits": Limits(udp_datagrams_per_second=500.0)}
    async with (
        udp_echo() as udp,
        tcp_target() as tcp,
        aggregator(server_identity, udp_port_range=free_udp_range(4), **slow) as server,
        running_client(client_config(server, server_identity, (tcp,), udp_targets=(udp,))) as cl,
    ):
        port = udp_port(cl, udp)
        feed = server.activity.subscribe()
        flooding = True

        async def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(("127.0.0.1", port))
                while flooding:
                    for _ in range(200):
                        try:
                            sock.send(b"f" * 1000)
                        except BlockingIOError:
                            break
                    await anyio.sleep(0.001)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                await anyio.sleep(0.3)
                await exchange(public_port(cl), 2_000_000, 1_000_000, seed=9)
                flooding = False
        # The flood's flow ends with the port: its counts say what the rate held back.
        await cl.aclose()
        closed = await next_of(feed, activity.UdpFlowClosed)
        assert closed.drops.get("over_rate", 0) > 1000
        # 500 a second and a burst of 125: at most a few seconds' worth went out.
        assert closed.datagrams_out < 500 * 30


async def test_a_client_that_goes_away_ends_its_flows_and_frees_its_udp_port(
    server_identity: Any,
) -> None:
    async with (
        udp_echo() as target,
        aggregator(server_identity, udp_port_range=free_udp_range(2)) as server,
    ):
        feed = server.activity.subscribe()
        async with running_client(
            client_config(server, server_identity, (), udp_targets=(target,))
        ) as client:
            port = udp_port(client, target)
            async with await visitor_socket(port) as visitor:
                with anyio.fail_after(STEP):
                    await visitor.send(b"ping")
                    assert await visitor.receive() == b"ping"
        closed = await next_of(feed, activity.UdpFlowClosed)
        assert closed.cause in ("closed", "tunnel closed", "peer closed")
        released = await next_of(feed, activity.PortReleased)
        assert (released.port, released.protocol) == (port, "udp")
        await wait_until(lambda: port not in server.udp_ports_in_use)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rebind:
            rebind.bind(("127.0.0.1", port))  # the aggregator closed it


async def test_a_reconnecting_client_gets_its_udp_port_back(server_identity: Any) -> None:
    async with (
        udp_echo() as target,
        aggregator(server_identity, udp_port_range=free_udp_range(4)) as server,
    ):
        config = client_config(server, server_identity, (), udp_targets=(target,))
        async with running_client(config) as client:
            first = udp_port(client, target)
        async with running_client(config) as client:
            assert udp_port(client, target) == first


async def test_the_client_refuses_a_flow_to_a_target_it_was_not_given(
    server_identity: Any,
) -> None:
    async with udp_setup(server_identity) as (server, client, _target, _port):
        feed = client.activity.subscribe()
        (session,) = server._books.sessions()
        with server._lock:
            flow_id = session.tunnel.open_flow(
                UdpTarget.parse_host_port("127.0.0.1:9"),
                ("203.0.113.7", 4000),
                anyio.current_time(),
            )
            server._flush(session.tunnel)
        refused = await next_of(feed, activity.StreamRefused)
        assert "not in this client's allow-list" in refused.reason
        assert f"udp flow {flow_id}" in refused.address


async def test_a_refused_visitor_is_held_off_instead_of_a_flow_setup_per_round_trip(
    server_identity: Any,
) -> None:
    """A visitor keeps sending while the client refuses its flows (here: the target
    dropped from the client's allow-list after the grant).  Each refusal holds the
    visitor off (1 s, then 2 s, ...) and its datagrams are dropped and counted as
    ``refused``; without the hold each round trip was a new flow setup.  Once the
    client takes flows again, the visitor's next datagram after the hold gets through."""
    async with udp_setup(server_identity) as (server, client, _target, port):
        feed = server.activity.subscribe()
        allowed = set(client._udp_allowed)
        client._udp_allowed.clear()
        visitor = await visitor_socket(port)
        started = anyio.current_time()
        while anyio.current_time() - started < 2.5:
            await visitor.send(b"knock")
            await anyio.sleep(0.005)  # about 500 datagrams
        await anyio.sleep(0.3)
        closed = []
        while (record := feed.get_nowait()) is not None:
            if isinstance(record, activity.UdpFlowClosed):
                closed.append(record)
        assert closed and all(record.cause == "refused" for record in closed)
        assert len(closed) <= 3, [round(r.at - closed[0].at, 2) for r in closed]
        (lease,) = [lease for s in server._books.sessions() for lease in s.udp_leases.values()]
        assert lease.drops.get("refused", 0) >= 300

        # The client takes flows again: after the hold (2 s now), the echo comes back.
        client._udp_allowed.update(allowed)
        with anyio.fail_after(10):
            while True:
                await visitor.send(b"hello again")
                with anyio.move_on_after(0.5):
                    assert await visitor.receive() == b"hello again"
                    break
        await visitor.aclose()


async def test_a_client_without_udp_targets_refuses_every_flow(server_identity: Any) -> None:
    async with (
        tcp_target() as tcp,
        aggregator(server_identity, udp_port_range=free_udp_range(2)) as server,
        running_client(client_config(server, server_identity, (tcp,))) as _client,
    ):
        (session,) = server._books.sessions()
        # Neither side offered udp-datagrams: no flows on this tunnel at all.
        assert UDP_DATAGRAMS not in session.tunnel.features
        assert not session.tunnel.flows_enabled


# Negotiation ----------------------------------------------------------------------


def test_udp_datagrams_is_offered_only_by_a_token_side_that_serves_udp(
    server_identity: Any,
) -> None:
    base = {
        "certificate_pem": server_identity.certificate_pem,
        "private_key_pem": server_identity.private_key_pem,
    }
    from snocat_anyio import ServerConfig

    plain = ServerConfig(**base)
    udp = ServerConfig(**base, udp_port_range=PortRange(9000, 9001))
    compat = ServerConfig(**base, udp_port_range=PortRange(9000, 9001), auth=SCHEME_SIMPLE_ACK)
    assert UDP_DATAGRAMS not in plain.features and not plain.datagrams
    assert UDP_DATAGRAMS in udp.features and udp.datagrams
    # SimpleAck (what snocat 0.8 speaks): no transport parameter, no addition.
    assert not compat.datagrams
    for config, size in ((plain, None), (compat, None), (udp, 65535)):
        endpoint = server_endpoint(config, lambda name: None)  # type: ignore[arg-type,return-value]
        assert endpoint._configuration.max_datagram_frame_size == size


async def test_a_simple_ack_client_cannot_publish_udp(server_identity: Any) -> None:
    """SimpleAck (a snocat 0.8 aggregator speaks nothing else) never agrees on
    udp-datagrams: a UDP target is refused, with the reason, rather than sent as TCP."""
    async with (
        udp_echo() as target,
        aggregator(
            server_identity, udp_port_range=free_udp_range(2), auth=SCHEME_SIMPLE_ACK
        ) as server,
    ):
        config = client_config(
            server,
            server_identity,
            (),
            udp_targets=(target,),
            credentials=ClientCredentials.simple_ack(),
            reconnect=False,
        )
        with anyio.fail_after(STEP), pytest.raises(PortRefusedError, match="udp-datagrams"):
            await TunnelClient(config).run()
        assert not server.udp_ports_in_use


async def test_an_aggregator_without_udp_ports_refuses_a_udp_target_with_the_reason(
    server_identity: Any,
) -> None:
    async with udp_echo() as target, aggregator(server_identity) as server:
        config = client_config(server, server_identity, (), udp_targets=(target,), reconnect=False)
        with anyio.fail_after(STEP), pytest.raises(PortRefusedError, match="udp-datagrams"):
            await TunnelClient(config).run()


def test_a_fleet_node_serves_a_udp_range(server_identity: Any) -> None:
    """A fleet serves UDP ports too (tests/test_fleet_udp.py runs one)."""
    from snocat_anyio import FleetConfig, FleetServer, ServerConfig

    fleet = FleetConfig(
        registry_url="redis://127.0.0.1:6379/0",
        node="n1",
        advertise=("127.0.0.1", 9),
        secret=b"0123456789abcdef",
    )
    config = ServerConfig(
        certificate_pem=server_identity.certificate_pem,
        private_key_pem=server_identity.private_key_pem,
        udp_port_range=PortRange(9000, 9001),
        fleet=fleet,
    )
    assert UDP_DATAGRAMS in config.features
    FleetServer(config)
