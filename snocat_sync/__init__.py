"""snocat for blocking programs: stdlib sockets, ``selectors`` and one pump thread.

The same tunnels, configuration and decisions as :mod:`snocat_anyio`, with no event
loop: :class:`TunnelClient` exposes a local port through an aggregator, and
:class:`TunnelServer` is the aggregator.  Tunnel streams behave like blocking
sockets (:class:`TunnelStream`) and may be shared between threads.  The flows are
generated from snocat_anyio's (docs/architecture.md); everything not listed in
``__all__`` is internal.

A :class:`TunnelServer` here is one node with the embedded registry: a fleet's node
(``ServerConfig.fleet``, docs/fleet.md) is ``snocat_anyio.FleetServer`` only, whose
store client (coredis) and node links run on anyio.  Clients of both bindings fail
over between the nodes of a fleet (``ClientConfig.more_servers``).
"""

from __future__ import annotations

from snocat_proto import (
    ClientConfig,
    ClientCredentials,
    Limits,
    PortRange,
    ProxyTcpTarget,
    RouteAddress,
    ServerConfig,
    TrustedNetworks,
    TunnelDomain,
    TunnelStatus,
    UdpTarget,
)

from ._client import TunnelClient
from ._errors import (
    AuthenticationError,
    ConnectError,
    FeedOverflowError,
    PortRefusedError,
    SnocatError,
    StreamRefusedError,
    StreamResetError,
    TunnelClosedError,
    TunnelNotFoundError,
)
from ._feed import ActivityFeed, Subscription
from ._server import Authenticate, RouteHandler, Router, TunnelServer
from ._stream import EndOfStream, TunnelStream

__all__ = [
    "ActivityFeed",
    "Authenticate",
    "AuthenticationError",
    "ClientConfig",
    "ClientCredentials",
    "ConnectError",
    "EndOfStream",
    "FeedOverflowError",
    "Limits",
    "PortRange",
    "PortRefusedError",
    "ProxyTcpTarget",
    "RouteAddress",
    "RouteHandler",
    "Router",
    "ServerConfig",
    "SnocatError",
    "StreamRefusedError",
    "StreamResetError",
    "Subscription",
    "TrustedNetworks",
    "TunnelClient",
    "TunnelClosedError",
    "TunnelDomain",
    "TunnelNotFoundError",
    "TunnelServer",
    "TunnelStatus",
    "TunnelStream",
    "UdpTarget",
]
