"""The aggregator for blocking programs: tunnels on one UDP socket, public TCP ports.

:class:`TunnelServer` is :class:`snocat_anyio.server.TunnelServer` 's twin, configured
with the same :class:`~snocat_proto.settings.ServerConfig`, and deciding everything
through the same core books (:class:`~snocat_proto.aggregator.Aggregator`): who is
admitted, which port a tunnel gets, where a stream goes.  What differs is the I/O:
one :class:`~snocat_sync.host.SyncHost` pump thread moves the datagrams and accepts
on the public ports; every service (a ``proxyme`` exchange, a forwarded connection,
a routed stream, a credential lookup) runs in a thread of its own, so a slow or
failing handler costs only itself.

``start()`` binds and returns; ``shutdown()`` refuses anything new, stops every
listener, gives in-flight streams ``grace`` seconds, closes every tunnel with
:attr:`CloseCode.SHUTTING_DOWN`, then joins the pump and every thread and closes
every socket.  Used as a context manager it does both.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec

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

from .errors import StreamRefusedError, TunnelClosedError, TunnelNotFoundError
from .host import SyncHost
from .observe import ActivityFeed
from .relay import relay
from .stream import TunnelStream
from .threads import ThreadGroup
from .udp import bind_udp

__all__ = [
    "RouteHandler",
    "Router",
    "ServerConfig",
    "TunnelNotFoundError",
    "TunnelServer",
    "TunnelStatus",
]

P = ParamSpec("P")
logger = logging.getLogger("snocat.sync.server")

#: Serves one accepted stream, in a thread of its own; the server closes the stream
#: when it returns.
RouteHandler = Callable[[TunnelStream], None]
#: Picks the handler for a stream a client opened (None: refuse it).  Called from the
#: pump with the lock held: decide quickly, do the work in the handler.
Router = Callable[[TunnelStatus, RouteAddress], RouteHandler | None]
#: Looks up the secret of a tunnel name (None: unknown name); runs in its own thread.
Authenticate = Callable[[str], bytes | None]

#: After closing every tunnel, how long the pump keeps answering their last packets.
CLOSE_LINGER = 0.5
#: Pause after a failed ``accept()`` (e.g. out of file descriptors) before retrying.
ACCEPT_ERROR_PAUSE = 0.1
#: How long shutdown waits for service threads once every tunnel is closed.
THREAD_JOIN_TIMEOUT = 5.0


@dataclass(eq=False)
class _Lease:
    """One granted port: its listening sockets."""

    port: int
    sockets: list[socket.socket]
    addresses: tuple[str, ...]
    request: ProxymeRequest
    #: Guards watching and closing the sockets (never held with the host lock).
    guard: threading.Lock = field(default_factory=threading.Lock)
    stopped: bool = False


class _Session(TunnelSession):
    """The core's books on one tunnel, plus its port leases."""

    def __init__(
        self, tunnel: TunnelConnection, tunnel_id: str, peer: str, connected_at: float
    ) -> None:
        super().__init__(tunnel, tunnel_id, peer, connected_at)
        self.leases: dict[int, _Lease] = {}


class TunnelServer(ServerEvents[_Session, TunnelStream]):
    """The aggregator; see the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        authenticate: Authenticate | None = None,
        route: Router | None = None,
    ) -> None:
        self.config = config
        self.activity = ActivityFeed()
        self._lock = threading.RLock()
        self._books: Aggregator[_Session] = Aggregator(config, _Session)
        self.registry = self._books.registry
        self._authenticate = authenticate if authenticate is not None else self._lookup_token
        self._route = route
        self._threads = ThreadGroup("snocat-server", logger)
        self._host: SyncHost | None = None
        self._endpoint: ServerEndpoint | None = None
        self._quic_address: tuple[str, int] | None = None
        self._started = False
        self._stopping = False
        self._stopped = threading.Event()
        self._services = 0
        self._services_idle = threading.Condition(self._lock)

    # Public API ---------------------------------------------------------------

    @property
    def quic_address(self) -> tuple[str, int]:
        """The bound QUIC (UDP) address; available once :meth:`start` returned."""
        if self._quic_address is None:
            raise RuntimeError("the server has not started")
        return self._quic_address

    @property
    def ports_in_use(self) -> frozenset[int]:
        """Public ports currently granted to tunnels."""
        with self._lock:
            return self._books.ports_in_use

    def start(self) -> TunnelServer:
        """Bind the QUIC socket and start serving in the background."""
        with self._lock:
            if self._started:
                raise RuntimeError("start() may run only once per TunnelServer")
            self._started = True
            if self._stopping:  # shutdown() came first
                self._finish()
                return self
        config = self.config
        sock: socket.socket | None = None
        try:
            self._endpoint = server_endpoint(config, self._new_authenticator)
            sock = bind_udp(config.quic_host, config.quic_port)
            host = SyncHost(
                self._endpoint, sock, self._on_event, lock=self._lock, name="snocat-server-pump"
            )
            self._quic_address = host.local_address
            host.start()
            self._host = host
        except BaseException:
            if sock is not None:
                sock.close()
            self._finish()
            raise
        address = format_address(host.local_address)
        if config.auth == SCHEME_SIMPLE_ACK:
            logger.warning(
                "SimpleAck authentication (snocat 0.8 compat) is configured: any client "
                "that reaches %s can open a tunnel, it carries no credentials",
                address,
            )
        self._report(notices.listening, address)
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

    # Events from the pump: the core's ServerEvents handles them (lock held);
    # these are the I/O it asks for (threads for anything slow) -----------------

    def _spawn(self, session: _Session, fn: Callable[..., Any], *args: object) -> None:
        self._threads.spawn(fn, *args)

    def _tunnel_gone(self, session: _Session) -> None:
        pass  # its threads see their streams fail

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

    def _lookup_token(self, name: str) -> bytes | None:
        return self.config.tokens.get(name)

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
        machine = ProxymeServer(limits=self.config.limits)
        pending: list[ProxymeEvent] = []
        lease: _Lease | None = None
        try:
            event = _next_proxyme_event(stream, machine, pending)
            if not isinstance(event, SubjectReceived):
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
                return
            lease, reason = self._lease_port(session, request)
            if lease is None:
                stream.sendall(machine.deny())
                self._report(notices.port_denied, session, reason)
                stream.close()
                return
            stream.sendall(machine.grant(lease.addresses))
            self._port_granted(session, lease)
            event = _next_proxyme_event(stream, machine, pending)
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
        except OSError as exc:
            logger.debug("tunnel %s: proxyme stream ended: %r", session.tunnel_id, exc)
            stream.reset(StreamCode.CANCELLED)
        finally:
            if lease is not None:
                self._stop_lease(session, lease)

    def _lease_port(self, session: _Session, request: ProxymeRequest) -> tuple[_Lease | None, str]:
        """Allocate a port and bind its listener; ``(None, reason)`` if there is none."""
        refused: set[int] = set()
        bind_host = self.config.tcp_bind or None
        while True:
            with self._lock:
                port = self._books.allocate_port(session, time.monotonic(), refused)
                if port is None:
                    return None, self._books.no_port_reason(refused)
            try:
                sockets = _listen_tcp(bind_host, port)
            except OSError as exc:
                with self._lock:
                    self._books.port_unavailable(port)
                if exc.errno in PORT_TAKEN_ERRNOS:
                    logger.debug("port %d is not available: %s", port, exc)
                    refused.add(port)
                    continue
                logger.warning("cannot listen on %s port %d: %s", bind_host or "*", port, exc)
                return None, f"cannot listen on port {port}: {exc.strerror or exc}"
            except BaseException:
                with self._lock:
                    self._books.port_unavailable(port)
                raise
            addresses = tuple(format_address(s.getsockname()) for s in sockets)
            return _Lease(port=port, sockets=sockets, addresses=addresses, request=request), ""

    def _port_granted(self, session: _Session, lease: _Lease) -> None:
        with self._lock:
            session.leases[lease.port] = lease
            self._books.port_granted(session, lease.port)
            accepting = self._books.accepting and not session.closed
        self._report(notices.port_granted, session, lease.port, lease.addresses, lease.request)
        if accepting:
            host = self._require_host()
            with lease.guard:
                if not lease.stopped:
                    for sock in lease.sockets:
                        host.watch(
                            sock, functools.partial(self._accept_connections, session, lease, sock)
                        )

    def _close_listeners(self, lease: _Lease) -> None:
        """Stop accepting and close the lease's sockets (idempotent; no lock held)."""
        with lease.guard:
            if lease.stopped:
                return
            lease.stopped = True
            host = self._host
            for sock in lease.sockets:
                if host is not None:
                    host.unwatch(sock)
                sock.close()

    def _stop_lease(self, session: _Session, lease: _Lease) -> None:
        """Close the listeners, then free the port and remember it for the name."""
        self._close_listeners(lease)
        with self._lock:
            session.leases.pop(lease.port, None)
            released = self._books.port_released(session, lease.port, time.monotonic())
        if not released:
            return  # never granted (denied before the grant went out)
        self._report(notices.port_released, session, lease.port)

    def _accept_connections(
        self, session: _Session, lease: _Lease, listener: socket.socket
    ) -> None:
        """(Pump thread, no lock) Accept what is waiting; one thread per connection."""
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of file descriptors, buffers...
                logger.warning("accept on port %d failed: %s", lease.port, exc)
                # The listener stays readable: pause it, or the pump would spin.
                self._require_host().unwatch(listener)
                self._threads.spawn(self._resume_accepting, session, lease, listener)
                return
            with self._lock:
                serve = self._books.accepting and not session.closed
                if serve:
                    self._services += 1
            if not serve:
                client.close()
                continue
            self._threads.spawn(self._forward, session, client, lease)

    def _resume_accepting(self, session: _Session, lease: _Lease, listener: socket.socket) -> None:
        time.sleep(ACCEPT_ERROR_PAUSE)
        with lease.guard:
            if not lease.stopped and self._host is not None:
                self._host.watch(
                    listener, functools.partial(self._accept_connections, session, lease, listener)
                )

    def _forward(self, session: _Session, client: socket.socket, lease: _Lease) -> None:
        """Carry one accepted TCP connection over a new stream to the tunnel."""
        address = lease.request.target().to_address()
        try:
            client.setblocking(True)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                stream = self._open_on(session, address)
            except (StreamRefusedError, TunnelClosedError) as exc:
                self._report(notices.stream_refused, session.tunnel_id, address, str(exc))
                return
            self._report(notices.stream_opened, session.tunnel_id, stream.stream_id, address, "out")
            result = relay(stream, client)
            self._report(notices.relayed, session.tunnel_id, stream.stream_id, address, result)
        finally:
            client.close()
            self._service_finished()

    # Other services -------------------------------------------------------------

    def _serve_routed(self, session: _Session, stream: TunnelStream, handler: RouteHandler) -> None:
        self._report(
            notices.stream_opened, session.tunnel_id, stream.stream_id, stream.address, "in"
        )
        error: str | None = None
        try:
            handler(stream)
        except OSError as exc:
            error = repr(exc)
            stream.reset(StreamCode.CANCELLED)
        except Exception as exc:
            error = repr(exc)
            logger.exception("service for %s failed", stream.address)
            stream.reset(StreamCode.CANCELLED)
        finally:
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

    # Lifecycle ------------------------------------------------------------------

    def _wind_down(self, grace: float) -> None:
        """Stop listening, let streams finish within ``grace``, close every tunnel,
        stop the pump, then wait for every thread."""
        with self._lock:
            leases = [
                lease for session in self._books.sessions() for lease in session.leases.values()
            ]
        for lease in leases:
            self._close_listeners(lease)
        deadline = time.monotonic() + grace
        with self._lock:
            while self._services and (remaining := deadline - time.monotonic()) > 0:
                self._services_idle.wait(remaining)
        host, endpoint = self._host, self._endpoint
        if host is not None and endpoint is not None:
            with self._lock:
                endpoint.close(CloseCode.SHUTTING_DOWN, "the aggregator is shutting down")
                host.flush()
            # Keep answering until every tunnel has finished closing (briefly).
            linger_until = time.monotonic() + CLOSE_LINGER
            while time.monotonic() < linger_until:
                with self._lock:
                    if not len(endpoint):
                        break
                time.sleep(0.02)
            host.stop()
        leftover = self._threads.join(THREAD_JOIN_TIMEOUT)
        if leftover:
            logger.warning(
                "%d service threads did not finish: %s",
                len(leftover),
                ", ".join(t.name for t in leftover),
            )
        if host is not None:
            host.sock.close()

    def _finish(self) -> None:
        """Drop what is left and tell waiters we are done."""
        with self._lock:
            leftover = self._books.finish("the aggregator stopped")
        if leftover:  # would be a bug: every lease frees its port as it unwinds
            logger.error("ports still allocated after shutdown: %s", sorted(leftover))
        self.activity.close()
        self._stopped.set()

    # Helpers --------------------------------------------------------------------

    def _require_host(self) -> SyncHost:
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
                self._services_idle.notify_all()

    def _report(
        self, build: Callable[Concatenate[float, P], Notice], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Log and publish what the core reports (``build(now, *args, **kwargs)``)."""
        notice = build(time.time(), *args, **kwargs)
        notices.deliver(notice, logger.log, self.activity.publish)


def _next_proxyme_event(
    stream: TunnelStream, machine: ProxymeServer, pending: list[ProxymeEvent]
) -> ProxymeEvent | None:
    """The next event of the ``proxyme`` exchange; None if the client ended without one."""
    while not pending:
        data = stream.recv()
        if not data:
            pending.extend(machine.receive_eof())
            break
        pending.extend(machine.receive_data(data))
    return pending.pop(0) if pending else None


def _listen_tcp(host: str | None, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (None: every interface), ``port``."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, _, proto, _, sockaddr in infos:
            key = (int(family), str(sockaddr[0]))
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sockets.append(sock)
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
