# Generated from snocat_anyio/_client_flows.py by scripts/unasync.py: do not edit.
"""The tunnel client's flows, written once: dial, authenticate, ask for a port, forward.

This file is the source of both bindings' clients: ``snocat_sync/_client_flows.py``
is generated from it by ``scripts/unasync.py``.  One *session* is one attempt:
resolve, handshake (checking a pinned fingerprint, if any), authenticate, request
the public port through ``proxyme`` at once, then serve the streams the aggregator
opens, until the tunnel is lost.  :meth:`ClientCore._run_loop` strings sessions
together with capped, jittered backoff and raises only for what retrying cannot fix
(a rejected credential, an untrusted certificate).  The verdicts are the core's
(:mod:`~snocat_proto._service.attempts`), the reactions to tunnel events its
:class:`~snocat_proto._service.client_events.ClientEvents`.

Each session runs its pump and its services (the ``proxyme`` exchange and one task
or thread per forwarded connection) in a group of its own.  Its end always runs,
bounded by ``close_timeout``: give the port back and wait for the 8-byte
acknowledgement, close the tunnel with :attr:`CloseCode.NORMAL`, stop the services
and the pump.

Decisions the brief leaves open:

* Every target gets a public port of its own (one ``proxyme`` exchange each), or the
  one ``ClientConfig.public_ports`` asks for (with an aggregator that offers
  ``proxyme-options``; a port it cannot give is a refusal, never another port).
* A ``proxyme`` denial (JSON ``null``: the aggregator's range is full) keeps the
  tunnel, which still serves what the aggregator routes to it, and the request is
  repeated with the same backoff as reconnects, until a port is granted.  A port the
  aggregator withdraws is requested again the same way.  Without ``reconnect``, or
  when the aggregator says asking again cannot help, a denial ends the client with
  :class:`PortRefusedError`.
* The client is *ready* once the first tunnel is authenticated and every target's
  first ``proxyme`` answer arrived, granted or not, so a full aggregator does not hang
  the caller: read :attr:`ClientCore.grants` or wait with ``wait_granted()``.
* With ``reconnect=False`` a tunnel lost after authentication ends the client with
  :class:`TunnelClosedError`; one lost before it, with :class:`ConnectError`.
* A pinned fingerprint is checked as the handshake completes, before the client
  sends any authentication byte; a mismatch closes with :attr:`CloseCode.REFUSED`.
* A stream the aggregator opens is accepted only once its TCP target has answered,
  so a dead target is a refusal, not a stream that breaks.  Until then it counts
  against ``Limits.max_pending_requests``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec

from snocat_proto._service import activity, notices
from snocat_proto._service.allowlist import AllowList
from snocat_proto._service.attempts import (
    AttemptEnd,
    ErrorKind,
    connect_tunnel,
    diagnose_early_close,
    local_socket_failure,
    lost_tunnel,
    no_answer,
    port_refused,
    unreachable,
    unresolvable,
)
from snocat_proto._service.backoff import Backoff
from snocat_proto._service.config import ClientConfig
from snocat_proto._service.notices import Notice
from snocat_proto._service.publications import (
    Publication,
    client_route,
    proxy_header,
    proxyme_client,
)
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.codes import CloseCode, StreamCode
from snocat_proto._wire.endpoint import ClientEndpoint
from snocat_proto._wire.errors import LocalProtocolError, ProtocolError
from snocat_proto._wire.events import ConnectionTerminated
from snocat_proto._wire.network import NetworkAddress, format_address, format_host_port
from snocat_proto._wire.proxyme import ProxymeClient
from snocat_proto._wire.tunnel import TunnelConnection, TunnelState
from snocat_proto._wire.visitor import format_endpoint

from ._backend import (
    BROKEN_OR_REFUSED,
    LOG_PREFIX,
    Condition,
    EndOfStream,
    Lock,
    TaskSet,
    current_time,
    join_group,
    open_group,
    relay,
    resolve,
    send_within,
    shield,
)
from ._client_udp import ClientFlow, ClientUdp
from ._dial import connect_target
from ._errors import (
    AuthenticationError,
    ConnectError,
    PortRefusedError,
    SnocatError,
    StreamRefusedError,
    TunnelClosedError,
)
from ._feed import ActivityFeed
from ._host import TunnelHost
from ._stream import TunnelStream
from ._udp import bind_udp

__all__ = ["ClientCore", "attempt_error"]

P = ParamSpec("P")
logger = logging.getLogger(f"{LOG_PREFIX}.client")

_SHUTDOWN_REASON = "client shutting down"
#: How long a stopping session waits for its services beyond ``close_timeout``.
TASK_JOIN_TIMEOUT = 5.0


def attempt_error(end: AttemptEnd) -> SnocatError:
    """The exception the client raises for ``end``."""
    if end.kind is ErrorKind.AUTHENTICATION:
        return AuthenticationError(end.message)
    if end.kind is ErrorKind.TUNNEL_CLOSED:
        return TunnelClosedError(end.code, end.close_reason)
    if end.kind is ErrorKind.PORT:
        return PortRefusedError(end.message)
    return ConnectError(end.message)


class _Session:
    """One attempt: its tunnel, its pump and services, and what happened on it so far."""

    def __init__(self, tunnel_id: str, tunnel: TunnelConnection, peer: str) -> None:
        self.tunnel_id = tunnel_id
        self.tunnel = tunnel
        self.peer = peer
        self.host: TunnelHost
        self.services: TaskSet | None = None
        self.group: Any = None
        self.handshake_done = False
        self.authenticated = False
        self.name: str | None = None
        self.closed: ConnectionTerminated | None = None
        #: What the network said before the handshake (nothing listens there), if it did.
        self.unreachable: str | None = None
        self.pin_problem: str | None = None
        #: The aggregator dialled (``--driver``), for messages.
        self.label = peer
        #: The targets whose first port request was answered.
        self.answered: set[Publication] = set()
        #: Why a target cannot have its port (this ends the client), if it cannot.
        self.refusal: AttemptEnd | None = None
        #: The session is ending: no new services, no new port requests.
        self.stopping = False
        #: The ``proxyme`` exchange of each target while it is open.
        self.proxyme: dict[Publication, tuple[ProxymeClient, TunnelStream]] = {}
        #: The UDP flows the aggregator opened (``udp-datagrams``), by flow ID.
        self.udp_flows: dict[int, ClientFlow] = {}


class ClientCore(ClientUdp):
    """The Connect side's flows; the binding's ``TunnelClient`` subclasses it.  Its
    UDP targets are :class:`ClientUdp`'s."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.activity = ActivityFeed(config.limits.max_subscriber_backlog)
        #: The public address(es) the aggregator listens on for each target (on its
        #: port, or by name), while granted.
        self.grants: dict[Publication, tuple[str, ...]] = {}
        self._allow = AllowList(config.allowed_targets)
        #: Guards everything below, the core and the streams (a no-op on an event loop).
        self._lock = Lock()
        self._changed = Condition(self._lock)
        self._session: _Session | None = None
        self._sessions_started = 0
        #: Which of the server host's addresses the next attempt uses (after no answer).
        self._address_turn = 0
        #: Asked to stop; and stopped.
        self._stop = False
        self._done = False
        self._init_udp()

    # Public API ----------------------------------------------------------------

    def wait_granted(self, timeout: float | None = None) -> tuple[str, ...]:
        """The public address(es) of the first target, once every target has a port
        (all of them are in :attr:`grants`).

        Raises :class:`TunnelClosedError` if the client stops first, ``TimeoutError``
        after ``timeout`` seconds."""
        self._changed.wait_for(lambda: self._all_granted() or self._done or self._stop, timeout)
        with self._lock:
            if self._all_granted() and self.granted is not None:
                return self.granted
            if self._done or self._stop:
                raise TunnelClosedError(CloseCode.NORMAL, "the client has stopped")
        raise TimeoutError("no port was granted within the timeout")

    def open_stream(self, address: RouteAddress, timeout: float | None = None) -> TunnelStream:
        """Open a stream to ``address`` on the aggregator (e.g. a service it offers)."""
        with self._lock:
            session = self._session
            if session is None or not session.authenticated or session.closed is not None:
                raise TunnelClosedError(
                    CloseCode.NORMAL, "the client has no authenticated tunnel now"
                )
        try:
            stream = session.host.open_stream(session.tunnel, address, timeout)
        except LocalProtocolError as exc:  # the tunnel closed meanwhile
            raise TunnelClosedError(
                CloseCode.NORMAL, f"the tunnel cannot open streams: {exc}"
            ) from None
        self._publish(
            activity.StreamOpened,
            tunnel_id=session.tunnel_id,
            stream_id=stream.stream_id,
            address=str(address),
            direction="out",
        )
        return stream

    # The reconnect loop (the binding's run task or thread) ---------------------

    def _run_loop(self, on_ready: Callable[[], None]) -> None:
        """Sessions, one after another, until stopped; raises what retrying cannot fix
        (or, without ``reconnect``, whatever ended the first session)."""
        config = self.config
        backoff = Backoff(config.backoff_initial, config.backoff_max)

        def ready() -> None:
            backoff.reset()
            on_ready()

        while True:
            outcome = self._attempt(ready)
            if outcome is None or self._stop:
                return
            if outcome.fatal or not config.reconnect:
                raise attempt_error(outcome)
            if outcome.no_answer or (
                outcome.kind is ErrorKind.TUNNEL_CLOSED and len(config.servers) > 1
            ):
                # Next time the next address (or the next node of the fleet).
                self._address_turn += 1
            delay = backoff.next_delay()
            logger.info("reconnecting in %.2f s: %s", delay, outcome.reason)
            self._publish(
                activity.Reconnecting, attempt=backoff.attempt, delay=delay, reason=outcome.reason
            )
            if self._changed.wait_for(lambda: self._stop, delay):
                return

    def _all_granted(self) -> bool:
        return all(target in self.grants for target in self.config.publications)

    def _request_stop(self) -> None:
        with self._lock:
            self._stop = True
            self._changed.notify_all()

    def _finish(self) -> None:
        """The client has stopped: nothing granted any more, the feed ends."""
        with self._lock:
            self._done = True
            self.grants.clear()
            self._changed.notify_all()
        self.activity.close()

    def _attempt(self, on_ready: Callable[[], None]) -> AttemptEnd | None:
        # Every address of every aggregator, in order (a name with several addresses
        # counts as a list); the first, unless it did not answer or its tunnel was
        # lost last time (another node of the fleet, or the other address family).
        candidates: list[tuple[str, socket.AddressFamily, NetworkAddress]] = []
        problem: AttemptEnd | None = None
        for host, port in self.config.servers:
            try:
                infos = resolve(host, port)
            except OSError as exc:
                problem = unresolvable(host, str(exc))
                continue
            if not infos:
                problem = unresolvable(host, "no addresses")
            label = format_host_port(host, port)
            candidates += [(label, family, address) for family, address in infos]
        if not candidates:
            assert problem is not None
            return problem
        label, family, address = candidates[self._address_turn % len(candidates)]
        try:
            sock = bind_udp(
                "::" if family == socket.AF_INET6 else "0.0.0.0",
                0,
                dont_fragment=self.config.path_mtu_discovery,
            )
        except OSError as exc:
            return local_socket_failure(label, str(exc))
        try:
            # Connected, the socket hears what the network says (an ICMP port
            # unreachable when nothing listens there) instead of waiting it out.
            sock.connect(address)
        except OSError as exc:
            sock.close()
            return unreachable(label, exc.strerror or str(exc))
        try:
            return self._run_session(sock, label, address, on_ready)
        finally:
            sock.close()

    def _run_session(
        self,
        sock: socket.socket,
        label: str,
        address: NetworkAddress,
        on_ready: Callable[[], None],
    ) -> AttemptEnd | None:
        config = self.config
        with self._lock:
            tunnel = connect_tunnel(config, address, current_time())
            self._sessions_started += 1
            session = _Session(f"client-{self._sessions_started}", tunnel, format_address(address))
            session.label = label
            session.host = TunnelHost(
                ClientEndpoint(tunnel),
                sock,
                lambda t, e, s: self._on_event(session, t, e, s),
                limits=config.limits,
                lock=self._lock,
                name=f"snocat-client-pump-{self._sessions_started}",
                on_unreachable=lambda error: self._unreachable(session, error),
            )
            self._session = session
        self._publish(activity.ListeningOn, address=format_address(session.host.local_address))
        outcome: AttemptEnd | None = None
        try:
            with open_group() as group:
                session.group = group
                session.services = TaskSet(group, logger, session.tunnel_id)
                session.host.start(group)
                try:
                    outcome = self._supervise(session, on_ready)
                finally:
                    with shield():
                        self._end_session(session)
        finally:
            with self._lock:
                if self._session is session:
                    self._session = None
                self.grants.clear()
                self._changed.notify_all()
        return outcome

    def _supervise(self, session: _Session, on_ready: Callable[[], None]) -> AttemptEnd | None:
        config = self.config
        self._changed.wait_for(
            lambda: (
                session.handshake_done
                or session.closed is not None
                or session.unreachable is not None
                or self._stop
            ),
            config.connect_timeout,
        )
        if self._stop:
            return None
        if session.unreachable is not None and not session.handshake_done:
            return unreachable(session.label, session.unreachable)
        if not session.handshake_done and session.closed is None:
            return no_answer(session.label, f"within {config.connect_timeout:g} s")
        # The core's auth_timeout bounds this wait.
        self._changed.wait_for(
            lambda: session.authenticated or session.closed is not None or self._stop
        )
        if self._stop:
            return None
        if session.closed is not None:
            return diagnose_early_close(
                session.closed,
                handshake_done=session.handshake_done,
                pin_problem=session.pin_problem,
                server_label=session.label,
                server_name=config.server_name,
            )
        if config.request_port:
            assert session.services is not None
            for target in config.publications:
                session.services.spawn(self._proxyme_loop, session, target, name="proxyme")
            # Bounded: an aggregator that never answers must not hold up the caller.
            self._changed.wait_for(
                lambda: (
                    session.answered.issuperset(config.publications)
                    or session.closed is not None
                    or session.refusal is not None
                    or self._stop
                ),
                config.connect_timeout,
            )
        if session.closed is None and session.refusal is None and not self._stop:
            on_ready()
        self._changed.wait_for(
            lambda: session.closed is not None or session.refusal is not None or self._stop
        )
        if self._stop:
            return None
        if session.refusal is not None:
            return session.refusal
        assert session.closed is not None
        return lost_tunnel(session.closed)

    def _end_session(self, session: _Session) -> None:
        """Say goodbye (bounded), then stop the services and the pump."""
        with self._lock:
            session.stopping = True
            self._changed.notify_all()
        try:
            self._goodbye(session, current_time() + self.config.close_timeout)
        finally:
            self._end_flows(session, "closed" if session.closed is None else "tunnel closed")
            if session.services is not None:
                session.services.cancel()
            session.host.stop()
            left = join_group(session.group, TASK_JOIN_TIMEOUT)
            if left:
                logger.warning(
                    "%d tasks of %s did not finish: %s",
                    len(left),
                    session.tunnel_id,
                    ", ".join(left),
                )

    def _goodbye(self, session: _Session, deadline: float) -> None:
        """Give the ports back (waiting for the acknowledgements), then close the tunnel."""
        tunnel = session.tunnel
        with self._lock:
            exchanges = list(session.proxyme.values()) if session.closed is None else []
            releases = [(c, s, c.release() if c.granted else None) for c, s in exchanges]
        for _, stream, release in releases:
            if release is not None:
                send_within(stream, release, deadline - current_time())
        # The proxyme tasks read the acknowledgements, and then they end.
        self._changed.wait_for(
            lambda: not any(c.granted for c, _ in exchanges) or session.closed is not None,
            max(0.0, deadline - current_time()),
        )
        for client, stream, _ in releases:
            if not client.granted:
                stream.close()
            else:
                stream.reset(StreamCode.CANCELLED)
        with self._lock:
            if session.closed is None and tunnel.state is not TunnelState.CLOSED:
                tunnel.close(CloseCode.NORMAL, _SHUTDOWN_REASON)
                session.host.flush(tunnel)

    # Events from the pump: the core's ClientEvents handles them (never blocking);
    # these are the I/O it asks for -------------------------------------------------

    def _stream_requested(self, session: _Session, stream: TunnelStream) -> None:
        services = session.services
        if services is None or session.stopping or session.closed is not None:
            session.host.refuse(stream)
        else:
            services.spawn(self._serve_stream, session, stream, name="stream")

    def _state_changed(self, session: _Session) -> None:
        self._changed.notify_all()

    def _flush(self, session: _Session, tunnel: TunnelConnection) -> None:
        session.host.flush(tunnel)

    def _failed(self, message: str, *args: object) -> None:
        logger.exception(message, *args)

    def _unreachable(self, session: _Session, error: OSError) -> None:
        """(From the pump) The network says the aggregator cannot be reached.  Before
        the handshake that ends the attempt at once; after it, it is only a hint (an
        ICMP error can be forged off the path), and the keep-alive decides."""
        with self._lock:
            if session.handshake_done or session.unreachable is not None:
                logger.debug("%s: %s (ignored after the handshake)", session.tunnel_id, error)
                return
            session.unreachable = error.strerror or str(error)
            self._changed.notify_all()

    def _answered(self, session: _Session, target: Publication) -> None:
        with self._lock:
            if target not in session.answered:
                session.answered.add(target)
                self._changed.notify_all()

    def _refused(self, session: _Session, target: Publication, reason: str) -> None:
        with self._lock:
            if session.refusal is None:
                session.refusal = port_refused(target, reason)
                self._changed.notify_all()

    def _set_granted(self, target: Publication, addresses: tuple[str, ...] | None) -> None:
        with self._lock:
            if addresses is None:
                self.grants.pop(target, None)
            else:
                self.grants[target] = addresses
            self._changed.notify_all()

    # proxyme (the session's proxyme task) ------------------------------------------

    def _proxyme_loop(self, session: _Session, target: Publication) -> None:
        """Request ``target``'s port; after a denial or a withdrawal, ask again with backoff."""
        config = self.config
        retry = Backoff(config.backoff_initial, config.backoff_max)
        while not self._session_over(session):
            if self._request_port(session, target):
                retry.reset()
            self._changed.wait_for(lambda: self._session_over(session), retry.next_delay())

    def _session_over(self, session: _Session) -> bool:
        with self._lock:
            return (
                self._stop
                or session.stopping
                or session.closed is not None
                or session.refusal is not None
            )

    def _request_port(self, session: _Session, target: Publication) -> bool:
        """One ``proxyme`` exchange for ``target``, kept open while the port (or the
        name) is ours; True if it was granted."""
        asked = proxyme_client(
            target,
            session.tunnel.features,
            limits=self.config.limits,
            public_ports=self.config.public_ports,
        )
        if isinstance(asked, str):
            self._refused(session, target, asked)
            self._port_denied(session, target, asked)
            return False
        request, client = asked
        try:
            stream = session.host.open_stream(session.tunnel, request.to_address())
        except StreamRefusedError as exc:
            reason = f"the aggregator refused the proxyme request: {exc.reason}"
            self._port_denied(session, target, reason)
            return False
        except (TunnelClosedError, LocalProtocolError):
            return False
        with self._lock:
            if session.stopping:
                stream.reset(StreamCode.CANCELLED)
                return False
            session.proxyme[target] = (client, stream)
            initial = client.initial_data()
        try:
            stream.sendall(initial)
            granted = self._read_proxyme(session, target, client, stream)
        except BROKEN_OR_REFUSED as exc:
            stream.reset(StreamCode.CANCELLED)
            granted = client.granted
            with self._lock:
                if session.closed is None and not session.stopping:
                    self._proxyme_failed(session, target, f"the proxyme stream failed: {exc}")
        with self._lock:
            session.proxyme.pop(target, None)
            self._changed.notify_all()
        with shield():
            stream.close()  # after a denial or a release: the exchange is over
        return granted

    def _read_proxyme(
        self,
        session: _Session,
        target: Publication,
        client: ProxymeClient,
        stream: TunnelStream,
    ) -> bool:
        """Feed the ``proxyme`` stream to ``client`` until denied or released.

        Returns whether a port was granted on the way."""
        was_granted = client.granted
        while True:
            try:
                data = stream.receive()
            except EndOfStream:
                data = b""
            with self._lock:
                try:
                    events = client.receive_data(data) if data else client.receive_eof()
                except ProtocolError as exc:
                    stream.reset(StreamCode.PROTOCOL_VIOLATION)
                    self._proxyme_failed(session, target, f"bad proxyme answer: {exc.reason}")
                    return was_granted
                if not data and not events:
                    return was_granted
                was_granted, over = self._follow_proxyme(session, target, events, was_granted)
                if over:
                    return was_granted

    # proxy-tcp (a task or thread per stream) -----------------------------------------

    def _serve_stream(self, session: _Session, stream: TunnelStream) -> None:
        route = client_route(stream.address, session.tunnel.features, self._allow)
        if isinstance(route, str):
            self._refuse(session, stream, route)
            return
        target, address, whose = route
        visitor = None if whose is None else format_endpoint(whose.source, whose.source_port)
        try:
            tcp = connect_target(target, self.config.target_connect_timeout)
        except OSError as exc:
            self._refuse(session, stream, f"cannot connect to {target}: {exc or 'timed out'}")
            return
        with self._lock:
            usable = session.closed is None and session.tunnel.state is not TunnelState.CLOSED
            if usable:
                try:
                    session.host.accept(stream)
                except LocalProtocolError as exc:  # the core gave up on it meanwhile
                    logger.debug("stream %d vanished before its accept: %s", stream.stream_id, exc)
                    usable = False
        if not usable:
            with shield():
                tcp.close()
            return
        name = session.name
        self._report(
            notices.stream_opened,
            session.tunnel_id,
            stream.stream_id,
            address,
            "in",
            name=name,
            visitor=visitor,
        )
        header = proxy_header(self.config.proxy_protocol, whose)
        result = relay(stream, tcp, self.config.limits.relay_chunk_size, header=header)
        self._report(
            notices.client_relayed,
            session.tunnel_id,
            stream.stream_id,
            address,
            result,
            name=name,
            visitor=visitor,
        )

    def _refuse(self, session: _Session, stream: TunnelStream, reason: str) -> None:
        with self._lock:
            if session.closed is None and session.tunnel.state is not TunnelState.CLOSED:
                with contextlib.suppress(LocalProtocolError):
                    session.host.refuse(stream)
        self._report(notices.client_stream_refused, session.tunnel_id, stream.address, reason)

    # Helpers -------------------------------------------------------------------

    def _publish(self, kind: type[activity.Activity], **fields: object) -> None:
        self.activity.publish(kind(at=time.time(), **fields))

    def _report(
        self, build: Callable[Concatenate[float, P], Notice], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Log and publish what the core reports (``build(now, *args, **kwargs)``)."""
        notice = build(time.time(), *args, **kwargs)
        notices.deliver(notice, logger.log, self.activity.publish)
