"""A fleet of aggregator nodes: real ``snocat server --registry`` processes, a real
valkey-server, clients and visitors on loopback (docs/fleet.md).

Nodes listen on 127.0.0.2, 127.0.0.3, ... with the same port numbers; a client on
one node is reached through every other.  The fault tests kill, pause and restart
nodes and the store, and say how long recovery took.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import signal
import socket
import ssl
import time
from pathlib import Path

import anyio
import pytest
from cli_harness import (  # noqa: F401 (fixtures)
    TOKEN,
    Lab,
    Snocat,
    Website,
    assert_one_line_error,
    free_port_range,
    lab_fixture,
    public_port,
    wait_until,
    website_fixture,
)
from conftest import Identity
from fleet_harness import (
    LEASE,
    Fleet,
    StoreProxy,
    fetch,
    fetch_until,
    make_fleet,
    node_host,
)
from store_harness import Store, store_binary, store_fixture  # noqa: F401 (fixtures)

from snocat_anyio._host import TunnelHost
from snocat_proto import Limits
from snocat_proto._wire.auth import NONCE_SIZE
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.endpoint import ClientEndpoint
from snocat_proto._wire.engine import quic_configuration
from snocat_proto._wire.events import ConnectionTerminated
from snocat_proto._wire.fleet_auth import FLEET_ALPN, FleetConnector
from snocat_proto._wire.network import format_host_port
from snocat_proto._wire.tunnel import TunnelConnection

BIG = "big.bin"
SMALL = "small.bin"


@pytest.fixture(name="fleet")
def fleet_fixture(lab: Lab, store: Store) -> Fleet:
    return make_fleet(lab, store)


def events_of(process: Snocat, change: str) -> list[dict[str, object]]:
    events = process.events()
    return [e for e in events if e.get("event") == "fleet_changed" and e.get("change") == change]


def test_any_node_serves_any_tunnel(fleet: Fleet, website: Website) -> None:
    nodes = [fleet.start_node(i) for i in range(3)]
    client = fleet.start_client(website.port, 0)
    port = public_port(client)
    # Every node listens on the port (its own address) once it has seen the claim.
    for index in range(3):
        took = fetch_until(node_host(index), port, BIG, website.digests[BIG], timeout=15)
        print(f"node {index}: first good fetch of {BIG} after {took:.2f} s")
    # 100 connections at once, spread over the three nodes, every body intact.
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        digests = list(pool.map(lambda i: fetch(node_host(i % 3), port, SMALL), range(100)))
    assert digests == [website.digests[SMALL]] * 100
    # The other nodes told their --json readers about the tunnel and its port.
    wait_until(lambda: bool(events_of(nodes[2], "tunnel_registered")), 10, "tunnel_registered")
    wait_until(lambda: bool(events_of(nodes[2], "port_claimed")), 10, "port_claimed")
    registered = events_of(nodes[2], "tunnel_registered")[0]
    assert registered["name"] == "alpha" and registered["node"] == "node-0"
    client.stop()
    for node in nodes:
        node.stop()
    assert fleet.store.keys("snocat:port:*") == []
    assert fleet.store.keys("snocat:name:*") == []
    assert fleet.store.keys("snocat:node:*") == []


def test_ports_are_unique_across_the_fleet(fleet: Fleet, website: Website) -> None:
    for index in range(2):
        fleet.start_node(index)
    beta = fleet.lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
    # The range's last port: each client's default target takes any free port, the
    # lowest first, and on a loaded machine one of them could take the first port
    # before either client's request for it (both were then refused, rightly: an
    # operator keeps wanted ports out of the range that is handed out).
    wanted = fleet.ports[-1]
    # Two clients of two names on two nodes ask for one port at the same moment.
    alpha = fleet.start_client(
        website.port, 0, extra=("--no-reconnect", "--target", f"{wanted}=127.0.0.1:1")
    )
    other = fleet.start_client(
        website.port, 1, token=beta, extra=("--no-reconnect", "--target", f"{wanted}=127.0.0.1:2")
    )
    outcomes = {}
    for name, process in (("alpha", alpha), ("beta", other)):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                outcomes[name] = "refused"
                break
            if sum("public address" in line for line in process.stdout) >= 2:
                outcomes[name] = "granted"
                break
            time.sleep(0.05)
    said = {name: process.stderr[-3:] for name, process in (("alpha", alpha), ("beta", other))}
    assert sorted(outcomes.values()) == ["granted", "refused"], (outcomes, said)
    loser = alpha if outcomes["alpha"] == "refused" else other
    assert loser.popen.wait(5) == 2
    assert f"port {wanted} is in use by another tunnel" in "\n".join(loser.stderr)
    # Without a wanted port, each name gets its own free one.
    alpha.kill()
    other.kill()


def test_a_killed_node_fails_over_with_its_port(fleet: Fleet, website: Website) -> None:
    nodes = [fleet.start_node(i) for i in range(2)]
    client = fleet.start_client(website.port, 0, 1)
    port = public_port(client)
    fetch_until(node_host(1), port, BIG, website.digests[BIG], timeout=15)
    # A download through node 1 (relayed to node 0) is running when node 0 dies.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(fetch, node_host(1), port, BIG)
        time.sleep(0.05)
        killed = time.monotonic()
        nodes[0].kill()
        try:
            digest = running.result(40)
        except (OSError, http.client.HTTPException):
            pass  # it broke with its node: an error, never a wrong body
        else:
            assert digest == website.digests[BIG]
    took = fetch_until(node_host(1), port, BIG, website.digests[BIG], timeout=20)
    since = time.monotonic() - killed
    print(f"kill -9 to the first good fetch through the survivor: {since:.2f} s")
    again = public_port(client, after=1)
    assert again == port
    assert took < 20


def test_the_store_restarted_mid_transfer(fleet: Fleet, website: Website) -> None:
    nodes = [fleet.start_node(i) for i in range(2)]
    client = fleet.start_client(website.port, 0)
    port = public_port(client)
    fetch_until(node_host(1), port, SMALL, website.digests[SMALL], timeout=15)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        direct = pool.submit(fetch, node_host(0), port, BIG)
        relayed = pool.submit(fetch, node_host(1), port, BIG)
        fleet.store.restart()
        assert direct.result(60) == website.digests[BIG]
        assert relayed.result(60) == website.digests[BIG]
    # The nodes set their claims again: the store is rebuilt from what they hold.
    wait_until(lambda: bool(fleet.store.keys(f"snocat:port:{port}")), 10, "the port claim is back")
    wait_until(lambda: bool(fleet.store.keys("snocat:name:alpha")), 10, "the name claim is back")
    assert fetch(node_host(1), port, BIG) == website.digests[BIG]
    # And a new tunnel gets a port.
    beta = fleet.lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
    other = fleet.start_client(website.port, 1, token=beta)
    other_port = public_port(other)
    assert other_port != port
    fetch_until(node_host(0), other_port, SMALL, website.digests[SMALL], timeout=10)
    for node in nodes:
        assert "Traceback" not in "\n".join(node.stderr)


def test_the_store_gone_for_30_seconds(fleet: Fleet, website: Website) -> None:
    nodes = [fleet.start_node(i) for i in range(2)]
    client = fleet.start_client(website.port, 0)
    port = public_port(client)
    fetch_until(node_host(1), port, SMALL, website.digests[SMALL], timeout=15)
    fleet.store.kill()
    gone = time.monotonic()
    for node in nodes:
        node.wait_event("fleet_degraded", timeout=15)
    beta = fleet.lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
    waiting = fleet.start_client(website.port, 1, token=beta)
    # Meanwhile the tunnel goes on, directly and through the other node.
    while time.monotonic() - gone < 30:
        assert fetch(node_host(0), port, SMALL) == website.digests[SMALL]
        assert fetch(node_host(1), port, SMALL) == website.digests[SMALL]
        time.sleep(2)
    assert not any("public address" in line for line in waiting.stdout)
    fleet.store.start()
    back = time.monotonic()
    for node in nodes:
        node.wait_event("fleet_recovered", timeout=20)
    new_port = public_port(waiting, after=0)
    print(f"a new tunnel got its port {time.monotonic() - back:.2f} s after the store came back")
    assert new_port != port
    fetch_until(node_host(0), new_port, SMALL, website.digests[SMALL], timeout=10)
    wait_until(lambda: bool(fleet.store.keys("snocat:name:alpha")), 10, "the old claims are back")


def test_a_paused_node_stops_serving_what_another_took(fleet: Fleet, website: Website) -> None:
    nodes = [fleet.start_node(i) for i in range(2)]
    client = fleet.start_client(website.port, 0, 1)
    port = public_port(client)
    fetch_until(node_host(1), port, SMALL, website.digests[SMALL], timeout=15)
    nodes[0].send(signal.SIGSTOP)
    paused = time.monotonic()
    # The client gives up on the silent node and comes back through node 1, same port.
    assert public_port(client, after=1) == port
    wait_until(lambda: time.monotonic() - paused > 2 * LEASE, 10, "the lease ran out")
    marker = len(nodes[0].stderr)
    nodes[0].send(signal.SIGCONT)
    # On resume node 0 knows it was away, serves no visitor until its claims are
    # confirmed, and finds them node 1's: its own tunnel and listener are gone.
    nodes[0].wait_line("did not run for", stream="stderr", after=marker, timeout=15)
    nodes[0].wait_event("port_released", timeout=15)
    holder = fleet.store.get(f"snocat:port:{port}")
    assert holder is not None and '"node":"node-1"' in holder
    # A visitor at node 0 is relayed to the tunnel on node 1, not served stale.
    fetch_until(node_host(0), port, SMALL, website.digests[SMALL], timeout=15)
    assert fetch(node_host(0), port, BIG) == website.digests[BIG]
    assert fetch(node_host(1), port, BIG) == website.digests[BIG]


def test_two_clients_racing_for_one_name(fleet: Fleet, website: Website) -> None:
    for index in range(2):
        fleet.start_node(index)
    first = fleet.start_client(website.port, 0)
    second = fleet.start_client(website.port, 1)
    # One name, one tunnel: whichever authenticated first is taken over and stops.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ended = [p for p in (first, second) if p.popen.poll() is not None]
        if ended:
            break
        time.sleep(0.1)
    assert len(ended) == 1, (first.describe(), second.describe())
    survivor = second if ended[0] is first else first
    message = "\n".join(ended[0].stderr)
    assert "(code 0x18): a newer tunnel of this name authenticated on another node" in message
    assert ended[0].popen.returncode != 0
    port = public_port(survivor)
    for index in range(2):
        fetch_until(node_host(index), port, SMALL, website.digests[SMALL], timeout=15)


def test_a_stranger_on_the_fleet_alpn_is_refused(fleet: Fleet) -> None:
    node = fleet.start_node(0)

    async def stranger(secret: bytes) -> ConnectionTerminated:
        """A node-to-node link made as a node would, with ``secret``."""
        configuration = quic_configuration(
            is_client=True, limits=Limits(), server_name="localhost", alpn_protocols=(FLEET_ALPN,)
        )
        configuration.verify_mode = ssl.CERT_NONE
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((node_host(0), fleet.quic_port))
        ended = anyio.Event()
        closes: list[ConnectionTerminated] = []

        def on_event(tunnel: object, event: object, stream: object) -> None:
            if isinstance(event, ConnectionTerminated):
                closes.append(event)
                ended.set()

        tunnel = TunnelConnection.connect(
            configuration,
            address=sock.getpeername(),
            authenticator=FleetConnector(
                bytes(NONCE_SIZE), secret=secret, node="mallory", limits=Limits()
            ),
            limits=Limits(),
            now=anyio.current_time(),
        )
        host = TunnelHost(ClientEndpoint(tunnel), sock, on_event)
        try:
            async with anyio.create_task_group() as tg:
                host.start(tg)
                with anyio.fail_after(10):
                    await ended.wait()
                host.stop()
        finally:
            sock.close()
        return closes[0]

    closed = anyio.run(stranger, b"not-the-fleet-secret-at-all")
    assert closed.code == CloseCode.AUTHENTICATION_FAILED
    assert "fleet link refused" in closed.reason
    node.wait_line("fleet link refused: node 'mallory' does not know", stream="stderr", timeout=10)
    # Nothing of it reached the registry, and real tunnels still authenticate.
    assert fleet.store.keys("snocat:name:*") == []


def test_workers_share_the_ports(fleet: Fleet, website: Website) -> None:
    host = node_host(0)
    process = fleet.lab.start(
        "server",
        "--cert",
        str(fleet.certificate),
        "--key",
        str(fleet.key),
        "--quic",
        f"{host}:{fleet.quic_port}",
        "--tcp",
        host,
        "--ports",
        f"{fleet.ports[0]}:{fleet.ports[1]}",
        "--tokens",
        str(fleet.tokens),
        "--registry",
        fleet.store.url,
        "--fleet-token-file",
        str(fleet.fleet_token),
        "--node",
        "box",
        "--workers",
        "2",
    )
    process.wait_line("with 2 workers", stream="stdout")
    wait_until(lambda: len(fleet.store.keys("snocat:node:*")) == 2, 15, "two workers joined")
    clients = []
    for name in ("alpha", "beta"):
        line = TOKEN if name == "alpha" else "beta b3ta-b3ta-b3ta-b3ta-2"
        token = fleet.lab.tokens(f"{name}.w.token", line + "\n")
        clients.append(fleet.start_client(website.port, 0, token=token))
    for client in clients:
        port = public_port(client)
        assert fetch(host, port, BIG) == website.digests[BIG]
    process.stop(timeout=20)
    wait_until(lambda: not fleet.store.keys("snocat:node:*"), 10, "the workers left")


def test_the_store_unreachable_at_start(lab: Lab, store: Store) -> None:
    fleet = make_fleet(lab, store)
    store.kill()
    node = fleet.lab.start(
        "server",
        "--cert",
        str(fleet.certificate),
        "--key",
        str(fleet.key),
        "--quic",
        f"{node_host(0)}:{fleet.quic_port}",
        "--tcp",
        node_host(0),
        "--ports",
        f"{fleet.ports[0]}:{fleet.ports[1]}",
        "--tokens",
        str(fleet.tokens),
        "--registry",
        f"redis://user:hunter2@127.0.0.1:{store.port}/0",
        "--fleet-token-file",
        str(fleet.fleet_token),
        "--plain",
    )
    line = node.wait_line("registry .* is unreachable", stream="stderr", timeout=15)
    assert "hunter2" not in "\n".join(node.stderr + node.stdout)
    assert "user:***@" in line.string
    assert node.popen.poll() is None  # it keeps trying
    node.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "--workers needs --registry"),
        (["--registry", "redis://127.0.0.1:1/0"], "--registry needs --fleet-token-file"),
        (["--registry", "http://x/"], "the registry must be redis://"),
        (["--node", "a"], "need --registry"),
    ],
)
def test_fleet_flags_are_checked(lab: Lab, args: list[str], message: str) -> None:
    token = lab.tokens("fleet.token", "0123456789abcdef0123\n")
    if "--registry" in args and "needs --fleet-token-file" not in message:
        args = [*args, "--fleet-token-file", str(token)]
    result = lab.run("server", "--quic", "127.0.0.1:0", "--auth", "simple-ack", *args)
    assert message in assert_one_line_error(result, 2)


def test_no_port_is_left_claimed_after_a_clean_stop(fleet: Fleet, website: Website) -> None:
    node = fleet.start_node(0)
    client = fleet.start_client(website.port, 0)
    public_port(client)
    client.stop()
    wait_until(lambda: not fleet.store.keys("snocat:port:*"), 5, "the port released")
    node.stop()
    assert not fleet.store.keys("snocat:node:*")


def test_a_single_node_server_refuses_a_fleet_config(server_identity: Identity) -> None:
    from snocat_anyio import TunnelServer
    from snocat_proto import FleetConfig, ServerConfig
    from snocat_sync import TunnelServer as BlockingServer

    config = ServerConfig(
        certificate_pem=server_identity.certificate_pem,
        private_key_pem=server_identity.private_key_pem,
        tokens={"a": b"0123456789abcdef"},
        fleet=FleetConfig(
            registry_url="redis://127.0.0.1:1/0",
            node="n",
            advertise=("127.0.0.1", 9),
            secret=b"0123456789abcdef",
        ),
    )
    for server in (TunnelServer, BlockingServer):
        with pytest.raises(ValueError, match=r"use snocat_anyio\.FleetServer"):
            server(config)


def test_a_store_with_a_password(lab: Lab, tmp_path: Path, website: Website) -> None:
    binary = store_binary()
    assert binary is not None
    store = Store(binary, tmp_path / "locked", password="store-password-0123")
    store.start()
    try:
        fleet = make_fleet(lab, store)
        password = lab.tokens("registry.password", "store-password-0123\n")
        password.chmod(0o600)
        node = fleet.start_node(0, "--registry-password-file", str(password))
        node.wait_event("fleet_recovered")
        client = fleet.start_client(website.port, 0)
        port = public_port(client)
        assert fetch(node_host(0), port, SMALL) == website.digests[SMALL]
        assert store.keys("snocat:name:*") == ["snocat:name:alpha"]
        # A wrong password: one line, and the node keeps trying (it never crashes).
        wrong = lab.tokens("wrong.password", "not-the-password\n")
        other = fleet.start_node(1, "--registry-password-file", str(wrong))
        line = other.wait_line("registry .* is unreachable", stream="stderr", timeout=15)
        assert "not-the-password" not in "\n".join(other.stderr + other.stdout)
        assert other.popen.poll() is None, line.string
    finally:
        store.kill()


def test_a_node_cut_off_from_the_store_misses_no_change(fleet: Fleet, website: Website) -> None:
    proxy = StoreProxy(fleet.store.port)
    try:
        cut = fleet.start_node(0, registry=proxy.url)
        other = fleet.start_node(1)
        cut.wait_event("fleet_recovered")
        wait_until(lambda: len(fleet.store.keys("snocat:node:*")) == 2, 10, "both nodes")
        before = len(cut.stdout)
        proxy.cut()
        cut.wait_event("fleet_degraded", after=before, timeout=15)
        # Meanwhile, through the other node: a tunnel registers and gets a port.
        beta = fleet.lab.tokens("beta.token", "beta b3ta-b3ta-b3ta-b3ta-2\n")
        client = fleet.start_client(website.port, 1, token=beta)
        port = public_port(client)
        wait_until(lambda: bool(events_of(other, "tunnel_updated")), 10, "beta's ports recorded")
        proxy.restore()
        cut.wait_event("fleet_recovered", after=before, timeout=20)
        # The cut-off node reports every change it missed, in order, once.
        wait_until(
            lambda: bool(events_of(cut, "tunnel_updated")), 15, "the missed changes reported"
        )
        changes = [
            (e["change"], e["name"])
            for e in cut.events()[before:]
            if e.get("event") == "fleet_changed" and e.get("name") == "beta"
        ]
        assert changes == [
            ("tunnel_registered", "beta"),
            ("port_claimed", "beta"),
            ("tunnel_updated", "beta"),
        ], changes
        # And it serves the tunnel it learned of meanwhile.
        fetch_until(node_host(0), port, SMALL, website.digests[SMALL], timeout=15)
    finally:
        proxy.close()


def test_any_node_routes_any_name_and_every_relay_carries_the_visitor(
    fleet: Fleet, website: Website
) -> None:
    """A tunnel on node 0 publishes its target by name; node 1's shared HTTP listener
    relays a visitor to it (4 MiB checksummed), and both a by-name and a by-port visitor
    that came through node 1 reach the client with their own address."""
    http_port = free_port_range(1)[0]
    assert not fleet.ports[0] <= http_port <= fleet.ports[1], (http_port, fleet.ports)
    for index in range(2):
        fleet.start_node(
            index, "--domain", "tunnels.test", "--http", f"{node_host(index)}:{http_port}"
        )
    client = fleet.start_client(
        website.port, 0, extra=("--http", f"127.0.0.1:{website.port}", "--json")
    )

    def granted_port() -> int | None:
        for event in client.events():
            addresses = event.get("addresses") or []
            if event.get("event") == "port_granted" and "tunnels.test" not in str(addresses):
                return int(str(event["port"]))
        return None

    wait_until(lambda: granted_port() is not None, 15, "a public port")
    port = granted_port()
    assert port is not None

    seen: list[str] = []

    def by_name(host: str) -> str:
        connection = http.client.HTTPConnection(host, http_port, timeout=30)
        try:
            connection.request("GET", f"/{BIG}", headers={"Host": "alpha.tunnels.test"})
            seen.append(format_host_port(*connection.sock.getsockname()[:2]))
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body[:200])
            return hashlib.sha256(body).hexdigest()
        finally:
            connection.close()

    deadline = time.monotonic() + 15
    while True:
        try:
            assert by_name(node_host(1)) == website.digests[BIG]
            break
        except AssertionError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert by_name(node_host(0)) == website.digests[BIG]
    # The client saw the visitor, not node 1, on both kinds of relay.
    with socket.create_connection((node_host(1), port), timeout=10) as visitor:
        seen.append(format_host_port(*visitor.getsockname()[:2]))
        visitor.sendall(f"GET /{SMALL} HTTP/1.0\r\n\r\n".encode())
        while visitor.recv(65536):
            pass
    wait_until(
        lambda: all(any(e.get("visitor") == address for e in client.events()) for address in seen),
        10,
        "every visitor's own address on the client",
    )
    opened = [e for e in client.events() if e.get("event") == "stream_opened"]
    assert all(e.get("name") == "alpha" for e in opened), opened
    # An unknown name is a 404 from whichever node; it names the name.
    connection = http.client.HTTPConnection(node_host(1), http_port, timeout=10)
    connection.request("GET", "/", headers={"Host": "nobody.tunnels.test"})
    response = connection.getresponse()
    assert response.status == 404 and b"nobody" in response.read()
    connection.close()


def test_a_pool_spans_nodes_without_taking_over(fleet: Fleet, website: Website) -> None:
    fleet.tokens.write_text(fleet.tokens.read_text() + "crew crew-secret-0123456789ab pool\n")
    crew = fleet.lab.tokens("crew.token", "crew crew-secret-0123456789ab\n")
    http_port = free_port_range(1)[0]
    for index in range(2):
        fleet.start_node(
            index, "--domain", "tunnels.test", "--http", f"{node_host(index)}:{http_port}"
        )
    members = [
        fleet.start_client(
            website.port, index, token=crew, extra=("--http", f"127.0.0.1:{website.port}")
        )
        for index in range(2)
    ]
    for member in members:
        member.wait_line("public address: crew.tunnels.test")
    wait_until(lambda: len(fleet.store.keys("snocat:pool:crew:*")) == 2, 10, "two members")
    for index in range(2):
        connection = http.client.HTTPConnection(node_host(index), http_port, timeout=10)
        connection.request("GET", f"/{SMALL}", headers={"Host": "crew.tunnels.test"})
        assert hashlib.sha256(connection.getresponse().read()).hexdigest() == website.digests[SMALL]
        connection.close()
    time.sleep(1.0)  # an exclusive name would have taken one over by now
    assert all(member.popen.poll() is None for member in members), [m.describe() for m in members]
    assert fleet.store.keys("snocat:name:crew") == []
