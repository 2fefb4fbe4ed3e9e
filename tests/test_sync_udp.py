"""UDP over the tunnel with snocat_sync, the blocking binding (``udp-datagrams``,
docs/protocol.md 3.17): its server and its client, each with the other binding too,
real QUIC over loopback and real UDP visitors and targets; no thread or socket is
left behind (``test_sync.no_threads_left``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cli_harness import udp_echo_port
from test_sync import (  # noqa: F401 (the fixture)
    STEP,
    anyio_server,
    client_config,
    no_threads_left,
    portal,
    sync_server,
    wait_until,
)
from test_udp_tunnel import check, free_udp_range, numbered

from snocat_proto._wire.network import port_of
from snocat_proto._wire.udp_flows import UdpTarget
from snocat_sync import TunnelClient


@contextmanager
def udp_echo() -> Iterator[UdpTarget]:
    """A UDP target in a thread that answers each datagram with itself."""
    with udp_echo_port() as port:
        yield UdpTarget.parse_host_port(f"127.0.0.1:{port}")


def echo_through(port: int, count: int) -> set[int]:
    """``count`` numbered datagrams of mixed sizes to ``port``, one at a time; the
    echoes that came back, each checked."""
    received: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as visitor:
        visitor.connect(("127.0.0.1", port))
        visitor.settimeout(1.0)
        for seq in range(count):
            visitor.send(numbered(seq, (seq * 37) % 1150))
            try:
                received.add(check(visitor.recv(65535)))
            except TimeoutError:
                continue
    return received


def test_sync_server_and_client_carry_udp_both_ways(server_identity: Any) -> None:
    with (
        udp_echo() as target,
        sync_server(server_identity, udp_port_range=free_udp_range(2)) as server,
    ):
        config = client_config(server.quic_address, server_identity, (), udp_targets=(target,))
        client = TunnelClient(config)
        client.start(timeout=STEP)
        try:
            port = port_of(client.grants[target])
            assert server.udp_ports_in_use == {port}
            received = echo_through(port, 500)
            assert len(received) >= 498
        finally:
            client.close()
        wait_until(lambda: not server.udp_ports_in_use)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rebind:
            rebind.bind(("127.0.0.1", port))


def test_sync_client_through_the_anyio_server_carries_udp(server_identity: Any) -> None:
    with (
        udp_echo() as target,
        portal() as loop,
        anyio_server(loop, server_identity, udp_port_range=free_udp_range(2)) as server,
    ):
        config = client_config(server.quic_address, server_identity, (), udp_targets=(target,))
        client = TunnelClient(config)
        client.start(timeout=STEP)
        try:
            assert len(echo_through(port_of(client.grants[target]), 200)) >= 198
        finally:
            client.close()


@pytest.mark.parametrize("visitors", [20])
def test_sync_server_serves_concurrent_visitors(server_identity: Any, visitors: int) -> None:
    with (
        udp_echo() as target,
        sync_server(server_identity, udp_port_range=free_udp_range(2)) as server,
    ):
        client = TunnelClient(
            client_config(server.quic_address, server_identity, (), udp_targets=(target,))
        )
        client.start(timeout=STEP)
        try:
            port = port_of(client.grants[target])
            results: list[int] = []
            threads = [
                threading.Thread(target=lambda: results.append(len(echo_through(port, 50))))
                for _ in range(visitors)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert len(results) == visitors and min(results) >= 48
        finally:
            client.close()
