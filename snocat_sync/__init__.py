"""snocat for blocking programs: stdlib sockets, ``selectors`` and one pump thread.

The same tunnels, configuration and decisions as :mod:`snocat_anyio`, with no event
loop: :class:`TunnelClient` exposes a local port through an aggregator, and
:class:`TunnelServer` is the aggregator.  Tunnel streams behave like blocking
sockets (:class:`TunnelStream`) and may be shared between threads.
"""

from __future__ import annotations

from snocat_proto._service.aggregator import TunnelStatus
from snocat_proto._service.config import ClientConfig, ServerConfig
from snocat_proto._wire.auth import ClientCredentials
from snocat_proto._wire.targets import ProxyTcpTarget

from .client import TunnelClient
from .errors import (
    AuthenticationError,
    ConnectError,
    SnocatError,
    StreamRefusedError,
    StreamResetError,
    TunnelClosedError,
    TunnelNotFoundError,
)
from .server import TunnelServer
from .stream import TunnelStream

__all__ = [
    "AuthenticationError",
    "ClientConfig",
    "ClientCredentials",
    "ConnectError",
    "ProxyTcpTarget",
    "ServerConfig",
    "SnocatError",
    "StreamRefusedError",
    "StreamResetError",
    "TunnelClient",
    "TunnelClosedError",
    "TunnelNotFoundError",
    "TunnelServer",
    "TunnelStatus",
    "TunnelStream",
]
