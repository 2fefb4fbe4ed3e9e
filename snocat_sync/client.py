"""The tunnel client for blocking programs: dial, authenticate, ask for a port, forward.

:class:`TunnelClient` is :class:`snocat_anyio.client.TunnelClient` 's twin, configured
with the same :class:`~snocat_proto.settings.ClientConfig` and judging failures with
the same core verdicts (:mod:`snocat_proto._service.attempts`).  A background *run thread*
strings sessions together with capped, jittered backoff; each session has its own
UDP socket and :class:`~snocat_sync.host.SyncHost` pump thread, a ``proxyme`` thread
that requests the public port for ``targets[0]`` (again, with backoff, after a denial
or a withdrawal), and one thread per stream the aggregator opens, forwarded to an
allow-listed target once it has answered (a dead target is a refusal).

``start()`` (or ``with``) returns once the first tunnel is authenticated and the
first ``proxyme`` answer arrived, granted or not, and raises what retrying cannot fix
(a rejected credential, an untrusted certificate; with ``reconnect=False`` any
failure).  ``close()`` releases the port (waiting for the acknowledgement), closes
the tunnel with :attr:`CloseCode.NORMAL`, joins every thread and closes the socket,
all bounded by ``close_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec

from snocat_proto._service import activity, notices
from snocat_proto._service.allowlist import AllowList
from snocat_proto._service.attempts import (
    AttemptEnd,
    ErrorKind,
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

from .errors import (
    AuthenticationError,
    ConnectError,
    SnocatError,
    StreamRefusedError,
    TunnelClosedError,
)
from .host import SyncHost
from .observe import ActivityFeed
from .relay import relay
from .stream import TunnelStream
from .threads import ThreadGroup
from .udp import bind_udp

__all__ = ["ClientConfig", "TunnelClient", "connect_target"]

P = ParamSpec("P")
logger = logging.getLogger("snocat.sync.client")

_SHUTDOWN_REASON = "client shutting down"
#: How long a stopping session waits for its service threads beyond ``close_timeout``.
THREAD_JOIN_TIMEOUT = 5.0


def attempt_error(end: AttemptEnd) -> SnocatError:
    """The exception :meth:`TunnelClient.start` / :meth:`TunnelClient.wait` raises."""
    if end.kind is ErrorKind.AUTHENTICATION:
        return AuthenticationError(end.message)
    if end.kind is ErrorKind.TUNNEL_CLOSED:
        return TunnelClosedError(end.code, end.close_reason)
    return ConnectError(end.message)


@dataclass(eq=False)
class _Session:
    """One attempt: its tunnel, its pump, its threads, and what happened on it so far."""

    tunnel_id: str
    tunnel: TunnelConnection
    host: SyncHost
    peer: str
    threads: ThreadGroup
    handshake_done: bool = False
    authenticated: bool = False
    name: str | None = None
    closed: ConnectionTerminated | None = None
    pin_problem: str | None = None
    first_answer: bool = False
    #: The session is ending: no new services, no new port requests.
    stopping: bool = False
    proxyme: tuple[ProxymeClient, TunnelStream] | None = None


class TunnelClient(ClientEvents[_Session, TunnelStream]):
    """The Connect side of snocat, blocking; see the module docstring."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.activity = ActivityFeed()
        #: The public address(es) the aggregator listens on for us; None while not granted.
        self.granted: tuple[str, ...] | None = None
        self._allow = AllowList(config.targets)
        #: Guards everything below, the core and the streams; shared with every pump.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._session: _Session | None = None
        self._sessions_started = 0
        self._address_turn = 0
        self._ready = False
        self._stop = False
        self._done = False
        self._error: SnocatError | None = None
        self._thread: threading.Thread | None = None

    # Public API ----------------------------------------------------------------

    def start(self, timeout: float | None = None) -> TunnelClient:
        """Connect in the background; return once the first tunnel is ready.

        Raises the error that ended the client instead (see the module docstring),
        or ``TimeoutError`` after ``timeout`` seconds (the client is then closed)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("TunnelClient.start() can be called only once")
            if self._stop:
                raise RuntimeError("the client was closed")
            self._thread = threading.Thread(target=self._run, name="snocat-client", daemon=True)
        self._thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not (self._ready or self._done):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._changed.wait(remaining)
            ready, error = self._ready, self._error
        if error is not None:
            self.close()
            raise error
        if not ready:
            self.close()
            if self._error is not None:
                raise self._error
            if self._done and not self._stop:
                raise ConnectError("the client stopped before its tunnel was ready")
            raise TimeoutError(f"the tunnel was not ready within {timeout:g} s")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the client stops (True) or ``timeout`` passed (False).

        Raises the error that ended the client, if one did (e.g. the tunnel was lost
        with ``reconnect=False``)."""
        thread = self._thread
        if thread is None:
            return True
        if not self._wait_done(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True

    def _wait_done(self, timeout: float | None) -> bool:
        # A Condition, not Thread.join(): a join interrupted by Ctrl-C can leave the
        # thread looking finished (CPython gh-90882), and the goodbye would be cut short.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # it has finished its work; this only reaps it
        return True

    def wait_granted(self, timeout: float | None = None) -> tuple[str, ...]:
        """The public address(es), once the aggregator has granted a port."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.granted is None:
                if self._done or self._stop:
                    raise TunnelClosedError(CloseCode.NORMAL, "the client has stopped")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no port was granted within the timeout")
                self._changed.wait(remaining)
            return self.granted

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

    def close(self) -> None:
        """Release the port, close the tunnel (NORMAL), join every thread, close the socket.

        Idempotent; safe from any thread but the client's own service threads."""
        with self._lock:
            self._stop = True
            self._changed.notify_all()
            thread = self._thread
        if thread is None:
            self._finish()
        elif thread is not threading.current_thread():
            self._wait_done(None)

    def __enter__(self) -> TunnelClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The reconnect loop (run thread) -------------------------------------------

    def _run(self) -> None:
        config = self.config
        backoff = Backoff(config.backoff_initial, config.backoff_max)
        try:
            while True:
                outcome = self._attempt(backoff)
                if outcome is None or self._stopping():
                    return
                if outcome.fatal or not config.reconnect:
                    with self._lock:
                        self._error = attempt_error(outcome)
                    return
                if outcome.no_answer:
                    self._address_turn += 1
                delay = backoff.next_delay()
                logger.info("reconnecting in %.2f s: %s", delay, outcome.reason)
                self._publish(
                    activity.Reconnecting,
                    attempt=backoff.attempt,
                    delay=delay,
                    reason=outcome.reason,
                )
                if self._sleep(delay):
                    return
        except Exception as exc:  # a bug: report it instead of hanging start()
            logger.exception("the client failed")
            with self._lock:
                self._error = ConnectError(f"internal error: {exc!r}")
        finally:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._done = True
            self._set_granted(None)
            self._changed.notify_all()
        self.activity.close()

    def _stopping(self) -> bool:
        with self._lock:
            return self._stop

    def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds unless the client stops first (True then)."""
        deadline = time.monotonic() + delay
        with self._lock:
            while not self._stop and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
            return self._stop

    def _attempt(self, backoff: Backoff) -> AttemptEnd | None:
        config = self.config
        try:
            infos = socket.getaddrinfo(
                config.server_host, config.server_port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            return unresolvable(config.server_host, str(exc))
        if not infos:
            return unresolvable(config.server_host, "no addresses")
        # The first address, unless it did not answer last time (a name with both
        # families, and an aggregator listening on one).
        family, *_, sockaddr = infos[self._address_turn % len(infos)]
        try:
            sock = bind_udp("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
        except OSError as exc:
            return local_socket_failure(config.server_label, str(exc))
        try:
            # stdlib getaddrinfo gives IPv6 as the full 4-tuple, as recvfrom reports it.
            return self._run_session(sock, sockaddr, backoff)
        finally:
            sock.close()

    def _run_session(
        self, sock: socket.socket, address: NetworkAddress, backoff: Backoff
    ) -> AttemptEnd | None:
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
        with self._lock:
            tunnel = TunnelConnection.connect(
                configuration,
                address=address,
                authenticator=connect_authenticator(config.credentials, limits=config.limits),
                limits=config.limits,
                now=time.monotonic(),
                keepalive_interval=config.keepalive_interval,
            )
            self._sessions_started += 1
            tunnel_id = f"client-{self._sessions_started}"
            session: _Session
            host = SyncHost(
                ClientEndpoint(tunnel),
                sock,
                lambda t, e, s: self._on_event(session, t, e, s),
                lock=self._lock,
                name=f"snocat-client-pump-{self._sessions_started}",
            )
            session = _Session(
                tunnel_id=tunnel_id,
                tunnel=tunnel,
                host=host,
                peer=format_address(address),
                threads=ThreadGroup(f"snocat-{tunnel_id}", logger),
            )
            self._session = session
        self._publish(activity.ListeningOn, address=format_address(host.local_address))
        host.start()
        try:
            return self._supervise(session, backoff)
        finally:
            self._end_session(session)

    def _supervise(self, session: _Session, backoff: Backoff) -> AttemptEnd | None:
        config = self.config
        with self._lock:
            self._wait_for(
                lambda: session.handshake_done or session.closed is not None,
                config.connect_timeout,
            )
            if self._stop:
                return None
            if not session.handshake_done and session.closed is None:
                return no_answer(config.server_label, f"within {config.connect_timeout:g} s")
            # The core's auth_timeout bounds this wait.
            self._wait_for(lambda: session.authenticated or session.closed is not None)
            if self._stop:
                return None
            if session.closed is not None:
                return diagnose_early_close(
                    session.closed,
                    handshake_done=session.handshake_done,
                    pin_problem=session.pin_problem,
                    server_label=config.server_label,
                    server_name=config.server_name,
                )
            if config.request_port:
                session.threads.spawn(self._proxyme_loop, session, name="proxyme")
                # Bounded: an aggregator that never answers must not hold up the caller.
                self._wait_for(
                    lambda: session.first_answer or session.closed is not None,
                    config.connect_timeout,
                )
            if session.closed is None and not self._stop:
                backoff.reset()
                self._ready = True
                self._changed.notify_all()
            self._wait_for(lambda: session.closed is not None)
            if self._stop:
                return None
            assert session.closed is not None
            return lost_tunnel(session.closed)

    def _wait_for(self, condition: Callable[[], bool], timeout: float | None = None) -> None:
        """(Lock held) Wait until ``condition()``, the client stops, or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (condition() or self._stop):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            self._changed.wait(remaining)

    def _end_session(self, session: _Session) -> None:
        """Say goodbye (bounded), stop the pump, join the session's threads."""
        with self._lock:
            session.stopping = True
            self._changed.notify_all()
        try:
            self._goodbye(session, time.monotonic() + self.config.close_timeout)
        finally:
            session.host.stop()
            leftover = session.threads.join(THREAD_JOIN_TIMEOUT)
            if leftover:
                logger.warning(
                    "%d threads of %s did not finish: %s",
                    len(leftover),
                    session.tunnel_id,
                    ", ".join(t.name for t in leftover),
                )
            with self._lock:
                if self._session is session:
                    self._session = None
                self._set_granted(None)

    def _goodbye(self, session: _Session, deadline: float) -> None:
        """Give the port back (waiting for the acknowledgement), then close the tunnel."""
        tunnel = session.tunnel
        with self._lock:
            proxyme = session.proxyme if session.closed is None else None
        if proxyme is not None:
            client, stream = proxyme
            with self._lock:
                release = client.release() if client.granted else None
            if release is not None:
                try:
                    stream.settimeout(max(0.0, deadline - time.monotonic()))
                    stream.sendall(release)
                except OSError:
                    pass
                else:
                    # The proxyme thread reads the acknowledgement and then ends.
                    with self._lock:
                        while (
                            client.granted
                            and session.closed is None
                            and (remaining := deadline - time.monotonic()) > 0
                        ):
                            self._changed.wait(remaining)
            released = not client.granted
            if released:
                stream.close()
            else:
                stream.reset(StreamCode.CANCELLED)
        with self._lock:
            if session.closed is None and tunnel.state is not TunnelState.CLOSED:
                tunnel.close(CloseCode.NORMAL, _SHUTDOWN_REASON)
                session.host.flush(tunnel)

    # Events from the pump: the core's ClientEvents handles them (lock held,
    # never blocking); these are the I/O it asks for ---------------------------

    def _stream_requested(self, session: _Session, stream: TunnelStream) -> None:
        if session.stopping or session.closed is not None:
            session.host.refuse(stream)
        else:
            session.threads.spawn(self._serve_stream, session, stream, name="stream")

    def _state_changed(self, session: _Session) -> None:
        self._changed.notify_all()

    def _flush(self, session: _Session, tunnel: TunnelConnection) -> None:
        session.host.flush(tunnel)

    def _failed(self, message: str, *args: object) -> None:
        logger.exception(message, *args)

    # proxyme (the session's proxyme thread) --------------------------------------

    def _proxyme_loop(self, session: _Session) -> None:
        """Request the port; after a denial or a withdrawal, ask again with backoff."""
        config = self.config
        retry = Backoff(config.backoff_initial, config.backoff_max)
        while not self._session_over(session):
            if self._request_port(session):
                retry.reset()
            deadline = time.monotonic() + retry.next_delay()
            with self._lock:
                while (
                    not (self._stop or session.stopping or session.closed is not None)
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._changed.wait(remaining)

    def _session_over(self, session: _Session) -> bool:
        with self._lock:
            return self._stop or session.stopping or session.closed is not None

    def _request_port(self, session: _Session) -> bool:
        """One ``proxyme`` exchange, kept open while the port is ours; True if it was granted."""
        target = self.config.targets[0]
        request = ProxymeRequest(host=target.connect_host(), port=target.port)
        try:
            stream = session.host.open_stream(session.tunnel, request.to_address())
        except StreamRefusedError as exc:
            self._port_denied(session, f"the aggregator refused the proxyme request: {exc.reason}")
            return False
        except (TunnelClosedError, LocalProtocolError):
            return False
        client = ProxymeClient(limits=self.config.limits)
        with self._lock:
            if session.stopping:
                stream.reset(StreamCode.CANCELLED)
                return False
            session.proxyme = (client, stream)
            initial = client.initial_data()
        try:
            stream.sendall(initial)
            granted = self._read_proxyme(session, client, stream)
        except OSError as exc:
            stream.reset(StreamCode.CANCELLED)
            granted = client.granted
            with self._lock:
                if session.closed is None and not session.stopping:
                    self._proxyme_failed(session, f"the proxyme stream failed: {exc}")
        with self._lock:
            session.proxyme = None
            self._changed.notify_all()
        stream.close()  # after a denial or a release: the exchange is over
        return granted

    def _read_proxyme(self, session: _Session, client: ProxymeClient, stream: TunnelStream) -> bool:
        """Feed the ``proxyme`` stream to ``client`` until denied or released.

        Returns whether a port was granted on the way."""
        was_granted = client.granted
        while True:
            data = stream.recv()
            with self._lock:
                try:
                    events = client.receive_data(data) if data else client.receive_eof()
                except ProtocolError as exc:
                    stream.reset(StreamCode.PROTOCOL_VIOLATION)
                    self._proxyme_failed(session, f"bad proxyme answer: {exc.reason}")
                    return was_granted
                if not data and not events:
                    return was_granted
                was_granted, over = self._follow_proxyme(session, events, was_granted)
                if over:
                    return was_granted

    def _answered(self, session: _Session) -> None:
        with self._lock:
            if not session.first_answer:
                session.first_answer = True
                self._changed.notify_all()

    def _set_granted(self, addresses: tuple[str, ...] | None) -> None:
        """(Lock held.)"""
        self.granted = addresses
        self._changed.notify_all()

    # proxy-tcp (one thread per stream) -----------------------------------------

    def _serve_stream(self, session: _Session, stream: TunnelStream) -> None:
        address = str(stream.address)
        target = self._allow.check(stream.address)
        if isinstance(target, str):
            self._refuse(session, stream, target)
            return
        try:
            tcp = connect_target(target, self.config.target_connect_timeout)
        except OSError as exc:
            self._refuse(session, stream, f"cannot connect to {target}: {exc or 'timed out'}")
            return
        try:
            with self._lock:
                if session.closed is not None or session.tunnel.state is TunnelState.CLOSED:
                    tcp.close()
                    return
                session.host.accept(stream)
        except LocalProtocolError as exc:  # the core gave up on the stream meanwhile
            tcp.close()
            logger.debug("stream %d vanished before it was accepted: %s", stream.stream_id, exc)
            return
        self._report(notices.stream_opened, session.tunnel_id, stream.stream_id, address, "in")
        result = relay(stream, tcp)
        self._report(notices.client_relayed, session.tunnel_id, stream.stream_id, address, result)

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


def connect_target(target: ProxyTcpTarget, timeout: float) -> socket.socket:
    """A blocking TCP connection to ``target`` with TCP_NODELAY; DNS4/DNS6 restrict
    the family.  Raises ``OSError`` (``TimeoutError`` after ``timeout`` seconds)."""
    host, port = target.connect_host(), target.port
    if target.kind in (TargetKind.DNS4, TargetKind.DNS6):
        family = socket.AF_INET if target.kind is TargetKind.DNS4 else socket.AF_INET6
        infos = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        error: OSError = OSError(
            f"{host} has no {'IPv4' if family == socket.AF_INET else 'IPv6'} address"
        )
        for *_, sockaddr in infos:
            try:
                tcp = socket.create_connection((str(sockaddr[0]), port), timeout=timeout)
            except OSError as exc:
                error = exc
                continue
            break
        else:
            raise error
    else:
        tcp = socket.create_connection((host, port), timeout=timeout)
    tcp.settimeout(None)
    if tcp.family in (socket.AF_INET, socket.AF_INET6):
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return tcp
