# Generated from snocat_anyio/_shared_listeners.py by scripts/unasync.py: do not edit.
"""The aggregator's public listeners by name, and who each visitor is: written once.

This file is the source of both bindings' shared listeners:
``snocat_sync/_shared_listeners.py`` is generated from it by ``scripts/unasync.py``.
:class:`SharedListeners` is a part of the binding's ``ServerCore`` (a base class
of it), for what docs/protocol.md 3.14 and 3.18 add to the aggregator:

* ``--http`` and ``--tls``: listeners shared by every tunnel.  Each visitor is a task
  (a thread) of its own; its first bytes are read, never consumed, until the request
  head or the ClientHello names ``NAME.DOMAIN`` (bounded in bytes and in time, and
  in how many visitors are read at once: ``Limits.max_sniff_bytes``,
  ``max_http_header_bytes``, ``sniff_timeout``, ``max_sniffing_visitors``); then a
  stream goes to a tunnel named ``NAME`` that publishes that service, every byte read
  is forwarded first, and the rest is relayed.  A refusal is answered (404, 502, the
  TLS alert ...) and counted by reason.
* ``--accept-proxy-protocol-from``: who a visitor is, on every public listener (the
  per-tunnel ports too): a trusted load balancer's PROXY header, else the peer.
* The by-name publications (``proxyme`` with ``{"http": true}``), held open as a port's
  exchange is.

The decisions are the core's: :class:`~snocat_proto._service.visitors.VisitorStart`
(what the first bytes mean, what a refusal sounds like) and
:class:`~snocat_proto._service.name_routes.NameRoutes` (who publishes what, pools,
which tunnel gets the next visitor).  What is here is the waiting around them.
:meth:`SharedListeners._route_name` is where a fleet node extends the choice to the
tunnels of other nodes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from abc import abstractmethod
from collections.abc import Collection
from typing import Any

from snocat_proto._service import notices
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.name_routes import NameRefusal, host_label
from snocat_proto._service.server_events import ServerEvents
from snocat_proto._service.visitors import (
    FAILURES,
    REFUSAL_LINGER_BYTES,
    REFUSAL_LINGER_SECONDS,
    Failure,
    Forward,
    ListenerKind,
    ProxyHeaderGuard,
    ProxyHeaderRefused,
    Refuse,
    VisitorStart,
    refusal,
)
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.codes import StreamCode
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.features import VISITOR_ADDRESS
from snocat_proto._wire.network import format_host_port
from snocat_proto._wire.proxy_protocol import ProxyAddresses
from snocat_proto._wire.proxyme import (
    ProxymeEvent,
    ProxymeRequest,
    ProxymeServer,
    ReleaseRequested,
)
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.visitor import format_endpoint, with_visitor

from ._backend import (
    BROKEN,
    LOG_PREFIX,
    Connection,
    EndOfStream,
    Listener,
    Lock,
    TaskSet,
    accepted,
    close_gracefully,
    current_time,
    receive_within,
    relay,
)
from ._errors import StreamRefusedError, TunnelClosedError
from ._stream import TunnelStream

__all__ = ["ListenerBindError", "SharedListeners", "next_proxyme_event"]

logger = logging.getLogger(f"{LOG_PREFIX}.server")

#: A pool's visitor whose first member refuses is tried on one more (docs/protocol.md
#: 3.14.6); a name with one tunnel has nobody else to try.
ATTEMPTS_PER_VISITOR = 2


class ListenerBindError(OSError):
    """A shared listener cannot listen where it was told (``strerror`` says where)."""


class SharedListeners(ServerEvents[Any, TunnelStream]):
    """The shared listeners and the visitors' addresses of ``ServerCore``; see the
    module docstring.  ``ServerCore`` calls :meth:`_init_shared` in its constructor,
    :meth:`_open_shared` when it binds, :meth:`_start_shared` when it starts,
    :meth:`_stop_shared` and :meth:`_cancel_shared` as it winds down."""

    # What ServerCore has (its constructor sets them).
    config: ServerConfig
    _lock: Lock
    _host: Any
    _services: int
    _tokens: dict[str, bytes]

    @abstractmethod
    def _open_on(
        self, session: Any, address: RouteAddress, timeout: float | None = None
    ) -> TunnelStream:
        """Open a stream to ``address`` on ``session`` 's tunnel (ServerCore)."""

    @abstractmethod
    def _service_finished(self) -> None:
        """One service (a forwarded connection) fewer in flight (ServerCore)."""

    def _init_shared(self) -> None:
        self._shared: dict[ListenerKind, Listener] = {}
        self._shared_tasks: TaskSet | None = None
        #: Visitors being read before a decision now, and their sockets (shut down
        #: when the server stops, which wakes a blocked read in the blocking binding).
        self._sniffing: set[socket.socket] = set()
        self._routing_failures = dict.fromkeys(FAILURES, 0)

    # Public API ---------------------------------------------------------------

    @property
    def shared_addresses(self) -> dict[str, tuple[str, ...]]:
        """The bound addresses of the shared listeners, by service (``"http"``,
        ``"tls"``), once the server has started."""
        return {kind.value: listener.addresses for kind, listener in self._shared.items()}

    def name_routing_failures(self) -> dict[str, int]:
        """Visitors the public listeners did not forward, by reason (every reason of
        :class:`~snocat_proto._service.visitors.Failure`, from 0)."""
        with self._lock:
            return {failure.value: count for failure, count in self._routing_failures.items()}

    # Lifecycle ----------------------------------------------------------------

    def _open_shared(self) -> None:
        """Bind the shared listeners (as the QUIC socket is bound: an error stops the
        start)."""
        config = self.config
        wanted = ((ListenerKind.HTTP, config.http_listen), (ListenerKind.TLS, config.tls_listen))
        for kind, where in wanted:
            if where is None:
                continue
            host, port = where
            try:
                self._shared[kind] = Listener.bind(host or None, port)
            except OSError as exc:
                for listener in self._shared.values():
                    listener.close_now()
                self._shared.clear()
                text = format_host_port(host, port)
                raise ListenerBindError(
                    exc.errno, f"cannot listen on --{kind.value} {text}: {exc.strerror or exc}"
                ) from None

    def _start_shared(self, group: Any) -> None:
        if not self._shared:
            return
        tasks = self._shared_tasks = TaskSet(group, logger, "shared listeners")
        domain = self.config.domain
        assert domain is not None
        for kind, listener in self._shared.items():
            listener.start(self._host, tasks, functools.partial(self._shared_accepted, kind))
            logger.info(
                "listening on %s (%s: NAME.%s reaches the tunnel NAME)",
                ", ".join(listener.addresses),
                kind.value.upper(),
                domain.domain,
            )

    def _stop_shared(self) -> None:
        """Stop accepting; visitors being read are cut off (nothing was forwarded)."""
        for listener in self._shared.values():
            listener.close()
        with self._lock:
            sniffing = list(self._sniffing)
        for sock in sniffing:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _cancel_shared(self) -> None:
        if self._shared_tasks is not None:
            self._shared_tasks.cancel()

    # Visitors of the shared listeners -----------------------------------------

    def _shared_accepted(self, kind: ListenerKind, client: socket.socket) -> None:
        """(Never blocks) A visitor connected to a shared listener."""
        limit = self.config.limits.max_sniffing_visitors
        with self._lock:
            tasks = self._shared_tasks
            serve = self._books.accepting and tasks is not None
            busy = len(self._sniffing) >= limit
            if serve and not busy:
                self._sniffing.add(client)
                self._services += 1
        if serve and not busy:
            assert tasks is not None
            tasks.spawn(self._serve_visitor, kind, client, name=f"{kind.value}-visitor")
            return
        failure = Failure.BUSY if serve else Failure.SHUTTING_DOWN
        answer = refusal(kind, failure)
        self._count(kind, _peer_text(client), answer)
        # Not a task: a flood of them is what the bound is for.  A small reply fits a
        # fresh socket's buffer; if it does not, the visitor gets a plain close.
        with contextlib.suppress(OSError):
            client.setblocking(False)
            if answer.reply:
                client.send(answer.reply)
        client.close()

    def _serve_visitor(self, kind: ListenerKind, client: socket.socket) -> None:
        try:
            conn = accepted(client)
            started = self._visitor_start(kind, client, conn)
            if started is not None:
                self._carry_by_name(kind, conn, started[0])
        finally:
            with self._lock:
                self._sniffing.discard(client)
            client.close()
            self._service_finished()

    def _visitor_start(
        self, kind: ListenerKind, client: socket.socket, conn: Connection
    ) -> tuple[Forward, ProxyHeaderGuard | None] | None:
        """Who the visitor is and (shared listeners) where it goes; None if it was
        refused (answered, counted and closed) or went away.  The reading is bounded
        by ``sniff_timeout`` from now."""
        limits = self.config.limits
        try:
            connection = ProxyAddresses.from_sockaddrs(client.getpeername(), client.getsockname())
        except (OSError, LocalProtocolError) as exc:  # gone already, or not IP
            logger.debug("%s listener: visitor without an address: %s", kind.value, exc)
            conn.close()
            return None
        trusted_networks = self.config.proxy_protocol_from
        trusted = trusted_networks.trusts(connection.source)
        start = VisitorStart(
            kind,
            limits=limits,
            connection=connection,
            domain=self.config.domain,
            trusted=trusted,
            guard=bool(trusted_networks),
        )
        decision: Forward | Refuse | None = start.start()
        if decision is None:
            with self._lock:
                self._sniffing.add(client)  # shut down if the server stops meanwhile
        deadline = current_time() + limits.sniff_timeout
        while decision is None:
            try:
                data = receive_within(conn, start.read_size, deadline - current_time())
            except TimeoutError:
                decision = start.timed_out()
                break
            except BROKEN:
                data = b""
            except OSError:  # a reset
                data = b""
            decision = start.receive_data(data) if data else start.receive_eof()
        with self._lock:
            self._sniffing.discard(client)
            stopping = not self._books.accepting
        if isinstance(decision, Refuse) and stopping:
            # Cut off by the wind-down (_stop_shared), not by what it sent.
            decision = Refuse(Failure.SHUTTING_DOWN, b"", "the aggregator is shutting down")
        if isinstance(decision, Refuse):
            self._count(kind, format_endpoint(connection.source, connection.source_port), decision)
            close_gracefully(conn, decision.reply, REFUSAL_LINGER_SECONDS, REFUSAL_LINGER_BYTES)
            return None
        guard = ProxyHeaderGuard() if start.guarding else None
        return decision, guard

    def _carry_by_name(self, kind: ListenerKind, conn: Connection, start: Forward) -> None:
        """Carry a visitor of a shared listener to a tunnel of ``start.name``."""
        name, service = start.name, kind.value
        assert name is not None
        tried: list[Any] = []
        failure: Failure | None = None
        for _ in range(ATTEMPTS_PER_VISITOR):
            with self._lock:
                choice = self._route_name(name, service, tried)
            if choice is None:
                break
            session, target = choice
            tried.append(session)
            address = target.to_address()
            try:
                stream = self._open_on(session, self._with_visitor(session, address, start))
            except (StreamRefusedError, TunnelClosedError) as exc:
                self._report(notices.stream_refused, session.tunnel_id, address, str(exc))
                failure = Failure.REFUSED
                continue
            visitor = format_endpoint(start.visitor.source, start.visitor.source_port)
            with self._lock:
                self._books.names.opened(session)
            try:
                self._report(
                    notices.stream_opened,
                    session.tunnel_id,
                    stream.stream_id,
                    address,
                    "out",
                    name=session.name,
                    visitor=visitor,
                )
                chunk = self.config.limits.relay_chunk_size
                result = relay(stream, conn, chunk, initial=start.data)
                self._report(
                    notices.relayed,
                    session.tunnel_id,
                    stream.stream_id,
                    address,
                    result,
                    name=session.name,
                    visitor=visitor,
                )
            finally:
                with self._lock:
                    self._books.names.finished(session)
            return
        if failure is None:
            failure = self._unroutable(name, service)
        answer = refusal(kind, failure, name=name)
        self._count(kind, format_endpoint(start.visitor.source, start.visitor.source_port), answer)
        close_gracefully(conn, answer.reply, REFUSAL_LINGER_SECONDS, REFUSAL_LINGER_BYTES)

    def _publications_changed(self, session: Any) -> None:
        """``session`` published a target by name, or withdrew one (a fleet node
        tells the others)."""

    def _route_name(
        self, name: str, service: str, exclude: Collection[Any]
    ) -> tuple[Any, ProxyTcpTarget] | None:
        """(With the lock held; never blocks) The tunnel the next visitor of
        ``NAME.DOMAIN`` 's ``service`` (``"http"``, ``"tls"``) goes to, but none of
        ``exclude`` (tried already), and the target it published; None: no tunnel of
        this node serves it.  A fleet node overrides this to reach the tunnels of
        the other nodes too."""
        return self._books.names.choose(name, service, exclude)

    def _unroutable(self, name: str, service: str) -> Failure:
        """Why nobody serves ``name`` 's ``service``: its tunnel publishes no such
        target, it is offline, or the name is not known at all."""
        with self._lock:
            if self._books.names.publishers(name) or self._books.has_tunnel(name):
                return Failure.NO_SERVICE
            if self._name_known(name):
                return Failure.OFFLINE
        return Failure.UNKNOWN_NAME

    def _name_known(self, name: str) -> bool:
        """(With the lock held) Whether a token admits a tunnel that ``name`` reaches
        (then it is offline, not unknown).  With an application's own credential
        lookup nothing is known but the connected tunnels."""
        return any(host_label(known) == name for known in self._tokens)

    def _count(self, kind: ListenerKind, visitor: str, answer: Refuse) -> None:
        with self._lock:
            self._routing_failures[answer.failure] += 1
        self._report(
            notices.name_routing_failed, kind.value, visitor, answer.failure.value, answer.detail
        )

    # Visitors' addresses (every public listener) ------------------------------

    def _guard_refused(self, visitor: str, error: BaseException | None) -> None:
        """Count a relay a :class:`ProxyHeaderGuard` ended (a PROXY header from a peer
        not trusted to send one, on a per-tunnel port)."""
        if isinstance(error, ProxyHeaderRefused):
            self._count(ListenerKind.PORT, visitor, Refuse(Failure.PROXY_HEADER, b"", error.reason))

    def _with_visitor(self, session: Any, address: RouteAddress, start: Forward) -> RouteAddress:
        """The route address for a visitor's stream: with the visitor's address where
        the tunnel agreed on ``visitor-address`` (3.18), else the snocat 0.8 one."""
        if VISITOR_ADDRESS in session.tunnel.features:
            return with_visitor(address, start.visitor)
        return address

    # Publications by name (the proxyme exchange) ------------------------------

    def _serve_published_name(
        self,
        session: Any,
        stream: TunnelStream,
        machine: ProxymeServer,
        pending: list[ProxymeEvent],
        request: ProxymeRequest,
        service: str,
    ) -> None:
        """A ``proxyme`` exchange that publishes ``request`` 's target by name
        (``{"http": true}``): granted with where the name is reached, held until the
        client releases it (or the tunnel ends)."""
        kind = ListenerKind(service)
        listener = self._shared.get(kind)
        domain = self.config.domain
        refused: NameRefusal | None = None
        with self._lock:
            if listener is None or domain is None:
                refused = NameRefusal(f"this aggregator has no --{service} listener", False)
            elif not self._books.accepting:
                refused = NameRefusal("the aggregator is shutting down", True)
            else:
                refused = self._books.names.publish(session, service, request.target())
        if refused is not None:
            stream.sendall(machine.deny(refused.reason, retry=refused.retry))
            self._report(notices.port_denied, session, request, refused.reason)
            stream.close()
            return
        assert listener is not None and domain is not None
        host = domain.host_for(session.name)
        addresses = (format_host_port(host, listener.port),)
        event: ProxymeEvent | None = None
        try:
            stream.sendall(machine.grant(addresses))
            self._report(notices.name_published, session, service, addresses, request)
            self._publications_changed(session)
            event = next_proxyme_event(stream, machine, pending)
        finally:
            with self._lock:
                withdrawn = self._books.names.withdraw(session, service)
            if withdrawn:
                self._report(notices.name_withdrawn, session, service)
                self._publications_changed(session)
        if isinstance(event, ReleaseRequested):
            stream.sendall(machine.release_ack())
            stream.close()
        else:
            stream.reset(StreamCode.PROTOCOL_VIOLATION)


def _peer_text(client: socket.socket) -> str:
    try:
        host, port = client.getpeername()[:2]
    except OSError:
        return "?"
    return format_host_port(host, port)


def next_proxyme_event(
    stream: TunnelStream, machine: ProxymeServer, pending: list[ProxymeEvent]
) -> ProxymeEvent | None:
    """The next event of the ``proxyme`` exchange; None if the client ended without one."""
    while not pending:
        try:
            data = stream.receive()
        except EndOfStream:
            pending.extend(machine.receive_eof())
            break
        pending.extend(machine.receive_data(data))
    return pending.pop(0) if pending else None
