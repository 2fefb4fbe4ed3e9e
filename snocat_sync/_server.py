"""The aggregator for blocking programs: :class:`TunnelServer`.

The flows are :class:`~._server_flows.ServerCore`, generated from snocat_anyio's:
the same decisions, the same waiting, here in threads.  One pump thread moves the
datagrams and accepts on the public ports; every service (a ``proxyme`` exchange, a
forwarded connection, a routed stream, a credential lookup) runs in a thread of its
own, so a slow or failing handler costs only itself.

``start()`` binds and returns; ``shutdown()`` refuses anything new, stops every
listener, gives in-flight streams ``grace`` seconds, closes every tunnel with
:attr:`CloseCode.SHUTTING_DOWN`, then joins the pump and every thread and closes
every socket.  Used as a context manager it does both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from snocat_proto._wire.address import RouteAddress

from ._server_flows import Authenticate, ServerCore, TunnelStatus
from ._stream import TunnelStream
from ._threads import ThreadGroup

__all__ = ["Authenticate", "RouteHandler", "Router", "TunnelServer", "TunnelStatus"]

#: Serves one accepted stream, in a thread of its own; the server closes the stream
#: when it returns.
RouteHandler = Callable[[TunnelStream], None]
#: Picks the handler for a stream a client opened (None: refuse it).  Called from the
#: pump with the lock held: decide quickly, do the work in the handler.
Router = Callable[[TunnelStatus, RouteAddress], RouteHandler | None]

logger = logging.getLogger("snocat.sync.server")


class TunnelServer(ServerCore):
    """The aggregator; see the module docstring.

    ``authenticate(name)`` looks a tunnel name's secret up, in a thread of its own
    (default: the config's tokens); ``route(status, address)`` picks a handler for a
    stream a client opened that is not ``proxyme``: called from the pump with the lock
    held, it must decide quickly; the handler runs in a thread (default: refuse)."""

    _started = False
    _stopping = False

    def start(self) -> TunnelServer:
        """Bind the QUIC socket and start serving in the background."""
        with self._lock:
            if self._started:
                raise RuntimeError("start() may run only once per TunnelServer")
            self._started = True
            self._stopped = threading.Event()
            if self._stopping:  # shutdown() came first
                self._finish()
                self._stopped.set()
                return self
        try:
            self._open()
            self._begin(ThreadGroup("snocat-server", logger))
        except BaseException:
            self._finish()
            self._stopped.set()
            raise
        return self

    def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully and wait until everything is cleaned up.

        New tunnels, streams and TCP connections are refused and every listener stops
        at once; in-flight streams get ``grace`` seconds (default: the config's) to
        finish; then every tunnel is closed with :attr:`CloseCode.SHUTTING_DOWN`, the
        pump and every service thread are joined and every port released.  Called
        before :meth:`start`, it makes ``start()`` return at once.  Idempotent."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            self._books.accepting = False
            if not self._started:
                return
        if not first:
            self._stopped.wait()
            return
        try:
            self._wind_down(self.config.shutdown_grace if grace is None else grace)
        finally:
            self._finish()
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` passed (False)."""
        return self._stopped.wait(timeout)

    def serve_forever(self) -> None:
        """Start if needed, then block until :meth:`shutdown` (from another thread) or
        Ctrl-C, which shuts down gracefully."""
        if not self._started:
            self.start()
        try:
            self._stopped.wait()
        finally:
            self.shutdown()

    def __enter__(self) -> TunnelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
