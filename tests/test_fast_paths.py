"""The shortcuts taken for speed keep their meaning.

The endpoint keeps a heap of deadlines instead of asking every tunnel; a tunnel
caches its send-buffered total and indexes its streams; a read coalesces queued
chunks; the datagram size is configurable.  Each is checked against the slow,
obvious answer.
"""

from __future__ import annotations

from collections import deque

import pytest
from netsim import Simulation, Writer, digest, payload, pump_all

from snocat_proto._service.config import ClientConfig, ServerConfig
from snocat_proto._service.stream_handle import StreamHandle
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import ClientCredentials, SimpleAckConnector, SimpleAckListener
from snocat_proto._wire.events import AuthenticationCompleted, StreamAccepted, StreamRequested
from snocat_proto._wire.targets import ProxyTcpTarget

ADDRESS = RouteAddress.of("svc")


def test_endpoint_deadline_is_the_earliest_of_its_tunnels() -> None:
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    for i in range(4):
        sim.add_client(("10.0.0.9", 41000 + i), SimpleAckConnector())

    def earliest_matches() -> None:
        timers = [t.get_timer() for t in sim.server.tunnels]
        expected = min((t for t in timers if t is not None), default=None)
        assert sim.server.get_timer() == expected

    sim.checks.append(earliest_matches)
    end = sim.now + 30  # handshakes, authentication, keep-alives
    while sim.now < end:
        sim.step(until=end)
    assert len(list(sim.server.tunnels)) == 5


def test_many_streams_keep_writable_and_deliver() -> None:
    """Send-buffer accounting with a cached total: every stream completes intact."""
    sim = Simulation(server_auth=SimpleAckListener, client_auth=SimpleAckConnector())
    sim.run_until(lambda: bool(sim.client_app.of_type(AuthenticationCompleted)))
    data = {i: payload(200_000 + i, seed=i) for i in range(8)}
    stream_ids = [sim.client.open_stream(ADDRESS) for _ in range(8)]
    sim.flush()
    sim.run_until(lambda: len(sim.client_app.of_type(StreamAccepted)) == 8)
    pump_all(sim, [Writer(sim, sim.client, sid, data[i]) for i, sid in enumerate(stream_ids)])
    sim.run_until(lambda: len(sim.server_app.ended) == 8)
    assert len(sim.server_app.of_type(StreamRequested)) == 8
    for i, stream_id in enumerate(stream_ids):
        assert digest(sim.server_app.received[stream_id]) == digest(data[i])


class _Tunnel:
    def __init__(self) -> None:
        self.acknowledged = 0

    def acknowledge_received_data(self, stream_id: int, amount: int) -> None:
        self.acknowledged += amount


def test_read_coalesces_queued_chunks_up_to_max_bytes() -> None:
    tunnel = _Tunnel()
    handle = StreamHandle(tunnel, 0, ADDRESS, accepted=True)  # type: ignore[arg-type]
    handle._chunks = deque([b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 5])
    assert handle.read(25) == b"a" * 10 + b"b" * 10
    assert handle.read(100) == b"c" * 10 + b"d" * 5
    handle._chunks = deque([b"x" * 30, b"y"])
    assert handle.read(20) == b"x" * 20
    assert handle.read(20) == b"x" * 10 + b"y"
    assert tunnel.acknowledged == 35 + 31


def test_max_datagram_size_is_validated() -> None:
    base = {"certificate_pem": b"", "private_key_pem": b""}
    # By default a ceiling for path MTU discovery; without it, the one size, 1200.
    assert ServerConfig(**base).datagram_size == 16384  # type: ignore[arg-type]
    assert ServerConfig(**base, path_mtu_discovery=False).datagram_size == 1200  # type: ignore[arg-type]
    assert ServerConfig(**base, max_datagram_size=9000).datagram_size == 9000  # type: ignore[arg-type]
    for bad in (1199, 65528):
        with pytest.raises(ValueError, match="max_datagram_size"):
            ServerConfig(**base, max_datagram_size=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_datagram_size"):
            ClientConfig(
                server_host="127.0.0.1",
                server_port=9090,
                server_name="localhost",
                targets=(ProxyTcpTarget.parse_host_port("127.0.0.1:80"),),
                credentials=ClientCredentials.simple_ack(),
                max_datagram_size=bad,
            )
