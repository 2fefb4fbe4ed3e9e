"""Batched UDP I/O (snocat_anyio/_udp.py and its generated blocking copy) on real
loopback sockets: GSO sends arrive as the datagrams they were, GRO buffers are split
at the right boundaries, and a socket whose kernel refuses either still moves every
datagram, one per call."""

from __future__ import annotations

import errno
import hashlib
import socket
import sys
import time
from typing import Any

import pytest

from snocat_anyio import _udp
from snocat_sync import _udp as sync_udp

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="GSO and GRO are Linux's")

HOST = "127.0.0.1"


def _pair() -> tuple[socket.socket, socket.socket]:
    sender = _udp.bind_udp(HOST, 0)
    receiver = _udp.bind_udp(HOST, 0)
    return sender, receiver


def _gso_works() -> bool:
    sender, receiver = _pair()
    try:
        batching = _udp.UdpBatching(sender, 16)
        _udp.send_datagrams(sender, [(b"x" * 100, receiver.getsockname())] * 2, batching)
        return batching.gso
    finally:
        sender.close()
        receiver.close()


needs_gso = pytest.mark.skipif(not _gso_works(), reason="this kernel has no UDP GSO")


def _datagrams(count: int, size: int, last: int | None = None) -> list[bytes]:
    out = [bytes([i % 251]) * size for i in range(count)]
    if last is not None:
        out[-1] = b"\xee" * last
    return out


def _drain(sock: socket.socket, want: int, *, batching: Any = None) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < want and time.monotonic() < deadline:
        _udp.receive_batch(sock, lambda data, addr, now: got.append(data), 0.0, 64, batching)
        time.sleep(0.001)
    return got


class Counting:
    """Counts the system calls made on a socket (sendto / sendmsg)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[str] = []
        self.family = sock.family

    def sendto(self, data: bytes, addr: Any) -> int:
        self.calls.append("sendto")
        return self.sock.sendto(data, addr)

    def sendmsg(self, buffers: Any, control: Any, flags: int, addr: Any) -> int:
        self.calls.append("sendmsg")
        return self.sock.sendmsg(buffers, control, flags, addr)


@needs_gso
@pytest.mark.parametrize("module", [_udp, sync_udp], ids=["anyio", "sync"])
@pytest.mark.parametrize(
    ("count", "size", "last"), [(10, 1200, None), (7, 1452, 300), (5, 9000, 1)]
)
def test_gso_send_arrives_as_the_datagrams_sent(
    module: Any, count: int, size: int, last: int | None
) -> None:
    sender, receiver = _pair()
    try:
        counting = Counting(sender)
        batching = module.UdpBatching(sender, 16)
        datagrams = _datagrams(count, size, last)
        addr = receiver.getsockname()
        dropped, error = module.send_datagrams(
            counting,
            [(d, addr) for d in datagrams],
            batching,
        )
        assert (dropped, error) == (0, None)
        assert counting.calls == ["sendmsg"]  # one call for all of them
        assert _drain(receiver, count) == datagrams
    finally:
        sender.close()
        receiver.close()


@needs_gso
def test_gso_groups_by_peer_and_size_in_send_order() -> None:
    sender, one = _pair()
    two = _udp.bind_udp(HOST, 0)
    try:
        counting = Counting(sender)
        batching = _udp.UdpBatching(sender, 4)
        a, b = one.getsockname(), two.getsockname()
        plan = [(b"a" * 500, a)] * 6 + [(b"b" * 500, b)] * 2 + [(b"c" * 700, a), (b"d" * 500, a)]
        assert _udp.send_datagrams(counting, plan, batching) == (0, None)  # type: ignore[arg-type]
        # a: 4 + 2 (at most 4 a call), b: 2, a: a larger one starts a new run
        assert counting.calls == ["sendmsg", "sendmsg", "sendmsg", "sendmsg"]
        assert _drain(one, 8) == [d for d, addr in plan if addr == a]
        assert _drain(two, 2) == [b"b" * 500] * 2
    finally:
        for sock in (sender, one, two):
            sock.close()


def test_gro_receive_splits_coalesced_buffers() -> None:
    sender, receiver = _pair()
    try:
        batching = _udp.UdpBatching(receiver, 16)
        if not batching.gro:
            pytest.skip("this kernel has no UDP GRO")
        sending = _udp.UdpBatching(sender, 16)
        addr = receiver.getsockname()
        first = _datagrams(12, 1300, 77)
        second = _datagrams(3, 999)
        _udp.send_datagrams(sender, [(d, addr) for d in first], sending)
        _udp.send_datagrams(sender, [(d, addr) for d in second], sending)
        buffers: list[int] = []
        original = receiver.recvmsg

        class Spy:
            family = receiver.family

            def recvmsg(self, *args: Any) -> Any:
                result = original(*args)
                buffers.append(len(result[0]))
                return result

        got = _drain(Spy(), 15, batching=batching)  # type: ignore[arg-type]
        assert got == first + second  # contents and boundaries
        if sending.gso:
            assert len(buffers) < 15  # the kernel handed some up coalesced
    finally:
        sender.close()
        receiver.close()


def test_setsockopt_failure_turns_batching_off_and_sends_everything(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sender, receiver = _pair()
    try:

        class Refusing:
            family = sender.family

            def setsockopt(self, *args: Any) -> None:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")

            def sendmsg(self, *args: Any) -> int:
                raise OSError(errno.EIO, "Input/output error")

            def sendto(self, data: bytes, addr: Any) -> int:
                return sender.sendto(data, addr)

        refusing = Refusing()
        with caplog.at_level("DEBUG", logger="snocat.udp"):
            batching = _udp.UdpBatching(refusing, 16)  # type: ignore[arg-type]
            assert not batching.gro
            addr = receiver.getsockname()
            datagrams = _datagrams(20, 1200)
            result = _udp.send_datagrams(refusing, [(d, addr) for d in datagrams], batching)  # type: ignore[arg-type]
            assert result == (0, None)
            assert not batching.gso  # EIO at sendmsg: off for this socket
            more = _datagrams(5, 800)
            assert _udp.send_datagrams(refusing, [(d, addr) for d in more], batching) == (0, None)  # type: ignore[arg-type]
        assert _drain(receiver, 25) == datagrams + more
        messages = [r.getMessage() for r in caplog.records if "not available" in r.getMessage()]
        assert len(messages) == 2  # once for GRO, once for GSO
    finally:
        sender.close()
        receiver.close()


def test_one_segment_per_call_is_no_batching() -> None:
    sender, receiver = _pair()
    try:
        batching = _udp.UdpBatching(sender, 1)
        assert not batching.gso and not batching.gro
        counting = Counting(sender)
        addr = receiver.getsockname()
        datagrams = _datagrams(4, 1200)
        _udp.send_datagrams(counting, [(d, addr) for d in datagrams], batching)  # type: ignore[arg-type]
        assert counting.calls == ["sendto"] * 4
        assert (
            hashlib.sha256(b"".join(_drain(receiver, 4))).digest()
            == hashlib.sha256(b"".join(datagrams)).digest()
        )
    finally:
        sender.close()
        receiver.close()


# A whole tunnel, batching on and off ---------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("segments", [16, 1], ids=["batched", "one-per-call"])
async def test_tunnel_transfer_with_batching_on_and_off(
    server_identity: Any, segments: int
) -> None:
    import anyio
    from test_anyio_client import (
        aggregator,
        client_config,
        exchange,
        public_port,
        running_client,
        tcp_target,
    )

    from snocat_proto._wire.limits import Limits

    limits = Limits(udp_segments_per_call=segments)
    async with (
        aggregator(server_identity, limits=limits, max_datagram_size=1452) as server,
        tcp_target() as target,
        running_client(
            client_config(server, server_identity, (target,), limits=limits, max_datagram_size=1452)
        ) as client,
    ):
        with anyio.fail_after(60):
            await exchange(public_port(client), 3_000_000, 3_000_000, seed=segments)


@pytest.mark.parametrize(
    ("segments", "discovery"),
    [(16, True), (1, True), (16, False)],
    ids=["batched-pmtud", "one-per-call-pmtud", "batched-fixed"],
)
def test_blocking_binding_transfer_with_batching_and_discovery(
    server_identity: Any, segments: int, discovery: bool
) -> None:
    from test_sync import client_config, exchange_tcp, public_port, sync_server, tcp_target

    from snocat_proto._wire.limits import Limits
    from snocat_sync import TunnelClient

    options: dict[str, Any] = {
        "limits": Limits(udp_segments_per_call=segments),
        "path_mtu_discovery": discovery,
    }
    with (
        sync_server(server_identity, **options) as server,
        tcp_target() as target,
        TunnelClient(
            client_config(server.quic_address, server_identity, (target,), **options)
        ) as client,
    ):
        exchange_tcp(public_port(client.granted), 3_000_000, 3_000_000, seed=segments)
