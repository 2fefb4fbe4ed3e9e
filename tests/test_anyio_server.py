"""The aggregator (snocat_anyio.server) end to end: real QUIC handshakes over loopback
UDP, real TCP listeners, on asyncio and trio.

The Connect side here is a minimal peer built from the core and ``TunnelHost`` (not
``TunnelClient``), so each test controls exactly what the client does: when it asks
for a port, releases it, closes the tunnel, or just vanishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.abc
import pytest

from snocat_anyio import (
    ServerConfig,
    TunnelNotFoundError,
    TunnelServer,
    TunnelStatus,
)
from snocat_anyio._errors import StreamRefusedError
from snocat_anyio._host import TunnelHost
from snocat_anyio._stream import TunnelStream
from snocat_anyio._udp import bind_udp
from snocat_proto._service import activity
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import ClientCredentials, connect_authenticator
from snocat_proto._wire.certificates import install_trust
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.endpoint import ClientEndpoint
from snocat_proto._wire.engine import quic_configuration
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    StreamRequested,
    TunnelEvent,
)
from snocat_proto._wire.features import FEATURES, PROXYME_OPTIONS, VISITOR_ADDRESS
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.network import format_address
from snocat_proto._wire.proxyme import (
    Denied,
    Granted,
    ProxymeClient,
    ProxymeEvent,
    ProxymeRequest,
    Released,
)
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_proto._wire.visitor import split_visitor

pytestmark = pytest.mark.anyio

TOKENS = {
    "alpha": b"alpha-secret-0123456789abcdef",
    "beta": b"beta-secret-0123456789abcdef",
    "gamma": b"gamma-secret-0123456789abcdef",
}
LIMITS = Limits()
TARGET = ProxymeRequest("127.0.0.1", 5000)
PROXY_TCP_ADDRESS = "/proxy-tcp/dns/127.0.0.1/tcp/5000"

Handler = Callable[[TunnelStream], Awaitable[None]]
ActivityT = TypeVar("ActivityT", bound=activity.Activity)


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


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def port_is_closed(port: int, host: str = "127.0.0.1") -> bool:
    try:
        conn = await anyio.connect_tcp(host, port)
    except OSError:
        return True
    await conn.aclose()
    return False


async def echo(stream: TunnelStream) -> None:
    async for chunk in stream:
        await stream.send(chunk)
    await stream.send_eof()


def make_digest_handler(payload: bytes) -> Handler:
    """Reads everything, then answers with its SHA-256 (hex) followed by ``payload``."""

    async def handler(stream: TunnelStream) -> None:
        digest = hashlib.sha256()
        async for chunk in stream:
            digest.update(chunk)
        await stream.send(digest.hexdigest().encode() + payload)
        await stream.send_eof()

    return handler


async def receive_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
    return b"".join(chunks)


async def tcp_exchange(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` (then EOF) to ``host:port`` while reading everything back."""
    conn = await anyio.connect_tcp(host, port)
    async with conn:
        received: list[bytes] = []

        async def read() -> None:
            received.append(await receive_all(conn))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            view = memoryview(data)
            for offset in range(0, len(data), 65536):
                await conn.send(bytes(view[offset : offset + 65536]))
            await conn.send_eof()
    return received[0]


class Peer:
    """A minimal Connect side: one tunnel on its own UDP socket and TunnelHost."""

    def __init__(self, tunnel: TunnelConnection, handler: Handler | None) -> None:
        self.tunnel = tunnel
        self.handler = handler
        self.host: TunnelHost
        self.tg: anyio.abc.TaskGroup
        self.authenticated = anyio.Event()
        self.closed_event = anyio.Event()
        self.closed: ConnectionTerminated | None = None
        self.incoming: list[RouteAddress] = []
        self.abandoned = False

    @property
    def local_address(self) -> tuple[str, int]:
        return self.host.local_address

    def on_event(
        self, tunnel: TunnelConnection, event: TunnelEvent, stream: TunnelStream | None
    ) -> None:
        if isinstance(event, AuthenticationCompleted):
            self.authenticated.set()
        elif isinstance(event, ConnectionTerminated):
            self.closed = event
            self.closed_event.set()
        elif isinstance(event, StreamRequested):
            assert stream is not None
            self.incoming.append(event.address)
            if self.handler is None:
                self.host.refuse(stream)
            else:
                self.host.accept(stream)
                self.tg.start_soon(self._serve, stream, self.handler)

    async def _serve(self, stream: TunnelStream, handler: Handler) -> None:
        try:
            await handler(stream)
        except anyio.BrokenResourceError:
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def wait_ready(self) -> None:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def wait(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(wait, self.authenticated)
                tg.start_soon(wait, self.closed_event)

    async def wait_closed(self, timeout: float = 10.0) -> ConnectionTerminated:
        with anyio.fail_after(timeout):
            await self.closed_event.wait()
        assert self.closed is not None
        return self.closed

    async def open_stream(self, address: RouteAddress) -> TunnelStream:
        return await self.host.open_stream(self.tunnel, address)

    async def request_port(
        self, request: ProxymeRequest = TARGET, *, public_port: int | None = None
    ) -> PortHandle:
        stream = await self.open_stream(request.to_address())
        options = PROXYME_OPTIONS in self.tunnel.features
        machine = ProxymeClient(limits=LIMITS, options=options, public_port=public_port)
        await stream.send(machine.initial_data())
        events = await read_proxyme(stream, machine)
        assert len(events) == 1
        return PortHandle(stream, machine, events[0])

    def close(self, code: int = CloseCode.NORMAL, reason: str = "test done") -> None:
        self.tunnel.close(code, reason)
        self.host.flush(self.tunnel)

    def abandon(self) -> None:
        """Vanish without a word: stop pumping and close the socket."""
        self.abandoned = True
        self.tg.cancel_scope.cancel()


class PortHandle:
    def __init__(self, stream: TunnelStream, machine: ProxymeClient, event: ProxymeEvent) -> None:
        self.stream = stream
        self.machine = machine
        self.event = event

    @property
    def addresses(self) -> tuple[str, ...]:
        assert isinstance(self.event, Granted), self.event
        return self.event.addresses

    @property
    def port(self) -> int:
        return int(self.addresses[0].rpartition(":")[2])

    async def release(self) -> None:
        await self.stream.send(self.machine.release())
        events = await read_proxyme(self.stream, self.machine)
        assert events == [Released()]
        await self.stream.aclose()


async def read_proxyme(stream: TunnelStream, machine: ProxymeClient) -> list[ProxymeEvent]:
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            return machine.receive_eof()
        events = machine.receive_data(data)
        if events:
            return events


@asynccontextmanager
async def connect(
    server: TunnelServer,
    identity: Any,
    credentials: ClientCredentials | None = None,
    *,
    handler: Handler | None = echo,
    wait: bool = True,
    features: frozenset[str] = FEATURES,
) -> AsyncIterator[Peer]:
    """A peer connected to ``server`` (authenticated, or closed, once this yields)."""
    if credentials is None:
        credentials = ClientCredentials.token("alpha", TOKENS["alpha"])
    configuration = quic_configuration(is_client=True, limits=LIMITS, server_name="localhost")
    install_trust(configuration, authority_pem=identity.certificate_pem, pinned=None)
    tunnel = TunnelConnection.connect(
        configuration,
        address=server.quic_address,
        authenticator=connect_authenticator(credentials, limits=LIMITS, features=features),
        limits=LIMITS,
        now=anyio.current_time(),
    )
    peer = Peer(tunnel, handler)
    sock = bind_udp("127.0.0.1", 0)
    try:
        async with anyio.create_task_group() as tg:
            peer.tg = tg
            peer.host = TunnelHost(ClientEndpoint(tunnel), sock, peer.on_event)
            tg.start_soon(peer.host.run)
            if wait:
                await peer.wait_ready()
            try:
                yield peer
            finally:
                if not peer.abandoned and peer.closed is None:
                    peer.close()
                tg.cancel_scope.cancel()
    finally:
        sock.close()


@asynccontextmanager
async def running(
    identity: Any,
    *,
    authenticate: Callable[[str], Awaitable[bytes | None]] | None = None,
    route: Any = None,
    **overrides: Any,
) -> AsyncIterator[TunnelServer]:
    """A served TunnelServer on a free UDP port, shut down on exit."""
    settings: dict[str, Any] = {
        "certificate_pem": identity.certificate_pem,
        "private_key_pem": identity.private_key_pem,
        "quic_port": 0,
        "tokens": TOKENS,
        "port_range": free_port_range(3),
        "shutdown_grace": 2.0,
    }
    settings.update(overrides)
    server = TunnelServer(ServerConfig(**settings), authenticate=authenticate, route=route)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            with anyio.fail_after(10):
                await server.shutdown()


async def next_activity(subscription: Any, kind: type[ActivityT], timeout: float = 5) -> ActivityT:
    """The next published record of ``kind`` (earlier ones of other kinds are skipped)."""
    with anyio.fail_after(timeout):
        while True:
            item = await subscription.get()
            if isinstance(item, kind):
                return item


def drain(subscription: Any) -> list[activity.Activity]:
    items = []
    while (item := subscription.get_nowait()) is not None:
        items.append(item)
    return items


# Authentication -----------------------------------------------------------------


async def test_token_auth_registers_the_tunnel(server_identity: Any) -> None:
    async with running(server_identity) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity) as peer:
            assert peer.authenticated.is_set() and peer.closed is None
            await wait_until(lambda: len(server.registry) == 1)
            record = server.registry.route("alpha")
            assert record is not None
            assert record.scheme == "token"
            assert record.peer == format_address(peer.local_address)
            [status] = server.tunnels()
            assert isinstance(status, TunnelStatus)
            assert (status.name, status.tunnel_id, status.ports) == ("alpha", record.tunnel_id, ())
            records = drain(feed)
            kinds = [type(a) for a in records]
            assert kinds[:2] == [activity.TunnelConnected, activity.TunnelAuthenticated]
            assert all(abs(a.at - time.time()) < 60 for a in records)  # wall-clock times
        await wait_until(lambda: len(server.registry) == 0)
        closed = [a for a in drain(feed) if isinstance(a, activity.TunnelClosed)]
        assert len(closed) == 1 and closed[0].name == "alpha" and closed[0].by_peer


async def test_authenticate_hook_is_awaited(server_identity: Any) -> None:
    asked: list[str] = []

    async def authenticate(name: str) -> bytes | None:
        asked.append(name)
        await anyio.sleep(0.05)
        return b"from-the-hook-0123456789" if name == "hooked" else None

    async with running(server_identity, authenticate=authenticate, tokens={}) as server:
        good = ClientCredentials.token("hooked", b"from-the-hook-0123456789")
        async with connect(server, server_identity, good) as peer:
            assert peer.authenticated.is_set()
            await wait_until(lambda: server.registry.route("hooked") is not None)
        bad = ClientCredentials.token("alpha", TOKENS["alpha"])  # unknown to the hook
        async with connect(server, server_identity, bad) as peer:
            closed = await peer.wait_closed()
            assert closed.code == CloseCode.AUTHENTICATION_FAILED
        assert asked == ["hooked", "alpha"]


async def test_a_failing_authenticate_hook_costs_only_that_client(
    server_identity: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def authenticate(name: str) -> bytes | None:
        if name == "beta":
            raise RuntimeError("credential store is down")
        return TOKENS.get(name)

    caplog.set_level(logging.CRITICAL, logger="snocat.server")
    async with running(server_identity, authenticate=authenticate) as server:
        beta = ClientCredentials.token("beta", TOKENS["beta"])
        async with connect(server, server_identity, beta) as peer:
            closed = await peer.wait_closed()
            assert closed.code == CloseCode.INTERNAL_ERROR  # not the token's fault: retry
            assert "could not check" in closed.reason
        async with connect(server, server_identity) as peer:
            assert peer.authenticated.is_set()
            assert (await peer.request_port()).port == server.config.port_range.start


async def test_wrong_token_and_unknown_name_are_rejected(server_identity: Any) -> None:
    async with running(server_identity) as server:
        for credentials in (
            ClientCredentials.token("alpha", b"not-the-right-secret-000000"),
            ClientCredentials.token("nobody", b"whatever-secret-0000000000"),
        ):
            async with connect(server, server_identity, credentials) as peer:
                closed = await peer.wait_closed()
                assert not peer.authenticated.is_set()
                assert closed.code == CloseCode.AUTHENTICATION_FAILED
                assert "wrong token" in closed.reason
        assert len(server.registry) == 0
        assert server.tunnels() == []


async def test_tunnel_limit_rejects_with_a_reason(server_identity: Any) -> None:
    async with running(server_identity, max_tunnels=1) as server:
        async with connect(server, server_identity) as first:
            assert first.authenticated.is_set()
            beta = ClientCredentials.token("beta", TOKENS["beta"])
            async with connect(server, server_identity, beta) as second:
                closed = await second.wait_closed()
                assert closed.code == CloseCode.LIMIT_EXCEEDED
                assert "tunnel limit" in closed.reason
            assert [s.name for s in server.tunnels()] == ["alpha"]
        await wait_until(lambda: not server.tunnels())
        # The slot is free again.
        async with connect(server, server_identity, beta) as third:
            assert third.authenticated.is_set()


async def test_simple_ack_names_the_tunnel_by_peer_address(
    server_identity: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="snocat.server")
    async with running(server_identity, auth="simple-ack") as server:
        assert any("SimpleAck" in r.getMessage() for r in caplog.records)
        async with connect(server, server_identity, ClientCredentials.simple_ack()) as peer:
            assert peer.authenticated.is_set()
            name = format_address(peer.local_address)
            await wait_until(lambda: server.registry.route(name) is not None)
            record = server.registry.route(name)
            assert record is not None and record.scheme == "simple-ack"
            handle = await peer.request_port()
            assert handle.port == server.config.port_range.start


# proxyme: grants, forwarding, release ----------------------------------------------


async def test_proxyme_grants_the_lowest_free_port_on_tcp_bind(server_identity: Any) -> None:
    async with running(server_identity) as server:
        feed = server.activity.subscribe()
        start = server.config.port_range.start
        async with connect(server, server_identity) as peer:
            first = await peer.request_port()
            second = await peer.request_port()
            assert first.addresses == (f"127.0.0.1:{start}",)
            assert second.addresses == (f"127.0.0.1:{start + 1}",)
            assert server.ports_in_use == {start, start + 1}
            record = server.registry.route("alpha")
            assert record is not None and record.ports == (start, start + 1)
            assert server.registry.by_port(start) == record
            assert server.tunnels()[0].ports == (start, start + 1)
            assert not await port_is_closed(start)
            granted = [a for a in drain(feed) if isinstance(a, activity.PortGranted)]
            assert [(g.port, g.target) for g in granted] == [
                (start, "127.0.0.1:5000"),
                (start + 1, "127.0.0.1:5000"),
            ]


async def test_tcp_bind_is_really_used(server_identity: Any) -> None:
    port_range = free_port_range(2)
    try:
        probe = socket.socket()
        probe.bind(("127.0.0.2", port_range.start))
        probe.close()
    except OSError:
        pytest.skip("127.0.0.2 is not usable here")
    async with (
        running(server_identity, tcp_bind="127.0.0.2", port_range=port_range) as server,
        connect(server, server_identity) as peer,
    ):
        handle = await peer.request_port()
        assert handle.addresses == (f"127.0.0.2:{port_range.start}",)
        assert await port_is_closed(handle.port, "127.0.0.1")
        reply = await tcp_exchange(handle.port, b"ping", host="127.0.0.2")
        assert reply == b"ping"


async def test_a_port_the_os_refuses_is_skipped(server_identity: Any) -> None:
    port_range = free_port_range(3)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port_range.start))
    squatter.listen()
    try:
        async with (
            running(server_identity, port_range=port_range) as server,
            connect(server, server_identity) as peer,
        ):
            handle = await peer.request_port()
            assert handle.port == port_range.start + 1
            assert server.ports_in_use == {port_range.start + 1}
    finally:
        squatter.close()


async def test_forwarding_carries_megabytes_both_ways_with_half_close(
    server_identity: Any,
) -> None:
    upload = os.urandom(4_000_000)
    download = os.urandom(3_000_000)
    async with running(server_identity) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity, handler=make_digest_handler(download)) as peer:
            handle = await peer.request_port()
            with anyio.fail_after(30):
                reply = await tcp_exchange(handle.port, upload)
            assert reply[:64] == hashlib.sha256(upload).hexdigest().encode()
            assert hashlib.sha256(reply[64:]).digest() == hashlib.sha256(download).digest()
            # visitor-address (agreed by default): the suffix names the visitor and
            # the public port it came to (docs/protocol.md 3.18).
            [(address, visitor)] = [split_visitor(a) for a in peer.incoming]
            assert str(address) == PROXY_TCP_ADDRESS
            assert visitor is not None
            assert (str(visitor.source), str(visitor.destination)) == ("127.0.0.1", "127.0.0.1")
            assert visitor.destination_port == handle.port
            closed = await next_activity(feed, activity.StreamClosed)
            assert closed.address == PROXY_TCP_ADDRESS
            assert closed.name == "alpha"
            assert closed.visitor == f"127.0.0.1:{visitor.source_port}"
            assert (closed.bytes_out, closed.bytes_in) == (len(upload), len(reply))
            assert closed.error is None
            [status] = server.tunnels()
            assert status.bytes_out >= len(upload) and status.bytes_in >= len(reply)


async def test_a_fast_uploader_is_held_back_by_a_stalled_reader(server_identity: Any) -> None:
    # The target side reads nothing until told: what the uploader gets rid of must be
    # bounded by the windows and the kernel's socket buffers, not queued without end
    # in the aggregator; afterwards every byte arrives, in order.
    cap = 192 * 1024 * 1024
    release = anyio.Event()
    received = hashlib.sha256()
    counted = [0]

    async def stalled(stream: TunnelStream) -> None:
        await release.wait()
        async for chunk in stream:
            received.update(chunk)
            counted[0] += len(chunk)
        await stream.send_eof()

    # The uploader is another process, as a real client is: pushing from a thread of
    # this one would take turns with the aggregator's event loop for the GIL.
    script = """
import hashlib, os, socket, sys
port, cap = int(sys.argv[1]), int(sys.argv[2])
sent, total, chunk = hashlib.sha256(), 0, os.urandom(256 * 1024)
with socket.create_connection(("127.0.0.1", port)) as sock:
    sock.settimeout(1.0)
    while total < cap:
        try:
            n = sock.send(chunk)
        except TimeoutError:
            break  # held back for a whole second
        sent.update(chunk[:n])
        total += n
    print(total, sent.hexdigest(), flush=True)
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(60)
    assert sock.recv(1) == b""
"""

    async with (
        running(server_identity) as server,
        connect(server, server_identity, handler=stalled) as peer,
    ):
        handle = await peer.request_port()
        command = [sys.executable, "-c", script, str(handle.port), str(cap)]
        async with await anyio.open_process(command) as uploader:
            assert uploader.stdout is not None
            with anyio.fail_after(60):
                line = b""
                while not line.endswith(b"\n"):  # blocked for 1 s, or the cap reached
                    line += await uploader.stdout.receive()
                release.set()
                await uploader.wait()
        pushed, digest = int(line.split()[0]), line.split()[1].decode()
        assert pushed < 64 * 1024 * 1024, f"{pushed / 1e6:.0f} MB taken in ahead of the reader"
        assert uploader.returncode == 0
        assert counted[0] == pushed
        assert received.hexdigest() == digest


async def test_a_hundred_concurrent_connections_stay_intact(server_identity: Any) -> None:
    async with running(server_identity) as server, connect(server, server_identity) as peer:
        handle = await peer.request_port()
        failures: list[int] = []

        async def one(index: int) -> None:
            data = random.Random(index).randbytes(1024 + 337 * index)
            if await tcp_exchange(handle.port, data) != data:
                failures.append(index)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for index in range(100):
                    tg.start_soon(one, index)
        assert failures == []
        assert len(peer.incoming) == 100


async def test_release_request_frees_the_port(server_identity: Any) -> None:
    async with running(server_identity) as server, connect(server, server_identity) as peer:
        handle = await peer.request_port()
        port = handle.port
        assert await tcp_exchange(port, b"hello") == b"hello"
        await handle.release()
        assert server.ports_in_use == frozenset()
        assert await port_is_closed(port)
        record = server.registry.route("alpha")
        assert record is not None and record.ports == ()
        again = await peer.request_port()
        assert again.port == port


async def test_client_closing_the_tunnel_frees_everything(server_identity: Any) -> None:
    async with running(server_identity) as server:
        # The pump's own tasks have started once its timer task runs.
        await wait_until(
            lambda: any("_timer_loop" in (t.name or "") for t in anyio.get_running_tasks())
        )
        tasks_before = len(anyio.get_running_tasks())
        async with connect(server, server_identity) as peer:
            handle = await peer.request_port()
            port = handle.port
            for _ in range(3):
                assert await tcp_exchange(port, b"x" * 1000) == b"x" * 1000
            conn = await anyio.connect_tcp("127.0.0.1", port)  # left open on purpose
            await wait_until(lambda: len(peer.incoming) == 4)
            assert len(anyio.get_running_tasks()) > tasks_before
            peer.close()
        await wait_until(lambda: not server.ports_in_use and len(server.registry) == 0)
        assert await port_is_closed(port)
        with anyio.fail_after(5):  # the forwarded connection was closed too
            assert await receive_all(conn) == b""
        await conn.aclose()
        # Every task the tunnel started has ended.
        await wait_until(lambda: len(anyio.get_running_tasks()) == tasks_before)
        beta = ClientCredentials.token("beta", TOKENS["beta"])
        async with connect(server, server_identity, beta) as other:
            assert (await other.request_port()).port == port


async def test_client_vanishing_frees_everything(server_identity: Any) -> None:
    async with running(server_identity, idle_timeout=1.0, keepalive_interval=0.25) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity) as peer:
            handle = await peer.request_port()
            port = handle.port
            peer.abandon()
        await wait_until(lambda: not server.ports_in_use and len(server.registry) == 0, 10)
        assert await port_is_closed(port)
        kinds = [type(a) for a in drain(feed)]
        assert activity.PortReleased in kinds and activity.TunnelClosed in kinds
        beta = ClientCredentials.token("beta", TOKENS["beta"])
        async with connect(server, server_identity, beta) as other:
            assert (await other.request_port()).port == port


async def test_a_restarted_client_takes_its_name_and_port_over_at_once(
    server_identity: Any,
) -> None:
    """kill -9 of a client and a restart within the idle timeout: the old tunnel still
    lingers (30 s here), but the newcomer under the same name takes it over: the old
    one is closed with TAKEN_OVER and its port is the newcomer's at once (it was 8080 ->
    8081, with two live tunnels sharing the name)."""
    async with running(server_identity, idle_timeout=30.0) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity) as old:
            port = (await old.request_port()).port
            old.abandon()  # gone without a word: the aggregator cannot know yet
        with anyio.fail_after(8):
            async with connect(server, server_identity) as new:
                assert (await new.request_port()).port == port
                assert [t.name for t in server.tunnels()] == ["alpha"]
                closed = [a for a in drain(feed) if isinstance(a, activity.TunnelClosed)]
                assert [c.code for c in closed] == [CloseCode.TAKEN_OVER]
                assert "taken over" in closed[0].reason


async def test_a_live_tunnel_taken_over_is_told_why(server_identity: Any) -> None:
    async with (
        running(server_identity) as server,
        connect(server, server_identity) as first,
    ):
        port = (await first.request_port()).port
        async with connect(server, server_identity) as second:
            reason = await first.wait_closed()
            assert (reason.code, reason.by_peer) == (CloseCode.TAKEN_OVER, True)
            assert "another client authenticated as 'alpha'" in reason.reason
            assert (await second.request_port()).port == port
            assert len(server.registry) == 1


async def test_a_reconnecting_name_gets_its_port_back(server_identity: Any) -> None:
    async with running(server_identity) as server:
        start = server.config.port_range.start
        beta = ClientCredentials.token("beta", TOKENS["beta"])
        async with connect(server, server_identity) as alpha_peer:
            assert (await alpha_peer.request_port()).port == start
            async with connect(server, server_identity, beta) as beta_peer:
                assert (await beta_peer.request_port()).port == start + 1
        await wait_until(lambda: not server.ports_in_use and len(server.registry) == 0)
        # Both ports are free; beta is offered its own, not the lowest.
        async with connect(server, server_identity, beta) as beta_again:
            assert (await beta_again.request_port()).port == start + 1
            gamma = ClientCredentials.token("gamma", TOKENS["gamma"])
            async with connect(server, server_identity, gamma) as gamma_peer:
                assert (await gamma_peer.request_port()).port == start


@pytest.mark.parametrize("features", [frozenset(), FEATURES], ids=["0.8-peer", "options"])
async def test_exhausted_range_answers_null(server_identity: Any, features: frozenset[str]) -> None:
    """A full range: the 0.8 denial (JSON null) to a peer that agreed on no additions,
    a reason to one that agreed on proxyme-options."""
    async with running(server_identity, port_range=free_port_range(1)) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity, features=features) as peer:
            granted = await peer.request_port()
            assert isinstance(granted.event, Granted)
            denied = await peer.request_port()
            assert isinstance(denied.event, Denied)
            if features:
                assert "no free port" in denied.event.reason and denied.event.retry
            else:
                assert denied.event == Denied()
            [activity_denied] = [a for a in drain(feed) if isinstance(a, activity.PortDenied)]
            assert activity_denied.name == "alpha"
            assert activity_denied.target == "127.0.0.1:5000"
            assert server.ports_in_use == {granted.port}


async def test_a_port_asked_for_is_granted_or_refused_with_a_reason(server_identity: Any) -> None:
    ports = free_port_range(3)
    async with (
        running(server_identity, port_range=ports) as server,
        connect(server, server_identity) as peer,
    ):
        wanted = ports.start + 2
        granted = await peer.request_port(public_port=wanted)
        assert isinstance(granted.event, Granted) and granted.port == wanted
        taken = await peer.request_port(ProxymeRequest("127.0.0.1", 5001), public_port=wanted)
        assert taken.event == Denied(f"port {wanted} is in use by another tunnel", True)
        outside = await peer.request_port(public_port=ports.end + 1)
        assert outside.event == Denied(
            f"port {ports.end + 1} is outside this aggregator's range {ports}", False
        )
        assert server.ports_in_use == {wanted}


async def test_bad_proxyme_request_is_refused(server_identity: Any) -> None:
    async with running(server_identity) as server, connect(server, server_identity) as peer:
        with pytest.raises(StreamRefusedError):
            await peer.open_stream(RouteAddress.of("proxyme", "9.9.9", "5000"))
        assert (await peer.request_port()).port == server.config.port_range.start


async def test_forwarding_to_a_refusing_client_closes_the_connection(
    server_identity: Any,
) -> None:
    async with running(server_identity) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity, handler=None) as peer:
            handle = await peer.request_port()
            conn = await anyio.connect_tcp("127.0.0.1", handle.port)
            with anyio.fail_after(5):
                assert await receive_all(conn) == b""
            await conn.aclose()
            refused = await next_activity(feed, activity.StreamRefused)
            assert refused.address == PROXY_TCP_ADDRESS


# Routing --------------------------------------------------------------------------


async def test_unknown_route_is_refused_and_the_hook_routes(server_identity: Any) -> None:
    seen: list[tuple[str, str]] = []

    def route(status: TunnelStatus, address: RouteAddress) -> Handler | None:
        seen.append((status.name, str(address)))
        return echo if address == RouteAddress.of("echo") else None

    async with running(server_identity, route=route) as server:
        feed = server.activity.subscribe()
        async with connect(server, server_identity) as peer:
            with pytest.raises(StreamRefusedError):
                await peer.open_stream(RouteAddress.of("no", "such", "service"))
            stream = await peer.open_stream(RouteAddress.of("echo"))
            await stream.send(b"marco")
            await stream.send_eof()
            assert await receive_all(stream) == b"marco"
            await stream.aclose()
            assert seen == [("alpha", "/no/such/service"), ("alpha", "/echo")]
            kinds = [type(a) for a in drain(feed)]
            assert activity.StreamRefused in kinds and activity.StreamOpened in kinds


async def test_a_failing_route_hook_or_handler_costs_only_that_stream(
    server_identity: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(stream: TunnelStream) -> None:
        await stream.receive()
        raise RuntimeError("service bug")

    def route(status: TunnelStatus, address: RouteAddress) -> Handler | None:
        if address == RouteAddress.of("hook-bug"):
            raise RuntimeError("router bug")
        return {"broken": broken, "echo": echo}.get(str(address)[1:])

    caplog.set_level(logging.CRITICAL, logger="snocat.server")
    async with (
        running(server_identity, route=route) as server,
        connect(server, server_identity) as peer,
    ):
        with pytest.raises(StreamRefusedError):
            await peer.open_stream(RouteAddress.of("hook-bug"))
        stream = await peer.open_stream(RouteAddress.of("broken"))
        await stream.send(b"boom")
        with anyio.fail_after(5), pytest.raises(anyio.BrokenResourceError):
            await receive_all(stream)
        stream = await peer.open_stream(RouteAddress.of("echo"))
        await stream.send(b"still here")
        await stream.send_eof()
        assert await receive_all(stream) == b"still here"
        assert peer.closed is None and len(server.tunnels()) == 1


async def test_without_a_hook_every_other_route_is_refused(server_identity: Any) -> None:
    async with running(server_identity) as server, connect(server, server_identity) as peer:
        with pytest.raises(StreamRefusedError):
            await peer.open_stream(RouteAddress.of("echo"))
        # The tunnel survives a refusal.
        assert (await peer.request_port()).port == server.config.port_range.start


async def test_open_stream_reaches_the_newest_tunnel_of_a_name(server_identity: Any) -> None:
    async with running(server_identity) as server:
        with pytest.raises(TunnelNotFoundError):
            await server.open_stream("alpha", RouteAddress.of("svc"))
        async with connect(server, server_identity, handler=None) as older:
            await wait_until(lambda: len(server.registry) == 1)
            async with connect(server, server_identity) as newer:
                # One name, one tunnel: the newer took the name over (3.15).
                assert (await older.wait_closed()).code == CloseCode.TAKEN_OVER
                await wait_until(lambda: len(server.registry) == 1)
                stream = await server.open_stream("alpha", RouteAddress.of("svc"))
                await stream.send(b"x" * 100_000)
                await stream.send_eof()
                assert await receive_all(stream) == b"x" * 100_000
                await stream.aclose()
                assert [str(a) for a in newer.incoming] == ["/svc"]
                assert older.incoming == []


# Shutdown -------------------------------------------------------------------------


async def test_graceful_shutdown_lets_streams_finish_then_closes_everything(
    server_identity: Any,
) -> None:
    async def slow_echo(stream: TunnelStream) -> None:
        data = await receive_all(stream)
        await anyio.sleep(0.5)
        await stream.send(data)
        await stream.send_eof()

    config = ServerConfig(
        certificate_pem=server_identity.certificate_pem,
        private_key_pem=server_identity.private_key_pem,
        quic_port=0,
        tokens=TOKENS,
        port_range=free_port_range(2),
        shutdown_grace=5.0,
    )
    server = TunnelServer(config)
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            feed = server.activity.subscribe()
            udp_port = server.quic_address[1]
            async with connect(server, server_identity, handler=slow_echo) as peer:
                handle = await peer.request_port()
                conn = await anyio.connect_tcp("127.0.0.1", handle.port)
                await conn.send(b"in flight")
                await conn.send_eof()
                await wait_until(lambda: len(peer.incoming) == 1)
                before = anyio.current_time()
                await server.shutdown()
                assert anyio.current_time() - before < 3.0
                # The in-flight stream finished within the grace period.
                assert await receive_all(conn) == b"in flight"
                await conn.aclose()
                closed = await peer.wait_closed()
                assert closed.code == CloseCode.SHUTTING_DOWN
                assert await port_is_closed(handle.port)
            # serve() has returned: the test's task group ends without cancelling it.
        assert server.ports_in_use == frozenset()
        assert len(server.registry) == 0
        # The UDP socket is closed: its port can be bound again.
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", udp_port))
        udp.close()
        kinds = [type(a) for a in drain(feed)]
        assert kinds.count(activity.PortReleased) == 1
        assert activity.TunnelClosed in kinds
        with pytest.raises(anyio.EndOfStream):
            await feed.get()  # the feed ended with the server
        # New connections are not accepted any more.
        with pytest.raises(RuntimeError):
            await server.serve()


async def test_shutdown_grace_bounds_stuck_streams(server_identity: Any) -> None:
    async def stuck(stream: TunnelStream) -> None:
        await anyio.sleep_forever()

    async with running(server_identity) as server:
        async with connect(server, server_identity, handler=stuck) as peer:
            handle = await peer.request_port()
            conn = await anyio.connect_tcp("127.0.0.1", handle.port)
            await conn.send(b"anyone?")
            await wait_until(lambda: len(peer.incoming) == 1)
            before = anyio.current_time()
            with anyio.fail_after(5):
                await server.shutdown(grace=0.3)
            assert anyio.current_time() - before < 2.0
            with anyio.fail_after(5):
                with contextlib.suppress(anyio.BrokenResourceError):  # a reset is as good
                    assert await receive_all(conn) == b""
            await conn.aclose()
            assert (await peer.wait_closed()).code == CloseCode.SHUTTING_DOWN
            assert await port_is_closed(handle.port)
        assert server.ports_in_use == frozenset()


async def test_during_the_grace_period_nothing_new_is_accepted(server_identity: Any) -> None:
    async def stuck(stream: TunnelStream) -> None:
        await anyio.sleep_forever()

    async with (
        running(server_identity) as server,
        connect(server, server_identity, handler=stuck) as peer,
    ):
        handle = await peer.request_port()
        conn = await anyio.connect_tcp("127.0.0.1", handle.port)
        await wait_until(lambda: len(peer.incoming) == 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.shutdown, 2.0)
            with anyio.fail_after(1):  # every listener stops at once
                while not await port_is_closed(handle.port):
                    await anyio.sleep(0.01)
            with pytest.raises(StreamRefusedError):  # new streams are refused
                await peer.request_port()
            with pytest.raises(StreamRefusedError):
                await server.open_stream("alpha", RouteAddress.of("svc"))
            beta = ClientCredentials.token("beta", TOKENS["beta"])
            async with connect(server, server_identity, beta) as late:
                assert (await late.wait_closed()).code == CloseCode.SHUTTING_DOWN
            assert peer.closed is None  # the grace period is not over yet
        assert (await peer.wait_closed()).code == CloseCode.SHUTTING_DOWN
        await conn.aclose()


async def test_cancelling_serve_shuts_down_gracefully(server_identity: Any) -> None:
    config = ServerConfig(
        certificate_pem=server_identity.certificate_pem,
        private_key_pem=server_identity.private_key_pem,
        quic_port=0,
        tokens=TOKENS,
        port_range=free_port_range(2),
        shutdown_grace=1.0,
    )
    server = TunnelServer(config)
    serve_scope = anyio.CancelScope()

    async def run(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
        with serve_scope:
            await server.serve(task_status=task_status)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            async with connect(server, server_identity) as peer:
                handle = await peer.request_port()
                assert await tcp_exchange(handle.port, b"before") == b"before"
                serve_scope.cancel()
                closed = await peer.wait_closed()
                assert closed.code == CloseCode.SHUTTING_DOWN
        assert await port_is_closed(handle.port)
        assert server.ports_in_use == frozenset()
        assert len(server.registry) == 0
        with anyio.fail_after(1):
            await server.shutdown()  # already stopped: returns at once


async def test_configuration_errors_and_shutdown_before_serve(
    server_identity: Any, other_identity: Any
) -> None:
    with pytest.raises(ValueError, match="auth must be one of"):
        ServerConfig(certificate_pem=b"", private_key_pem=b"", auth="password")
    mismatched = ServerConfig(
        certificate_pem=server_identity.certificate_pem,
        private_key_pem=other_identity.private_key_pem,
        quic_port=0,
    )
    with pytest.raises(LocalProtocolError, match="does not belong"):
        await TunnelServer(mismatched).serve()
    server = TunnelServer(
        ServerConfig(
            certificate_pem=server_identity.certificate_pem,
            private_key_pem=server_identity.private_key_pem,
            quic_port=0,
        )
    )
    await server.shutdown()
    with anyio.fail_after(1):
        await server.serve()  # returns at once: it was shut down before it started
    assert server.tunnels() == []


# visitor-address: only to peers that agreed (docs/protocol.md 3.18) -----------------------

#: The route address of 2.8's trace (a snocat 0.8 aggregator's), byte for byte.
REFERENCE_ADDRESS = bytes.fromhex(
    "2F70726F78792D7463702F646E732F3132372E302E302E312F7463702F35303030"
)


@pytest.mark.parametrize(
    ("auth", "features"),
    [
        ("simple-ack", frozenset()),  # a snocat 0.8 peer: SimpleAck lists nothing
        ("token", frozenset({PROXYME_OPTIONS})),  # a snocat of ours before 3.18
    ],
    ids=["simple-ack", "token-without-it"],
)
async def test_a_peer_that_did_not_agree_gets_the_0_8_route_address(
    server_identity: Any, auth: str, features: frozenset[str]
) -> None:
    credentials = ClientCredentials.simple_ack() if auth == "simple-ack" else None
    async with (
        running(server_identity, auth=auth) as server,
        connect(server, server_identity, credentials, features=features) as peer,
    ):
        assert VISITOR_ADDRESS not in peer.tunnel.features
        handle = await peer.request_port()
        with anyio.fail_after(10):
            await tcp_exchange(handle.port, b"hello")
        [address] = peer.incoming
        assert address.encode() == REFERENCE_ADDRESS
        assert split_visitor(address) == (address, None)
