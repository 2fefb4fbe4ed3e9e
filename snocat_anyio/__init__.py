"""snocat on asyncio and trio, through anyio.

:class:`TunnelServer` is the aggregator (``await tg.start(server.serve)``),
:class:`TunnelClient` the Connect side (``await tg.start(client.run)``); both take
the core's configuration objects, re-exported here, and expose ``.activity``, a feed
of typed records.  Tunnel streams are anyio ``ByteStream`` s with backpressure both
ways.  The flows are written once for this binding and ``snocat_sync``
(docs/architecture.md); everything not listed in ``__all__`` is internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from snocat_proto import (
    ClientConfig,
    ClientCredentials,
    FleetConfig,
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
from ._stream import TunnelStream

if TYPE_CHECKING:
    from ._fleet import FleetServer


def __getattr__(name: str) -> Any:
    # The fleet's store client (coredis) is imported only by those who use it.
    if name == "FleetServer":
        from ._fleet import FleetServer

        return FleetServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActivityFeed",
    "Authenticate",
    "AuthenticationError",
    "ClientConfig",
    "ClientCredentials",
    "ConnectError",
    "FeedOverflowError",
    "FleetConfig",
    "FleetServer",
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
