"""The aggregator on asyncio or trio: :class:`TunnelServer`, run with :meth:`~TunnelServer.serve`.

The flows are :class:`~._server_flows.ServerCore` (shared with ``snocat_sync``);
this adds the structured lifecycle.  Every task runs in ``serve()``'s task group,
shielded from its cancellation: cancelling ``serve()`` cannot stop the pump in the
middle of the goodbye, the graceful wind-down always runs (bounded by the grace
period), and nothing outlives ``serve()``: no task, socket, port or record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.abc

from snocat_proto._wire.address import RouteAddress

from ._server_flows import Authenticate, ServerCore, TunnelStatus
from ._stream import TunnelStream

__all__ = [
    "Authenticate",
    "RouteHandler",
    "Router",
    "ServerCounters",
    "TunnelServer",
    "TunnelStatus",
    "forwarded_connections",
]

#: Serves one accepted stream; the server closes the stream when it returns.
RouteHandler = Callable[[TunnelStream], Awaitable[None]]
#: Picks the handler for a stream a client opened (None: refuse it).  Called from the
#: pump: decide quickly, do the work in the handler.
Router = Callable[[TunnelStatus, RouteAddress], RouteHandler | None]


def forwarded_connections(status: TunnelStatus) -> int:
    """The visitors' TCP connections a tunnel carries now (the live table's conns).
    ``open_streams`` counts every stream, including the ``proxyme`` stream that holds
    each granted port open for the tunnel's whole life: one per port, not a visitor
    (and one per target published by name, and one per UDP port; UDP flows' streams
    are not counted)."""
    held = len(status.ports) + len(status.names) + len(status.udp_ports)
    return max(0, status.open_streams - held)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerCounters:
    """What the QUIC endpoint and its pump counted since :meth:`TunnelServer.serve`
    began (zeros before), for metrics: the parts of the server's state that are counts,
    not records of the activity feed."""

    #: Tunnels the endpoint created (Initials past Retry and the handshake rate).
    handshakes_started: int = 0
    #: Connection attempts refused because their address was over its handshake rate.
    handshakes_refused: int = 0
    #: Datagrams received that belonged to no tunnel and could start none.
    datagrams_dropped_received: int = 0
    #: Datagrams not sent because the socket's send buffer was full (QUIC resends).
    datagrams_dropped_sent: int = 0
    #: Tunnels closed because handling them raised (a bug; the others went on).
    tunnels_failed: int = 0
    #: Visitors of the public listeners not forwarded, by reason (the values of
    #: :class:`~snocat_proto._service.visitors.Failure`).
    name_routing_failures: Mapping[str, int] = field(default_factory=dict)


class TunnelServer(ServerCore):
    """The aggregator.  Run :meth:`serve`; see the module docstring.

    ``authenticate(name)`` (async) looks a tunnel name's secret up (default: the
    config's tokens); ``route(status, address)`` picks an async handler for a stream
    a client opened that is not ``proxyme`` (default: refuse)."""

    _started = False
    _shutdown_grace: float | None = None
    # anyio primitives need a running event loop: serve() creates them.
    _shutdown_requested: anyio.Event
    _stopped: anyio.Event

    def counters(self) -> ServerCounters:
        """The endpoint's and the pump's counts (read them on the server's event loop)."""
        endpoint, host = self._endpoint, self._host
        if endpoint is None or host is None:
            return ServerCounters()
        return ServerCounters(
            handshakes_started=endpoint.started_handshakes,
            handshakes_refused=endpoint.refused_handshakes,
            datagrams_dropped_received=endpoint.dropped_datagrams,
            datagrams_dropped_sent=host.datagrams_dropped,
            tunnels_failed=endpoint.failed_tunnels,
            name_routing_failures=self.name_routing_failures(),
        )

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[TunnelServer] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the QUIC socket and serve until cancelled or :meth:`shutdown`.

        Either way the graceful wind-down runs before this returns (bounded by the
        grace period), and every task, socket, port and record is gone after it."""
        if self._started:
            raise RuntimeError("serve() may run only once per TunnelServer")
        self._started = True
        self._shutdown_requested = anyio.Event()
        self._stopped = anyio.Event()
        try:
            if not self._books.accepting:  # shutdown() came first
                return
            self._open()
            async with anyio.create_task_group() as tg:
                self._begin(tg)
                try:
                    task_status.started(self)
                    await self._shutdown_requested.wait()
                finally:
                    grace = self._shutdown_grace
                    if grace is None:
                        grace = self.config.shutdown_grace
                    with anyio.CancelScope(shield=True):
                        await self._wind_down(grace)
        finally:
            self._finish()
            self._stopped.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully and wait until :meth:`serve` has cleaned up.

        New tunnels, streams and TCP connections are refused and every listener stops
        at once; in-flight streams get ``grace`` seconds (default: the config's) to
        finish; then every tunnel is closed with :attr:`CloseCode.SHUTTING_DOWN` and
        every port released.  Called before :meth:`serve`, it makes ``serve()``
        return at once."""
        if not self._started:
            self._books.accepting = False
            return
        if not self._shutdown_requested.is_set():
            self._shutdown_grace = grace
            self._shutdown_requested.set()
        await self._stopped.wait()
