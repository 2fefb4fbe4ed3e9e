"""Binding a public port: its sockets on every address of a host, TCP or UDP.

A granted TCP port's listener, a UDP port's sockets, and the ports a fleet's node
opens for the others are all bound here, the same way: one socket per address
family, IPv6 ones IPv6 only (a visitor's address is never a mapped IPv4 one), the
same port on each.  Plain non-blocking stdlib sockets, no waiting: ``snocat_sync``
has a generated copy of this module.
"""

from __future__ import annotations

import os
import socket

__all__ = ["bind_port"]


def bind_port(host: str | None, port: int, kind: socket.SocketKind) -> list[socket.socket]:
    """Non-blocking sockets of ``kind`` (``SOCK_STREAM``: listening) on every address
    of ``host`` (None or ``""``: every interface), ``port`` (0: one free port, the
    same on each); ``OSError`` if one cannot be bound (none is left open)."""
    infos = socket.getaddrinfo(
        host or None, port, type=kind, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    stream = kind == socket.SOCK_STREAM
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, _, proto, _, sockaddr in infos:
            key = (int(family), str(sockaddr[0]))
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if stream and os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
            if stream:
                sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
