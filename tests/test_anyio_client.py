"""The tunnel client (snocat_anyio.client) end to end: real QUIC handshakes over loopback
UDP against the real :class:`TunnelServer`, real TCP targets, on asyncio and trio.

Each test runs an aggregator, a TCP target behind the client, and the client, and
talks to the public port the aggregator granted, as a user of the tunnel would.
"""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import anyio.abc
import pytest
from cryptography import x509

from snocat_anyio import (
    Authenticate,
    ClientConfig,
    Router,
    ServerConfig,
    TunnelClient,
    TunnelServer,
    TunnelStatus,
)
from snocat_anyio._dial import connect_target
from snocat_anyio._errors import (
    AuthenticationError,
    ConnectError,
    PortRefusedError,
    StreamRefusedError,
    TunnelClosedError,
)
from snocat_anyio._stream import TunnelStream
from snocat_proto._service import activity
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.certificates import fingerprint
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.handshake_rate import HandshakeRate
from snocat_proto._wire.network import port_of as _port_of
from snocat_proto._wire.targets import ProxyTcpTarget, TargetKind

pytestmark = pytest.mark.anyio

TOKENS = {
    "alpha": b"alpha-secret-0123456789abcdef",
    "beta": b"beta-secret-0123456789abcdef",
}
ALPHA = ClientCredentials.token("alpha", TOKENS["alpha"])
BETA = ClientCredentials.token("beta", TOKENS["beta"])
#: How long any single step may take before the test fails instead of hanging.
STEP = 10.0


# Helpers ------------------------------------------------------------------------


def free_port_range(count: int) -> PortRange:
    """``count`` consecutive TCP ports that are free on 127.0.0.1 right now."""
    rng = random.Random()
    for _ in range(500):
        start = rng.randint(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(start, start + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return PortRange(start, start + count - 1)
    raise RuntimeError("no free port range found")


def unused_port(kind: socket.SocketKind) -> int:
    """A port nothing listens on (bound once by us, then closed)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], timeout: float = STEP) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def port_is_free(port: int) -> bool:
    try:
        conn = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await conn.aclose()
    return False


def public_port(client: TunnelClient) -> int:
    assert client.granted is not None
    return _port_of(client.granted)


async def digest_service(conn: anyio.abc.SocketStream) -> None:
    """The TCP target: reads to EOF, answers with the SHA-256 of what it read, then
    a reply whose size the first 8 bytes asked for (so half-close is exercised)."""
    async with conn:
        digest = hashlib.sha256()
        header = b""
        async for chunk in conn:
            if len(header) < 8:
                header += chunk[: 8 - len(header)]
            digest.update(chunk)
        reply_size = int.from_bytes(header.ljust(8, b"\0"), "big")
        await conn.send(digest.hexdigest().encode())
        reply = random.Random(reply_size).randbytes(reply_size)
        for offset in range(0, len(reply), 65536):
            await conn.send(reply[offset : offset + 65536])


async def exchange(port: int, upload: int, download: int, seed: int = 0) -> None:
    """Send ``upload`` bytes, half-close, and check the digest and ``download`` bytes."""
    data = download.to_bytes(8, "big") + random.Random(seed).randbytes(max(0, upload - 8))
    received = bytearray()
    with anyio.fail_after(30):
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            for offset in range(0, len(data), 65536):
                await conn.send(data[offset : offset + 65536])
            await conn.send_eof()  # half-close: the reply must still arrive
            async for chunk in conn:
                received += chunk
    assert received[:64].decode() == hashlib.sha256(data).hexdigest()
    assert bytes(received[64:]) == random.Random(download).randbytes(download)


@asynccontextmanager
async def tcp_target() -> AsyncIterator[ProxyTcpTarget]:
    """The TCP service behind the client, as its ``--target``."""
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, digest_service)
        try:
            yield ProxyTcpTarget.parse_host_port(f"127.0.0.1:{port}")
        finally:
            tg.cancel_scope.cancel()  # serve() closes the listener as it unwinds


def server_config(identity: Any, **options: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "certificate_pem": identity.certificate_pem,
        "private_key_pem": identity.private_key_pem,
        "quic_host": "127.0.0.1",
        "quic_port": 0,
        "tokens": TOKENS,
        "port_range": free_port_range(4),
        "shutdown_grace": 0.5,
        **options,
    }
    return ServerConfig(**settings)


@asynccontextmanager
async def aggregator(
    identity: Any,
    *,
    route: Router | None = None,
    authenticate: Authenticate | None = None,
    **options: Any,
) -> AsyncIterator[TunnelServer]:
    async with anyio.create_task_group() as tg:
        config = server_config(identity, **options)
        instance = TunnelServer(config, route=route, authenticate=authenticate)
        server: TunnelServer = await tg.start(instance.serve)
        try:
            yield server
        finally:
            with anyio.fail_after(STEP):
                await server.shutdown(grace=0.2)


def client_config(
    server: TunnelServer | None,
    identity: Any,
    targets: tuple[ProxyTcpTarget, ...],
    **options: Any,
) -> ClientConfig:
    host, port = ("127.0.0.1", 9) if server is None else server.quic_address
    settings: dict[str, Any] = {
        "server_host": host,
        "server_port": port,
        "server_name": "localhost",
        "targets": targets,
        "credentials": ALPHA,
        "authority_pem": identity.certificate_pem,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "connect_timeout": 2.0,
        **options,
    }
    return ClientConfig(**settings)


@asynccontextmanager
async def running_client(config: ClientConfig) -> AsyncIterator[TunnelClient]:
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            client: TunnelClient = await tg.start(TunnelClient(config).run)
        try:
            yield client
        finally:
            with anyio.fail_after(STEP):
                await client.aclose()


async def next_of(subscription: Any, kind: type[activity.Activity]) -> Any:
    with anyio.fail_after(STEP):
        async for record in subscription:
            if isinstance(record, kind):
                return record
    raise AssertionError(f"the feed ended before a {kind.__name__}")


# Forwarding ---------------------------------------------------------------------


async def test_forwarding_megabytes_both_ways_with_half_close(server_identity: Any) -> None:
    async with (
        aggregator(server_identity) as server,
        tcp_target() as target,
        running_client(client_config(server, server_identity, (target,))) as client,
    ):
        assert client.granted is not None
        port = public_port(client)
        assert port in server.ports_in_use
        feed = client.activity.subscribe()
        with anyio.fail_after(30):
            await exchange(port, 4_000_000, 3_000_000, seed=1)
            await exchange(port, 10, 2_000_000, seed=2)  # tiny upload, then a long reply
        opened = await next_of(feed, activity.StreamOpened)
        assert opened.direction == "in"
        assert opened.address == f"/proxy-tcp/dns/127.0.0.1/tcp/{target.port}"
        closed = await next_of(feed, activity.StreamClosed)
        assert (closed.bytes_in, closed.bytes_out) == (4_000_000, 64 + 3_000_000)
        assert closed.error is None


async def test_a_hundred_and_twenty_concurrent_connections_stay_intact(
    server_identity: Any,
) -> None:
    async with (
        aggregator(server_identity) as server,
        tcp_target() as target,
        running_client(client_config(server, server_identity, (target,))) as client,
    ):
        port = public_port(client)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(120):
                    tg.start_soon(exchange, port, 20_000 + i * 97, 30_000 + i * 89, i)
        statuses = server.tunnels()
        assert len(statuses) == 1
        assert statuses[0].name == "alpha"


# What the client refuses ------------------------------------------------------------


async def test_a_target_outside_the_allow_list_is_refused(server_identity: Any) -> None:
    other = unused_port(socket.SOCK_STREAM)
    async with (
        aggregator(server_identity) as server,
        tcp_target() as target,
        running_client(client_config(server, server_identity, (target,))) as client,
    ):
        feed = client.activity.subscribe()
        with anyio.fail_after(STEP), pytest.raises(StreamRefusedError):
            await server.open_stream(
                "alpha", RouteAddress.parse(f"/proxy-tcp/dns/127.0.0.1/tcp/{other}")
            )
        refused = await next_of(feed, activity.StreamRefused)
        assert "allow-list" in refused.reason
        # Same port, another host: the allow-list compares both.
        with anyio.fail_after(STEP), pytest.raises(StreamRefusedError):
            await server.open_stream(
                "alpha", RouteAddress.parse(f"/proxy-tcp/dns/localhost/tcp/{target.port}")
            )
        # Not proxy-tcp at all, and a malformed proxy-tcp address.
        for text in ("/echo", "/proxy-tcp/dns/127.0.0.1/udp/53"):
            with anyio.fail_after(STEP), pytest.raises(StreamRefusedError):
                await server.open_stream("alpha", RouteAddress.parse(text))
        # The tunnel is still fine.
        await exchange(public_port(client), 1000, 1000)


async def test_an_unreachable_target_is_refused(server_identity: Any) -> None:
    dead = ProxyTcpTarget.parse_host_port(f"127.0.0.1:{unused_port(socket.SOCK_STREAM)}")
    async with (
        aggregator(server_identity) as server,
        tcp_target() as target,
        running_client(client_config(server, server_identity, (dead, target))) as client,
    ):
        feed = client.activity.subscribe()
        with anyio.fail_after(STEP), pytest.raises(StreamRefusedError):
            await server.open_stream("alpha", dead.to_address())
        refused = await next_of(feed, activity.StreamRefused)
        assert "cannot connect" in refused.reason
        # A TCP user of the public port (which forwards to the dead target) is cut off.
        with anyio.fail_after(STEP):
            async with await anyio.connect_tcp("127.0.0.1", public_port(client)) as conn:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                    await conn.receive()
        # The second, reachable target still works, opened by the aggregator directly.
        with anyio.fail_after(STEP):
            stream = await server.open_stream("alpha", target.to_address())
            async with stream:
                await stream.send((5).to_bytes(8, "big"))
                await stream.send_eof()
                reply = b"".join([chunk async for chunk in stream])
        assert len(reply) == 64 + 5


# Reconnecting ---------------------------------------------------------------------


async def test_reconnects_after_the_aggregator_restarts(server_identity: Any) -> None:
    port_range = free_port_range(4)
    async with tcp_target() as target, anyio.create_task_group() as servers:
        first = TunnelServer(server_config(server_identity, port_range=port_range))
        await servers.start(first.serve)
        quic_port = first.quic_address[1]
        async with running_client(client_config(first, server_identity, (target,))) as client:
            feed = client.activity.subscribe()
            await exchange(public_port(client), 1000, 1000)
            with anyio.fail_after(STEP):
                await first.shutdown(grace=0.2)
            reconnecting = await next_of(feed, activity.Reconnecting)
            assert reconnecting.attempt == 1
            assert "0x15" in reconnecting.reason  # SHUTTING_DOWN, said by the aggregator
            assert client.granted is None
            async with aggregator(
                server_identity, quic_port=quic_port, port_range=port_range
            ) as second:
                with anyio.fail_after(STEP):
                    await client.wait_granted()
                assert len(second.registry) == 1
                await exchange(public_port(client), 200_000, 200_000, seed=3)


async def test_an_unreachable_aggregator_without_reconnect_raises_connect_error(
    server_identity: Any,
) -> None:
    """Nothing listens on the port: the ICMP port unreachable that loopback returns is
    heard by the client's connected socket, so it fails at once, not after the
    connect timeout (10 s)."""
    config = client_config(
        None,
        server_identity,
        (ProxyTcpTarget.parse_host_port("127.0.0.1:5000"),),
        server_port=unused_port(socket.SOCK_DGRAM),
        reconnect=False,
        connect_timeout=10.0,
    )
    client = TunnelClient(config)
    started = anyio.current_time()
    with (
        anyio.fail_after(5),
        pytest.raises(
            ConnectError, match=r"nothing answers at 127\.0\.0\.1:\d+: Connection refused"
        ),
    ):
        await client.run()
    assert anyio.current_time() - started < 1.0


async def test_a_silent_aggregator_is_no_answer_after_the_connect_timeout(
    server_identity: Any,
) -> None:
    """Something holds the port but never answers (no ICMP comes back): the client gives
    up after its connect timeout, as it must where the network says nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        config = client_config(
            None,
            server_identity,
            (ProxyTcpTarget.parse_host_port("127.0.0.1:5000"),),
            server_port=silent.getsockname()[1],
            reconnect=False,
            connect_timeout=0.5,
        )
        with (
            anyio.fail_after(5),
            pytest.raises(ConnectError, match=r"no answer from 127\.0\.0\.1:"),
        ):
            await TunnelClient(config).run()


async def test_an_unreachable_aggregator_is_retried_with_backoff(server_identity: Any) -> None:
    config = client_config(
        None,
        server_identity,
        (ProxyTcpTarget.parse_host_port("127.0.0.1:5000"),),
        server_port=unused_port(socket.SOCK_DGRAM),
        connect_timeout=0.2,
        backoff_initial=0.05,
        backoff_max=0.1,
    )
    client = TunnelClient(config)
    feed = client.activity.subscribe()
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run)
        attempts = [await next_of(feed, activity.Reconnecting) for _ in range(3)]
        with anyio.fail_after(STEP):
            await client.aclose()
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert all("nothing answers" in a.reason for a in attempts)
    assert 0.025 <= attempts[0].delay <= 0.05
    assert all(a.delay <= 0.1 for a in attempts)


async def test_a_credential_store_outage_is_retried_not_fatal(server_identity: Any) -> None:
    """The aggregator's credential lookup fails (its store is down): the client is told
    so and tries again, instead of stopping as it does for a wrong token."""
    lookups: list[str] = []

    async def authenticate(name: str) -> bytes | None:
        lookups.append(name)
        if len(lookups) == 1:
            raise RuntimeError("credential store is down")
        return TOKENS.get(name)

    async with aggregator(server_identity, authenticate=authenticate) as server:
        config = client_config(server, server_identity, (ProxyTcpTarget.parse_host_port("a:1"),))
        client = TunnelClient(config)
        feed = client.activity.subscribe()
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            retry = await next_of(feed, activity.Reconnecting)
            await next_of(feed, activity.TunnelAuthenticated)
            with anyio.fail_after(STEP):
                await client.aclose()
    assert "could not check the credential" in retry.reason
    assert lookups == ["alpha", "alpha"]


async def test_a_client_over_the_handshake_rate_is_refused_then_retries(
    server_identity: Any,
) -> None:
    """Both clients come from 127.0.0.1, which may start one tunnel, then one every
    half second: the second is refused with a reason and connects on a later attempt."""
    rate = HandshakeRate(per_second=2.0, burst=1)
    async with aggregator(server_identity, handshake_rate=rate) as server:
        targets = (ProxyTcpTarget.parse_host_port("a:1"),)
        async with running_client(client_config(server, server_identity, targets)) as first:
            await wait_until(lambda: first.granted is not None)
            second = TunnelClient(client_config(server, server_identity, targets, credentials=BETA))
            feed = second.activity.subscribe()
            async with anyio.create_task_group() as tg:
                tg.start_soon(second.run)
                refused = await next_of(feed, activity.Reconnecting)
                await next_of(feed, activity.TunnelAuthenticated)
                with anyio.fail_after(STEP):
                    await second.aclose()
    assert "refused the connection: too many new connections" in refused.reason


# Fatal errors -------------------------------------------------------------------


async def test_a_wrong_token_raises_authentication_error_promptly(server_identity: Any) -> None:
    async with aggregator(server_identity) as server:
        bad = ClientCredentials.token("alpha", b"not-the-secret")
        client = TunnelClient(
            client_config(
                server, server_identity, (ProxyTcpTarget.parse_host_port("a:1"),), credentials=bad
            )
        )
        with anyio.fail_after(5), pytest.raises(AuthenticationError, match="token"):
            await client.run()
        assert len(server.registry) == 0


@pytest.mark.parametrize(
    ("server_auth", "credentials"),
    [("token", ClientCredentials.simple_ack()), ("simple-ack", ALPHA)],
)
async def test_a_scheme_mismatch_raises_authentication_error(
    server_identity: Any, server_auth: str, credentials: ClientCredentials
) -> None:
    async with aggregator(server_identity, auth=server_auth) as server:
        config = client_config(
            server,
            server_identity,
            (ProxyTcpTarget.parse_host_port("a:1"),),
            credentials=credentials,
        )
        with anyio.fail_after(5), pytest.raises(AuthenticationError):
            await TunnelClient(config).run()


async def test_an_untrusted_certificate_raises_connect_error(
    server_identity: Any, other_identity: Any
) -> None:
    async with aggregator(server_identity) as server:
        config = client_config(server, other_identity, (ProxyTcpTarget.parse_host_port("a:1"),))
        with anyio.fail_after(5), pytest.raises(ConnectError, match=r"not trusted.*--authority"):
            await TunnelClient(config).run()
        assert len(server.registry) == 0


async def test_a_wrong_server_name_raises_connect_error(server_identity: Any) -> None:
    async with aggregator(server_identity) as server:
        config = client_config(
            server,
            server_identity,
            (ProxyTcpTarget.parse_host_port("a:1"),),
            server_name="elsewhere.example",
        )
        with anyio.fail_after(5), pytest.raises(ConnectError, match=r"elsewhere\.example"):
            await TunnelClient(config).run()


async def test_a_pinned_fingerprint_is_checked(server_identity: Any, other_identity: Any) -> None:
    right = fingerprint(x509.load_pem_x509_certificate(server_identity.certificate_pem))
    wrong = fingerprint(x509.load_pem_x509_certificate(other_identity.certificate_pem))
    async with aggregator(server_identity) as server, tcp_target() as target:
        # The right pin works without any authority (chain verification is replaced).
        pinned = client_config(
            server,
            server_identity,
            (target,),
            authority_pem=None,
            fingerprint=right.replace(":", "").lower(),
        )
        async with running_client(pinned) as client:
            await exchange(public_port(client), 1000, 1000)
        wrong_pin = replace(pinned, fingerprint=wrong)
        with anyio.fail_after(5), pytest.raises(ConnectError, match="fingerprint mismatch"):
            await TunnelClient(wrong_pin).run()
        with anyio.fail_after(STEP):
            while len(server.registry):
                await anyio.sleep(0.01)


# Ports ----------------------------------------------------------------------------


async def test_aclose_releases_the_port_and_closes_the_tunnel(server_identity: Any) -> None:
    async with aggregator(server_identity) as server, tcp_target() as target:
        server_feed = server.activity.subscribe()
        client = TunnelClient(client_config(server, server_identity, (target,)))
        client_feed = client.activity.subscribe()
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(STEP):
                await tg.start(client.run)
            port = public_port(client)
            with anyio.fail_after(STEP):
                await client.aclose()
        assert client.granted is None
        # The aggregator freed the port on the release request, before the tunnel closed.
        released = await next_of(server_feed, activity.PortReleased)
        assert released.port == port
        closed = await next_of(server_feed, activity.TunnelClosed)
        assert (closed.code, closed.by_peer) == (0, True)
        await wait_until(lambda: len(server.registry) == 0 and not server.ports_in_use)
        assert await port_is_free(port)
        kinds = [type(record) async for record in client_feed]  # the feed ends with run()
        assert kinds.index(activity.PortReleased) < kinds.index(activity.TunnelClosed)


async def test_cancelling_run_releases_the_port_too(server_identity: Any) -> None:
    async with aggregator(server_identity) as server, tcp_target() as target:
        server_feed = server.activity.subscribe()
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(STEP):
                client = await tg.start(
                    TunnelClient(client_config(server, server_identity, (target,))).run
                )
            port = public_port(client)
            tg.cancel_scope.cancel()
        released = await next_of(server_feed, activity.PortReleased)
        assert released.port == port
        await wait_until(lambda: len(server.registry) == 0 and not server.ports_in_use)


async def test_a_denied_port_keeps_the_tunnel_and_is_asked_for_again(
    server_identity: Any,
) -> None:
    async with (
        aggregator(server_identity, port_range=free_port_range(1)) as server,
        tcp_target() as target,
    ):
        first = client_config(server, server_identity, (target,))
        second = replace(first, credentials=BETA)
        async with running_client(first) as alpha:
            beta = TunnelClient(second)
            feed = beta.activity.subscribe()
            async with anyio.create_task_group() as tg:
                with anyio.fail_after(STEP):
                    await tg.start(beta.run)  # started although no port was granted
                assert beta.granted is None
                denied = await next_of(feed, activity.PortDenied)
                assert "no free port" in denied.reason
                assert sorted(record.name for record in server.registry) == ["alpha", "beta"]
                port = public_port(alpha)
                await alpha.aclose()
                with anyio.fail_after(STEP):
                    await beta.wait_granted()  # the retry gets the freed port
                assert public_port(beta) == port
                await exchange(port, 5000, 5000)
                await beta.aclose()


async def test_every_target_gets_its_own_port_and_each_keeps_it(server_identity: Any) -> None:
    """Two --target flags: two public ports, each forwarding to its own target; after a
    reconnect each target gets its own port back (sticky per name and target)."""
    async with (
        aggregator(server_identity) as server,
        tcp_target() as web,
        tcp_target() as ssh,
    ):
        config = client_config(server, server_identity, (web, ssh))
        async with running_client(config) as client:
            with anyio.fail_after(STEP):
                await client.wait_granted()
            ports = {target: _port_of(client.grants[target]) for target in (web, ssh)}
            assert len(set(ports.values())) == 2
            assert server.ports_in_use == set(ports.values())
            for seed, port in enumerate(ports.values()):
                await exchange(port, 300_000, 200_000, seed=seed)
        assert not server.ports_in_use
        async with running_client(replace(config, targets=(ssh, web))) as again:
            with anyio.fail_after(STEP):
                await again.wait_granted()
            assert {t: _port_of(again.grants[t]) for t in (web, ssh)} == ports


async def test_a_public_port_asked_for_is_the_one_granted(server_identity: Any) -> None:
    ports = free_port_range(4)
    wanted = ports.start + 3
    async with aggregator(server_identity, port_range=ports) as server, tcp_target() as target:
        config = client_config(server, server_identity, (target,), public_ports={target: wanted})
        async with running_client(config) as client:
            assert public_port(client) == wanted
            await exchange(wanted, 100_000, 100_000)


async def test_a_port_outside_the_range_is_refused_at_once_even_with_reconnect(
    server_identity: Any,
) -> None:
    ports = free_port_range(2)
    async with aggregator(server_identity, port_range=ports) as server, tcp_target() as target:
        config = client_config(
            server, server_identity, (target,), public_ports={target: ports.end + 1}
        )
        with (
            anyio.fail_after(STEP),
            pytest.raises(PortRefusedError, match=rf"outside this aggregator's range {ports}"),
        ):
            await TunnelClient(config).run()
        assert not server.tunnels()  # the client said goodbye


async def test_without_reconnect_a_full_range_ends_the_client(server_identity: Any) -> None:
    async with (
        aggregator(server_identity, port_range=free_port_range(1)) as server,
        tcp_target() as target,
        running_client(client_config(server, server_identity, (target,))),
    ):
        config = client_config(
            server, server_identity, (target,), credentials=BETA, reconnect=False
        )
        with anyio.fail_after(STEP), pytest.raises(PortRefusedError, match="no free port"):
            await TunnelClient(config).run()


async def test_a_port_cannot_be_asked_of_an_aggregator_without_options(
    server_identity: Any,
) -> None:
    """A SimpleAck aggregator (as snocat 0.8 is) cannot be asked for a port: the client
    says so instead of taking another one."""
    async with (
        aggregator(server_identity, auth="simple-ack") as server,
        tcp_target() as target,
    ):
        config = client_config(
            server,
            server_identity,
            (target,),
            credentials=ClientCredentials.simple_ack(),
            public_ports={target: 8085},
        )
        with anyio.fail_after(STEP), pytest.raises(PortRefusedError, match="proxyme-options"):
            await TunnelClient(config).run()


async def test_a_client_taken_over_stops_instead_of_taking_the_name_back(
    server_identity: Any,
) -> None:
    """Two clients configured alike: the second takes the name over, the first stops
    with the reason (reconnecting would start a tug of war)."""
    async with aggregator(server_identity) as server, tcp_target() as target:
        config = client_config(server, server_identity, (target,))
        first = TunnelClient(config)
        ended: list[BaseException] = []

        async def run_first(*, task_status: Any) -> None:
            try:
                await first.run(task_status=task_status)
            except Exception as exc:
                ended.append(exc)

        async with anyio.create_task_group() as tg:
            await tg.start(run_first)
            port = public_port(first)
            async with running_client(config) as second:
                await wait_until(lambda: bool(ended))
                (error,) = ended
                assert isinstance(error, TunnelClosedError) and error.code == 0x18
                assert "taken over" in error.reason
                assert public_port(second) == port
                await exchange(port, 100_000, 100_000)


# The rest of the API ----------------------------------------------------------------


async def test_the_client_opens_streams_to_aggregator_services(server_identity: Any) -> None:
    async def echo(stream: TunnelStream) -> None:
        async for chunk in stream:
            await stream.send(chunk)

    def route(status: TunnelStatus, address: RouteAddress) -> Any:
        return echo if address == RouteAddress.of("echo") else None

    async with aggregator(server_identity, route=route) as server, tcp_target() as target:
        config = client_config(server, server_identity, (target,), request_port=False)
        async with running_client(config) as client:
            assert client.granted is None
            with anyio.fail_after(STEP):
                stream = await client.open_stream(RouteAddress.of("echo"))
                async with stream:
                    await stream.send(b"ping")
                    await stream.send_eof()
                    assert b"".join([chunk async for chunk in stream]) == b"ping"
            with anyio.fail_after(STEP), pytest.raises(StreamRefusedError):
                await client.open_stream(RouteAddress.of("nothing"))
        with pytest.raises(TunnelClosedError):
            await client.open_stream(RouteAddress.of("echo"))


async def test_simple_ack_interop(server_identity: Any) -> None:
    """The reference wire profile: SimpleAck, no credentials, the tunnel named by address."""
    async with (
        aggregator(server_identity, auth="simple-ack") as server,
        tcp_target() as target,
    ):
        config = client_config(
            server, server_identity, (target,), credentials=ClientCredentials.simple_ack()
        )
        async with running_client(config) as client:
            (record,) = list(server.registry)
            assert record.scheme == "simple-ack"
            assert record.name.startswith("127.0.0.1:")
            await exchange(public_port(client), 300_000, 300_000)


def test_client_config_is_validated() -> None:
    target = ProxyTcpTarget.parse_host_port("127.0.0.1:5000")
    base: dict[str, Any] = {
        "server_host": "127.0.0.1",
        "server_port": 9090,
        "server_name": "localhost",
        "targets": (target,),
        "credentials": ALPHA,
    }
    ClientConfig(**base)
    with pytest.raises(ValueError, match="target"):
        ClientConfig(**{**base, "targets": ()})
    with pytest.raises(ValueError, match="port"):
        ClientConfig(**{**base, "server_port": 0})
    with pytest.raises(LocalProtocolError, match="fingerprint"):
        ClientConfig(**{**base, "fingerprint": "abc"})
    with pytest.raises(LocalProtocolError, match="PEM"):
        ClientConfig(**{**base, "authority_pem": b"not a certificate"})
    with pytest.raises(LocalProtocolError, match="backoff"):
        ClientConfig(**{**base, "backoff_initial": 5.0, "backoff_max": 1.0})
    assert ClientConfig(**{**base, "server_host": "::1"}).server_label == "[::1]:9090"


def test_port_of_granted_addresses() -> None:
    assert _port_of(("127.0.0.1:8080",)) == 8080
    assert _port_of(("[::]:8081", "0.0.0.0:8081")) == 8081
    assert _port_of(("garbage",)) == 0


async def test_aclose_before_run_makes_run_return(server_identity: Any) -> None:
    client = TunnelClient(
        client_config(None, server_identity, (ProxyTcpTarget.parse_host_port("a:1"),))
    )
    await client.aclose()
    with anyio.fail_after(1):
        await client.run()  # returns at once: the client was closed
    with pytest.raises(RuntimeError):
        await client.run()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_an_ipv6_aggregator(server_identity: Any) -> None:
    async with aggregator(server_identity, quic_host="::1") as server, tcp_target() as target:
        config = client_config(server, server_identity, (target,), server_host="::1")
        assert config.server_label.startswith("[::1]:")
        async with running_client(config) as client:
            await exchange(public_port(client), 100_000, 100_000)


async def test_dns4_and_dns6_targets_restrict_the_address_family() -> None:
    async with tcp_target() as target:  # listens on 127.0.0.1 only
        conn = await connect_target(ProxyTcpTarget(TargetKind.DNS4, "localhost", target.port))
        await conn.aclose()
        with anyio.fail_after(STEP), pytest.raises(OSError):
            await connect_target(ProxyTcpTarget(TargetKind.DNS6, "localhost", target.port))


# Token reloads -------------------------------------------------------------------


async def test_replacing_tokens_closes_only_revoked_and_changed_names(
    server_identity: Any,
) -> None:
    """A reload keeps every tunnel whose token is unchanged, mid-transfer, byte for byte;
    a name whose token was removed or changed is closed with a reason, and its client
    stops at once with AuthenticationError (retrying cannot fix a withdrawn token)."""
    tokens = {**TOKENS, "gamma": b"gamma-secret-0123456789abcdef"}
    gamma = ClientCredentials.token("gamma", tokens["gamma"])
    ends: dict[str, BaseException | None] = {}

    async def run(name: str, client: TunnelClient, *, task_status: Any) -> None:
        try:
            await client.run(task_status=task_status)
            ends[name] = None
        except Exception as exc:
            ends[name] = exc

    async with (
        aggregator(server_identity, tokens=tokens) as server,
        tcp_target() as target,
        running_client(client_config(server, server_identity, (target,))) as alpha,
        anyio.create_task_group() as tg,
    ):
        feed = server.activity.subscribe()
        others = {
            name: TunnelClient(client_config(server, server_identity, (target,), credentials=c))
            for name, c in (("beta", BETA), ("gamma", gamma))
        }
        for name, client in others.items():
            await tg.start(run, name, client)
        transfer_done = anyio.Event()

        async def transfer() -> None:
            await exchange(public_port(alpha), 3_000_000, 3_000_000, seed=7)
            transfer_done.set()

        tg.start_soon(transfer)
        await anyio.sleep(0.05)  # the transfer is under way
        closed = server.replace_tokens(
            {
                "alpha": tokens["alpha"],  # unchanged: kept
                "gamma": b"a-new-gamma-secret-0123456789",  # changed: closed
            }  # beta: removed, closed
        )
        assert sorted(closed) == ["beta", "gamma"]
        record = await next_of(feed, activity.TokensReplaced)
        assert record.names == 2 and sorted(record.closed) == ["beta", "gamma"]
        await wait_until(lambda: len(ends) == 2)
        for name in ("beta", "gamma"):
            error = ends[name]
            assert isinstance(error, AuthenticationError), (name, error)
            assert "withdrew this tunnel's credential" in str(error)
        assert ("revoked" in str(ends["beta"])) and ("changed" in str(ends["gamma"]))
        with anyio.fail_after(30):
            await transfer_done.wait()  # exchange() checked every byte of alpha's transfer
        assert [t.name for t in server.tunnels()] == ["alpha"]
        await exchange(public_port(alpha), 100_000, 100_000, seed=8)  # alpha still serves
