# Generated from snocat_anyio/_dial.py by scripts/unasync.py: do not edit.
"""Dialling a ``proxy-tcp`` target: which addresses, in which family, in what order.

The source of both bindings' dials (``snocat_sync/_dial.py`` is generated from it).
An IP target (IP4/IP6) is dialled directly, with no name lookup; a DNS4/DNS6 name is
resolved in that family only and its addresses are tried in turn; a plain DNS name
goes to the binding's own name dial (anyio's happy eyeballs across both families,
or the standard library's ``create_connection``).  Every connection has TCP_NODELAY.
"""

from __future__ import annotations

import socket

from snocat_proto._wire.targets import ProxyTcpTarget, TargetKind

from ._backend import Connection, connect_address, connect_name, resolve_stream

__all__ = ["connect_target"]

_FAMILIES = {
    TargetKind.IP4: socket.AF_INET,
    TargetKind.IP6: socket.AF_INET6,
    TargetKind.DNS4: socket.AF_INET,
    TargetKind.DNS6: socket.AF_INET6,
}


def connect_target(target: ProxyTcpTarget, timeout: float | None = None) -> Connection:
    """A TCP connection to ``target``.  Raises ``OSError`` (the last address's, for a
    name with several), ``TimeoutError`` after ``timeout`` seconds per attempt."""
    host, port = target.connect_host(), target.port
    family = _FAMILIES.get(target.kind)
    if family is None:
        return connect_name(host, port, timeout)
    if target.kind in (TargetKind.IP4, TargetKind.IP6):
        return connect_address(family, host, port, timeout)
    error = OSError(f"{host} has no {'IPv4' if family == socket.AF_INET else 'IPv6'} address")
    for address in resolve_stream(host, port, family):
        try:
            return connect_address(family, address, port, timeout)
        except OSError as exc:
            error = exc
    raise error
