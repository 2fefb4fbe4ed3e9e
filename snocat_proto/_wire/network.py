"""Socket addresses as snocat writes them: ``host:port``, IPv6 hosts in brackets.

The one formatter every log line, record, status display and error message uses,
and the one parser for the ``HOST:PORT`` text operators type (``--quic``,
``--driver``, ``--target``...).
"""

from __future__ import annotations

from aioquic.quic.connection import NetworkAddress

__all__ = ["NetworkAddress", "format_address", "format_host_port", "parse_host_port", "port_of"]


def format_host_port(host: str, port: int) -> str:
    """``1.2.3.4:5``, ``name:5`` or ``[::1]:5`` (the form snocat 0.8 names SimpleAck
    tunnels with, and the one :func:`parse_host_port` reads back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(addr: NetworkAddress) -> str:
    """A socket address (IPv4 pair or IPv6 4-tuple) as :func:`format_host_port` text."""
    return format_host_port(str(addr[0]), int(addr[1]))


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``, brackets removed.

    Raises ``ValueError`` whose message reads on from the name of the setting
    (``f"--driver {exc}"``), a sentence an operator can act on."""
    if "://" in text:
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:9090), not a URL: {text[:128]!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:9090), not {text[:128]!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("needs brackets around an IPv6 address, e.g. [::1]:9090")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"has port {port}, outside 0..65535")
    return host, port


def port_of(addresses: tuple[str, ...]) -> int:
    """The port of the first ``host:port`` / ``[v6]:port`` address (0 if none parses)."""
    for address in addresses:
        _, _, port = address.rpartition(":")
        if port.isdigit() and 0 < int(port) <= 65535:
            return int(port)
    return 0
