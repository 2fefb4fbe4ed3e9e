"""Who a forwarded connection is for: the visitor's address on a ``proxy-tcp`` stream.

This module owns the ``visitor-address`` addition (docs/protocol.md 3.18), agreed in
the token exchange (:mod:`~snocat_proto._wire.features`): on a tunnel that agreed on
it, every ``proxy-tcp`` stream the Listen side opens for a visitor's TCP connection
names, after the target, the visitor's address and port and the public address and
port it came to::

    /proxy-tcp/dns/127.0.0.1/tcp/8000/from/ip4/203.0.113.7/tcp/40000/to/ip4/198.51.100.1/tcp/443
    \\_________ the target (2.6) ____/\\_______ source ________/\\________ destination ______/

Ten more segments, always all of them: ``from``, the family (``ip4`` or ``ip6``), the
address in canonical text (no IPv6 zone), ``tcp``, the port (0..65535, decimal without
leading zeros); then the same after ``to``.  Both addresses are of one family (a
dual-stack listener's IPv4 visitors are IPv4 here).  Without the agreement the route
address is the snocat 0.8 one, byte for byte, and carries no suffix.

Why a suffix of the route address rather than a frame after it: the acceptor has the
visitor's address when it decides (an allow-list by source could refuse there), the
status byte is still the whole answer, nothing new is buffered before the service bytes,
and the address frame already has its parser and its bound (``max_address_size``; the
longest suffix, two IPv6 addresses, is 116 bytes).  It is also the form the UDP flow
setup uses for its visitor (3.17.3).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from .address import RouteAddress
from .errors import LocalProtocolError, RemoteProtocolError
from .proxy_protocol import ProxyAddresses

__all__ = [
    "FROM",
    "SUFFIX_SEGMENTS",
    "TO",
    "format_endpoint",
    "split_visitor",
    "with_visitor",
]

FROM = "from"
TO = "to"
#: The segments the suffix adds: ``from FAMILY ADDRESS tcp PORT to FAMILY ADDRESS tcp PORT``.
SUFFIX_SEGMENTS = 10
_TCP = "tcp"
_FAMILIES: dict[str, type[IPv4Address] | type[IPv6Address]] = {
    "ip4": IPv4Address,
    "ip6": IPv6Address,
}
_MAX_PORT = 65535


def _family(address: IPv4Address | IPv6Address) -> str:
    return "ip4" if isinstance(address, IPv4Address) else "ip6"


def with_visitor(address: RouteAddress, visitor: ProxyAddresses) -> RouteAddress:
    """``address`` with the visitor suffix (send it only where ``visitor-address`` was
    agreed)."""
    if not isinstance(visitor, ProxyAddresses):
        raise LocalProtocolError(f"with_visitor takes ProxyAddresses, not {visitor!r}")
    return RouteAddress(
        (
            *address.segments,
            FROM,
            _family(visitor.source),
            str(visitor.source),
            _TCP,
            str(visitor.source_port),
            TO,
            _family(visitor.destination),
            str(visitor.destination),
            _TCP,
            str(visitor.destination_port),
        )
    )


def split_visitor(address: RouteAddress) -> tuple[RouteAddress, ProxyAddresses | None]:
    """The route address without its visitor suffix, and the visitor it names (None:
    there is no suffix).  A suffix that starts as one (``from`` ten segments from the
    end) but breaks a rule is a :class:`RemoteProtocolError`."""
    segments = address.segments
    if len(segments) <= SUFFIX_SEGMENTS or segments[-SUFFIX_SEGMENTS] != FROM:
        return address, None
    suffix = segments[-SUFFIX_SEGMENTS:]
    if suffix[5] != TO:
        raise RemoteProtocolError(f"visitor suffix without 'to': {str(address)[-160:]!r}")
    source, source_port = _endpoint(suffix[1:5], "source")
    destination, destination_port = _endpoint(suffix[6:10], "destination")
    try:
        visitor = ProxyAddresses(source, source_port, destination, destination_port)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid visitor suffix: {exc.reason}") from None
    return RouteAddress(segments[:-SUFFIX_SEGMENTS]), visitor


def _endpoint(parts: tuple[str, ...], what: str) -> tuple[IPv4Address | IPv6Address, int]:
    family, text, protocol, port_text = parts
    kind = _FAMILIES.get(family)
    if kind is None:
        raise RemoteProtocolError(f"visitor {what}: unknown family {family[:16]!r}")
    if protocol != _TCP:
        raise RemoteProtocolError(f"visitor {what}: expected 'tcp', not {protocol[:16]!r}")
    if "%" in text:
        raise RemoteProtocolError(f"visitor {what}: an IPv6 zone is not allowed")
    try:
        address: IPv4Address | IPv6Address = kind(text)
    except ValueError:
        raise RemoteProtocolError(
            f"visitor {what}: not an {family} address: {text[:64]!r}"
        ) from None
    if str(address) != text:
        raise RemoteProtocolError(f"visitor {what}: {text[:64]!r} is not in canonical form")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise RemoteProtocolError(f"visitor {what}: invalid port {port_text[:16]!r}")
    port = int(port_text)
    if port > _MAX_PORT or str(port) != port_text:
        raise RemoteProtocolError(f"visitor {what}: invalid port {port_text[:16]!r}")
    return address, port


def format_endpoint(address: IPv4Address | IPv6Address, port: int) -> str:
    """``203.0.113.7:40000`` or ``[2001:db8::1]:443``, for logs and activity records."""
    if isinstance(address, IPv6Address):
        return f"[{address}]:{port}"
    return f"{address}:{port}"
