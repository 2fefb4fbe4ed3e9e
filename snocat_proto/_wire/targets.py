"""TCP proxy targets: the ``/proxy-tcp/...`` route addresses and ``HOST:PORT`` text.

This module owns what a ``proxy-tcp`` stream asks to be connected to, in both of
its spellings: the route address a NYAN opener names, and the ``HOST:PORT`` text a
user types for ``--target``. It resolves nothing and connects nothing.

The six address forms of snocat 0.8 (the reference also parses them without the
``proxy-tcp`` prefix but never serves them, so neither do we)::

    /proxy-tcp/tcp/<port>                 this host (TargetKind.LOCAL)
    /proxy-tcp/ip4/<v4>/tcp/<port>        TargetKind.IP4
    /proxy-tcp/ip6/<v6>/tcp/<port>        TargetKind.IP6
    /proxy-tcp/dns/<host>/tcp/<port>      TargetKind.DNS   (either family)
    /proxy-tcp/dns4/<host>/tcp/<port>     TargetKind.DNS4  (IPv4 only)
    /proxy-tcp/dns6/<host>/tcp/<port>     TargetKind.DNS6  (IPv6 only)

Where we are stricter than the reference, it is on purpose: port 0 is refused
(it cannot be connected to), a port is ASCII decimal digits only (Rust's ``u16``
parser would also take a leading ``+``), a segment count other than the forms above
is refused (the reference silently ignores segments past the fourth), IPv6 zone
identifiers are refused (Rust's parser has none), and DNS names are checked for
length and for characters no host name contains.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from .address import RouteAddress
from .errors import LocalProtocolError, RemoteProtocolError
from .network import format_host_port

__all__ = [
    "LOCAL_HOST",
    "MAX_DNS_NAME_LENGTH",
    "PROXY_TCP",
    "ProxyTcpTarget",
    "TargetKind",
    "parse_port",
    "validate_host_name",
]

#: The first segment of every ``proxy-tcp`` route address.
PROXY_TCP = "proxy-tcp"
#: The longest DNS name (in its text form, without a trailing dot) RFC 1035 allows.
MAX_DNS_NAME_LENGTH = 253
#: The connect host we report for :attr:`TargetKind.LOCAL`.
LOCAL_HOST = "localhost"

_TCP = "tcp"
# Rust's u16 parser accepts any number of leading zeros; so do we, but cap the text
# so a huge digit string is never handed to int().
_MAX_PORT_DIGITS = 5


class TargetKind(Enum):
    """How the target host is given; the value is the address segment naming it."""

    LOCAL = "tcp"
    IP4 = "ip4"
    IP6 = "ip6"
    DNS = "dns"
    DNS4 = "dns4"
    DNS6 = "dns6"


_KIND_BY_SEGMENT = {kind.value: kind for kind in TargetKind if kind is not TargetKind.LOCAL}
_DNS_KINDS = frozenset({TargetKind.DNS, TargetKind.DNS4, TargetKind.DNS6})


def parse_port(text: str) -> int | None:
    """A TCP port (1..65535) from ASCII decimal digits, else ``None``.

    Leading zeros are allowed (``0080`` is 80, as the reference reads it); signs,
    spaces, non-ASCII digits and port 0 are not.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0")
    if len(digits) > _MAX_PORT_DIGITS:
        return None
    port = int(digits or "0")
    return port if 1 <= port <= 65535 else None


def validate_host_name(host: object) -> str | None:
    """Why ``host`` cannot be a DNS target host, or ``None`` if it can.

    The reference checks nothing; we refuse what would be meaningless (empty,
    over-long) or would break an address or a log line (``/``, ``\\``, spaces and
    control characters).
    """
    if not isinstance(host, str):
        return f"host must be str, not {type(host).__name__}"
    if not host:
        return "host name is empty"
    if len(host) > MAX_DNS_NAME_LENGTH:
        return f"host name is {len(host)} characters; the limit is {MAX_DNS_NAME_LENGTH}"
    for char in host:
        if char in "/\\" or char.isspace() or not char.isprintable():
            return f"host name contains the character {char!r}"
    return None


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise LocalProtocolError(f"port must be an int, not {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise LocalProtocolError(f"port must be in 1..65535, not {port}")
    return port


def _canonical_ip(kind: TargetKind, host: object) -> str:
    if not isinstance(host, str):
        raise LocalProtocolError(f"{kind.value} target needs a str host, not {host!r}")
    try:
        if kind is TargetKind.IP4:
            return str(ipaddress.IPv4Address(host))
        if "%" in host:
            raise LocalProtocolError(f"IPv6 zone identifiers are not supported: {host!r}")
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        family = "IPv4" if kind is TargetKind.IP4 else "IPv6"
        raise LocalProtocolError(f"not an {family} address: {host[:64]!r}") from None


@dataclass(frozen=True, slots=True)
class ProxyTcpTarget:
    """Where a ``proxy-tcp`` stream goes: a host of some :class:`TargetKind`, and a port.

    ``host`` is ``None`` for :attr:`TargetKind.LOCAL`; for IP kinds it is stored in
    canonical form (``0:0::1`` becomes ``::1``); DNS names are kept as given.
    Invalid combinations raise :class:`LocalProtocolError`.
    """

    kind: TargetKind
    host: str | None
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TargetKind):
            raise LocalProtocolError(f"kind must be a TargetKind, not {self.kind!r}")
        _check_port(self.port)
        if self.kind is TargetKind.LOCAL:
            if self.host is not None:
                raise LocalProtocolError("a LOCAL target has no host")
        elif self.kind in _DNS_KINDS:
            problem = validate_host_name(self.host)
            if problem is not None:
                raise LocalProtocolError(problem)
        else:
            object.__setattr__(self, "host", _canonical_ip(self.kind, self.host))

    @classmethod
    def from_address(cls, address: RouteAddress) -> ProxyTcpTarget | None:
        """The target a ``proxy-tcp`` address names.

        ``None`` when the address is not a ``proxy-tcp`` one (its first segment
        differs); :class:`RemoteProtocolError` when it is one but malformed.
        """
        segments = address.segments
        if not segments or segments[0] != PROXY_TCP:
            return None
        rest = segments[1:]
        if len(rest) == 2 and rest[0] == _TCP:
            kind, host, port_text = TargetKind.LOCAL, None, rest[1]
        elif len(rest) == 4 and rest[2] == _TCP:
            found = _KIND_BY_SEGMENT.get(rest[0])
            if found is None:
                raise RemoteProtocolError(
                    f"unknown proxy-tcp address type {rest[0][:32]!r} in {str(address)[:128]!r}"
                )
            kind, host, port_text = found, rest[1], rest[3]
        else:
            raise RemoteProtocolError(
                "proxy-tcp address must be /proxy-tcp/tcp/<port> or "
                f"/proxy-tcp/<type>/<host>/tcp/<port>, not {str(address)[:128]!r}"
            )
        port = parse_port(port_text)
        if port is None:
            raise RemoteProtocolError(f"invalid port {port_text[:32]!r} in proxy-tcp address")
        try:
            return cls(kind, host, port)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"invalid proxy-tcp target: {exc.reason}") from None

    @classmethod
    def parse_host_port(cls, text: str) -> ProxyTcpTarget:
        """Parse ``--target`` text: ``1.2.3.4:80``, ``[::1]:80`` or ``name:80``.

        An IPv4 literal gives :attr:`TargetKind.IP4`, a bracketed IPv6 literal
        :attr:`TargetKind.IP6`, anything else a :attr:`TargetKind.DNS` name.
        Raises :class:`LocalProtocolError` with the reason on bad input.
        """
        if not isinstance(text, str):
            raise LocalProtocolError(f"target must be str, not {type(text).__name__}")
        if text.startswith("["):
            close = text.find("]")
            if close < 0 or text[close + 1 : close + 2] != ":":
                raise LocalProtocolError(
                    f"expected [IPV6]:PORT, e.g. [::1]:5000, not {text[:128]!r}"
                )
            kind, host, port_text = TargetKind.IP6, text[1:close], text[close + 2 :]
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon:
                raise LocalProtocolError(f"expected HOST:PORT, e.g. localhost:5000, not {text!r}")
            if ":" in host:
                raise LocalProtocolError(
                    f"an IPv6 address must be bracketed, e.g. [::1]:5000, not {text[:128]!r}"
                )
            if not host:
                raise LocalProtocolError(f"missing host in {text!r}; expected HOST:PORT")
            kind = TargetKind.DNS
            try:
                host = str(ipaddress.IPv4Address(host))
                kind = TargetKind.IP4
            except ValueError:
                pass
        port = parse_port(port_text)
        if port is None:
            raise LocalProtocolError(
                f"invalid port {port_text[:32]!r}: expected a number from 1 to 65535"
            )
        return cls(kind, host, port)

    def to_address(self) -> RouteAddress:
        """The route address that names this target."""
        if self.kind is TargetKind.LOCAL:
            return RouteAddress((PROXY_TCP, _TCP, str(self.port)))
        assert self.host is not None
        return RouteAddress((PROXY_TCP, self.kind.value, self.host, _TCP, str(self.port)))

    def connect_host(self) -> str:
        """The host to resolve or connect to (``localhost`` for a LOCAL target)."""
        return LOCAL_HOST if self.host is None else self.host

    def __str__(self) -> str:
        return format_host_port(self.connect_host(), self.port)
