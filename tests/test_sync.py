"""snocat_sync, the blocking binding, end to end: real QUIC over loopback UDP, real TCP.

Both directions of interoperation with the anyio binding (whose server and client run
on an event loop in a portal thread), and the sync binding with itself: multi-MB
checksummed transfers both ways, dozens of concurrent streams from several threads,
timeouts, backpressure, refusals, resets, failing handlers, and shutdowns after
which no snocat thread is left (``threading.enumerate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.from_thread
import pytest

from snocat_anyio import TunnelClient as AnyioClient
from snocat_anyio import TunnelServer as AnyioServer
from snocat_anyio._stream import TunnelStream as AnyioStream
from snocat_proto._service import activity
from snocat_proto._service.config import ClientConfig, ServerConfig
from snocat_proto._service.ports import PortRange
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_sync import (
    AuthenticationError,
    ConnectError,
    RouteHandler,
    StreamRefusedError,
    StreamResetError,
    TunnelClient,
    TunnelClosedError,
    TunnelNotFoundError,
    TunnelServer,
    TunnelStatus,
    TunnelStream,
)

TOKENS = {
    "alpha": b"alpha-secret-0123456789abcdef",
    "beta": b"beta-secret-0123456789abcdef",
}
ALPHA = ClientCredentials.token("alpha", TOKENS["alpha"])
#: How long any single step may take before the test fails instead of hanging.
STEP = 10.0
DIGEST = "/digest"


# Helpers ------------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # closed meanwhile
        return ""


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    """Every test must end with every thread it started stopped, and (where /proc
    tells) every socket it opened closed."""
    before = set(threading.enumerate())
    fds_before = open_fds()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not left, f"threads left running: {[t.name for t in left]}"
    leaked = [fd for fd in open_fds() - fds_before if "socket" in fd_target(fd)]
    assert not leaked, f"sockets left open: {leaked}"


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


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        time.sleep(0.01)


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def digest_reply(received: bytes) -> bytes:
    """What the digest services answer: the SHA-256 (hex) of what they read, then as
    many bytes as its first 8 bytes asked for (so half-close is exercised)."""
    size = int.from_bytes(received[:8].ljust(8, b"\0"), "big")
    return hashlib.sha256(received).hexdigest().encode() + payload(size)


def digest_handler(stream: TunnelStream) -> None:
    """A sync route handler: the digest service on a tunnel stream."""
    received = bytearray()
    while chunk := stream.recv():
        received += chunk
    stream.sendall(digest_reply(bytes(received)))
    stream.shutdown(socket.SHUT_WR)


async def anyio_digest_handler(stream: AnyioStream) -> None:
    received = bytearray()
    async for chunk in stream:
        received += chunk
    await stream.send(digest_reply(bytes(received)))
    await stream.send_eof()


def request(upload: int, download: int, seed: int) -> bytes:
    return download.to_bytes(8, "big") + random.Random(seed).randbytes(max(0, upload - 8))


def check_reply(data: bytes, reply: bytes, download: int) -> None:
    assert reply[:64].decode() == hashlib.sha256(data).hexdigest()
    assert reply[64:] == payload(download)


def exchange_stream(stream: Any, upload: int, download: int, seed: int = 0) -> None:
    """Send a digest request over a socket or a tunnel stream, half-close, check the reply.

    The request is written by a second thread while this one reads, so neither side's
    buffers need to hold everything."""
    data = request(upload, download, seed)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            stream.sendall(data)
            stream.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    try:
        while chunk := stream.recv(65536):
            received += chunk
    finally:
        sender.join(STEP * 3)
    assert not errors, errors
    check_reply(data, bytes(received), download)


def exchange_tcp(port: int, upload: int, download: int, seed: int = 0) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=STEP * 3) as conn:
        exchange_stream(conn, upload, download, seed)


class TcpTarget:
    """The TCP service behind a client: the digest service, one thread per connection."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self.target = ProxyTcpTarget.parse_host_port(f"127.0.0.1:{self.port}")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="test-target")
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="test-target-conn")
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(STEP * 3)
            received = bytearray()
            try:
                while chunk := conn.recv(65536):
                    received += chunk
                conn.sendall(digest_reply(bytes(received)))
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(STEP)
        self._listener.close()
        for thread in self._threads:
            thread.join(STEP)


@contextmanager
def tcp_target() -> Iterator[ProxyTcpTarget]:
    target = TcpTarget()
    try:
        yield target.target
    finally:
        target.close()


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


def client_config(
    address: tuple[str, int], identity: Any, targets: tuple[ProxyTcpTarget, ...], **options: Any
) -> ClientConfig:
    settings: dict[str, Any] = {
        "server_host": address[0],
        "server_port": address[1],
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


@contextmanager
def sync_server(identity: Any, route: Any = None, **options: Any) -> Iterator[TunnelServer]:
    server = TunnelServer(server_config(identity, **options), route=route)
    with server:
        yield server


@contextmanager
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal("asyncio", name="test-portal") as running:
        yield running


@contextmanager
def anyio_server(
    loop: anyio.from_thread.BlockingPortal, identity: Any, route: Any = None, **options: Any
) -> Iterator[AnyioServer]:
    server = AnyioServer(server_config(identity, **options), route=route)
    future, _ = loop.start_task(server.serve)
    try:
        yield server
    finally:
        loop.call(server.shutdown, 0.2)
        future.result(STEP)


@contextmanager
def anyio_client(
    loop: anyio.from_thread.BlockingPortal, config: ClientConfig
) -> Iterator[AnyioClient]:
    client = AnyioClient(config)
    future, _ = loop.start_task(client.run)
    try:
        yield client
    finally:
        loop.call(client.aclose)
        future.result(STEP)


def public_port(addresses: tuple[str, ...] | None) -> int:
    assert addresses is not None
    return int(addresses[0].rpartition(":")[2])


def route_digest(status: TunnelStatus, address: RouteAddress) -> RouteHandler | None:
    return digest_handler if str(address) == DIGEST else None


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` for ``i < count`` in ``count`` threads; re-raise the first error."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"test-worker-{i}") for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STEP * 4)
    assert not any(t.is_alive() for t in threads), "workers hung"
    if errors:
        raise errors[0]


# Interop with the anyio binding ----------------------------------------------------


def test_sync_client_through_the_anyio_server_carries_megabytes_both_ways(
    server_identity: Any,
) -> None:
    with (
        portal() as loop,
        anyio_server(loop, server_identity, route=lambda s, a: anyio_digest_handler) as server,
        tcp_target() as target,
        TunnelClient(client_config(server.quic_address, server_identity, (target,))) as client,
    ):
        port = public_port(client.granted)
        assert port in server.ports_in_use
        feed = client.activity.subscribe()
        exchange_tcp(port, 4_000_000, 3_000_000, seed=1)
        exchange_tcp(port, 10, 2_000_000, seed=2)  # tiny upload, then a long reply
        opened = feed.get(STEP)
        assert isinstance(opened, activity.StreamOpened)
        assert opened.direction == "in"
        closed = feed.get(STEP)
        assert isinstance(closed, activity.StreamClosed)
        assert (closed.bytes_in, closed.bytes_out) == (4_000_000, 64 + 3_000_000)
        # The other way: a stream the sync client opens to the anyio aggregator's route.
        with client.open_stream(RouteAddress.parse(DIGEST), timeout=STEP) as stream:
            stream.settimeout(STEP)
            exchange_stream(stream, 2_000_000, 2_500_000, seed=3)
        assert [s.name for s in server.tunnels()] == ["alpha"]
    assert not server.ports_in_use


def test_anyio_client_through_the_sync_server_carries_megabytes_both_ways(
    server_identity: Any,
) -> None:
    with (
        portal() as loop,
        sync_server(server_identity, route=route_digest) as server,
        tcp_target() as target,
        anyio_client(
            loop, client_config(server.quic_address, server_identity, (target,))
        ) as client,
    ):
        port = public_port(client.granted)
        assert server.ports_in_use == {port}
        exchange_tcp(port, 4_000_000, 3_000_000, seed=4)
        exchange_tcp(port, 3_000_000, 10, seed=5)

        async def digest_over_stream() -> None:
            stream = await client.open_stream(RouteAddress.parse(DIGEST))
            async with stream:
                data = request(2_000_000, 2_000_000, 6)
                async with anyio.create_task_group() as tg:

                    async def send() -> None:
                        await stream.send(data)
                        await stream.send_eof()

                    tg.start_soon(send)
                    reply = b"".join([chunk async for chunk in stream])
            check_reply(data, reply, 2_000_000)

        loop.call(digest_over_stream)
        (status,) = server.tunnels()
        assert (status.name, status.scheme, status.ports) == ("alpha", "token", (port,))
        # Sent to the tunnel: both uploads and the reply to the client's own stream.
        assert status.bytes_out >= 9_000_000
        assert status.bytes_in >= 5_000_000
        # Outbound from the sync aggregator to the anyio client's target.
        with server.open_stream("alpha", target.to_address(), timeout=STEP) as stream:
            stream.settimeout(STEP)
            exchange_stream(stream, 1_000_000, 1_000_000, seed=7)
    assert not server.ports_in_use


# The sync binding with itself -------------------------------------------------------


def test_sixty_four_concurrent_streams_from_eight_threads(server_identity: Any) -> None:
    with (
        sync_server(server_identity, route=route_digest) as server,
        tcp_target() as target,
        TunnelClient(client_config(server.quic_address, server_identity, (target,))) as client,
    ):
        port = public_port(client.granted)
        opened = threading.Barrier(8, timeout=STEP)

        def worker(i: int) -> None:
            # Eight streams per thread, all open at once across all threads.
            streams = [
                client.open_stream(RouteAddress.parse(DIGEST), timeout=STEP) for _ in range(8)
            ]
            opened.wait()  # 64 streams are open now
            try:
                for n, stream in enumerate(streams):
                    stream.settimeout(STEP)
                    exchange_stream(stream, 30_000 + 997 * n, 40_000 + 89 * i, seed=i * 8 + n)
            finally:
                for stream in streams:
                    stream.close()

        run_threads(8, worker)
        # And as many concurrent TCP connections through the public port.
        run_threads(60, lambda i: exchange_tcp(port, 20_000 + i * 97, 30_000 + i * 89, i))
        # Every relay winds down; only the proxyme stream is left.
        wait_until(lambda: [s.open_streams for s in server.tunnels()] == [1])


def test_timeouts_backpressure_and_nonblocking_calls(server_identity: Any) -> None:
    held = threading.Event()
    release = threading.Event()
    seen: list[int] = []

    def slow_reader(stream: TunnelStream) -> None:
        """Reads nothing until told to, then everything."""
        held.set()
        release.wait(STEP)
        total = 0
        while chunk := stream.recv():
            total += len(chunk)
        seen.append(total)
        stream.sendall(b"done")

    def route(status: TunnelStatus, address: RouteAddress) -> RouteHandler | None:
        return {"/slow": slow_reader, DIGEST: digest_handler}.get(str(address))

    limits_kb = 64 * 1024
    limits = Limits(stream_send_buffer=limits_kb, stream_receive_window=limits_kb)
    with (
        sync_server(server_identity, route=route, limits=limits) as server,
        tcp_target() as target,
        TunnelClient(
            client_config(server.quic_address, server_identity, (target,), limits=limits)
        ) as client,
    ):
        with (
            contextlib.ExitStack() as cleanup,
            client.open_stream(RouteAddress.parse("/slow"), timeout=STEP) as stream,
        ):
            cleanup.callback(release.set)  # even if the test fails
            assert held.wait(STEP)
            # Nothing arrives: recv times out like a socket.
            stream.settimeout(0.2)
            started = time.monotonic()
            with pytest.raises(socket.timeout):
                stream.recv(10)
            assert 0.15 < time.monotonic() - started < 2.0
            stream.setblocking(False)
            with pytest.raises(BlockingIOError):
                stream.recv(10)
            # The peer does not read: the writer blocks once the window and the send
            # buffer are full, and a timeout ends the wait.
            stream.settimeout(0.5)
            data = payload(1_000_000)
            with pytest.raises(TimeoutError):
                stream.sendall(data)
            blocked_at = stream.bytes_sent
            assert 0 < blocked_at <= 3 * limits_kb
            assert stream.gettimeout() == 0.5
            # Once the reader reads, the rest goes through.
            release.set()
            stream.settimeout(STEP)
            stream.sendall(data[blocked_at:])
            stream.shutdown(socket.SHUT_WR)
            assert stream.recv(10) == b"done"
            assert stream.recv(10) == b""
        wait_until(lambda: bool(seen))
        assert seen == [1_000_000]
        # send() takes what fits and says how much.
        with client.open_stream(RouteAddress.parse(DIGEST), timeout=STEP) as stream:
            stream.settimeout(STEP)
            sent = stream.send(request(300_000, 5, 8))
            assert 0 < sent <= 300_000
        with pytest.raises(ValueError):
            stream.settimeout(-1)


def test_refusals_resets_and_a_failing_handler_cost_only_their_stream(
    server_identity: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="snocat.sync.server")
    got_stream: list[TunnelStream] = []
    gate = threading.Event()

    def boom(stream: TunnelStream) -> None:
        raise RuntimeError("a bug in the user's handler")

    def keep(stream: TunnelStream) -> None:
        got_stream.append(stream)
        gate.wait(STEP)
        with pytest.raises(StreamResetError) as info:
            while stream.recv():
                pass
        assert info.value.by_peer

    def route(status: TunnelStatus, address: RouteAddress) -> RouteHandler | None:
        text = str(address)
        if text == "/hook-fails":
            raise RuntimeError("a bug in the route hook")
        return {"/boom": boom, "/keep": keep, DIGEST: digest_handler}.get(text)

    other = unused_port()
    with (
        sync_server(server_identity, route=route) as server,
        tcp_target() as target,
        TunnelClient(client_config(server.quic_address, server_identity, (target,))) as client,
    ):
        feed = client.activity.subscribe()
        for text in ("/nothing-here", "/hook-fails"):
            with pytest.raises(StreamRefusedError) as refused:
                client.open_stream(RouteAddress.parse(text), timeout=STEP)
            assert isinstance(refused.value, ConnectionRefusedError)
        # A handler that raises resets its stream; the pump and the tunnel go on.
        with client.open_stream(RouteAddress.parse("/boom"), timeout=STEP) as stream:
            stream.settimeout(STEP)
            with pytest.raises(StreamResetError):
                while stream.recv():
                    pass
        # A reset reaches the peer's reader.
        stream = client.open_stream(RouteAddress.parse("/keep"), timeout=STEP)
        stream.sendall(b"some bytes")
        wait_until(lambda: bool(got_stream))
        stream.reset()
        gate.set()
        with pytest.raises(OSError):
            stream.recv()
        # The aggregator's streams to the client: outside the allow-list, not
        # proxy-tcp, unknown tunnel names, are refused.
        for text in (f"/proxy-tcp/dns/127.0.0.1/tcp/{other}", "/echo"):
            with pytest.raises(StreamRefusedError):
                server.open_stream("alpha", RouteAddress.parse(text), timeout=STEP)
        record = feed.get(STEP)
        while not isinstance(record, activity.StreamRefused):
            record = feed.get(STEP)
        assert "allow-list" in record.reason
        with pytest.raises(TunnelNotFoundError):
            server.open_stream("nobody", target.to_address())
        # Everything still works.
        with client.open_stream(RouteAddress.parse(DIGEST), timeout=STEP) as stream:
            stream.settimeout(STEP)
            exchange_stream(stream, 100_000, 100_000)
        exchange_tcp(public_port(client.granted), 1000, 1000)


def test_closing_the_client_releases_the_port_and_closes_the_tunnel(
    server_identity: Any,
) -> None:
    with portal() as loop, anyio_server(loop, server_identity) as server, tcp_target() as target:
        feed = server.activity.subscribe()
        client = TunnelClient(client_config(server.quic_address, server_identity, (target,)))
        client.start(timeout=STEP)
        port = public_port(client.granted)
        assert server.ports_in_use == {port}
        client.close()
        client.close()  # idempotent
        assert client.granted is None
        assert not server.ports_in_use  # released before the tunnel closed
        assert not [t for t in threading.enumerate() if t.name.startswith("snocat")]

        async def closed_record() -> activity.TunnelClosed:
            with anyio.fail_after(STEP):
                async for record in feed:
                    if isinstance(record, activity.TunnelClosed):
                        return record
            raise AssertionError("no ConnectionTerminated")

        record = loop.call(closed_record)
        assert (record.code, record.reason, record.by_peer) == (
            CloseCode.NORMAL,
            "client shutting down",
            True,
        )
        with pytest.raises(socket.error):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_server_shutdown_closes_tunnels_and_leaves_no_thread(server_identity: Any) -> None:
    server = TunnelServer(server_config(server_identity), route=route_digest).start()
    with tcp_target() as target:
        config = client_config(server.quic_address, server_identity, (target,), reconnect=False)
        client = TunnelClient(config).start(timeout=STEP)
        try:
            port = public_port(client.granted)
            # A connection in flight while the server shuts down.
            conn = socket.create_connection(("127.0.0.1", port), timeout=STEP)
            conn.sendall(b"\0" * 8 + b"x" * 1000)
            stream = client.open_stream(RouteAddress.parse(DIGEST), timeout=STEP)
            wait_until(lambda: server.tunnels()[0].open_streams >= 3)
            started = time.monotonic()
            server.shutdown(grace=0.2)
            assert time.monotonic() - started < 5
            assert not server.ports_in_use
            assert not server.tunnels()
            with pytest.raises(TunnelClosedError) as closed:
                client.wait(STEP)
            assert closed.value.code == CloseCode.SHUTTING_DOWN
            with pytest.raises(TunnelClosedError):
                stream.recv()
            conn.settimeout(STEP)
            assert conn.recv(100) == b""
            conn.close()
            server.shutdown()  # idempotent
            assert server.wait(0)
            stream.close()
        finally:
            client.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("snocat")]


def test_authentication_and_trust_failures_raise_promptly(
    server_identity: Any, other_identity: Any
) -> None:
    with sync_server(server_identity) as server, tcp_target() as target:
        wrong = ClientCredentials.token("alpha", b"not-the-secret-0123456789")
        started = time.monotonic()
        with pytest.raises(AuthenticationError, match="refused authentication"):
            TunnelClient(
                client_config(server.quic_address, server_identity, (target,), credentials=wrong)
            ).start(timeout=STEP)
        with pytest.raises(ConnectError, match="not trusted"):
            TunnelClient(client_config(server.quic_address, other_identity, (target,))).start(
                timeout=STEP
            )
        assert time.monotonic() - started < 5
        dead = ("127.0.0.1", unused_port())
        with pytest.raises(ConnectError, match="nothing answers"):
            TunnelClient(
                client_config(
                    dead, server_identity, (target,), reconnect=False, connect_timeout=0.3
                )
            ).start(timeout=STEP)
        assert not server.tunnels()


def test_a_full_range_denies_the_port_but_keeps_the_tunnel(server_identity: Any) -> None:
    single = free_port_range(1)
    with (
        sync_server(server_identity, route=route_digest, port_range=single) as server,
        tcp_target() as target,
        TunnelClient(client_config(server.quic_address, server_identity, (target,))) as first,
    ):
        assert first.granted is not None
        config = client_config(
            server.quic_address,
            server_identity,
            (target,),
            credentials=ClientCredentials.token("beta", TOKENS["beta"]),
        )
        with TunnelClient(config) as second:
            assert second.granted is None
            with pytest.raises(TimeoutError):
                second.wait_granted(timeout=0.1)
            with second.open_stream(RouteAddress.parse(DIGEST), timeout=STEP) as stream:
                stream.settimeout(STEP)
                exchange_stream(stream, 1000, 1000)
            first.close()
            # Asked again with backoff, the port is granted once it is free.
            assert public_port(second.wait_granted(timeout=STEP)) == single.start
            wait_until(lambda: [s.name for s in server.tunnels()] == ["beta"])


def test_server_activity_is_stamped_with_wall_clock_time(server_identity: Any) -> None:
    with (
        sync_server(server_identity, route=route_digest) as server,
        tcp_target() as target,
    ):
        feed = server.activity.subscribe()
        before = time.time()
        with TunnelClient(client_config(server.quic_address, server_identity, (target,))):
            pass
        records = [feed.get(timeout=STEP) for _ in range(3)]
        assert [type(r) for r in records][:2] == [
            activity.TunnelConnected,
            activity.TunnelAuthenticated,
        ]
        assert all(r is not None and before <= r.at <= time.time() for r in records)


def test_snocat_sync_imports_no_event_loop() -> None:
    code = (
        "import sys, snocat_sync, snocat_sync._client_flows, snocat_sync._server_flows\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('anyio', 'asyncio', 'trio', "
        "'snocat_anyio')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=STEP)


README_SNIPPET = """
from snocat_sync import ClientConfig, ClientCredentials, ProxyTcpTarget, TunnelClient

config = ClientConfig(
    server_host="127.0.0.1", server_port={port}, server_name="localhost",
    targets=(ProxyTcpTarget.parse_host_port("127.0.0.1:{target}"),),  # the local port
    credentials=ClientCredentials.token("alpha", {secret!r}),
    authority_pem=open({cert!r}, "rb").read(),  # the aggregator's certificate
)
with TunnelClient(config) as tunnel:
    print("public address:", ", ".join(tunnel.wait_granted()), flush=True)
    tunnel.wait()  # serve until Ctrl-C; reconnects on its own
"""


def test_the_readme_snippet_exposes_a_local_port_until_ctrl_c(server_identity: Any) -> None:
    with sync_server(server_identity) as server, tcp_target() as target:
        code = README_SNIPPET.format(
            port=server.quic_address[1],
            target=target.port,
            secret=TOKENS["alpha"],
            cert=str(server_identity.certificate_path),
        )
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("public address: 127.0.0.1:"), line
            port = int(line.strip().rpartition(":")[2])
            exchange_tcp(port, 500_000, 500_000, seed=9)
            process.send_signal(signal.SIGINT)
            process.wait(STEP)
        finally:
            process.kill()
            process.wait(STEP)
            process.stdout.close()  # type: ignore[union-attr]
        # The snippet's exit released the port and closed the tunnel.
        wait_until(lambda: not server.ports_in_use and not server.tunnels())


def test_replacing_tokens_closes_only_the_revoked_name(server_identity: Any) -> None:
    """The blocking server's reload: alpha keeps transferring, beta's client stops with
    AuthenticationError and the reason."""
    beta = ClientCredentials.token("beta", TOKENS["beta"])
    with sync_server(server_identity) as server, tcp_target() as target:
        address = server.quic_address
        with (
            TunnelClient(client_config(address, server_identity, (target,))) as alpha,
            TunnelClient(
                client_config(address, server_identity, (target,), credentials=beta)
            ) as beta_client,
        ):
            port = public_port(alpha.wait_granted(STEP))
            done: list[bool] = []

            def move() -> None:
                exchange_tcp(port, 2_000_000, 2_000_000, seed=3)
                done.append(True)

            mover = threading.Thread(target=move)
            mover.start()
            assert server.replace_tokens({"alpha": TOKENS["alpha"]}) == ("beta",)
            with pytest.raises(AuthenticationError, match="revoked"):
                beta_client.wait(STEP)
            mover.join(30)
            assert done == [True]
            assert [t.name for t in server.tunnels()] == ["alpha"]
