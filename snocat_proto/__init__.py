"""snocat's protocol core: a sans-IO state machine for snocat tunnels.

Bytes, datagrams and ``now`` go in; bytes, datagrams and events come out.  No
sockets, threads, clocks or event loops live here: ``snocat_anyio`` and
``snocat_sync`` are the adapters that do the I/O.

Two layers, each in a private package: ``_wire`` (what goes on the wire: codecs,
negotiation, authentication, the tunnel, the endpoints, the QUIC engine) and
``_service`` above it (the policy both bindings share: configuration, the
aggregator's books, ports, the registry, the client's attempts, activity records).
Import from here: the names in ``__all__`` are the public API; the modules behind
them may move (docs/architecture.md).
"""

from __future__ import annotations

from ._service.activity import (
    Activity,
    ListeningOn,
    NamePublished,
    NameWithdrawn,
    PortDenied,
    PortGranted,
    PortReleased,
    Reconnecting,
    StreamClosed,
    StreamOpened,
    StreamRefused,
    TunnelAuthenticated,
    TunnelClosed,
    TunnelConnected,
)
from ._service.aggregator import TunnelStatus, server_endpoint
from ._service.attempts import connect_tunnel
from ._service.config import ClientConfig, FleetConfig, ServerConfig
from ._service.fanout import Fanout, Subscription
from ._service.heap import HeapCounts, LongLivedHeap
from ._service.ports import PortRange
from ._service.publications import NamedTarget
from ._service.registry import (
    RegistryEvent,
    TunnelDeregistered,
    TunnelRecord,
    TunnelRegistered,
    TunnelRegistry,
    TunnelUpdated,
)
from ._service.tokens import format_tokens, parse_single_token, parse_token_file, parse_tokens
from ._service.visitors import TrustedNetworks
from ._wire.address import RouteAddress
from ._wire.auth import SCHEME_SIMPLE_ACK, SCHEME_TOKEN, ClientCredentials
from ._wire.certificates import fingerprint, generate_self_signed
from ._wire.codes import CloseCode, StreamCode
from ._wire.endpoint import ClientEndpoint, ServerEndpoint
from ._wire.errors import (
    AuthenticationFailed,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SendBufferFull,
    UnsupportedVersion,
)
from ._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    CredentialRequired,
    DataReceived,
    FlowDatagramReceived,
    FlowEnded,
    FlowOpened,
    FlowRequested,
    HandshakeCompleted,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamRequested,
    StreamReset,
    StreamWritable,
    TunnelEvent,
)
from ._wire.handshake_rate import HandshakeRate
from ._wire.limits import Limits
from ._wire.names import TunnelDomain
from ._wire.network import format_host_port, parse_host_port
from ._wire.proxy_protocol import ProxyAddresses
from ._wire.targets import ProxyTcpTarget, TargetKind
from ._wire.tunnel import Role, TunnelConnection, TunnelState
from ._wire.udp_flows import DatagramCounters, DropReason, FlowEnd, UdpTarget

__all__ = [
    "SCHEME_SIMPLE_ACK",
    "SCHEME_TOKEN",
    "Activity",
    "AuthenticationCompleted",
    "AuthenticationFailed",
    "ClientConfig",
    "ClientCredentials",
    "ClientEndpoint",
    "CloseCode",
    "ConnectionTerminated",
    "CredentialRequired",
    "DataReceived",
    "DatagramCounters",
    "DropReason",
    "Fanout",
    "FleetConfig",
    "FlowDatagramReceived",
    "FlowEnd",
    "FlowEnded",
    "FlowOpened",
    "FlowRequested",
    "FrameTooLarge",
    "HandshakeCompleted",
    "HandshakeRate",
    "HeapCounts",
    "Limits",
    "ListeningOn",
    "LocalProtocolError",
    "LongLivedHeap",
    "NamePublished",
    "NameWithdrawn",
    "NamedTarget",
    "PortDenied",
    "PortGranted",
    "PortRange",
    "PortReleased",
    "ProtocolError",
    "ProxyAddresses",
    "ProxyTcpTarget",
    "Reconnecting",
    "RegistryEvent",
    "RemoteProtocolError",
    "Role",
    "RouteAddress",
    "SendBufferFull",
    "ServerConfig",
    "ServerEndpoint",
    "StreamAccepted",
    "StreamClosed",
    "StreamCode",
    "StreamEnded",
    "StreamOpened",
    "StreamRefused",
    "StreamRejected",
    "StreamRequested",
    "StreamReset",
    "StreamWritable",
    "Subscription",
    "TargetKind",
    "TrustedNetworks",
    "TunnelAuthenticated",
    "TunnelClosed",
    "TunnelConnected",
    "TunnelConnection",
    "TunnelDeregistered",
    "TunnelDomain",
    "TunnelEvent",
    "TunnelRecord",
    "TunnelRegistered",
    "TunnelRegistry",
    "TunnelState",
    "TunnelStatus",
    "TunnelUpdated",
    "UdpTarget",
    "UnsupportedVersion",
    "connect_tunnel",
    "fingerprint",
    "format_host_port",
    "format_tokens",
    "generate_self_signed",
    "parse_host_port",
    "parse_single_token",
    "parse_token_file",
    "parse_tokens",
    "server_endpoint",
]
