# Generated from snocat_anyio/_udp.py by scripts/unasync.py: do not edit.
"""The UDP socket work of a pump: binding, reading a batch, sending.

Plain non-blocking stdlib sockets, no event loop and no threads: ``snocat_sync``
has a generated copy of this module, and only the waiting differs between the two.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable

from snocat_proto._wire.network import NetworkAddress

__all__ = ["MAX_DATAGRAM", "bind_udp", "receive_batch", "send_datagrams"]

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
