"""Settings of a tunnel server and a tunnel client, shared by every binding.

Plain, validated values: what to bind, whom to trust, what to prove, where to
forward.  ``snocat_anyio`` and ``snocat_sync`` take the same objects, and the CLI
builds them from its flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

from .._wire.auth import SCHEMES, ClientCredentials
from .._wire.certificates import load_certificate_chain, parse_fingerprint
from .._wire.engine import SMALLEST_MAX_DATAGRAM_SIZE
from .._wire.features import FEATURES, UDP_DATAGRAMS
from .._wire.handshake_rate import DEFAULT_HANDSHAKE_RATE, HandshakeRate
from .._wire.limits import Limits
from .._wire.names import TunnelDomain
from .._wire.network import format_host_port
from .._wire.targets import ProxyTcpTarget
from .._wire.tunnel import CONNECT_KEEPALIVE_INTERVAL, LISTEN_KEEPALIVE_INTERVAL
from .._wire.udp_flows import UdpTarget, advertise_datagrams
from .backoff import Backoff
from .ports import PortRange
from .publications import PROXY_PROTOCOL_VERSIONS, NamedTarget, Publication
from .visitors import TrustedNetworks

__all__ = [
    "DEFAULT_DATAGRAM_CEILING",
    "DEFAULT_MAX_DATAGRAM_SIZE",
    "MAX_DATAGRAM_SIZE_LIMIT",
    "ClientConfig",
    "ServerConfig",
]

#: The UDP payload every QUIC path must carry (RFC 9000 section 14): safe anywhere,
#: where every datagram starts, and the one size sent without path MTU discovery
#: unless ``max_datagram_size`` says otherwise.
DEFAULT_MAX_DATAGRAM_SIZE = SMALLEST_MAX_DATAGRAM_SIZE
#: How far path MTU discovery grows datagrams unless ``max_datagram_size`` says: past
#: jumbo frames (8952), where loopback has most of its gain (docs/performance.md).
DEFAULT_DATAGRAM_CEILING = 16384
#: The largest UDP payload QUIC allows (``max_udp_payload_size``, RFC 9000 section 18.2).
MAX_DATAGRAM_SIZE_LIMIT = 65527


def check_max_datagram_size(value: int | None) -> None:
    if value is None:
        return
    if not DEFAULT_MAX_DATAGRAM_SIZE <= value <= MAX_DATAGRAM_SIZE_LIMIT:
        raise ValueError(
            f"max_datagram_size must be within {DEFAULT_MAX_DATAGRAM_SIZE}.."
            f"{MAX_DATAGRAM_SIZE_LIMIT}, not {value!r}"
        )


def datagram_size(max_datagram_size: int | None, path_mtu_discovery: bool) -> int:
    """The ceiling of path MTU discovery, or the one size sent without it."""
    if max_datagram_size is not None:
        return max_datagram_size
    return DEFAULT_DATAGRAM_CEILING if path_mtu_discovery else DEFAULT_MAX_DATAGRAM_SIZE


@dataclass(frozen=True, kw_only=True)
class FleetConfig:
    """How a server joins a fleet of aggregator nodes sharing one registry (docs/fleet.md)."""

    #: ``redis://[user:password@]HOST:PORT/DB`` or ``rediss://`` (TLS): Valkey, or
    #: Redis 6.2 or newer.
    registry_url: str
    #: The store's password, if not in the URL (``--registry-password-file``).
    registry_password: str | None = None
    #: This node's name in the fleet (unique; default: host name and QUIC port).
    node: str
    #: Where the other nodes reach this one (its node-to-node QUIC address).
    advertise: tuple[str, int]
    #: The secret nodes prove to each other (``--fleet-token-file``).
    secret: bytes
    #: Seconds a node's claims live unless renewed (at a third of it).
    lease: float = 10.0
    #: Keys and the event stream live under this prefix.
    prefix: str = "snocat"
    #: The workers of one ``--workers`` server share a non-empty group: they share
    #: its QUIC port and public address, where only a port's holder listens.
    group: str = ""

    def __post_init__(self) -> None:
        scheme, sep, _ = self.registry_url.partition("://")
        if not sep or scheme not in ("redis", "rediss"):
            raise ValueError(
                "the registry must be redis://HOST:PORT/DB or rediss://HOST:PORT/DB, "
                f"not {self.registry_url[:64]!r}"
            )
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise ValueError("the fleet secret must be at least 16 characters")
        if not (math.isfinite(self.lease) and self.lease >= 1.0):
            raise ValueError(f"the fleet lease must be at least 1 s, not {self.lease!r}")
        if not self.node or any(c.isspace() or c in "/:" for c in self.node):
            raise ValueError(
                f"a node name may not be empty or hold spaces, '/' or ':': {self.node!r}"
            )

    def __repr__(self) -> str:  # never the secret or the password
        host, port = self.advertise
        return f"FleetConfig(node={self.node!r}, advertise={host}:{port}, lease={self.lease})"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything :class:`TunnelServer` needs; validated at construction."""

    certificate_pem: bytes
    private_key_pem: bytes
    #: Where the QUIC (UDP) socket binds; port 0 picks a free port.
    quic_host: str = "127.0.0.1"
    quic_port: int = 9090
    #: ``"token"`` or ``"simple-ack"`` (snocat 0.8 compat, no credentials).
    auth: str = "token"
    #: Tunnel name -> secret, for the default credential lookup.
    tokens: Mapping[str, bytes] = field(default_factory=dict)
    #: Public ports the ``proxyme`` service grants, lowest free first.
    port_range: PortRange = field(default_factory=lambda: PortRange(8080, 8090))
    #: The address public ports bind to; ``""`` binds every interface.
    tcp_bind: str = "127.0.0.1"
    #: Public UDP ports the ``proxyme`` service grants for UDP targets (``--udp-ports``),
    #: lowest free first, sticky per tunnel name like the TCP ones; they bind to
    #: ``tcp_bind`` too.  None: no UDP is served, and ``udp-datagrams`` is not offered
    #: (docs/protocol.md 3.17).
    udp_port_range: PortRange | None = None
    limits: Limits = field(default_factory=Limits)
    #: Authenticated tunnels at once (None: no limit); a client over it is told why.
    max_tunnels: int | None = 1000
    idle_timeout: float = 30.0
    #: Largest UDP payload sent.  With ``path_mtu_discovery`` the ceiling datagrams
    #: grow to from 1200 B, as far as the path carries (None: 16384); without, the one
    #: size sent (None: 1200, which fits every path; see docs/performance.md).
    max_datagram_size: int | None = None
    #: Path MTU discovery (RFC 8899): padded PING probes find the largest datagram the
    #: path to each client carries.
    path_mtu_discovery: bool = True
    retry: bool = True
    #: New tunnels one client address (IPv6: /64) may start, beyond which its attempts
    #: are refused with a reason until it slows down (None: no limit).  Applies with
    #: ``retry`` only, which proves the address.
    handshake_rate: HandshakeRate | None = DEFAULT_HANDSHAKE_RATE
    #: Seconds of silence from a client before the aggregator pings it: a fallback for
    #: clients that do not ping (snocat clients ping first; see the tunnel module).
    keepalive_interval: float | None = LISTEN_KEEPALIVE_INTERVAL
    #: A tunnel that reconnects under the same name gets its port back if it is free.
    sticky_port_seconds: float = 300.0
    #: Seconds in-flight streams may take to finish when the server shuts down.
    shutdown_grace: float = 5.0
    #: Whether ``/proxyme/...`` streams are served (else they go to the route hook).
    proxyme: bool = True
    #: Where TLS secrets are logged (SSLKEYLOGFILE format), for debugging only.
    secrets_log_file: TextIO | None = None
    #: Join a fleet of nodes (None: one node with the embedded registry).
    fleet: FleetConfig | None = None
    #: Bind the QUIC port with ``SO_REUSEPORT``, shared by the processes of one
    #: server (``--workers``); the kernel spreads the clients across them.
    quic_reuse_port: bool = False
    #: Tunnel names several tunnels serve at once (the tokens file's ``pool`` flag):
    #: no takeover, visitors by name spread across them (docs/protocol.md 3.14.6).
    pools: frozenset[str] = frozenset()
    #: Name routing (``--domain``): ``NAME.DOMAIN`` reaches the tunnel named NAME on
    #: the shared listeners below, each ``(host, port)`` (port 0: any free one).
    domain: TunnelDomain | None = None
    http_listen: tuple[str, int] | None = None
    tls_listen: tuple[str, int] | None = None
    #: ``--accept-proxy-protocol-from``: peers of these networks must start every
    #: connection to a public listener with a PROXY protocol header (their visitors'
    #: addresses); from others such a connection is refused.
    proxy_protocol_from: TrustedNetworks = field(default_factory=TrustedNetworks)

    def __post_init__(self) -> None:
        if self.auth not in SCHEMES:
            raise ValueError(f"auth must be one of {', '.join(SCHEMES)}, not {self.auth!r}")
        if not isinstance(self.port_range, PortRange):
            raise ValueError(f"port_range must be a PortRange, not {self.port_range!r}")
        if self.udp_port_range is not None and not isinstance(self.udp_port_range, PortRange):
            raise ValueError(f"udp_port_range must be a PortRange, not {self.udp_port_range!r}")
        if not 0 <= self.quic_port <= 65535:
            raise ValueError(f"quic_port must be within 0..65535, not {self.quic_port}")
        if self.max_tunnels is not None and self.max_tunnels < 1:
            raise ValueError(f"max_tunnels must be positive or None, not {self.max_tunnels}")
        for name in ("idle_timeout", "sticky_port_seconds", "shutdown_grace"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.keepalive_interval is not None and not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive or None")
        check_max_datagram_size(self.max_datagram_size)
        if (self.http_listen or self.tls_listen) and self.domain is None:
            raise ValueError("the shared --http and --tls listeners need --domain")

    @property
    def features(self) -> frozenset[str]:
        """The wire additions this server offers: ``udp-datagrams`` too with a UDP range."""
        return FEATURES | {UDP_DATAGRAMS} if self.udp_port_range is not None else FEATURES

    @property
    def datagrams(self) -> bool:
        """Whether the handshake carries ``max_datagram_frame_size`` (3.17.1)."""
        return advertise_datagrams(self.auth, self.features)

    @property
    def datagram_size(self) -> int:
        """The ceiling of path MTU discovery, or (off) the one datagram size sent."""
        return datagram_size(self.max_datagram_size, self.path_mtu_discovery)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """What a :class:`TunnelClient` connects to, trusts, proves and forwards."""

    #: The aggregator's QUIC address (the reference's ``--driver HOST:PORT``).
    server_host: str
    server_port: int
    #: The TLS name the aggregator's certificate must carry (``--san``).
    server_name: str
    #: The only targets forwarded to (the allow-list); each gets a public port through
    #: ``proxyme`` (with ``request_port``).
    targets: tuple[ProxyTcpTarget, ...]
    credentials: ClientCredentials
    #: UDP targets (``--udp-target``): each gets a public UDP port through ``proxyme``
    #: (``udp-datagrams``, docs/protocol.md 3.17), and only these are ever sent to.
    udp_targets: tuple[UdpTarget, ...] = ()
    #: Trusted CA / certificate PEM; None means the system's roots.
    authority_pem: bytes | None = None
    #: A SHA-256 pin of the aggregator's certificate; chain verification is then skipped.
    fingerprint: str | None = None
    #: Ask the aggregator for a public port for every target.
    request_port: bool = True
    #: The public port to ask for, by target (the others get the lowest free, or the
    #: one they had).  Needs an aggregator that offers ``proxyme-options``; a port it
    #: cannot give is a refusal (:class:`PortRefusedError`), never another port.  A
    #: UDP target's key asks for a UDP port (TCP and UDP ports are numbered apart).
    public_ports: Mapping[ProxyTcpTarget | UdpTarget, int] = field(default_factory=dict)
    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    limits: Limits = field(default_factory=Limits)
    idle_timeout: float = 30.0
    #: Largest UDP payload sent (as :attr:`ServerConfig.max_datagram_size`).
    max_datagram_size: int | None = None
    #: Path MTU discovery (as :attr:`ServerConfig.path_mtu_discovery`).
    path_mtu_discovery: bool = True
    #: Seconds of silence from the aggregator before the client pings it, which also
    #: keeps the client's NAT mapping open.  Capped at half the idle timeout.
    keepalive_interval: float | None = CONNECT_KEEPALIVE_INTERVAL
    secrets_log_file: TextIO | None = None
    #: Seconds to wait for the QUIC handshake before an attempt counts as "no answer".
    connect_timeout: float = 10.0
    #: Seconds to connect to a target before the stream is refused.
    target_connect_timeout: float = 10.0
    #: Bound on the goodbye: the port release (and its acknowledgement) plus the close.
    close_timeout: float = 3.0
    #: More aggregators (``HOST``, ``PORT``), nodes of one fleet: the client fails
    #: over to the next one when a tunnel is lost or an aggregator does not answer
    #: (``--driver`` given more than once).  They must carry ``server_name`` too.
    more_servers: tuple[tuple[str, int], ...] = ()
    #: Targets published by name (``--http``, ``--tls``) on the aggregator's shared
    #: listeners, as ``NAME.DOMAIN`` (an aggregator that offers ``by-name``).
    http_target: ProxyTcpTarget | None = None
    tls_target: ProxyTcpTarget | None = None
    #: ``--proxy-protocol``: write a PROXY protocol header of this version (1 or 2)
    #: with the visitor's address to the target before the first byte.
    proxy_protocol: int | None = None

    def __post_init__(self) -> None:
        if (
            not self.targets
            and not self.udp_targets
            and self.http_target is None
            and self.tls_target is None
        ):
            raise ValueError("a client needs at least one target")
        if len(set(self.udp_targets)) != len(self.udp_targets):
            raise ValueError("each UDP target may be given once")
        for udp_target in self.udp_targets:
            if not isinstance(udp_target, UdpTarget):
                raise ValueError(f"udp_targets holds UdpTarget values, not {udp_target!r}")
        if self.proxy_protocol is not None and self.proxy_protocol not in PROXY_PROTOCOL_VERSIONS:
            raise ValueError(f"proxy_protocol must be 1 or 2, not {self.proxy_protocol!r}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("each target may be given once")
        for target, port in self.public_ports.items():
            if target not in self.targets and target not in self.udp_targets:
                raise ValueError(f"public_ports names {target}, which is not a target")
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"the public port for {target} must be in 1..65535, not {port!r}")
        for udp in (False, True):
            ports = [
                port
                for target, port in self.public_ports.items()
                if isinstance(target, UdpTarget) is udp
            ]
            if len(set(ports)) != len(ports):
                raise ValueError("two targets ask for the same public port")
        for _, port in ((self.server_host, self.server_port), *self.more_servers):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
                raise ValueError(f"server port must be in 1..65535, not {port!r}")
        for name in ("connect_timeout", "target_connect_timeout", "close_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.keepalive_interval is not None and not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive or None")
        check_max_datagram_size(self.max_datagram_size)
        # Fail at configuration time, not at every attempt.
        if self.fingerprint is not None:
            parse_fingerprint(self.fingerprint)
        if self.authority_pem is not None:
            load_certificate_chain(self.authority_pem, source="authority_pem")
        Backoff(self.backoff_initial, self.backoff_max)  # validates the pair

    @property
    def datagram_size(self) -> int:
        """The ceiling of path MTU discovery, or (off) the one datagram size sent."""
        return datagram_size(self.max_datagram_size, self.path_mtu_discovery)

    @property
    def server_label(self) -> str:
        return format_host_port(self.server_host, self.server_port)

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """Every aggregator to dial, in the order tried."""
        return ((self.server_host, self.server_port), *self.more_servers)

    @property
    def features(self) -> frozenset[str]:
        """The wire additions this client offers: ``udp-datagrams`` too with UDP targets."""
        return FEATURES | {UDP_DATAGRAMS} if self.udp_targets else FEATURES

    @property
    def datagrams(self) -> bool:
        """Whether the handshake carries ``max_datagram_frame_size`` (3.17.1)."""
        return advertise_datagrams(self.credentials.scheme, self.features)

    @property
    def named_targets(self) -> tuple[NamedTarget, ...]:
        """The targets published by name (``--http``, ``--tls``)."""
        named = (("http", self.http_target), ("tls", self.tls_target))
        return tuple(NamedTarget(service, target) for service, target in named if target)

    @property
    def publications(self) -> tuple[Publication, ...]:
        """Every ``proxyme`` exchange the client keeps: each target's port, then the
        targets by name."""
        return (*self.targets, *self.udp_targets, *self.named_targets)

    @property
    def allowed_targets(self) -> tuple[ProxyTcpTarget, ...]:
        """Every target a stream may be forwarded to (the allow-list)."""
        return (*self.targets, *(named.target for named in self.named_targets))
