"""The tunnel client: dial the aggregator, authenticate, ask for a port, serve ``proxy-tcp``.

:class:`TunnelClient` owns one tunnel at a time, each on its own UDP socket and
:class:`~snocat_anyio.host.TunnelHost`.  One *session* is one attempt: resolve,
handshake (checking a pinned fingerprint, if any), authenticate, request the public
port through ``proxyme`` at once, then serve the streams the aggregator opens, until
the tunnel is lost.  :meth:`TunnelClient.run` strings sessions together with capped,
jittered backoff and raises only for what retrying cannot fix (a rejected credential,
an untrusted certificate).

Each session has two task groups: the pump, whose task shields itself so it keeps
moving datagrams while the session says goodbye, and the services (the ``proxyme``
exchange and one task per forwarded connection), which are stopped first.  The
goodbye (release the port and wait for the 8-byte acknowledgement, then close the
tunnel with :attr:`CloseCode.NORMAL`) runs shielded and bounded, whether the session
ends through :meth:`TunnelClient.aclose` or because :meth:`run` was cancelled.

Decisions the brief leaves open:

* A ``proxyme`` denial (JSON ``null``: the aggregator's range is full) keeps the
  tunnel, which still serves what the aggregator routes to it, and the request is
  repeated with the same backoff as reconnects, until a port is granted.  A port the
  aggregator withdraws is requested again the same way.
* ``run(task_status=...)`` reports started once the first tunnel is authenticated and
  the first ``proxyme`` answer arrived, granted or not, so a full aggregator does
  not hang the caller: read :attr:`TunnelClient.granted` or await :meth:`wait_granted`.
* With ``reconnect=False`` a tunnel lost after authentication ends :meth:`run` with
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
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from snocat_proto._service import activity, notices
from snocat_proto._service.allowlist import AllowList
from snocat_proto._service.attempts import (
    AttemptEnd,
    ErrorKind,
    check_pinned_certificate,
    diagnose_early_close,
    local_socket_failure,
    lost_tunnel,
    no_answer,
    unresolvable,
)
from snocat_proto._service.backoff import Backoff
from snocat_proto._service.client_events import ClientEvents
from snocat_proto._service.config import ClientConfig
from snocat_proto._service.notices import Notice
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import connect_authenticator
from snocat_proto._wire.certificates import install_trust
from snocat_proto._wire.codes import CloseCode, StreamCode
from snocat_proto._wire.endpoint import ClientEndpoint
from snocat_proto._wire.engine import quic_configuration
from snocat_proto._wire.errors import LocalProtocolError, ProtocolError
from snocat_proto._wire.events import (
    ConnectionTerminated,
)
from snocat_proto._wire.network import NetworkAddress, format_address
from snocat_proto._wire.proxyme import ProxymeClient, ProxymeRequest
from snocat_proto._wire.targets import ProxyTcpTarget, TargetKind
from snocat_proto._wire.tunnel import TunnelConnection, TunnelState
from snocat_sync.udp import bind_udp

from .errors import (
    AuthenticationError,
    ConnectError,
    SnocatError,
    StreamRefusedError,
    TunnelClosedError,
)
from .host import TunnelHost
from .observe import ActivityFeed
from .relay import read_on_demand, relay
from .stream import TunnelStream

__all__ = [
    "ClientConfig",
    "TunnelClient",
    "check_pinned_certificate",
    "connect_address",
    "connect_target",
]

P = ParamSpec("P")
logger = logging.getLogger("snocat.client")

_SHUTDOWN_REASON = "client shutting down"

_Callback = Callable[[], None]
#: How a session ended: an :class:`AttemptEnd`, or None when the client was stopped.
_Outcome = AttemptEnd | None


def attempt_error(end: AttemptEnd) -> SnocatError:
    """The exception :meth:`TunnelClient.run` raises for ``end``."""
    if end.kind is ErrorKind.AUTHENTICATION:
        return AuthenticationError(end.message)
    if end.kind is ErrorKind.TUNNEL_CLOSED:
        return TunnelClosedError(end.code, end.close_reason)
    return ConnectError(end.message)


@dataclass(eq=False)
class _Session:
    """One attempt: its tunnel, its pump, and what has happened on it so far."""

    tunnel_id: str
    tunnel: TunnelConnection
    host: TunnelHost
    peer: str
    pump_scope: anyio.CancelScope | None = None
    services: anyio.abc.TaskGroup | None = None
    handshake_done: bool = False
    authenticated: bool = False
    name: str | None = None
    closed: ConnectionTerminated | None = None
    pin_problem: str | None = None
    first_answer: bool = False
    proxyme: tuple[ProxymeClient, TunnelStream] | None = None
    changed: anyio.Event = field(default_factory=anyio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()


class TunnelClient(ClientEvents[_Session, TunnelStream]):
    """The Connect side of snocat: see the module docstring."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.activity = ActivityFeed()
        #: The public address(es) the aggregator listens on for us; None while not granted.
        self.granted: tuple[str, ...] | None = None
        self._allow = AllowList(config.targets)
        self._session: _Session | None = None
        self._sessions_started = 0
        #: Which of the server host's addresses the next attempt uses (after no answer).
        self._address_turn = 0
        self._grant_changed = anyio.Event()
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self._run_scope: anyio.CancelScope | None = None
        self._running = False
        self._closed = False

    # Public API ----------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[TunnelClient] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and serve until :meth:`aclose`, cancellation, or a fatal error."""
        if self._running:
            raise RuntimeError("TunnelClient.run() can be called only once")
        self._running = True
        if self._closed:
            return  # aclose() came first
        try:
            with anyio.CancelScope() as scope:
                self._run_scope = scope
                if not self._stop.is_set():
                    await self._run(task_status)
        finally:
            self._closed = True
            self._set_granted(None)
            self.activity.close()
            self._stopped.set()

    async def wait_granted(self) -> tuple[str, ...]:
        """The public address(es), once the aggregator has granted a port."""
        while self.granted is None:
            if self._closed:
                raise TunnelClosedError(CloseCode.NORMAL, "the client has stopped")
            await self._grant_changed.wait()
        return self.granted

    async def open_stream(self, address: RouteAddress) -> TunnelStream:
        """Open a stream to ``address`` on the aggregator (e.g. a service it offers)."""
        session = self._session
        if session is None or not session.authenticated or session.closed is not None:
            raise TunnelClosedError(CloseCode.NORMAL, "the client has no authenticated tunnel now")
        stream = await session.host.open_stream(session.tunnel, address)
        self._publish(
            activity.StreamOpened,
            tunnel_id=session.tunnel_id,
            stream_id=stream.stream_id,
            address=str(address),
            direction="out",
        )
        return stream

    async def aclose(self) -> None:
        """Release the port, close the tunnel (NORMAL), stop every task, close the socket."""
        self._stop.set()
        if not self._running:
            self._closed = True
            self.activity.close()
            self._stopped.set()
            return
        if self._run_scope is not None:
            self._run_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._stopped.wait()

    async def __aenter__(self) -> TunnelClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # The reconnect loop --------------------------------------------------------

    async def _run(self, task_status: anyio.abc.TaskStatus[TunnelClient]) -> None:
        config = self.config
        backoff = Backoff(config.backoff_initial, config.backoff_max)
        started: list[bool] = [False]

        def on_ready() -> None:
            backoff.reset()
            if not started[0]:
                started[0] = True
                task_status.started(self)

        while True:
            outcome = await self._attempt(on_ready)
            if outcome is None or self._stop.is_set():
                return
            if outcome.fatal:
                raise attempt_error(outcome)
            if outcome.no_answer:
                self._address_turn += 1
            if not config.reconnect:
                raise attempt_error(outcome)
            delay = backoff.next_delay()
            logger.info("reconnecting in %.2f s: %s", delay, outcome.reason)
            self._publish(
                activity.Reconnecting, attempt=backoff.attempt, delay=delay, reason=outcome.reason
            )
            with anyio.move_on_after(delay):
                await self._stop.wait()
            if self._stop.is_set():
                return

    async def _attempt(self, on_ready: _Callback) -> _Outcome:
        config = self.config
        try:
            infos = await anyio.getaddrinfo(
                config.server_host, config.server_port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            return unresolvable(config.server_host, str(exc))
        if not infos:
            return unresolvable(config.server_host, "no addresses")
        # The first address, unless it did not answer last time (a name with both
        # families, and an aggregator listening on one).
        family, *_, sockaddr = infos[self._address_turn % len(infos)]
        address = _full_sockaddr(family, sockaddr)
        try:
            sock = bind_udp("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
        except OSError as exc:
            return local_socket_failure(config.server_label, str(exc))
        try:
            return await self._run_session(sock, address, on_ready)
        finally:
            sock.close()

    async def _run_session(
        self, sock: socket.socket, address: NetworkAddress, on_ready: _Callback
    ) -> _Outcome:
        config = self.config
        configuration = quic_configuration(
            is_client=True,
            limits=config.limits,
            server_name=config.server_name,
            idle_timeout=config.idle_timeout,
            max_datagram_size=config.max_datagram_size,
        )
        install_trust(configuration, authority_pem=config.authority_pem, pinned=config.fingerprint)
        if config.secrets_log_file is not None:
            configuration.secrets_log_file = config.secrets_log_file
        tunnel = TunnelConnection.connect(
            configuration,
            address=address,
            authenticator=connect_authenticator(config.credentials, limits=config.limits),
            limits=config.limits,
            now=anyio.current_time(),
            keepalive_interval=config.keepalive_interval,
        )
        self._sessions_started += 1
        session: _Session
        host = TunnelHost(
            ClientEndpoint(tunnel), sock, lambda t, e, s: self._on_event(session, t, e, s)
        )
        session = _Session(
            tunnel_id=f"client-{self._sessions_started}",
            tunnel=tunnel,
            host=host,
            peer=format_address(address),
        )
        self._session = session
        self._publish(activity.ListeningOn, address=format_address(host.local_address))
        outcome: _Outcome = None
        try:
            async with anyio.create_task_group() as pump_group:
                # Not pump_group.start(): cancelled while it waits, start() waits in turn
                # for the (shielded) pump to end, which nothing would ever stop.
                session.pump_scope = anyio.CancelScope(shield=True)
                pump_group.start_soon(self._pump, session)
                try:
                    async with anyio.create_task_group() as services:
                        session.services = services
                        outcome = await self._supervise(session, on_ready)
                        services.cancel_scope.cancel()
                finally:
                    with anyio.CancelScope(shield=True):
                        session.services = None
                        with anyio.move_on_after(config.close_timeout):
                            await self._goodbye(session)
                        if session.pump_scope is not None:
                            session.pump_scope.cancel()
        finally:
            self._session = None
            self._set_granted(None)
        return outcome

    async def _pump(self, session: _Session) -> None:
        # Shielded, so datagrams keep moving while a cancelled session says goodbye;
        # the session cancels this scope itself once it is done.
        assert session.pump_scope is not None
        with session.pump_scope:
            await session.host.run()

    async def _supervise(self, session: _Session, on_ready: _Callback) -> _Outcome:
        config = self.config
        with anyio.move_on_after(config.connect_timeout):
            await session.wait_for(lambda: session.handshake_done or session.closed is not None)
        if not session.handshake_done and session.closed is None:
            return no_answer(config.server_label, f"within {config.connect_timeout:g} s")
        await session.wait_for(lambda: session.authenticated or session.closed is not None)
        if session.closed is not None:
            return diagnose_early_close(
                session.closed,
                handshake_done=session.handshake_done,
                pin_problem=session.pin_problem,
                server_label=config.server_label,
                server_name=config.server_name,
            )
        if config.request_port:
            assert session.services is not None
            session.services.start_soon(self._proxyme_loop, session)
            # Bounded: an aggregator that never answers must not hold up the caller.
            with anyio.move_on_after(config.connect_timeout):
                await session.wait_for(lambda: session.first_answer or session.closed is not None)
        if session.closed is None:
            on_ready()
        await session.wait_for(lambda: session.closed is not None)
        assert session.closed is not None
        return lost_tunnel(session.closed)

    async def _goodbye(self, session: _Session) -> None:
        """Give the port back (waiting for the acknowledgement), then close the tunnel."""
        tunnel = session.tunnel
        if session.closed is None and session.proxyme is not None:
            client, stream = session.proxyme
            released = False
            if client.granted:
                try:
                    await stream.send(client.release())
                    await self._read_proxyme(session, client, stream)
                    released = not client.granted
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, SnocatError):
                    pass
            if released:
                await stream.aclose()
            else:
                stream.reset(StreamCode.CANCELLED)
        if session.closed is None and tunnel.state is not TunnelState.CLOSED:
            tunnel.close(CloseCode.NORMAL, _SHUTDOWN_REASON)
            session.host.flush(tunnel)

    # Events from the pump: the core's ClientEvents handles them (synchronously,
    # never blocking); these are the I/O it asks for ---------------------------

    def _stream_requested(self, session: _Session, stream: TunnelStream) -> None:
        services = session.services
        if services is None or session.closed is not None:
            session.host.refuse(stream)
        else:
            services.start_soon(self._serve_stream, session, stream)

    def _state_changed(self, session: _Session) -> None:
        session.notify()

    def _flush(self, session: _Session, tunnel: TunnelConnection) -> None:
        session.host.flush(tunnel)

    def _failed(self, message: str, *args: object) -> None:
        logger.exception(message, *args)

    # proxyme -------------------------------------------------------------------

    async def _proxyme_loop(self, session: _Session) -> None:
        """Request the port; after a denial or a withdrawal, ask again with backoff."""
        config = self.config
        retry = Backoff(config.backoff_initial, config.backoff_max)
        while True:
            was_granted = await self._request_port(session)
            if was_granted:
                retry.reset()
            await anyio.sleep(retry.next_delay())

    async def _request_port(self, session: _Session) -> bool:
        """One ``proxyme`` exchange, kept open while the port is ours; True if it was granted."""
        target = self.config.targets[0]
        request = ProxymeRequest(host=target.connect_host(), port=target.port)
        try:
            stream = await session.host.open_stream(session.tunnel, request.to_address())
        except StreamRefusedError as exc:
            self._port_denied(session, f"the aggregator refused the proxyme request: {exc.reason}")
            return False
        except TunnelClosedError:
            return False
        client = ProxymeClient(limits=self.config.limits)
        session.proxyme = (client, stream)
        try:
            await stream.send(client.initial_data())
            granted = await self._read_proxyme(session, client, stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, SnocatError) as exc:
            stream.reset(StreamCode.CANCELLED)
            granted = client.granted
            if session.closed is None:
                self._proxyme_failed(session, f"the proxyme stream failed: {exc}")
        session.proxyme = None
        await stream.aclose()  # after a denial or a release: the exchange is over
        return granted

    async def _read_proxyme(
        self, session: _Session, client: ProxymeClient, stream: TunnelStream
    ) -> bool:
        """Feed the ``proxyme`` stream to ``client`` until denied or released.

        Returns whether a port was granted on the way."""
        was_granted = client.granted
        while True:
            try:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    events = client.receive_eof()
                    if not events:
                        return was_granted
                else:
                    events = client.receive_data(data)
            except ProtocolError as exc:
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
                self._proxyme_failed(session, f"bad proxyme answer: {exc.reason}")
                return was_granted
            was_granted, over = self._follow_proxyme(session, events, was_granted)
            if over:
                return was_granted

    def _answered(self, session: _Session) -> None:
        if not session.first_answer:
            session.first_answer = True
            session.notify()

    def _set_granted(self, addresses: tuple[str, ...] | None) -> None:
        if addresses != self.granted:
            self.granted = addresses
            self._grant_changed.set()
            self._grant_changed = anyio.Event()
        elif addresses is None:
            self._grant_changed.set()  # wake wait_granted() so it can see the client stop
            self._grant_changed = anyio.Event()

    # proxy-tcp -----------------------------------------------------------------

    async def _serve_stream(self, session: _Session, stream: TunnelStream) -> None:
        address = str(stream.address)
        target = self._allow.check(stream.address)
        if isinstance(target, str):
            self._refuse(session, stream, target)
            return
        try:
            with anyio.fail_after(self.config.target_connect_timeout):
                tcp = await connect_target(target)
        except (OSError, TimeoutError) as exc:
            self._refuse(session, stream, f"cannot connect to {target}: {exc or 'timed out'}")
            return
        if session.closed is not None or session.tunnel.state is TunnelState.CLOSED:
            await tcp.aclose()
            return
        try:
            session.host.accept(stream)
        except LocalProtocolError as exc:  # the core gave up on the stream meanwhile
            await tcp.aclose()
            logger.debug("stream %d vanished before it was accepted: %s", stream.stream_id, exc)
            return
        self._report(notices.stream_opened, session.tunnel_id, stream.stream_id, address, "in")
        result = await relay(stream, tcp)
        self._report(notices.client_relayed, session.tunnel_id, stream.stream_id, address, result)

    def _refuse(self, session: _Session, stream: TunnelStream, reason: str) -> None:
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


async def connect_target(target: ProxyTcpTarget) -> anyio.abc.SocketStream:
    """A TCP connection to ``target`` with TCP_NODELAY; DNS4/DNS6 restrict the family.

    An IP address (an IP4/IP6 target, or each address a DNS4/DNS6 name resolves to)
    is dialled directly by :func:`connect_address`; only names go through
    ``anyio.connect_tcp``, for its happy eyeballs across both families.  The stream
    reads only when asked (:func:`~snocat_anyio.relay.read_on_demand`)."""
    return read_on_demand(await _dial(target))


async def _dial(target: ProxyTcpTarget) -> anyio.abc.SocketStream:
    host, port = target.connect_host(), target.port
    if target.kind is TargetKind.IP4:
        return await connect_address(socket.AF_INET, host, port)
    if target.kind is TargetKind.IP6:
        return await connect_address(socket.AF_INET6, host, port)
    if target.kind in (TargetKind.DNS4, TargetKind.DNS6):
        family = socket.AF_INET if target.kind is TargetKind.DNS4 else socket.AF_INET6
        infos = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        error: OSError = OSError(
            f"{host} has no {'IPv4' if family == socket.AF_INET else 'IPv6'} address"
        )
        for *_, sockaddr in infos:
            try:
                return await connect_address(family, str(sockaddr[0]), port)
            except OSError as exc:
                error = exc
        raise error
    tcp = await anyio.connect_tcp(host, port)
    raw = tcp.extra(SocketAttribute.raw_socket)
    if raw.family in (socket.AF_INET, socket.AF_INET6):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return tcp


async def connect_address(
    family: socket.AddressFamily, host: str, port: int
) -> anyio.abc.SocketStream:
    """A TCP connection (with TCP_NODELAY) to the IP address ``host``, on the event loop.

    ``anyio.connect_tcp`` resolves no IP literal either, but it runs happy eyeballs
    (a task group, a task, an event, a timeout) even for one address; dialling a
    non-blocking socket here costs about half as much per stream.  A failure raises
    the connect's own ``OSError`` (``ConnectionRefusedError``, ...)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((host, port))
        except (BlockingIOError, InterruptedError):  # the handshake is under way
            await anyio.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code)) from None
        return await anyio.abc.SocketStream.from_socket(sock)
    except BaseException:
        sock.close()
        raise


def _full_sockaddr(family: int, sockaddr: tuple[str, int]) -> NetworkAddress:
    """The address as ``recvfrom`` will report the peer: IPv6 as a 4-tuple.

    anyio's ``getaddrinfo`` shortens IPv6 addresses to ``(host, port)``; aioquic
    compares addresses as tuples, so the aggregator's answers would come from an
    "unknown" path.  A numeric lookup (no DNS) restores flow info and scope id."""
    if family != socket.AF_INET6:
        return sockaddr
    host, port = sockaddr[0], sockaddr[1]
    info = socket.getaddrinfo(
        host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
    )
    return info[0][4]
