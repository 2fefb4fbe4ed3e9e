"""Reaching tunnels by name (docs/protocol.md 3.14, 3.18) end to end, on real loopback
sockets: the aggregator's shared ``--http`` and ``--tls`` listeners, the client's targets
by name, the visitor's address to the target (PROXY protocol), trusted load balancers,
pools.  The anyio tests run on asyncio and trio; the blocking binding has its own.

The visitors are blocking code (http.client, ssl, raw sockets) run in worker threads,
so every one of them is the same for every binding.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from names_harness import (
    BIG,
    DOMAIN,
    FQDN,
    HOST,
    TlsTarget,
    get,
    raw_exchange,
    read_all,
    start_proxy_target,
    start_tls_target,
    tls_digest,
    website,
)

import snocat_sync
from snocat_anyio import ClientConfig, ServerConfig, TunnelClient, TunnelServer
from snocat_proto._service import activity
from snocat_proto._service.ports import PortRange
from snocat_proto._service.visitors import TrustedNetworks
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.names import TunnelDomain
from snocat_proto._wire.network import port_of
from snocat_proto._wire.proxy_protocol import ProxyAddresses, encode_v1, encode_v2
from snocat_proto._wire.targets import ProxyTcpTarget

TOKENS = {
    "office-1": b"office-1-secret-0123456789",
    "office-2": b"office-2-secret-0123456789",
    "pool-1": b"pool-1-secret-0123456789ab",
}
STEP = 20.0
#: A short decision timeout, so that a silent visitor is cut off within the test.
QUICK = Limits(sniff_timeout=1.0)


def free_port_range(count: int = 4) -> PortRange:
    for _ in range(200):
        start = int.from_bytes(os.urandom(2), "big") % 20000 + 20000
        try:
            socks = []
            for port in range(start, start + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((HOST, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return PortRange(start, start + count - 1)
    raise RuntimeError("no free port range")


def server_config(identity: Any, **options: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "certificate_pem": identity.certificate_pem,
        "private_key_pem": identity.private_key_pem,
        "quic_host": HOST,
        "quic_port": 0,
        "tokens": TOKENS,
        "port_range": free_port_range(),
        "shutdown_grace": 0.5,
        "domain": TunnelDomain.parse(DOMAIN),
        "http_listen": (HOST, 0),
        "tls_listen": (HOST, 0),
        **options,
    }
    return ServerConfig(**settings)


def client_config(
    server: Any, identity: Any, name: str = "office-1", **options: Any
) -> ClientConfig:
    settings: dict[str, Any] = {
        "server_host": HOST,
        "server_port": server.quic_address[1],
        "server_name": "localhost",
        "targets": (),
        "credentials": ClientCredentials.token(name, TOKENS[name]),
        "authority_pem": identity.certificate_pem,
        "backoff_initial": 0.1,
        "backoff_max": 0.5,
        **options,
    }
    return ClientConfig(**settings)


def shared_port(server: Any, service: str) -> int:
    return port_of(server.shared_addresses[service])


def target(port: int) -> ProxyTcpTarget:
    return ProxyTcpTarget.parse_host_port(f"{HOST}:{port}")


@pytest.fixture(scope="module")
def tls_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTarget]:
    found, listener = start_tls_target(tmp_path_factory.mktemp("tls-target"))
    yield found
    listener.close()


@asynccontextmanager
async def aggregator(identity: Any, **options: Any) -> AsyncIterator[TunnelServer]:
    async with anyio.create_task_group() as tg:
        server: TunnelServer = await tg.start(
            TunnelServer(server_config(identity, **options)).serve
        )
        try:
            yield server
        finally:
            with anyio.fail_after(STEP):
                await server.shutdown(grace=0.2)


@asynccontextmanager
async def tunnel_client(config: ClientConfig) -> AsyncIterator[TunnelClient]:
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            client: TunnelClient = await tg.start(TunnelClient(config).run)
            await client.wait_granted()
        try:
            yield client
        finally:
            with anyio.fail_after(STEP):
                await client.aclose()


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with anyio.fail_after(STEP * 2):
        return await anyio.to_thread.run_sync(lambda: function(*args, **kwargs))


async def next_of(subscription: Any, kind: type[activity.Activity]) -> Any:
    with anyio.fail_after(STEP):
        async for record in subscription:
            if isinstance(record, kind):
                return record
    raise AssertionError(f"no {kind.__name__}")


# HTTP by name -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_by_name_and_what_a_name_that_reaches_nothing_gets(
    server_identity: Any,
) -> None:
    with website() as site:
        async with aggregator(server_identity) as server:
            feed = server.activity.subscribe()
            config = client_config(server, server_identity, http_target=target(site.port))
            async with tunnel_client(config) as client:
                port = shared_port(server, "http")
                assert client.granted == (f"{FQDN}:{port}",)
                status, body = await in_thread(get, port, "/big")
                assert status == 200 and hashlib.sha256(body).hexdigest() == site.digest
                closed = await next_of(feed, activity.StreamClosed)
                assert closed.name == "office-1" and closed.visitor.startswith(f"{HOST}:")
                assert closed.bytes_in >= BIG
                assert [s.names for s in server.tunnels()] == [("http",)]
                # A name nobody has, a known name offline, a host outside the domain,
                # a tunnel that publishes no TLS target.
                assert await in_thread(get, port, "/", f"nobody.{DOMAIN}") == (
                    404,
                    b"no tunnel named nobody\n",
                )
                assert await in_thread(get, port, "/", f"office-2.{DOMAIN}") == (
                    502,
                    b"tunnel office-2 is offline\n",
                )
                assert await in_thread(get, port, "/", "example.org") == (
                    404,
                    b"no tunnel at example.org\n",
                )
                tls = shared_port(server, "tls")
                with pytest.raises(OSError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
                    await in_thread(tls_digest, tls, server_identity.certificate_path, b"x")
            failures = server.name_routing_failures()
            assert (failures["unknown_name"], failures["offline"], failures["no_service"]) == (
                2,
                1,
                1,
            )
            # The client said goodbye: the name reaches nothing now, and says so.
            assert await in_thread(get, port, "/", FQDN) == (502, b"tunnel office-1 is offline\n")


@pytest.mark.anyio
async def test_keep_alive_split_heads_the_head_bound_and_a_dead_target(
    server_identity: Any,
) -> None:
    with website() as site:
        async with aggregator(server_identity) as server:
            config = client_config(server, server_identity, http_target=target(site.port))
            async with tunnel_client(config):
                port = shared_port(server, "http")
                await in_thread(_keep_alive, port)
                assert len(site.connections) == 1  # three requests, one connection
                # A Host header split across packets.
                head = f"GET /who HTTP/1.1\r\nHost: {FQDN}\r\nConnection: close\r\n\r\n".encode()
                reply = await in_thread(raw_exchange, port, head[:20], head[20:24], head[24:])
                assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"web")
                # A 16 KiB head is read whole (the bound counts all of it); one byte
                # more is a 431, answered before the close.
                exact = _head_of(Limits().max_http_header_bytes)
                reply = await in_thread(raw_exchange, port, exact)
                assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
                reply = await in_thread(raw_exchange, port, _head_of(16385))
                assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
            # The target is gone, the tunnel too: offline.
        site_port = site.port
    async with aggregator(server_identity) as server:
        config = client_config(server, server_identity, http_target=target(site_port))
        async with tunnel_client(config):  # its target refuses connections now
            status, body = await in_thread(get, shared_port(server, "http"))
            assert (status, body) == (502, b"tunnel office-1 could not reach its HTTP target\n")
            assert server.name_routing_failures()["refused"] == 1


def _keep_alive(port: int) -> None:
    connection = http.client.HTTPConnection(HOST, port, timeout=STEP)
    try:
        for path in ("/who", "/big", "/who"):
            connection.request("GET", path, headers={"Host": FQDN})
            response = connection.getresponse()
            assert response.status == 200
            response.read()
    finally:
        connection.close()


def _head_of(size: int) -> bytes:
    start = f"GET /who HTTP/1.1\r\nHost: {FQDN}\r\nConnection: close\r\nX-Fill: ".encode()
    filler = size - len(start) - 4
    return start + b"a" * filler + b"\r\n\r\n"


@pytest.mark.anyio
async def test_a_silent_visitor_is_cut_off_and_holds_nobody_up(server_identity: Any) -> None:
    with website() as site:
        async with aggregator(server_identity, limits=QUICK) as server:
            config = client_config(server, server_identity, http_target=target(site.port))
            async with tunnel_client(config):
                port = shared_port(server, "http")
                silent = [socket.create_connection((HOST, port)) for _ in range(3)]
                try:
                    # While they say nothing, others are served.
                    for _ in range(3):
                        assert (await in_thread(get, port, "/who"))[0] == 200
                    for sock in silent:
                        sock.settimeout(STEP)
                        assert await in_thread(sock.recv, 100) == b""  # cut off
                finally:
                    for sock in silent:
                        sock.close()
                assert server.name_routing_failures()["timeout"] == 3


# TLS by name ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tls_by_name_end_to_end(server_identity: Any, tls_target: TlsTarget) -> None:
    data = os.urandom(1_000_000)
    async with aggregator(server_identity) as server:
        config = client_config(server, server_identity, tls_target=target(tls_target.port))
        async with tunnel_client(config) as client:
            port = shared_port(server, "tls")
            assert client.granted == (f"{FQDN}:{port}",)
            # The visitor verifies the target's certificate: TLS is end to end.
            digest = await in_thread(tls_digest, port, tls_target.certificate, data)
            assert digest == hashlib.sha256(data).hexdigest()
            # A ClientHello split across reads.
            split = await in_thread(tls_digest, port, tls_target.certificate, b"abc", split=100)
            assert split == hashlib.sha256(b"abc").hexdigest()
            # No SNI: the unrecognized_name alert, then a clean close.
            with pytest.raises(OSError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
                await in_thread(tls_digest, port, tls_target.certificate, b"x", server_name=None)
            # Junk instead of a ClientHello: closed without a reply.
            assert await in_thread(raw_exchange, port, b"GET / HTTP/1.1\r\n\r\n") == b""
            failures = server.name_routing_failures()
            assert (failures["no_name"], failures["bad_request"]) == (1, 1)


# The visitor's address, to the target (PROXY protocol) ---------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("version", [1, 2])
async def test_the_target_sees_the_visitor(server_identity: Any, version: int) -> None:
    found, listener = start_proxy_target()
    try:
        async with aggregator(server_identity) as server:
            config = client_config(
                server,
                server_identity,
                targets=(target(found.port),),
                http_target=target(found.port),
                proxy_protocol=version,
            )
            async with tunnel_client(config) as client:
                public = port_of(client.grants[config.targets[0]])
                for port, first in ((public, b"hello"), (shared_port(server, "http"), None)):
                    answer, visitor = await in_thread(_visit, port, first)
                    line, _, rest = answer.partition(b"\n")
                    assert line.decode() == f"{HOST} {visitor[1]} {HOST} {port}"
                    assert rest == (first or _host_head())
    finally:
        listener.close()


def _host_head() -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {FQDN}\r\n\r\n".encode()


def _visit(port: int, first: bytes | None, lb_header: bytes = b"") -> tuple[bytes, tuple[str, int]]:
    """Connect to ``port``, send ``lb_header`` and ``first`` (or an HTTP head), half-close,
    read the answer; returns it and our own address."""
    with socket.create_connection((HOST, port), timeout=STEP) as sock:
        sock.sendall(lb_header + (first if first is not None else _host_head()))
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock), sock.getsockname()


@pytest.mark.anyio
async def test_a_trusted_load_balancer_says_who_and_anyone_else_may_not(
    server_identity: Any,
) -> None:
    found, listener = start_proxy_target()
    claimed = ProxyAddresses.from_sockaddrs(("203.0.113.9", 4444), ("198.51.100.1", 443))
    try:
        trusted = TrustedNetworks(["127.0.0.0/8"])
        async with aggregator(server_identity, proxy_protocol_from=trusted) as server:
            config = client_config(
                server,
                server_identity,
                targets=(target(found.port),),
                http_target=target(found.port),
                proxy_protocol=2,
            )
            async with tunnel_client(config) as client:
                public = port_of(client.grants[config.targets[0]])
                for port, first in ((public, b"hi"), (shared_port(server, "http"), None)):
                    for header in (encode_v1(claimed), encode_v2(claimed)):
                        answer, _ = await in_thread(_visit, port, first, header)
                        assert answer.split(b"\n")[0] == b"203.0.113.9 4444 198.51.100.1 443"
                    # From a trusted peer the header is required.
                    answer, _ = await in_thread(_visit, port, first)
                    assert answer == b""
        untrusted = TrustedNetworks(["10.0.0.0/8"])
        async with aggregator(server_identity, proxy_protocol_from=untrusted) as server:
            config = client_config(
                server, server_identity, targets=(target(found.port),), proxy_protocol=1
            )
            async with tunnel_client(config) as client:
                public = port_of(client.grants[config.targets[0]])
                seen = len(found.seen)
                answer, _ = await in_thread(_visit, public, b"x", encode_v1(claimed))
                assert not answer.startswith(b"203.0.113.9")  # refused, never believed
                answer, visitor = await in_thread(_visit, public, b"plain")
                assert answer == f"{HOST} {visitor[1]} {HOST} {public}\nplain".encode()
                assert found.seen[seen:].count(f"{HOST} {visitor[1]} {HOST} {public}") == 1
                assert not any("203.0.113.9" in line for line in found.seen[seen:])
                await _eventually(lambda: server.name_routing_failures()["proxy_header"] == 1)
    finally:
        listener.close()


async def _eventually(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(STEP):
        while not condition():
            await anyio.sleep(0.02)


# Pools ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_pool_spreads_visitors_and_survives_a_member_leaving(
    server_identity: Any,
) -> None:
    pools = frozenset({"pool-1"})
    with website("a") as site_a, website("b") as site_b:
        async with aggregator(server_identity, pools=pools) as server:
            port = shared_port(server, "http")
            first = client_config(
                server, server_identity, "pool-1", http_target=target(site_a.port)
            )
            second = client_config(
                server, server_identity, "pool-1", http_target=target(site_b.port)
            )
            async with tunnel_client(first), tunnel_client(second):
                assert len(server.tunnels()) == 2  # no takeover in a pool
                seen = Counter(
                    [(await in_thread(get, port, "/who", f"pool-1.{DOMAIN}"))[1] for _ in range(40)]
                )
                assert seen == {b"a": 20, b"b": 20}
            # Both left: offline (the name is known).
            assert (await in_thread(get, port, "/who", f"pool-1.{DOMAIN}"))[0] == 502


# The blocking binding -----------------------------------------------------------------------


def test_the_blocking_binding_routes_by_name_too(
    server_identity: Any, tls_target: TlsTarget
) -> None:
    with website() as site:
        config = server_config(server_identity)
        with snocat_sync.TunnelServer(config) as server:
            client_settings = client_config(
                server,
                server_identity,
                http_target=target(site.port),
                tls_target=target(tls_target.port),
            )
            with snocat_sync.TunnelClient(client_settings) as client:
                client.wait_granted(STEP)
                status, body = get(shared_port(server, "http"), "/big")
                assert status == 200 and hashlib.sha256(body).hexdigest() == site.digest
                digest = tls_digest(shared_port(server, "tls"), tls_target.certificate, b"sync")
                assert digest == hashlib.sha256(b"sync").hexdigest()
                assert get(shared_port(server, "http"), "/", f"nobody.{DOMAIN}")[0] == 404
            deadline = time.monotonic() + STEP
            while get(shared_port(server, "http"))[0] != 502:
                assert time.monotonic() < deadline
                time.sleep(0.05)
