"""The client's reactions to tunnel events, written once for both bindings.

:class:`ClientEvents` is the part of a binding's client that the pump calls for
every :class:`~snocat_proto.events.TunnelEvent` of one attempt: it checks the
pinned certificate, follows the attempt's state (handshake done, authenticated,
closed) and reports what happened (:mod:`~snocat_proto._service.notices`).  Whatever does
I/O is left to the binding through the abstract methods below: flushing a tunnel,
serving a stream, waking whoever waits, logging a failure.  Nothing here logs,
blocks, sleeps or reads a clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Concatenate, Generic, ParamSpec, Protocol, TypeVar

from .._wire.codes import CloseCode, StreamCode
from .._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    FlowDatagramReceived,
    FlowEnded,
    FlowOpened,
    FlowRequested,
    HandshakeCompleted,
    StreamRequested,
    TunnelEvent,
)
from .._wire.proxyme import Denied, Granted, ProxymeEvent, Released
from .._wire.tunnel import TunnelConnection
from .attempts import enforce_pin
from .config import ClientConfig
from .notices import (
    Notice,
    client_port_denied,
    client_port_granted,
    client_port_released,
    tunnel_authenticated,
    tunnel_closed,
    tunnel_connected,
)
from .publications import Publication
from .server_events import EventStream

__all__ = ["Attempt", "ClientEvents"]

P = ParamSpec("P")


class Attempt(Protocol):
    """What the event handling needs of a binding's session (one attempt)."""

    tunnel_id: str
    peer: str
    name: str | None
    handshake_done: bool
    authenticated: bool
    closed: ConnectionTerminated | None
    pin_problem: str | None


A = TypeVar("A", bound=Attempt)
#: The events of UDP flows (``udp-datagrams``), handed to :meth:`ClientEvents._flow_event`.
FLOW_EVENTS = (FlowRequested, FlowOpened, FlowDatagramReceived, FlowEnded)
NO_FREE_PORT = "the aggregator has no free port for this tunnel (null answer)"
T = TypeVar("T", bound=EventStream)


class ClientEvents(ABC, Generic[A, T]):
    """Base of a binding's client: handles the pump's events (see the module docstring)."""

    config: ClientConfig
    #: The public address(es) the aggregator listens on for each target, while granted.
    grants: dict[Publication, tuple[str, ...]]
    _session: A | None

    @property
    def granted(self) -> tuple[str, ...] | None:
        """The public address(es) of the first target; None while it has no port."""
        return self.grants.get(self.config.publications[0])

    # What the binding does ------------------------------------------------------

    @abstractmethod
    def _flush(self, session: A, tunnel: TunnelConnection) -> None:
        """Send what ``tunnel`` has to send."""

    @abstractmethod
    def _report(
        self, build: Callable[Concatenate[float, P], Notice], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Log and publish ``build(now, *args, **kwargs)``."""

    @abstractmethod
    def _stream_requested(self, session: A, stream: T) -> None:
        """Serve a stream the aggregator opened, or refuse it if the attempt is ending."""

    @abstractmethod
    def _state_changed(self, session: A) -> None:
        """Wake whoever waits for the attempt's state to change."""

    @abstractmethod
    def _set_granted(self, target: Publication, addresses: tuple[str, ...] | None) -> None:
        """Record (and announce to waiters) the addresses granted for ``target``, or None."""

    @abstractmethod
    def _answered(self, session: A, target: Publication) -> None:
        """The aggregator answered the first port request of ``target`` on ``session``."""

    @abstractmethod
    def _refused(self, session: A, target: Publication, reason: str) -> None:
        """``target`` cannot get its public port and waiting cannot help: end the client."""

    def _flow_event(self, session: A, tunnel: TunnelConnection, event: TunnelEvent) -> None:
        """A UDP flow's event (``udp-datagrams``).  Here, without UDP targets, a flow
        the aggregator opens is refused."""
        if isinstance(event, FlowRequested):
            tunnel.refuse_flow(event.flow_id)
            self._flush(session, tunnel)

    @abstractmethod
    def _failed(self, message: str, *args: object) -> None:
        """Something raised: log ``message % args`` with the traceback (called from
        the ``except`` block)."""

    # The handlers -----------------------------------------------------------------

    def _on_event(
        self, session: A, tunnel: TunnelConnection, event: TunnelEvent, stream: T | None
    ) -> None:
        try:
            self._handle_event(session, tunnel, event, stream)
        except Exception:
            # A bug must cost this tunnel (it is retried), never stop the pump silently.
            self._failed("failed to handle %s; closing the tunnel", type(event).__name__)
            if stream is not None:
                stream.reset(StreamCode.CANCELLED)
            tunnel.close(CloseCode.INTERNAL_ERROR, "client internal error")
            self._flush(session, tunnel)

    def _handle_event(
        self, session: A, tunnel: TunnelConnection, event: TunnelEvent, stream: T | None
    ) -> None:
        if isinstance(event, StreamRequested):
            assert stream is not None
            self._stream_requested(session, stream)
            return
        if isinstance(event, FLOW_EVENTS):
            self._flow_event(session, tunnel, event)
            return
        if isinstance(event, HandshakeCompleted):
            session.pin_problem = enforce_pin(tunnel, self.config.fingerprint)
            if session.pin_problem is not None:
                self._flush(session, tunnel)
            session.handshake_done = True
            self._report(tunnel_connected, session)
        elif isinstance(event, AuthenticationCompleted):
            session.authenticated = True
            session.name = event.name
            self._report(tunnel_authenticated, session, event, log=False)
        elif isinstance(event, ConnectionTerminated):
            session.closed = event
            if session is self._session:
                for target in list(self.grants):
                    self._port_gone(session, target)
            self._report(tunnel_closed, session, event, log=False)
        else:
            return
        self._state_changed(session)

    # The proxyme answers ----------------------------------------------------------

    def _follow_proxyme(
        self,
        session: A,
        target: Publication,
        events: Iterable[ProxymeEvent],
        was_granted: bool,
    ) -> tuple[bool, bool]:
        """Act on the aggregator's ``proxyme`` answers for ``target``: ``(was_granted,
        over)``, whether a port was granted on the way and whether the exchange is over."""
        for event in events:
            if isinstance(event, Granted):
                was_granted = True
                self._port_granted(session, target, event.addresses)
            elif isinstance(event, Denied):
                reason = event.reason or NO_FREE_PORT
                if not event.retry or not self.config.reconnect:
                    self._refused(session, target, reason)
                self._port_denied(session, target, reason)
                return False, True
            elif isinstance(event, Released):
                self._port_gone(session, target)
                self._state_changed(session)
                return was_granted, True
        return was_granted, False

    def _proxyme_failed(self, session: A, target: Publication, reason: str) -> None:
        """The ``proxyme`` exchange broke: no port, and the one we had is gone."""
        self._port_denied(session, target, reason)
        self._port_gone(session, target)

    def _port_granted(self, session: A, target: Publication, addresses: tuple[str, ...]) -> None:
        self._set_granted(target, addresses)
        self._answered(session, target)
        self._report(client_port_granted, session, addresses, target)

    def _port_gone(self, session: A, target: Publication) -> None:
        granted = self.grants.get(target)
        if granted is None:
            return
        self._set_granted(target, None)
        self._report(client_port_released, session, granted, target)

    def _port_denied(self, session: A, target: Publication, reason: str) -> None:
        self._report(client_port_denied, session, reason, target)
        self._answered(session, target)
