# Generated from snocat_anyio/_server_flows.py by scripts/unasync.py: do not edit.
"""The aggregator's flows, written once: tunnels in, public ports out.

This file is the source of both bindings' servers: ``snocat_sync/_server_flows.py``
is generated from it by ``scripts/unasync.py`` (``async``/``await`` removed), and
the names it imports from ``._backend``, ``._host`` and ``._stream`` have a twin in
each binding.  The decisions (who is admitted, which port, where a stream goes) are
the core's :class:`~snocat_proto._service.aggregator.Aggregator` and
:class:`~snocat_proto._service.server_events.ServerEvents`; what is here is the
waiting around them: the credential lookup, the ``proxyme`` exchange and its port
lease, forwarding each accepted TCP connection over a stream, the route hook's
services, and the wind-down.

Every task or thread belongs to one tunnel's :class:`_Session` (its
:class:`~._backend.TaskSet`), stopped when the tunnel closes.  A port goes back to
the allocator only once its listener is closed, so it is never granted twice; the
tunnel's name remembers it (sticky ports) for a reconnect.  The binding's public
``TunnelServer`` adds the lifecycle (``serve()``, or ``start()`` / ``shutdown()``).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec

from snocat_proto._service import notices
from snocat_proto._service.aggregator import (
    PORT_TAKEN_ERRNOS,
    Aggregator,
    PortPending,
    PortRefusal,
    TunnelSession,
    TunnelStatus,
    server_endpoint,
)
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.notices import Notice
from snocat_proto._service.visitors import ListenerKind
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
from snocat_proto._wire.features import BY_NAME, PROXYME_OPTIONS, UDP_DATAGRAMS
from snocat_proto._wire.network import format_address
from snocat_proto._wire.proxyme import (
    ProxymeEvent,
    ProxymeRequest,
    ProxymeServer,
    ReleaseRequested,
    SubjectReceived,
)
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_proto._wire.visitor import format_endpoint

from ._backend import (
    BROKEN,
    LOG_PREFIX,
    Condition,
    Listener,
    Lock,
    TaskSet,
    accepted,
    current_time,
    join_group,
    relay,
    shield,
    sleep,
)
from ._errors import StreamRefusedError, TunnelClosedError, TunnelNotFoundError
from ._feed import ActivityFeed
from ._host import TunnelHost
from ._server_udp import ServerUdp, UdpFlow, UdpLease
from ._shared_listeners import SharedListeners, next_proxyme_event
from ._stream import TunnelStream
from ._udp import bind_udp

__all__ = ["Authenticate", "Router", "ServerCore", "TunnelStatus"]

P = ParamSpec("P")
logger = logging.getLogger(f"{LOG_PREFIX}.server")

#: Picks the handler for a stream a client opened (None: refuse it).  Called
#: synchronously from the pump: decide quickly, do the work in the handler, which
#: serves the stream (the server closes it when the handler returns).
Router = Callable[[TunnelStatus, RouteAddress], Any]
#: Looks up the secret of a tunnel name (None: unknown name).
Authenticate = Callable[[str], Any]

#: After closing every tunnel, how long the pump keeps answering their last packets.
CLOSE_LINGER = 0.5
#: How long the wind-down waits for the tasks or threads of every tunnel.
TASK_JOIN_TIMEOUT = 5.0


class _Lease:
    """One granted port: its listener and what it forwards to."""

    def __init__(self, listener: Listener, request: ProxymeRequest) -> None:
        self.listener = listener
        self.port = listener.port
        self.addresses = listener.addresses
        self.request = request


class _Session(TunnelSession):
    """The server's side of one tunnel: the core's books plus its tasks and leases."""

    def __init__(
        self,
        tasks: TaskSet,
        tunnel: TunnelConnection,
        tunnel_id: str,
        peer: str,
        connected_at: float,
    ) -> None:
        super().__init__(tunnel, tunnel_id, peer, connected_at)
        self.tasks = tasks
        self.leases: dict[int, _Lease] = {}
        #: Its UDP ports (``udp-datagrams``) and their flows, by flow ID.
        self.udp_leases: dict[int, UdpLease] = {}
        self.udp_flows: dict[int, UdpFlow] = {}


class ServerCore(SharedListeners, ServerUdp):
    """The aggregator's flows; the binding's ``TunnelServer`` subclasses it.  Its
    shared listeners and visitors' addresses are :class:`SharedListeners`', its UDP
    ports :class:`ServerUdp`'s."""

    #: Whether this class is a node of a fleet (``ServerConfig.fleet``).
    serves_fleet = False

    def __init__(
        self,
        config: ServerConfig,
        *,
        authenticate: Authenticate | None = None,
        route: Router | None = None,
    ) -> None:
        if config.fleet is not None and not self.serves_fleet:
            raise ValueError(
                "ServerConfig.fleet makes a node of a fleet: use snocat_anyio.FleetServer "
                "(docs/fleet.md); this server is a single node"
            )
        self.config = config
        self.activity = ActivityFeed(config.limits.max_subscriber_backlog)
        #: Guards the core, the books and every stream (a no-op on an event loop).
        self._lock = Lock()
        self._books: Aggregator[_Session] = Aggregator(config, self._new_session)
        self.registry = self._books.registry
        self._authenticate = authenticate if authenticate is not None else self._lookup_token
        #: The default credential lookup's tokens (replaced on a reload).
        self._tokens: dict[str, bytes] = dict(config.tokens)
        self._route = route
        self._host: TunnelHost | None = None
        self._endpoint: ServerEndpoint | None = None
        self._sock: socket.socket | None = None
        self._quic_address: tuple[str, int] | None = None
        self._group: Any = None
        self._services = 0
        self._services_changed = Condition(self._lock)
        #: Notified whenever a port is released (and counted).
        self._ports_changed = Condition(self._lock)
        self._port_releases = 0
        self._init_shared()

    # Public API ---------------------------------------------------------------

    @property
    def quic_address(self) -> tuple[str, int]:
        """The bound QUIC (UDP) address; available once the server has started."""
        if self._quic_address is None:
            raise RuntimeError("the server has not started")
        return self._quic_address

    @property
    def ports_in_use(self) -> frozenset[int]:
        """Public ports currently granted to tunnels."""
        with self._lock:
            return self._books.ports_in_use

    def tunnels(self) -> list[TunnelStatus]:
        """The authenticated tunnels, oldest first."""
        with self._lock:
            return self._books.statuses()

    def open_stream(
        self, name: str, address: RouteAddress, timeout: float | None = None
    ) -> TunnelStream:
        """Open a stream to ``address`` on the newest tunnel named ``name``.

        Raises :class:`TunnelNotFoundError` if there is none, :class:`StreamRefusedError`
        if the client refuses (or the server is shutting down), :class:`TunnelClosedError`
        if the tunnel closes meanwhile, ``TimeoutError`` after ``timeout`` seconds.
        The caller owns (and must close) the stream."""
        with self._lock:
            if not self._books.accepting or self._host is None:
                raise StreamRefusedError("the aggregator is not running or is shutting down")
            session = self._books.route_to(name)
            if session is None:
                raise TunnelNotFoundError(name)
        return self._open_on(session, address, timeout)

    # Lifecycle (the binding's TunnelServer runs these) -------------------------

    def _open(self) -> None:
        """Make the endpoint and bind the QUIC socket (raises what is misconfigured)."""
        config = self.config
        self._endpoint = server_endpoint(config, self._new_authenticator)
        self._sock = bind_udp(
            config.quic_host,
            config.quic_port,
            reuse_port=config.quic_reuse_port,
            dont_fragment=config.path_mtu_discovery,
        )
        self._open_shared()
        self._host = TunnelHost(
            self._endpoint,
            self._sock,
            self._on_event,
            limits=config.limits,
            lock=self._lock,
            name="snocat-server-pump",
        )
        self._quic_address = self._host.local_address

    def _begin(self, group: Any) -> None:
        """Start the pump, with ``group`` for every task or thread to come."""
        self._group = group
        host = self._require_host()
        host.start(group)
        self._start_shared(group)
        address = format_address(host.local_address)
        if self.config.auth == SCHEME_SIMPLE_ACK:
            logger.warning(
                "SimpleAck authentication (snocat 0.8 compat) is configured: any client "
                "that reaches %s can open a tunnel, it carries no credentials",
                address,
            )
        self._report(notices.listening, address)

    def _wind_down(self, grace: float) -> None:
        """Stop listening, let streams finish within ``grace``, close every tunnel,
        stop the pump, then wait for every task or thread."""
        with self._lock:
            self._books.accepting = False
            sessions = self._books.sessions()
        for session in sessions:
            for lease in list(session.leases.values()):
                lease.listener.close()
            for udp_lease in list(session.udp_leases.values()):
                udp_lease.sockets.close()
        self._stop_shared()
        self._services_changed.wait_for(lambda: self._services == 0, grace)
        host, endpoint = self._host, self._endpoint
        if host is not None and endpoint is not None:
            with self._lock:
                endpoint.close(CloseCode.SHUTTING_DOWN, "the aggregator is shutting down")
                host.flush()
            # Keep answering until every tunnel has finished closing (briefly).
            deadline = current_time() + CLOSE_LINGER
            while current_time() < deadline:
                with self._lock:
                    if not len(endpoint):
                        break
                sleep(0.02)
        with self._lock:
            sessions = self._books.sessions()
        for session in sessions:
            session.tasks.cancel()
        self._cancel_shared()
        if host is not None:
            host.stop()
        left = join_group(self._group, TASK_JOIN_TIMEOUT)
        if left:
            logger.warning("%d service tasks did not finish: %s", len(left), ", ".join(left))

    def _finish(self) -> None:
        """After everything stopped: drop what is left, close the socket, end the feed."""
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            leftover = self._books.finish("the aggregator stopped")
        if leftover:  # would be a bug: every lease frees its port as it unwinds
            logger.error("ports still allocated after shutdown: %s", sorted(leftover))
        self.activity.close()

    # Events from the pump: the core's ServerEvents handles them; these are the
    # I/O it asks for (a task or thread for anything slow) -------------------------

    def _new_session(
        self, tunnel: TunnelConnection, tunnel_id: str, peer: str, connected_at: float
    ) -> _Session:
        tasks = TaskSet(self._group, logger, f"tunnel {tunnel_id}")
        return _Session(tasks, tunnel, tunnel_id, peer, connected_at)

    def _spawn(self, session: _Session, fn: Callable[..., Any], *args: object) -> None:
        session.tasks.spawn(fn, *args)

    def _tunnel_gone(self, session: _Session) -> None:
        session.tasks.cancel()

    def _failed(self, message: str, *args: object) -> None:
        logger.exception(message, *args)

    # Authentication -------------------------------------------------------------

    def _new_authenticator(self, peer_name: str) -> Authenticator:
        return listen_authenticator(
            self.config.auth,
            peer_name=peer_name,
            nonce=os.urandom(NONCE_SIZE),
            limits=self.config.limits,
            features=self.config.features,
        )

    def _lookup_token(self, name: str) -> bytes | None:
        with self._lock:
            return self._tokens.get(name)

    def replace_tokens(
        self, tokens: Mapping[str, bytes], pools: Iterable[str] | None = None
    ) -> tuple[str, ...]:
        """Take ``tokens`` (name -> secret) for the default credential lookup from now
        on, e.g. after the tokens file changed, and ``pools`` (if given) as the names
        several tunnels may serve at once.  No tunnel is dropped for it, except
        those whose name's token was removed or changed: they are closed with
        :attr:`CloseCode.AUTHENTICATION_FAILED` and a reason.  Returns their names."""
        with self._lock:
            old, self._tokens = self._tokens, dict(tokens)
            if pools is not None:
                self._books.names.set_pools(pools)
            closing = self._books.revoked(old, self._tokens)
            for session, (code, reason) in closing:
                session.tunnel.close(code, reason)
                if self._host is not None:
                    self._host.flush(session.tunnel)
        closed = tuple(session.label for session, _ in closing)
        self._report(notices.tokens_replaced, len(tokens), closed)
        return closed

    def _check_credential(self, session: _Session, name: str) -> None:
        secret: bytes | None = None
        lookup_failed = False
        try:
            secret = self._authenticate(name)
        except Exception:
            logger.exception("credential lookup for tunnel name %r failed", name)
            lookup_failed = True
        with self._lock:
            error = self._books.settle_credential(session, secret, lookup_failed=lookup_failed)
            if error is not None:
                logger.error("credential decision for %r failed: %s", name, error)
            self._flush(session.tunnel)

    # proxyme -------------------------------------------------------------------

    def _serve_proxyme(
        self, session: _Session, stream: TunnelStream, request: ProxymeRequest
    ) -> None:
        features = session.tunnel.features
        options = PROXYME_OPTIONS in features
        by_name = BY_NAME in features
        udp = UDP_DATAGRAMS in features and self.config.udp_port_range is not None
        machine = ProxymeServer(
            limits=self.config.limits, options=options, udp=udp, by_name=by_name
        )
        pending: list[ProxymeEvent] = []
        lease: _Lease | None = None
        try:
            event = next_proxyme_event(stream, machine, pending)
            if not isinstance(event, SubjectReceived):
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
                return
            if event.service is not None:
                self._serve_published_name(
                    session, stream, machine, pending, request, event.service
                )
                return
            if event.udp:
                self._serve_udp_port(
                    session, stream, machine, pending, request, event.port, next_proxyme_event
                )
                return
            leased = self._lease_port(session, request, event.port)
            if isinstance(leased, PortRefusal):
                stream.sendall(machine.deny(leased.reason, retry=leased.retry))
                self._report(notices.port_denied, session, request, leased.reason)
                stream.close()
                return
            lease = leased
            stream.sendall(machine.grant(lease.addresses))
            self._port_granted(session, lease)
            event = next_proxyme_event(stream, machine, pending)
            self._stop_lease(session, lease)
            lease = None
            if isinstance(event, ReleaseRequested):
                stream.sendall(machine.release_ack())
                stream.close()
            else:
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
        except ProtocolError as exc:
            logger.info("tunnel %s: proxyme protocol error: %s", session.tunnel_id, exc)
            stream.reset(StreamCode.PROTOCOL_VIOLATION)
        except BROKEN as exc:
            logger.debug("tunnel %s: proxyme stream ended: %r", session.tunnel_id, exc)
            stream.reset(StreamCode.CANCELLED)
        finally:
            if lease is not None:
                with shield():
                    self._stop_lease(session, lease)

    def _lease_port(
        self, session: _Session, request: ProxymeRequest, wanted: int | None
    ) -> _Lease | PortRefusal:
        """Claim a port (``wanted``, if the client asked for one) and bind it."""
        refused: set[int] = set()
        bind_host = self.config.tcp_bind or None
        while True:
            port = self._claim_port(session, request, wanted, refused)
            if isinstance(port, PortRefusal):
                return port
            try:
                listener = Listener.open(bind_host, port)
            except OSError as exc:
                self._unclaim_port(session, port)
                if exc.errno in PORT_TAKEN_ERRNOS:
                    logger.debug("port %d is not available: %s", port, exc)
                    refused.add(port)
                    continue
                logger.warning("cannot listen on %s port %d: %s", bind_host or "*", port, exc)
                return PortRefusal(f"cannot listen on port {port}: {exc.strerror or exc}", True)
            except BaseException:
                with shield():
                    self._unclaim_port(session, port)
                raise
            return _Lease(listener, request)

    def _claim_port(
        self, session: _Session, request: ProxymeRequest, wanted: int | None, refused: set[int]
    ) -> int | PortRefusal:
        """A port for ``request`` (the binding's registry decides; here, the embedded
        one): ``wanted`` if given, else the name's old one for this target, else the
        lowest free; ports in ``refused`` could not be bound."""
        return self._allocate_port(session, request, wanted, refused, udp=False)

    def _allocate_port(
        self,
        session: _Session,
        request: ProxymeRequest,
        wanted: int | None,
        refused: set[int],
        *,
        udp: bool,
    ) -> int | PortRefusal:
        """A port of the TCP range or (``udp``) the UDP one, from the embedded books.
        A tunnel that took the name over first waits for the displaced one's port."""
        wait_until = current_time() + self.config.limits.takeover_port_wait
        while True:
            with self._lock:
                releases = self._port_releases
                port = self._books.allocate_port(
                    session,
                    request,
                    current_time(),
                    refused,
                    wanted,
                    wait_for_takeover=current_time() < wait_until,
                    udp=udp,
                )
            if not isinstance(port, PortPending):
                return port
            # The tunnel this one took over is closing its listener (or sockets) on
            # our port.
            self._ports_changed.wait_for(
                functools.partial(self._ports_released_since, releases),
                wait_until - current_time(),
            )

    def _unclaim_port(self, session: _Session, port: int) -> None:
        """A claimed port could not be bound: give it back."""
        with self._lock:
            self._books.port_unavailable(port)

    def _release_port(self, session: _Session, port: int) -> bool:
        """A granted port's listener is closed: free it (and remember it for the
        name); False if it was never granted."""
        with self._lock:
            return self._books.port_released(session, port, current_time())

    def _port_granted(self, session: _Session, lease: _Lease) -> None:
        """The grant is on its way: book the port and start accepting on it."""
        with self._lock:
            session.leases[lease.port] = lease
            self._books.port_granted(session, lease.port, lease.request)
            accepting = self._books.accepting and not session.closed
        self._report(notices.port_granted, session, lease.port, lease.addresses, lease.request)
        if accepting:
            lease.listener.start(
                self._host, session.tasks, lambda client: self._accepted(session, lease, client)
            )

    def _stop_lease(self, session: _Session, lease: _Lease) -> None:
        """Close the listener, then free the port and remember it for the name."""
        lease.listener.close()
        with self._lock:
            session.leases.pop(lease.port, None)
        released = self._release_port(session, lease.port)
        with self._lock:
            self._port_releases += 1
            self._ports_changed.notify_all()
        if released:  # else never granted (denied before the grant went out)
            self._report(notices.port_released, session, lease.port)

    def _ports_released_since(self, count: int) -> bool:
        return self._port_releases != count

    def _accepted(self, session: _Session, lease: _Lease, client: socket.socket) -> None:
        """(Never blocks) A TCP connection arrived on ``lease``'s port."""
        with self._lock:
            serve = self._books.accepting and not session.closed
            if serve:
                self._services += 1
        if serve:
            session.tasks.spawn(self._forward, session, client, lease, name="forward")
        else:
            client.close()

    def _forward(self, session: _Session, client: socket.socket, lease: _Lease) -> None:
        """Carry one accepted TCP connection over a new stream to the tunnel."""
        address = lease.request.target().to_address()
        try:
            conn = accepted(client)
            started = self._visitor_start(ListenerKind.PORT, client, conn)
            if started is None:
                return  # refused (a PROXY header, or none from a load balancer)
            start, guard = started
            visitor = format_endpoint(start.visitor.source, start.visitor.source_port)
            try:
                stream = self._open_on(session, self._with_visitor(session, address, start))
            except (StreamRefusedError, TunnelClosedError) as exc:
                self._report(notices.stream_refused, session.tunnel_id, address, str(exc))
                with shield():
                    conn.close()
                return
            name = session.name
            self._report(
                notices.stream_opened,
                session.tunnel_id,
                stream.stream_id,
                address,
                "out",
                name=name,
                visitor=visitor,
            )
            chunk = self.config.limits.relay_chunk_size
            result = relay(stream, conn, chunk, initial=start.data, guard=guard)
            self._guard_refused(visitor, result.error)
            self._report(
                notices.relayed,
                session.tunnel_id,
                stream.stream_id,
                address,
                result,
                name=name,
                visitor=visitor,
            )
        finally:
            client.close()
            self._service_finished()

    # Other services -------------------------------------------------------------

    def _serve_routed(self, session: _Session, stream: TunnelStream, handler: Any) -> None:
        self._report(
            notices.stream_opened, session.tunnel_id, stream.stream_id, stream.address, "in"
        )
        error: str | None = None
        try:
            handler(stream)
        except BROKEN as exc:
            error = repr(exc)
            stream.reset(StreamCode.CANCELLED)
        except Exception as exc:
            error = repr(exc)
            logger.exception("service for %s failed", stream.address)
            stream.reset(StreamCode.CANCELLED)
        finally:
            with shield():
                stream.close()
            self._report(notices.served, session.tunnel_id, stream, error)
            self._service_finished()

    def _refuse(self, session: _Session, stream: TunnelStream, reason: str) -> None:
        self._require_host().refuse(stream)
        self._report(notices.stream_refused, session.tunnel_id, stream.address, reason)

    def _open_on(
        self, session: _Session, address: RouteAddress, timeout: float | None = None
    ) -> TunnelStream:
        if session.closed:
            raise StreamRefusedError("the tunnel is closed")
        try:
            stream = self._require_host().open_stream(session.tunnel, address, timeout)
        except LocalProtocolError as exc:  # the tunnel is closing
            raise StreamRefusedError(f"the tunnel cannot open streams: {exc}") from None
        with self._lock:
            session.track(stream.handle)
        return stream

    # Helpers --------------------------------------------------------------------

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
        with self._lock:
            self._services -= 1
            if self._services == 0:
                self._services_changed.notify_all()

    def _report(
        self, build: Callable[Concatenate[float, P], Notice], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Log and publish what the core reports (``build(now, *args, **kwargs)``)."""
        notice = build(time.time(), *args, **kwargs)
        notices.deliver(notice, logger.log, self.activity.publish)
