"""The client's TCP dial to a ``proxy-tcp`` target (snocat_anyio.client.connect_target).

An IP-literal target is dialled on the event loop: no name resolution and no worker
thread, on asyncio and trio.  A refusal is an ``OSError``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import anyio
import anyio.abc
import anyio.to_thread
import pytest
import trio

from snocat_anyio._dial import connect_target
from snocat_proto._wire.targets import ProxyTcpTarget, TargetKind

pytestmark = pytest.mark.anyio

STEP = 10.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _unused_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def no_resolving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup or hop to a worker thread fails the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"resolved or hopped threads: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(anyio, "getaddrinfo", forbidden)
    monkeypatch.setattr(anyio.to_thread, "run_sync", forbidden)
    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", forbidden)
    monkeypatch.setattr(trio.to_thread, "run_sync", forbidden)


@pytest.fixture(params=["127.0.0.1", "::1"])
def listener(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """A listening socket (made before ``no_resolving`` patches anything)."""
    host = str(request.param)
    if ":" in host and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as sock:
        sock.settimeout(STEP)
        yield sock


def _target(host: str, port: int) -> ProxyTcpTarget:
    return ProxyTcpTarget(TargetKind.IP6 if ":" in host else TargetKind.IP4, host, port)


async def test_an_ip_literal_is_dialled_without_resolving(
    listener: socket.socket, no_resolving: None
) -> None:
    host, port = listener.getsockname()[:2]
    with anyio.fail_after(STEP):
        tcp = await connect_target(_target(host, port))
    async with tcp:
        assert isinstance(tcp, anyio.abc.SocketStream)
        raw = tcp.extra(anyio.abc.SocketAttribute.raw_socket)
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert tcp.extra(anyio.abc.SocketAttribute.remote_port) == port
        accepted, _ = listener.accept()
        with accepted:
            accepted.sendall(b"hello")
            with anyio.fail_after(STEP):
                assert await tcp.receive() == b"hello"
                await tcp.send(b"back")
            assert accepted.recv(16) == b"back"
            await tcp.send_eof()
            assert accepted.recv(16) == b""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_refused_ip_literal_raises_oserror(host: str, no_resolving: None) -> None:
    if ":" in host and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    target = _target(host, _unused_port(host))
    with anyio.fail_after(STEP), pytest.raises(ConnectionRefusedError, match="refused"):
        await connect_target(target)


async def test_the_guard_catches_a_name_lookup(no_resolving: None) -> None:
    # Keeps the tests above honest: a name target does resolve, and is caught.
    with anyio.fail_after(STEP), pytest.raises(AssertionError, match="resolved"):
        await connect_target(ProxyTcpTarget(TargetKind.DNS, "localhost", 9))
