"""The aggregator: accepts tunnels on one UDP socket and gives them public TCP ports.

:class:`TunnelServer` runs one :class:`~snocat_anyio.host.TunnelHost` over one UDP
socket.  For every tunnel it authenticates the client (token or SimpleAck), keeps a
:class:`~snocat_proto.registry.TunnelRecord` while the tunnel lives, and serves the
streams the client opens: ``/proxyme/0.0.1/...`` requests get a port of the configured
range, bound on ``tcp_bind``, and every TCP connection accepted there becomes a stream
to that tunnel; any other address goes to the pluggable ``route`` hook (refused by
default).  :meth:`TunnelServer.open_stream` routes streams the other way, to the newest
tunnel of a name.

Task ownership: every task belongs to one tunnel's :class:`_Session` or is the pump.
All of them run in the server's task group inside a *shielded* cancel scope that the
server cancels itself: when the tunnel closes (its tasks), or at the end of
:meth:`TunnelServer.serve` (everything).  Cancelling ``serve()`` therefore cannot stop
the pump in the middle of the goodbye; the graceful wind-down always runs, bounded by
the grace period, and nothing outlives ``serve()``: no task, socket, port or record.

A port is released to the allocator only once its listener is closed, so it is never
granted twice; the tunnel's name remembers it (sticky ports) for a reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from snocat_proto._service import notices
from snocat_proto._service.aggregator import (
    PORT_TAKEN_ERRNOS,
    Aggregator,
    TunnelSession,
    TunnelStatus,
    server_endpoint,
)
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.notices import Notice
from snocat_proto._service.server_events import ServerEvents
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import (
    NONCE_SIZE,
    SCHEME_SIMPLE_ACK,
    Authenticator,
    listen_authenticator,
)
from snocat_proto._wire.codes import CloseCode, StreamCode
from snocat_proto._wire.endpoint import ServerEndpoint
from snocat_proto._wire.errors import LocalProtocolError, ProtocolError
from snocat_proto._wire.network import format_address
from snocat_proto._wire.proxyme import (
    ProxymeEvent,
    ProxymeRequest,
    ProxymeServer,
    ReleaseRequested,
    SubjectReceived,
)
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_sync.udp import bind_udp

from .errors import SnocatError, StreamRefusedError, TunnelClosedError
from .host import TunnelHost
from .observe import ActivityFeed
from .relay import read_on_demand, relay
from .stream import TunnelStream

__all__ = [
    "RouteHandler",
    "Router",
    "ServerConfig",
    "TunnelNotFoundError",
    "TunnelServer",
    "TunnelStatus",
]

P = ParamSpec("P")
logger = logging.getLogger("snocat.server")

#: Serves one accepted stream; the server closes the stream when it returns.
RouteHandler = Callable[[TunnelStream], Awaitable[None]]
#: Picks the handler for a stream a client opened (None: refuse it).  Called
#: synchronously from the pump: decide quickly, do the work in the handler.
Router = Callable[["TunnelStatus", RouteAddress], RouteHandler | None]
#: Looks up the secret of a tunnel name (None: unknown name).
Authenticate = Callable[[str], Awaitable[bytes | None]]

#: After closing every tunnel, how long the pump keeps answering their last packets.
CLOSE_LINGER = 0.5
#: Pause after a failed ``accept()`` (e.g. out of file descriptors) before retrying.
ACCEPT_ERROR_PAUSE = 0.1
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class TunnelNotFoundError(SnocatError, LookupError):
    """No authenticated tunnel has the name an outbound stream was routed to."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no tunnel named {name!r} is connected")
        self.name = name


@dataclass(eq=False, kw_only=True)
class _Lease:
    """One granted port: its listener, and the scope that stops its accept loops."""

    port: int
    listener: anyio.abc.Listener[anyio.abc.SocketStream]
    sub_listeners: list[anyio.abc.SocketListener]
    addresses: tuple[str, ...]
    request: ProxymeRequest
    accepting: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: Whether the listener task was started; it sets ``closed`` once the listener is.
    listening: bool = False
    closed: anyio.Event = field(default_factory=anyio.Event)


class _Session(TunnelSession):
    """The server's side of one tunnel: the core's books plus its tasks and leases."""

    def __init__(
        self,
        server: TunnelServer,
        tunnel: TunnelConnection,
        tunnel_id: str,
        peer: str,
        connected_at: float,
    ) -> None:
        super().__init__(tunnel, tunnel_id, peer, connected_at)
        self.server = server
        self.leases: dict[int, _Lease] = {}
        self._scopes: set[anyio.CancelScope] = set()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``fn(*args)`` as one of this tunnel's tasks (cancelled when it closes).

        If the tunnel is already closed, ``fn`` still starts, in a cancelled scope,
        so its cleanup (``finally``) runs."""
        self.server._task_group.start_soon(self._run, fn, args)

    async def _run(self, fn: Callable[..., Awaitable[object]], args: tuple[Any, ...]) -> None:
        with anyio.CancelScope(shield=True) as scope:
            self._scopes.add(scope)
            if self.closed:
                scope.cancel()
            try:
                await fn(*args)
            except Exception:
                name = getattr(fn, "__name__", repr(fn))
                logger.exception("tunnel %s (%s): %s failed", self.tunnel_id, self.label, name)
            finally:
                self._scopes.discard(scope)

    def close(self) -> None:
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()


class TunnelServer(ServerEvents[_Session, TunnelStream]):
    """The aggregator.  Run :meth:`serve`; see the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        authenticate: Authenticate | None = None,
        route: Router | None = None,
    ) -> None:
        self.config = config
        self.activity = ActivityFeed()
        self._books: Aggregator[_Session] = Aggregator(config, lambda *args: _Session(self, *args))
        self.registry = self._books.registry
        self._authenticate = authenticate if authenticate is not None else self._lookup_token
        self._route = route
        self._host: TunnelHost | None = None
        self._endpoint: ServerEndpoint | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = False
        self._quic_address: tuple[str, int] | None = None
        self._shutdown_grace: float | None = None
        self._services = 0
        # anyio primitives need a running event loop: serve() creates them.
        self._pump_scope: anyio.CancelScope
        self._shutdown_requested: anyio.Event
        self._stopped: anyio.Event
        self._services_idle: anyio.Event

    # Public API ---------------------------------------------------------------

    @property
    def quic_address(self) -> tuple[str, int]:
        """The bound QUIC (UDP) address; available once :meth:`serve` has started."""
        if self._quic_address is None:
            raise RuntimeError("the server has not started")
        return self._quic_address

    @property
    def ports_in_use(self) -> frozenset[int]:
        """Public ports currently granted to tunnels."""
        return self._books.ports_in_use

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[TunnelServer] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the QUIC socket and serve until cancelled or :meth:`shutdown`.

        Either way the graceful wind-down runs before this returns (bounded by the
        grace period), and every task, socket, port and record is gone after it."""
        if self._started:
            raise RuntimeError("serve() may run only once per TunnelServer")
        self._started = True
        self._pump_scope = anyio.CancelScope(shield=True)
        self._shutdown_requested = anyio.Event()
        self._stopped = anyio.Event()
        self._services_idle = anyio.Event()
        if not self._books.accepting:  # shutdown() came first
            self._finish()
            return
        config = self.config
        try:
            self._endpoint = server_endpoint(config, self._new_authenticator)
            sock = bind_udp(config.quic_host, config.quic_port)
        except BaseException:
            self._finish()
            raise
        try:
            self._host = TunnelHost(self._endpoint, sock, self._on_event)
            self._quic_address = self._host.local_address
            if config.auth == SCHEME_SIMPLE_ACK:
                logger.warning(
                    "SimpleAck authentication (snocat 0.8 compat) is configured: any client "
                    "that reaches %s can open a tunnel, it carries no credentials",
                    format_address(self._host.local_address),
                )
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._pump, self._host)
                try:
                    self._report(notices.listening, format_address(self._host.local_address))
                    task_status.started(self)
                    await self._shutdown_requested.wait()
                finally:
                    grace = self._shutdown_grace
                    with anyio.CancelScope(shield=True):
                        await self._wind_down(config.shutdown_grace if grace is None else grace)
        finally:
            sock.close()
            self._finish()

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

    def tunnels(self) -> list[TunnelStatus]:
        """The authenticated tunnels, oldest first."""
        return self._books.statuses()

    async def open_stream(self, name: str, address: RouteAddress) -> TunnelStream:
        """Open a stream to ``address`` on the newest tunnel named ``name``.

        Raises :class:`TunnelNotFoundError` if there is none, :class:`StreamRefusedError`
        if the client refuses (or the server is shutting down), :class:`TunnelClosedError`
        if the tunnel closes meanwhile.  The caller owns (and must close) the stream."""
        if not self._books.accepting or self._host is None:
            raise StreamRefusedError("the aggregator is not running or is shutting down")
        session = self._books.route_to(name)
        if session is None:
            raise TunnelNotFoundError(name)
        return await self._open_on(session, address)

    # Events from the pump: the core's ServerEvents handles them (synchronously);
    # these are the I/O it asks for (tasks for anything slow) -------------------

    def _spawn(self, session: _Session, fn: Callable[..., Any], *args: object) -> None:
        session.spawn(fn, *args)

    def _tunnel_gone(self, session: _Session) -> None:
        session.close()

    def _failed(self, message: str, *args: object) -> None:
        logger.exception(message, *args)

    # Authentication -------------------------------------------------------------

    def _new_authenticator(self, peer_name: str) -> Authenticator:
        return listen_authenticator(
            self.config.auth,
            peer_name=peer_name,
            nonce=os.urandom(NONCE_SIZE),
            limits=self.config.limits,
        )

    async def _lookup_token(self, name: str) -> bytes | None:
        return self.config.tokens.get(name)

    async def _check_credential(self, session: _Session, name: str) -> None:
        secret: bytes | None = None
        lookup_failed = False
        try:
            secret = await self._authenticate(name)
        except Exception:
            logger.exception("credential lookup for tunnel name %r failed", name)
            lookup_failed = True
        error = self._books.settle_credential(session, secret, lookup_failed=lookup_failed)
        if error is not None:
            logger.error("credential decision for %r failed: %s", name, error)
        self._flush(session.tunnel)

    # proxyme -------------------------------------------------------------------

    async def _serve_proxyme(
        self, session: _Session, stream: TunnelStream, request: ProxymeRequest
    ) -> None:
        machine = ProxymeServer(limits=self.config.limits)
        pending: list[ProxymeEvent] = []
        lease: _Lease | None = None
        try:
            event = await _next_proxyme_event(stream, machine, pending)
            if not isinstance(event, SubjectReceived):
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
                return
            lease, reason = await self._lease_port(session, request)
            if lease is None:
                await stream.send(machine.deny())
                self._report(notices.port_denied, session, reason)
                await stream.aclose()
                return
            await stream.send(machine.grant(lease.addresses))
            self._port_granted(session, lease)
            lease.listening = True
            session.spawn(self._listen, session, lease)
            event = await _next_proxyme_event(stream, machine, pending)
            await self._stop_lease(session, lease)
            lease = None
            if isinstance(event, ReleaseRequested):
                await stream.send(machine.release_ack())
                await stream.aclose()
            else:
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
        except ProtocolError as exc:
            logger.info("tunnel %s: proxyme protocol error: %s", session.tunnel_id, exc)
            stream.reset(StreamCode.PROTOCOL_VIOLATION)
        except _BROKEN as exc:
            logger.debug("tunnel %s: proxyme stream ended: %r", session.tunnel_id, exc)
            stream.reset(StreamCode.CANCELLED)
        finally:
            if lease is not None:
                await self._stop_lease(session, lease)

    async def _lease_port(
        self, session: _Session, request: ProxymeRequest
    ) -> tuple[_Lease | None, str]:
        """Allocate a port and bind its listener; ``(None, reason)`` if there is none."""
        refused: set[int] = set()
        bind_host = self.config.tcp_bind or None
        while True:
            port = self._books.allocate_port(session, anyio.current_time(), refused)
            if port is None:
                return None, self._books.no_port_reason(refused)
            try:
                listener = await anyio.create_tcp_listener(local_host=bind_host, local_port=port)
            except OSError as exc:
                self._books.port_unavailable(port)
                if exc.errno in PORT_TAKEN_ERRNOS:
                    logger.debug("port %d is not available: %s", port, exc)
                    refused.add(port)
                    continue
                logger.warning("cannot listen on %s port %d: %s", bind_host or "*", port, exc)
                return None, f"cannot listen on port {port}: {exc.strerror or exc}"
            except BaseException:
                self._books.port_unavailable(port)
                raise
            subs = [s for s in listener.listeners if isinstance(s, anyio.abc.SocketListener)]
            addresses = tuple(
                format_address(sub.extra(SocketAttribute.local_address)) for sub in subs
            )
            return (
                _Lease(
                    port=port,
                    listener=listener,
                    sub_listeners=subs,
                    addresses=addresses,
                    request=request,
                ),
                "",
            )

    def _port_granted(self, session: _Session, lease: _Lease) -> None:
        session.leases[lease.port] = lease
        if not self._books.accepting:
            lease.accepting.cancel()
        self._books.port_granted(session, lease.port)
        self._report(notices.port_granted, session, lease.port, lease.addresses, lease.request)

    def _end_lease(self, session: _Session, lease: _Lease) -> None:
        """The listener is closed: free the port, remember it for the name."""
        session.leases.pop(lease.port, None)
        if not self._books.port_released(session, lease.port, anyio.current_time()):
            return  # never granted (denied before the grant went out)
        self._report(notices.port_released, session, lease.port)

    async def _listen(self, session: _Session, lease: _Lease) -> None:
        """Accept on every socket of the lease until released, stopped or the tunnel closes."""
        try:
            with lease.accepting:
                async with anyio.create_task_group() as tg:
                    for listener in lease.sub_listeners:
                        tg.start_soon(self._accept_connections, session, lease, listener)
        finally:
            with anyio.CancelScope(shield=True):
                await lease.listener.aclose()
            lease.closed.set()

    async def _stop_lease(self, session: _Session, lease: _Lease) -> None:
        """Stop accepting, wait until the listener is closed, then free the port."""
        with anyio.CancelScope(shield=True):
            if lease.listening:
                lease.accepting.cancel()
                await lease.closed.wait()
            else:  # the listener task was never started
                await lease.listener.aclose()
        self._end_lease(session, lease)

    async def _accept_connections(
        self, session: _Session, lease: _Lease, listener: anyio.abc.SocketListener
    ) -> None:
        # Not listener.accept(): cancelling a pending accept as a connection arrives
        # drops that connection and raises in asyncio's loop (python/cpython#153761),
        # and this loop is stopped by cancellation.  Waiting for readability is safe.
        sock = listener.extra(SocketAttribute.raw_socket)
        while True:
            await anyio.wait_readable(sock)
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # out of file descriptors, buffers...
                logger.warning("accept on port %d failed: %s", lease.port, exc)
                await anyio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            if not self._books.accepting or session.closed:
                client.close()
                continue
            self._service_started()
            session.spawn(self._forward, session, client, lease)

    async def _forward(self, session: _Session, client: socket.socket, lease: _Lease) -> None:
        """Carry one accepted TCP connection over a new stream to the tunnel."""
        address = lease.request.target().to_address()
        conn: anyio.abc.SocketStream | None = None
        try:
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = read_on_demand(await anyio.abc.SocketStream.from_socket(client))
            try:
                stream = await self._open_on(session, address)
            except (StreamRefusedError, TunnelClosedError) as exc:
                self._report(notices.stream_refused, session.tunnel_id, address, str(exc))
                return
            self._report(notices.stream_opened, session.tunnel_id, stream.stream_id, address, "out")
            result = await relay(stream, conn)
            self._report(notices.relayed, session.tunnel_id, stream.stream_id, address, result)
        finally:
            if conn is None:
                client.close()
            else:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()
            self._service_finished()

    # Other services -------------------------------------------------------------

    async def _serve_routed(
        self, session: _Session, stream: TunnelStream, handler: RouteHandler
    ) -> None:
        self._report(
            notices.stream_opened, session.tunnel_id, stream.stream_id, stream.address, "in"
        )
        error: str | None = None
        try:
            await handler(stream)
        except _BROKEN as exc:
            error = repr(exc)
            stream.reset(StreamCode.CANCELLED)
        except Exception as exc:
            error = repr(exc)
            logger.exception("service for %s failed", stream.address)
            stream.reset(StreamCode.CANCELLED)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            self._report(notices.served, session.tunnel_id, stream, error)
            self._service_finished()

    def _refuse(self, session: _Session, stream: TunnelStream, reason: str) -> None:
        self._require_host().refuse(stream)
        self._report(notices.stream_refused, session.tunnel_id, stream.address, reason)

    async def _open_on(self, session: _Session, address: RouteAddress) -> TunnelStream:
        if session.closed:
            raise StreamRefusedError("the tunnel is closed")
        try:
            stream = await self._require_host().open_stream(session.tunnel, address)
        except LocalProtocolError as exc:  # the tunnel is closing
            raise StreamRefusedError(f"the tunnel cannot open streams: {exc}") from None
        session.track(stream.handle)
        return stream

    # Lifecycle ------------------------------------------------------------------

    async def _pump(self, host: TunnelHost) -> None:
        with self._pump_scope:  # shielded: only _wind_down stops it
            await host.run()

    async def _wind_down(self, grace: float) -> None:
        """Stop listening, let streams finish within ``grace``, close every tunnel,
        then stop every task (the caller's task group waits for them)."""
        self._books.accepting = False
        for session in self._books.sessions():
            for lease in session.leases.values():
                lease.accepting.cancel()
        with anyio.move_on_after(grace):
            while self._services:
                self._services_idle = anyio.Event()
                await self._services_idle.wait()
        if self._endpoint is not None and self._host is not None:
            self._endpoint.close(CloseCode.SHUTTING_DOWN, "the aggregator is shutting down")
            self._host.flush()
            # Keep answering until every tunnel has finished closing (briefly).
            with anyio.move_on_after(CLOSE_LINGER):
                while len(self._endpoint):
                    await anyio.sleep(0.02)
        for session in self._books.sessions():
            session.close()
        self._pump_scope.cancel()

    def _finish(self) -> None:
        """After the task group: drop what is left and tell waiters we are done."""
        leftover = self._books.finish("the aggregator stopped")
        if leftover:  # would be a bug: every lease frees its port as it unwinds
            logger.error("ports still allocated after shutdown: %s", sorted(leftover))
        self.activity.close()
        self._stopped.set()

    # Helpers --------------------------------------------------------------------

    @property
    def _task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("the server is not running")
        return self._tg

    def _require_host(self) -> TunnelHost:
        if self._host is None:
            raise RuntimeError("the server is not running")
        return self._host

    def _flush(self, tunnel: TunnelConnection) -> None:
        self._require_host().flush(tunnel)

    def _session(self, tunnel: TunnelConnection) -> _Session:
        return self._books.session(tunnel, time.time())

    def _wall_time(self) -> float:
        return time.time()

    def _service_started(self) -> None:
        self._services += 1

    def _service_finished(self) -> None:
        self._services -= 1
        if self._services == 0:
            self._services_idle.set()

    def _report(
        self, build: Callable[Concatenate[float, P], Notice], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Log and publish what the core reports (``build(now, *args, **kwargs)``)."""
        notice = build(time.time(), *args, **kwargs)
        notices.deliver(notice, logger.log, self.activity.publish)


async def _next_proxyme_event(
    stream: TunnelStream, machine: ProxymeServer, pending: list[ProxymeEvent]
) -> ProxymeEvent | None:
    """The next event of the ``proxyme`` exchange; None if the client ended without one."""
    while not pending:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            pending.extend(machine.receive_eof())
            break
        pending.extend(machine.receive_data(data))
    return pending.pop(0) if pending else None
