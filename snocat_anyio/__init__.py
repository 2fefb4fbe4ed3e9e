"""snocat on asyncio and trio, through anyio.

:class:`TunnelServer` is the aggregator (``await tg.start(server.serve)``),
:class:`TunnelClient` the Connect side (``await tg.start(client.run)``); both take
the core's configuration objects, re-exported here, and expose ``.activity``, a feed
of typed records.  Tunnel streams are anyio ``ByteStream`` s with backpressure both
ways.  The flows are written once for this binding and ``snocat_sync``
(docs/architecture.md); everything not listed in ``__all__`` is internal.
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
    TunnelStatus,
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

__all__ = [
    "ActivityFeed",
    "Authenticate",
    "AuthenticationError",
    "ClientConfig",
    "ClientCredentials",
    "ConnectError",
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
    "TunnelClient",
    "TunnelClosedError",
    "TunnelNotFoundError",
    "TunnelServer",
    "TunnelStatus",
    "TunnelStream",
]
