"""The UDP socket work of a pump: binding, reading a batch, sending.

Also the sockets of UDP services (``udp-datagrams``): a public UDP port's (bound
by :func:`~._bind.bind_port`) and a client flow's to its target, read a batch at a
time (:func:`read_batch`) and written without waiting (:func:`send_one`).

Plain non-blocking stdlib sockets, no event loop and no threads: ``snocat_sync``
has a generated copy of this module, and only the waiting differs between the two.

Where the kernel has them (Linux 4.18 and 5.0 on), datagrams move in batches
(docs/performance.md, "Batched UDP I/O and path MTU discovery"): UDP GSO sends
several equal-size datagrams to one peer in one ``sendmsg`` (``UDP_SEGMENT``; the
last may be shorter) and UDP GRO hands several received ones up in one
``recvmsg``, with their size in the ancillary data (``UDP_GRO``).  Python 3.11's
stdlib names neither, so the numbers are Linux's.  A socket where either fails
(another kernel, a device without checksum offload: EIO) turns it off for itself,
says so once at debug level, and goes on one datagram per call.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterable

from snocat_proto._wire.network import NetworkAddress

__all__ = [
    "MAX_DATAGRAM",
    "UdpBatching",
    "bind_udp",
    "read_batch",
    "receive_batch",
    "send_datagrams",
    "send_one",
]

logger = logging.getLogger("snocat.udp")

#: The largest UDP payload there is: a datagram is never truncated.
MAX_DATAGRAM = 65535

#: Errors that only say the peer (or the way to it) is gone: not worth a warning; a
#: client's pump passes them on (its connected socket learns of ICMP errors).
_UNREACHABLE = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)

#: Linux's numbers (include/uapi/linux/udp.h, in.h, in6.h): not in Python 3.11.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU_DISCOVER = 10
IPV6_MTU_DISCOVER = 23
#: Set the don't-fragment bit and ignore the kernel's path MTU cache: the core
#: finds the path's datagram size itself (path MTU discovery), and a probe too
#: large for the path must be lost, not fragmented.
PMTUDISC_PROBE = 3
#: Segments the kernel takes in one GSO call (UDP_MAX_SEGMENTS), and the bytes:
#: the segments of one call make one IP packet of at most 64 KiB before they are
#: split, headers included.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65535 - 40 - 8 - 512
#: An error at setsockopt or sendmsg that says this socket cannot batch.
_NO_BATCHING = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
#: Room for the ancillary data of one received batch (the GRO segment size, an int).
_GRO_ANCILLARY = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_SEGMENT_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")

Receiver = Callable[[bytes, NetworkAddress, float], None]


class UdpBatching:
    """What one socket batches: GSO on send, GRO on receive, at most ``segments``
    datagrams per call (``Limits.udp_segments_per_call``; 1 turns both off)."""

    __slots__ = ("gro", "gso", "segments")

    def __init__(self, sock: socket.socket, segments: int) -> None:
        self.segments = max(1, min(segments, GSO_MAX_SEGMENTS))
        on = self.segments > 1 and sys.platform == "linux"
        self.gso = on
        self.gro = False
        if on:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            except OSError as exc:
                _off("GRO", exc)
            else:
                self.gro = True

    def gso_failed(self, exc: OSError) -> None:
        self.gso = False
        _off("GSO", exc)


def _off(what: str, exc: OSError) -> None:
    logger.debug("UDP %s is not available on this socket (%s): one datagram per call", what, exc)


def bind_udp(
    host: str, port: int, *, reuse_port: bool = False, dont_fragment: bool = False
) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (IPv4 or IPv6); with
    ``reuse_port``, shared with other sockets that ask for it (``SO_REUSEPORT``); with
    ``dont_fragment``, sending with the DF bit and never fragmenting (path MTU
    discovery needs it; where the kernel cannot, the default stays)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dont_fragment:
            set_dont_fragment(sock)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def set_dont_fragment(sock: socket.socket) -> bool:
    """Send with DF and probe sizes past the kernel's path MTU cache (Linux); False
    where the kernel has no such option."""
    if sys.platform != "linux":
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_PROBE)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)
    except OSError as exc:
        logger.debug("cannot set the don't-fragment bit: %s", exc)
        return False
    return True


def receive_batch(
    sock: socket.socket,
    receive: Receiver,
    now: float,
    batch: int,
    batching: UdpBatching | None = None,
) -> OSError | None:
    """Hand up to ``batch`` waiting datagrams (``Limits.udp_receive_batch``) to
    ``receive(data, addr, now)``; with GRO a coalesced buffer is split into its
    datagrams here (each counts towards ``batch``; the last buffer may take it past).

    Returns the last error that says the peer cannot be reached, or None: a connected
    socket (a client's) reports an ICMP port or host unreachable that way, which tells
    at once that nothing listens where an aggregator was expected."""
    if batching is not None and batching.gro:
        return _receive_coalesced(sock, receive, now, batch)
    unreachable: OSError | None = None
    for _ in range(batch):
        try:
            data, addr = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return unreachable
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                unreachable = exc
            else:
                logger.debug("UDP receive error: %s", exc)
            continue
        receive(data, addr, now)
    return unreachable


def _receive_coalesced(
    sock: socket.socket, receive: Receiver, now: float, batch: int
) -> OSError | None:
    unreachable: OSError | None = None
    taken = 0
    while taken < batch:  # datagrams, not calls: one buffer may hold 64
        taken += 1
        try:
            data, ancillary, _flags, addr = sock.recvmsg(MAX_DATAGRAM, _GRO_ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return unreachable
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                unreachable = exc
            else:
                logger.debug("UDP receive error: %s", exc)
            continue
        size = 0
        for level, kind, value in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= _GRO_SIZE.size:
                size = _GRO_SIZE.unpack_from(value)[0]
        if 0 < size < len(data):
            view = memoryview(data)
            taken += (len(data) - 1) // size
            for start in range(0, len(data), size):
                receive(bytes(view[start : start + size]), addr, now)
        else:
            receive(data, addr, now)
    return unreachable


def send_datagrams(
    sock: socket.socket,
    datagrams: Iterable[tuple[bytes, NetworkAddress]],
    batching: UdpBatching | None = None,
) -> tuple[int, OSError | None]:
    """Send each datagram: how many were dropped (QUIC retransmits them), and the last
    error that says the peer cannot be reached (see :func:`receive_batch`), or None.

    With GSO, runs of datagrams to one peer go out in one call each, in send order:
    equal sizes, the last of a run may be shorter."""
    if batching is not None and batching.gso:
        return _send_segmented(sock, list(datagrams), batching)
    dropped = 0
    unreachable: OSError | None = None
    for data, addr in datagrams:
        error = _send_one(sock, data, addr)
        if error is not None:
            dropped += 1
            if error is not _WOULD_BLOCK:
                unreachable = error
    return dropped, unreachable


def read_batch(sock: socket.socket, batch: int) -> list[tuple[bytes, NetworkAddress]]:
    """Up to ``batch`` datagrams waiting on ``sock``, with their senders; errors (an
    ICMP error on a connected socket, a closed one) end the batch quietly."""
    received: list[tuple[bytes, NetworkAddress]] = []
    for _ in range(batch):
        try:
            data, addr = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            if exc.errno not in _UNREACHABLE:
                logger.debug("UDP receive error: %s", exc)
                break
            continue
        received.append((data, addr))
    return received


def send_one(sock: socket.socket, data: bytes, addr: NetworkAddress | None = None) -> bool:
    """Send one datagram without waiting (to ``addr``, or where ``sock`` is connected):
    False if it was dropped (a full buffer, an unreachable peer, a closed socket)."""
    try:
        if addr is None:
            sock.send(data)
        else:
            sock.sendto(data, addr)
    except OSError as exc:
        quiet = isinstance(exc, BlockingIOError | InterruptedError)
        if not quiet and exc.errno not in _UNREACHABLE:
            logger.debug("UDP send to %s failed: %s", addr, exc)
        return False
    return True


#: Stands for "the send buffer is full" in :func:`_send_one`'s answer.
_WOULD_BLOCK = OSError(errno.EAGAIN, "would block")


def _send_one(sock: socket.socket, data: bytes, addr: NetworkAddress) -> OSError | None:
    """None when sent; else _WOULD_BLOCK, an unreachable error, or another error
    (logged here, returned as _WOULD_BLOCK: it is only a drop)."""
    try:
        sock.sendto(data, addr)
    except (BlockingIOError, InterruptedError):
        return _WOULD_BLOCK
    except OSError as exc:
        if exc.errno in _UNREACHABLE:
            return exc
        _log_send_error(addr, exc)
        return _WOULD_BLOCK
    return None


def _log_send_error(addr: NetworkAddress, exc: OSError) -> None:
    if exc.errno == errno.EMSGSIZE:
        # A path MTU probe larger than the interface carries: lost, as it should be.
        logger.debug("UDP send to %s too large: %s", addr, exc)
    else:
        logger.warning("UDP send to %s failed: %s", addr, exc)


def _send_segmented(
    sock: socket.socket, datagrams: list[tuple[bytes, NetworkAddress]], batching: UdpBatching
) -> tuple[int, OSError | None]:
    dropped = 0
    unreachable: OSError | None = None
    count = len(datagrams)
    i = 0
    while i < count:
        data, addr = datagrams[i]
        size = len(data)
        # The run: the same peer, the same size, as many as one call takes; one
        # shorter datagram may end it.
        limit = min(batching.segments, GSO_MAX_BYTES // size if size else 1)
        j = i + 1
        while j < count and j - i < limit:
            other, other_addr = datagrams[j]
            if other_addr != addr or len(other) > size:
                break
            j += 1
            if len(other) < size:
                break
        if j - i == 1 or not batching.gso:
            error = _send_one(sock, data, addr)
            sent = 1
        else:
            error, sent = _send_run(sock, datagrams, i, j, size, batching)
        if error is not None:
            dropped += sent
            if error is not _WOULD_BLOCK:
                unreachable = error
        i += sent
    return dropped, unreachable


def _send_run(
    sock: socket.socket,
    datagrams: list[tuple[bytes, NetworkAddress]],
    start: int,
    stop: int,
    size: int,
    batching: UdpBatching,
) -> tuple[OSError | None, int]:
    """Send ``datagrams[start:stop]`` in one GSO call: ``(error, how many it covered)``.
    If this socket cannot, GSO goes off and only the first is sent, one by one."""
    addr = datagrams[start][1]
    payload = b"".join(data for data, _ in datagrams[start:stop])
    control = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
    try:
        sock.sendmsg([payload], control, 0, addr)
    except (BlockingIOError, InterruptedError):
        return _WOULD_BLOCK, stop - start
    except OSError as exc:
        if exc.errno in _UNREACHABLE:
            return exc, stop - start
        if exc.errno in _NO_BATCHING:
            batching.gso_failed(exc)
            return _send_one(sock, datagrams[start][0], addr), 1
        _log_send_error(addr, exc)
        return _WOULD_BLOCK, stop - start
    return None, stop - start
