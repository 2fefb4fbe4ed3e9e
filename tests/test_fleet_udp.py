"""UDP ports in a fleet (docs/fleet.md, docs/protocol.md 3.16.1): real ``snocat server
--registry --udp-ports`` nodes on 127.0.0.2 and 127.0.0.3, a real valkey-server, a real
client with a UDP echo target, and visitors' UDP sockets on loopback.

The client is on node 0; its UDP port is open on node 1 too, which relays each visitor
address over the node link as a flow of its own and sends the replies from the port."""

from __future__ import annotations

import functools
import hashlib
import random
import socket
import struct
import time

import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    Lab,
    Snocat,
    free_port_range,
    lab_fixture,
    udp_echo_port,
    wait_until,
)
from fleet_harness import Fleet, make_fleet, node_host
from store_harness import Store, store_binary, store_fixture  # noqa: F401 (fixtures)

NODES = (node_host(0), node_host(1))


@pytest.fixture(name="fleet")
def fleet_fixture(lab: Lab, store: Store) -> Fleet:
    return make_fleet(lab, store)


def free_udp_range_on(hosts: tuple[str, ...], count: int) -> tuple[int, int]:
    """``count`` consecutive ports free for TCP and UDP on every one of ``hosts``."""
    for _ in range(100):
        start, end = free_port_range(count)
        socks: list[socket.socket] = []
        try:
            for host in hosts:
                for port in range(start, end + 1):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(sock)
                    sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return start, end
    raise RuntimeError("no free UDP range")


def numbered(tag: int, seq: int) -> bytes:
    """A datagram that says whose and which it is, and carries its own SHA-256."""
    body = random.Random(tag * 1_000_003 + seq).randbytes(16 + seq % 1000)
    return struct.pack("!HI", tag, seq) + hashlib.sha256(body).digest() + body


def check(data: bytes) -> tuple[int, int]:
    """(tag, seq) of an intact :func:`numbered` datagram; fails if it is damaged."""
    tag, seq = struct.unpack("!HI", data[:6])
    assert hashlib.sha256(data[38:]).digest() == data[6:38], f"datagram {tag}/{seq} is damaged"
    assert data == numbered(tag, seq)
    return tag, seq


class Visitor:
    """A visitor's UDP socket: sends to one node's port, and checks where replies
    come from."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.target = (host, port)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.sources: set[tuple[str, int]] = set()

    def close(self) -> None:
        self.sock.close()

    def ask(self, data: bytes, timeout: float) -> bytes | None:
        """Send ``data`` and wait for one reply (None if none comes in ``timeout``)."""
        self.sock.sendto(data, self.target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.sources.add(source[:2])
            return reply
        return None

    def exchange(self, tag: int, count: int, window: int = 16) -> dict[int, bytes]:
        """Send ``count`` numbered datagrams, ``window`` at a time, asking again (up to
        five rounds) for any whose echo did not come: the echoes by sequence number."""
        received: dict[int, bytes] = {}
        for _ in range(5):
            missing = [seq for seq in range(count) if seq not in received]
            if not missing:
                break
            for start in range(0, len(missing), window):
                batch = missing[start : start + window]
                for seq in batch:
                    self.sock.sendto(numbered(tag, seq), self.target)
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and not all(s in received for s in batch):
                    try:
                        reply, source = self.sock.recvfrom(65535)
                    except TimeoutError:
                        continue
                    self.sources.add(source[:2])
                    got_tag, seq = check(reply)
                    assert got_tag == tag, f"visitor {tag} got visitor {got_tag}'s datagram"
                    received[seq] = reply
        return received


def start_udp_nodes(fleet: Fleet, udp_range: tuple[int, int], count: int = 2) -> list[Snocat]:
    return [
        fleet.start_node(i, "--udp-ports", f"{udp_range[0]}:{udp_range[1]}") for i in range(count)
    ]


def start_udp_client(
    fleet: Fleet, echo_port: int, node: int, *, public: int | None = None, name: str = "alpha"
) -> Snocat:
    token = None
    if name == "beta":
        token = fleet.lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
    target = f"127.0.0.1:{echo_port}" if public is None else f"{public}=127.0.0.1:{echo_port}"
    return fleet.start_client(
        echo_port, node, token=token, extra=("--udp-target", target, "--json", "--no-reconnect")
    )


def udp_grant(client: Snocat, timeout: float = 30.0) -> int:
    """The public UDP port the client was granted."""

    def granted() -> int | None:
        for event in client.events():
            if event.get("event") == "port_granted" and event.get("protocol") == "udp":
                return int(str(event["port"]))
        return None

    wait_until(lambda: granted() is not None, timeout, "a UDP port")
    port = granted()
    assert port is not None
    return port


def reachable(host: str, port: int, timeout: float = 20.0) -> None:
    """Wait until a datagram to ``host:port`` is echoed."""
    visitor = Visitor(host, port)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if visitor.ask(b"ping", 0.5) == b"ping":
                return
        raise AssertionError(f"no echo from {host}:{port} in {timeout} s")
    finally:
        visitor.close()


def silent(host: str, port: int, tries: int = 3) -> bool:
    """Whether datagrams to ``host:port`` get no answer (a few tries)."""
    visitor = Visitor(host, port)
    try:
        return all(visitor.ask(b"anyone?", 0.5) is None for _ in range(tries))
    finally:
        visitor.close()


def udp_bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def udp_flows_opened(node: Snocat) -> list[dict[str, object]]:
    return [e for e in node.events() if e.get("event") == "udp_flow_opened"]


def test_a_udp_port_reaches_its_tunnel_through_every_node(fleet: Fleet) -> None:
    """(a) 500 numbered datagrams through each node come back intact, from the port they
    were sent to; (b) two visitors through the other node stay two flows, each with its
    own address at the node that holds the tunnel."""
    udp_range = free_udp_range_on(NODES, 4)
    nodes = start_udp_nodes(fleet, udp_range)
    with udp_echo_port() as echo_port:
        client = start_udp_client(fleet, echo_port, 0)
        port = udp_grant(client)
        assert udp_range[0] <= port <= udp_range[1]
        assert fleet.store.keys(f"snocat:udp:{port}") == [f"snocat:udp:{port}"]
        wait_until(
            lambda: any(
                e.get("change") == "port_claimed" and e.get("protocol") == "udp"
                for e in nodes[1].events()
            ),
            10,
            "node 1 told of the UDP claim",
        )
        for index, host in enumerate(NODES):
            reachable(host, port)
            visitor = Visitor(host, port)
            try:
                received = visitor.exchange(index + 1, 500)
            finally:
                visitor.close()
            assert sorted(received) == list(range(500)), 500 - len(received)
            assert visitor.sources == {(host, port)}
        # Two visitors at once through node 1: each gets only its own datagrams back.
        first, second = Visitor(NODES[1], port), Visitor(NODES[1], port)
        try:
            for round_ in range(3):
                for tag, visitor in ((10, first), (11, second)):
                    got = visitor.exchange(tag, 50 + round_)
                    assert sorted(got) == list(range(50 + round_))
            # The node that holds the tunnel made each its own flow, under its own
            # address, and the client was told who each is.
            for process in (nodes[0], client):
                seen = {str(e.get("visitor")) for e in udp_flows_opened(process)}
                assert {first.address, second.address} <= seen, seen
        finally:
            first.close()
            second.close()
        assert all(e.get("port") == port for e in udp_flows_opened(nodes[0]))
        for node in nodes:
            assert "Traceback" not in "\n".join(node.stderr)


def test_a_udp_port_is_unique_in_the_fleet_and_released_on_every_node(fleet: Fleet) -> None:
    """(c) a client of another name asking for the port, through the other node, is
    refused; (d) once the client leaves, neither node answers on the port, and a new
    client gets it."""
    udp_range = free_udp_range_on(NODES, 4)
    nodes = start_udp_nodes(fleet, udp_range)
    with udp_echo_port() as echo_port:
        client = start_udp_client(fleet, echo_port, 0)
        port = udp_grant(client)
        reachable(NODES[1], port)
        rival = start_udp_client(fleet, echo_port, 1, public=port, name="beta")
        assert rival.popen.wait(30) == 2
        assert f"UDP port {port} is in use by another tunnel on node node-0" in "\n".join(
            rival.stderr
        )
        assert fleet.store.keys("snocat:name:beta") == []
        # The first client leaves: the claim goes, and both nodes close the port.
        client.stop()
        wait_until(lambda: not fleet.store.keys(f"snocat:udp:{port}"), 10, "the UDP claim gone")
        assert fleet.store.keys("snocat:udp-sticky:*") == [
            f"snocat:udp-sticky:alpha 127.0.0.1:{echo_port}"
        ]
        # Both nodes closed their socket on it: it can be bound on either address.
        for host in NODES:
            wait_until(functools.partial(udp_bindable, host, port), 10, f"{host}:{port} closed")
            assert silent(host, port), host
        # And it is free again: a new client, through node 1, asks for it and has it.
        newcomer = start_udp_client(fleet, echo_port, 1, public=port, name="beta")
        assert udp_grant(newcomer) == port
        for host in NODES:
            reachable(host, port)
        newcomer.stop()
        for node in nodes:
            assert "Traceback" not in "\n".join(node.stderr)


def test_the_store_gone_refuses_new_udp_ports_cleanly(fleet: Fleet) -> None:
    """(e) the store vanishes: an existing UDP port goes on through both nodes, a new
    client's UDP port is refused with "ask again later" (it asks again), no node
    crashes; once the store is back, the new client gets its port."""
    udp_range = free_udp_range_on(NODES, 4)
    nodes = start_udp_nodes(fleet, udp_range)
    with udp_echo_port() as echo_port:
        client = start_udp_client(fleet, echo_port, 0)
        port = udp_grant(client)
        reachable(NODES[1], port)
        fleet.store.kill()
        for node in nodes:
            node.wait_event("fleet_degraded", timeout=15)
        beta = fleet.lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
        waiting = fleet.start_client(
            echo_port, 1, token=beta, extra=("--udp-target", f"127.0.0.1:{echo_port}", "--json")
        )

        # The refusal comes after the claim has waited for the store (10 s).
        def udp_denials() -> list[dict[str, object]]:
            return [
                e
                for e in nodes[1].events()
                if e.get("event") == "port_denied" and e.get("protocol") == "udp"
            ]

        wait_until(lambda: bool(udp_denials()), 40, "the UDP port refused")
        reason = str(udp_denials()[0]["reason"])
        assert reason == "the fleet's registry is unreachable; ask again later", reason
        for host in NODES:
            reachable(host, port, timeout=10)
        assert waiting.popen.poll() is None
        assert not any(
            e.get("event") == "port_granted" and e.get("protocol") == "udp"
            for e in waiting.events()
        )
        fleet.store.start()
        other = udp_grant(waiting, timeout=60)
        assert other != port
        for host in NODES:
            reachable(host, other)
        for node in nodes:
            assert node.popen.poll() is None
            assert "Traceback" not in "\n".join(node.stderr)


def test_a_relayed_flow_queues_a_bounded_number_while_its_stream_opens(fleet: Fleet) -> None:
    """A visitor's first 100 datagrams through node 1 arrive before node 1 has a link to
    node 0 (links are made on first use): 16 (``udp_flow_queue``) wait for the flow's
    stream, the rest are dropped and counted (``queue_full``), and node 1 reports the
    drops, under the holder's tunnel, once the flow ends."""
    udp_range = free_udp_range_on(NODES, 4)
    nodes = start_udp_nodes(fleet, udp_range)
    with udp_echo_port() as echo_port:
        client = start_udp_client(fleet, echo_port, 0)
        port = udp_grant(client)
        # Node 1 opens the port once it has seen the claim (nothing is sent until then).
        wait_until(lambda: not udp_bindable(NODES[1], port), 15, "node 1 to open the port")
        visitor = Visitor(NODES[1], port)
        try:
            for seq in range(100):
                visitor.sock.sendto(numbered(7, seq), visitor.target)
            echoed: set[int] = set()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(echoed) < 16:
                try:
                    reply, _ = visitor.sock.recvfrom(65535)
                except TimeoutError:
                    continue
                echoed.add(check(reply)[1])
        finally:
            visitor.close()
        assert 1 <= len(echoed) <= 100
        client.stop()  # the tunnel's flow ends, so does the relayed one
        dropped = nodes[1].wait_event("udp_dropped", timeout=15)
        drops = dropped["drops"]
        assert isinstance(drops, dict) and drops.get("queue_full", 0) > 0, dropped
        assert (dropped["port"], dropped["name"]) == (port, "alpha")
        assert len(echoed) + sum(drops.values()) == 100, (len(echoed), drops)
