"""The aggregator's reactions to tunnel events, written once for both bindings.

:class:`ServerEvents` is the part of a binding's server that the pump calls for
every :class:`~snocat_proto.events.TunnelEvent`: it asks the
:class:`~snocat_proto.aggregator.Aggregator` what to do, closes tunnels it refuses
and reports what happened (:mod:`~snocat_proto._service.notices`).  Whatever does I/O is
left to the binding through the abstract methods below: flushing a tunnel,
accepting or refusing a stream, starting a task or a thread, logging a failure.
Nothing here logs, blocks, sleeps or reads a clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from .._wire.address import RouteAddress
from .._wire.codes import StreamCode
from .._wire.events import (
    AuthenticationCompleted,
    ConnectionTerminated,
    CredentialRequired,
    FlowDatagramReceived,
    FlowEnded,
    FlowOpened,
    FlowRequested,
    HandshakeCompleted,
    StreamRequested,
    TunnelEvent,
)
from .._wire.proxyme import ProxymeRequest
from .._wire.tunnel import TunnelConnection
from .aggregator import INTERNAL_ERROR, Aggregator, CloseVerdict, RouteKind, TunnelSession
from .notices import Notice, tunnel_authenticated, tunnel_closed, tunnel_connected
from .stream_handle import StreamHandle

__all__ = ["EventStream", "ServerEvents", "StreamHost"]

P = ParamSpec("P")


class EventStream(Protocol):
    """What the event handling needs of a binding's stream."""

    @property
    def handle(self) -> StreamHandle: ...
    def reset(self, code: int = ...) -> None: ...


S = TypeVar("S", bound=TunnelSession)
T = TypeVar("T", bound=EventStream)
T_contra = TypeVar("T_contra", contravariant=True)


class StreamHost(Protocol[T_contra]):
    """What the event handling needs of a binding's host."""

    def accept(self, stream: T_contra) -> None: ...
    def refuse(self, stream: T_contra) -> None: ...


_Handler = Callable[[Any, TunnelConnection, Any, Any], None]


class ServerEvents(ABC, Generic[S, T]):
    """Base of a binding's server: handles the pump's events (see the module docstring).

    The binding sets ``_books`` and ``_route`` and implements the abstract methods."""

    _books: Aggregator[S]
    #: The application's route hook: ``(status, address) -> handler | None``.
    _route: Callable[..., Any] | None

    # What the binding does ------------------------------------------------------

    @abstractmethod
    def _session(self, tunnel: TunnelConnection) -> S:
        """The session of ``tunnel`` (``Aggregator.session`` with the wall clock)."""

    @abstractmethod
    def _wall_time(self) -> float:
        """``time.time()``: when a tunnel registered, for status displays."""

    @abstractmethod
    def _flush(self, tunnel: TunnelConnection) -> None:
        """Send what ``tunnel`` has to send."""

    @abstractmethod
    def _report(
        self, build: Callable[Concatenate[float, P], Notice], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Log and publish ``build(now, *args, **kwargs)``."""

    @abstractmethod
    def _spawn(self, session: S, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` as a task or thread of ``session`` 's tunnel."""

    @abstractmethod
    def _require_host(self) -> StreamHost[T]:
        """The binding's host (it accepts and refuses the streams clients open)."""

    @abstractmethod
    def _refuse(self, session: S, stream: T, reason: str) -> None:
        """Refuse a stream the client opened, and report it."""

    @abstractmethod
    def _service_started(self) -> None:
        """Count one more service (a routed stream) in flight."""

    @abstractmethod
    def _check_credential(self, session: S, name: str) -> Any:
        """(Spawned) Look the secret of ``name`` up and settle the credential."""

    @abstractmethod
    def _serve_proxyme(self, session: S, stream: T, request: ProxymeRequest) -> Any:
        """(Spawned) Serve the ``proxyme`` exchange on ``stream``."""

    @abstractmethod
    def _serve_routed(self, session: S, stream: T, handler: Any) -> Any:
        """(Spawned) Run the route hook's ``handler`` on ``stream``."""

    @abstractmethod
    def _tunnel_gone(self, session: S) -> None:
        """The tunnel of ``session`` closed: stop what belongs to it."""

    @abstractmethod
    def _failed(self, message: str, *args: object) -> None:
        """Something raised: log ``message % args`` with the traceback (called from
        the ``except`` block)."""

    def _link_up(self, session: S) -> None:
        """A node of the fleet linked up (the fleet's server says what follows)."""

    def _registered(self, session: S) -> None:
        """A tunnel authenticated and is in the registry (a fleet tells the others)."""

    def _deregistered(self, session: S) -> None:
        """A registered tunnel closed (a fleet tells the others)."""

    def _flow_event(self, session: S, event: TunnelEvent) -> None:
        """A UDP flow's event (``udp-datagrams``): the binding's UDP ports take them.
        Here, without any: a flow the client opens is refused (an aggregator opens the
        flows of its ports; docs/protocol.md 3.17.3)."""
        if isinstance(event, FlowRequested):
            session.tunnel.refuse_flow(event.flow_id)
            self._flush(session.tunnel)

    def _hook_failed(self, address: RouteAddress) -> None:
        self._failed("the route hook failed for %s", address)

    # The handlers -----------------------------------------------------------------

    def _on_event(self, tunnel: TunnelConnection, event: TunnelEvent, stream: T | None) -> None:
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            return
        try:
            handler(self, tunnel, event, stream)
        except Exception:
            # A bug must cost this tunnel, never the server.
            self._failed("failed to handle %s; closing the tunnel", type(event).__name__)
            if stream is not None:
                stream.reset(StreamCode.CANCELLED)
            self._close_on(tunnel, INTERNAL_ERROR)

    def _close_on(self, tunnel: TunnelConnection, verdict: CloseVerdict | None) -> bool:
        """Close ``tunnel`` if the core said so; whether it did."""
        if verdict is None:
            return False
        tunnel.close(*verdict)
        self._flush(tunnel)
        return True

    def _on_handshake(
        self, tunnel: TunnelConnection, event: HandshakeCompleted, _: T | None
    ) -> None:
        session = self._session(tunnel)
        self._report(tunnel_connected, session)
        self._close_on(tunnel, self._books.on_handshake())

    def _on_credential_required(
        self, tunnel: TunnelConnection, event: CredentialRequired, _: T | None
    ) -> None:
        session = self._session(tunnel)
        self._spawn(session, self._check_credential, session, event.name)

    def _on_authenticated(
        self, tunnel: TunnelConnection, event: AuthenticationCompleted, _: T | None
    ) -> None:
        session = self._session(tunnel)
        verdict = self._books.on_authenticated(
            session, name=event.name, scheme=event.scheme, wall_time=self._wall_time()
        )
        if self._close_on(tunnel, verdict):
            return
        if session.is_link:
            self._link_up(session)
            return
        self._report(tunnel_authenticated, session, event)
        for displaced, takeover in self._books.take_over(session):
            self._close_on(displaced.tunnel, takeover)
        self._registered(session)

    def _on_stream_requested(
        self, tunnel: TunnelConnection, event: StreamRequested, stream: T | None
    ) -> None:
        assert stream is not None
        session = self._session(tunnel)
        decision, handler = self._books.dispatch(
            session, event.address, self._route, self._hook_failed
        )
        if decision.kind is RouteKind.DROP:
            self._require_host().refuse(stream)
        elif decision.kind is RouteKind.REFUSE:
            self._refuse(session, stream, decision.reason)
        else:
            self._require_host().accept(stream)
            session.track(stream.handle)
            if handler is None:  # proxyme
                assert decision.request is not None
                self._spawn(session, self._serve_proxyme, session, stream, decision.request)
            else:
                self._service_started()
                self._spawn(session, self._serve_routed, session, stream, handler)

    def _on_flow(self, tunnel: TunnelConnection, event: TunnelEvent, _: T | None) -> None:
        session = self._books.get(tunnel)
        if session is not None:
            self._flow_event(session, event)

    def _on_tunnel_closed(
        self, tunnel: TunnelConnection, event: ConnectionTerminated, _: T | None
    ) -> None:
        session = self._books.on_closed(tunnel, event.reason)
        if session is None:
            return  # closed before its handshake completed: nothing was started
        self._tunnel_gone(session)  # its tasks or threads free its ports as they unwind
        if session.is_link:
            return  # a node link, not a tunnel
        if session.registered:
            self._deregistered(session)
        self._report(tunnel_closed, session, event)

    #: Which handler takes which event (the others need nothing of the server).
    _HANDLERS: ClassVar[dict[type[TunnelEvent], _Handler]] = {
        HandshakeCompleted: _on_handshake,
        CredentialRequired: _on_credential_required,
        AuthenticationCompleted: _on_authenticated,
        StreamRequested: _on_stream_requested,
        ConnectionTerminated: _on_tunnel_closed,
        FlowRequested: _on_flow,
        FlowOpened: _on_flow,
        FlowDatagramReceived: _on_flow,
        FlowEnded: _on_flow,
    }
