"""The UDP socket work of a pump: binding, reading a batch, sending.

Also the sockets of UDP services (``udp-datagrams``): a public UDP port's
(:func:`bind_udp_port`) and a client flow's to its target, read a batch at a time
(:func:`read_batch`) and written without waiting (:func:`send_one`).

Plain non-blocking stdlib sockets, no event loop and no threads: ``snocat_sync``
has a generated copy of this module, and only the waiting differs between the two.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable

from snocat_proto._wire.network import NetworkAddress

__all__ = [
    "MAX_DATAGRAM",
    "bind_udp",
    "bind_udp_port",
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

Receiver = Callable[[bytes, NetworkAddress, float], None]


def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (IPv4 or IPv6); with
    ``reuse_port``, shared with other sockets that ask for it (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def receive_batch(sock: socket.socket, receive: Receiver, now: float, batch: int) -> OSError | None:
    """Hand up to ``batch`` waiting datagrams (``Limits.udp_receive_batch``) to
    ``receive(data, addr, now)``.

    Returns the last error that says the peer cannot be reached, or None: a connected
    socket (a client's) reports an ICMP port or host unreachable that way, which tells
    at once that nothing listens where an aggregator was expected."""
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


def send_datagrams(
    sock: socket.socket, datagrams: Iterable[tuple[bytes, NetworkAddress]]
) -> tuple[int, OSError | None]:
    """Send each datagram: how many were dropped (QUIC retransmits them), and the last
    error that says the peer cannot be reached (see :func:`receive_batch`), or None."""
    dropped = 0
    unreachable: OSError | None = None
    for data, addr in datagrams:
        try:
            sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            dropped += 1
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                unreachable = exc
            else:
                logger.warning("UDP send to %s failed: %s", addr, exc)
            dropped += 1
    return dropped, unreachable


def bind_udp_port(host: str | None, port: int) -> list[socket.socket]:
    """Non-blocking UDP sockets on every address of ``host`` (None or ``""``: every
    interface), ``port``: a public UDP port, bound as a TCP port's listener is
    (IPv6 sockets IPv6 only, so a visitor's address is never a mapped IPv4 one)."""
    infos = socket.getaddrinfo(
        host or None,
        port,
        type=socket.SOCK_DGRAM,
        flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG,
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, _, proto, _, sockaddr in infos:
            key = (int(family), str(sockaddr[0]))
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
            sockets.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
