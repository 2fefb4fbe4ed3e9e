"""What a client publishes, and what it does with each stream the aggregator opens.

A client publishes each ``--target`` on a public port of its own, and its ``--http`` /
``--tls`` targets by name (:class:`NamedTarget`): one ``proxyme`` exchange each
(docs/protocol.md 2.7, 3.13, 3.14.6).  Every published target is on its allow-list.
For a stream the aggregator opens, :func:`client_route` says which target it goes to
and, with ``visitor-address`` (3.18), for whom; :func:`proxy_header` is what the
client writes to that target first with ``--proxy-protocol``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .._wire.address import RouteAddress
from .._wire.errors import LocalProtocolError, RemoteProtocolError
from .._wire.features import BY_NAME, PROXYME_OPTIONS, UDP_DATAGRAMS, VISITOR_ADDRESS
from .._wire.limits import Limits
from .._wire.proxy_protocol import ProxyAddresses, encode_v1, encode_v2
from .._wire.proxyme import NAMED_SERVICES, ProxymeClient, ProxymeRequest
from .._wire.targets import ProxyTcpTarget
from .._wire.udp_flows import UdpTarget
from .._wire.visitor import split_visitor
from .allowlist import AllowList

__all__ = [
    "NO_NAMES",
    "NO_PORT_REQUESTS",
    "NO_UDP",
    "PROXY_PROTOCOL_VERSIONS",
    "NamedTarget",
    "Publication",
    "client_route",
    "proxy_header",
    "proxyme_client",
    "target_of",
]

NO_PORT_REQUESTS = (
    "the aggregator cannot be asked for a given public port: it does not offer "
    "proxyme-options (a snocat 0.8 aggregator, or one with SimpleAck)"
)
NO_NAMES = (
    "the aggregator does not publish targets by name: it does not offer by-name "
    "(a snocat 0.8 aggregator, an older snocat, or one with SimpleAck)"
)
NO_UDP = (
    "the aggregator does not forward UDP: it does not offer udp-datagrams (a snocat 0.8 "
    "aggregator, one without --udp-ports, one with SimpleAck, or a path without QUIC "
    "datagrams)"
)
#: ``--proxy-protocol v1|v2``.
PROXY_PROTOCOL_VERSIONS = (1, 2)


@dataclass(frozen=True, slots=True)
class NamedTarget:
    """A target published by name (``--http`` / ``--tls``): the aggregator's shared
    listener for ``service`` sends ``NAME.DOMAIN``'s visitors to it."""

    service: str
    target: ProxyTcpTarget

    def __post_init__(self) -> None:
        if self.service not in NAMED_SERVICES:
            raise LocalProtocolError(
                f"a named target is one of {', '.join(NAMED_SERVICES)}, not {self.service!r}"
            )
        if not isinstance(self.target, ProxyTcpTarget):
            raise LocalProtocolError(f"target must be a ProxyTcpTarget, not {self.target!r}")

    def __str__(self) -> str:
        return f"{self.target} ({self.service} by name)"


#: One ``proxyme`` exchange of a client: a target on a port, one by name, or a UDP
#: target on a UDP port (docs/protocol.md 3.17.2).
Publication = ProxyTcpTarget | NamedTarget | UdpTarget


def target_of(publication: Publication) -> ProxyTcpTarget | UdpTarget:
    """The local target a publication forwards to."""
    return publication.target if isinstance(publication, NamedTarget) else publication


def proxyme_client(
    publication: Publication,
    features: Collection[str],
    *,
    limits: Limits,
    public_ports: Mapping[ProxyTcpTarget | UdpTarget, int] | None = None,
) -> tuple[ProxymeRequest, ProxymeClient] | str:
    """The ``proxyme`` request and machine for ``publication`` on a tunnel that agreed
    on ``features`` (asking for its port in ``public_ports``, if any), or why the
    aggregator cannot be asked (ends the client)."""
    public_port = None
    if isinstance(publication, ProxyTcpTarget | UdpTarget) and public_ports:
        public_port = public_ports.get(publication)
    options = PROXYME_OPTIONS in features
    service = publication.service if isinstance(publication, NamedTarget) else None
    udp = isinstance(publication, UdpTarget)
    if udp and not (options and UDP_DATAGRAMS in features):
        return NO_UDP
    if service is not None and not (options and BY_NAME in features):
        return NO_NAMES
    if public_port is not None and not options:
        return NO_PORT_REQUESTS
    target = target_of(publication)
    request = ProxymeRequest(host=target.connect_host(), port=target.port)
    client = ProxymeClient(
        limits=limits, options=options, public_port=public_port, service=service, udp=udp
    )
    return request, client


def client_route(
    address: RouteAddress, features: Collection[str], allow: AllowList
) -> tuple[ProxyTcpTarget, RouteAddress, ProxyAddresses | None] | str:
    """Where a stream the aggregator opened to ``address`` goes: the target, the
    address without the visitor suffix, and the visitor (None: not told); or why it is
    refused.  The suffix is read only where ``visitor-address`` was agreed (elsewhere
    it is a malformed ``proxy-tcp`` address, as in snocat 0.8)."""
    visitor = None
    if VISITOR_ADDRESS in features:
        try:
            address, visitor = split_visitor(address)
        except RemoteProtocolError as exc:
            return f"malformed visitor address: {exc.reason}"
    target = allow.check(address)
    if isinstance(target, str):
        return target
    return target, address, visitor


def proxy_header(version: int | None, visitor: ProxyAddresses | None) -> bytes:
    """What the client writes to its target before the first byte with
    ``--proxy-protocol`` (nothing without): v1 ``PROXY TCP4 ...`` or v2, or ``PROXY
    UNKNOWN`` / v2 PROXY with AF_UNSPEC when the aggregator did not say whose
    connection it is (a snocat 0.8 aggregator, SimpleAck)."""
    if version is None:
        return b""
    if version == 1:
        return encode_v1(visitor)
    if version == 2:
        return encode_v2(visitor)
    raise LocalProtocolError(f"PROXY protocol version must be 1 or 2, not {version!r}")
