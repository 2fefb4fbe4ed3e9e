"""The aggregator's books and decisions, shared by every binding's server.

:class:`Aggregator` keeps, for every tunnel of one server, a :class:`TunnelSession`:
its identity (tunnel id, peer, name, scheme), whether it counts against
``max_tunnels``, its registry record, its public ports and the streams whose bytes
its :class:`TunnelStatus` reports.  It owns the :class:`~snocat_proto.ports.PortAllocator`
and :class:`~snocat_proto.ports.StickyPorts` that hand the ports out, and it decides
what the binding then does: admit or refuse a tunnel or a credential, serve a stream
with ``proxyme``, pass it to the route hook, or refuse it.

Sockets, listeners, tasks and threads stay in the binding, whose own session type
subclasses :class:`TunnelSession` (the aggregator builds it through a factory).
Clocks come in as arguments: ``now`` is the binding's monotonic clock (sticky
ports), ``wall_time`` is ``time.time()`` (what status displays show).
"""

from __future__ import annotations

import errno
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Generic, TypeVar

from .._wire.address import RouteAddress
from .._wire.auth import SCHEME_TOKEN
from .._wire.certificates import install_identity
from .._wire.codes import CloseCode
from .._wire.endpoint import AuthenticatorFactory, ServerEndpoint
from .._wire.engine import ALPN, quic_configuration
from .._wire.errors import LocalProtocolError, ProtocolError
from .._wire.fleet_auth import FLEET_ALPN, SCHEME_FLEET
from .._wire.network import format_address
from .._wire.proxyme import ProxymeRequest
from .._wire.tunnel import TunnelConnection
from .config import ServerConfig
from .name_routes import NameRoutes, host_label
from .ports import PortAllocator, PortRange, PortsExhausted, StickyPorts
from .registry import TunnelRecord, TunnelRegistry
from .stream_handle import StreamHandle

__all__ = [
    "INTERNAL_ERROR",
    "NO_SERVICE",
    "PORT_PENDING",
    "PORT_TAKEN_ERRNOS",
    "SHUTTING_DOWN",
    "Aggregator",
    "CloseVerdict",
    "PortPending",
    "PortRefusal",
    "RouteDecision",
    "RouteKind",
    "TunnelSession",
    "TunnelStatus",
    "endpoint_capacity",
    "server_endpoint",
]

#: Bind errors that concern one port only: the next port of the range is tried.
PORT_TAKEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES})
SHUTTING_DOWN = "the aggregator is shutting down"
NO_SERVICE = "no service for this address"
AT_TUNNEL_LIMIT = "aggregator is at its tunnel limit"

#: ``(code, reason)``: close the tunnel with these.
CloseVerdict = tuple[CloseCode, str]
#: How a binding closes a tunnel whose event handling failed (a bug).
INTERNAL_ERROR: CloseVerdict = (CloseCode.INTERNAL_ERROR, "aggregator internal error")
CREDENTIAL_LOOKUP_FAILED = "the aggregator could not check the credential; try again later"
#: Told to a tunnel a newer one of the same name displaced.
TAKEN_OVER_REASON = "another client authenticated as {name!r}; this tunnel was taken over"
TOKEN_REVOKED = "the token of this tunnel name was revoked on the aggregator"
TOKEN_CHANGED = "the token of this tunnel name was changed on the aggregator; use the new one"


def endpoint_capacity(max_tunnels: int | None) -> int | None:
    """Connections the endpoint takes: the tunnel limit plus room for handshakes in
    progress, so a client over the limit is told why instead of timing out."""
    if max_tunnels is None:
        return None
    return max_tunnels + max(16, max_tunnels // 4)


def server_endpoint(
    config: ServerConfig, authenticator_factory: AuthenticatorFactory
) -> ServerEndpoint:
    """The QUIC endpoint a server binding pumps, as ``config`` describes it."""
    quic = quic_configuration(
        is_client=False,
        # A node of a fleet also takes node-to-node links, on the same port.
        alpn_protocols=(ALPN, FLEET_ALPN) if config.fleet is not None else (ALPN,),
        limits=config.limits,
        idle_timeout=config.idle_timeout,
        max_datagram_size=config.datagram_size,
        path_mtu_discovery=config.path_mtu_discovery,
        datagrams=config.datagrams,
    )
    install_identity(quic, config.certificate_pem, config.private_key_pem)
    quic.secrets_log_file = config.secrets_log_file
    return ServerEndpoint(
        quic,
        authenticator_factory=authenticator_factory,
        limits=config.limits,
        retry=config.retry,
        max_tunnels=endpoint_capacity(config.max_tunnels),
        keepalive_interval=config.keepalive_interval,
        handshake_rate=config.handshake_rate,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelStatus:
    """A snapshot of one authenticated tunnel, for status displays and routing."""

    tunnel_id: str
    name: str
    peer: str
    scheme: str
    ports: tuple[int, ...]
    #: Wall-clock time (``time.time()``) of the handshake.
    connected_at: float
    open_streams: int
    #: Bytes received from / sent to the tunnel, over the streams the server knows of.
    bytes_in: int
    bytes_out: int
    #: What it publishes by name on the shared listeners (``"http"``, ``"tls"``); each
    #: holds a stream open, as a port does.
    names: tuple[str, ...] = ()
    #: Public UDP ports granted to it (``udp-datagrams``).
    udp_ports: tuple[int, ...] = ()


class TunnelSession:
    """The aggregator's books on one tunnel; bindings subclass it for their resources."""

    def __init__(
        self, tunnel: TunnelConnection, tunnel_id: str, peer: str, connected_at: float
    ) -> None:
        self.tunnel = tunnel
        self.tunnel_id = tunnel_id
        self.peer = peer
        self.connected_at = connected_at
        self.name: str | None = None
        self.scheme = ""
        #: Counted against ``max_tunnels`` (credential being checked, or authenticated).
        self.admitted = False
        #: A newer tunnel of the same name displaced this one (its ports go to it).
        self.taken_over = False
        #: A node-to-node link of a fleet, not a tunnel.
        self.is_link = False
        self.registered = False
        self.closed = False
        #: Public ports granted to this tunnel, and the request each serves.
        self.ports: dict[int, ProxymeRequest] = {}
        #: Public UDP ports granted to it (their own numbering: 53/udp is not 53/tcp).
        self.udp_ports: dict[int, ProxymeRequest] = {}
        self.streams: set[StreamHandle] = set()
        self.done_bytes_in = 0
        self.done_bytes_out = 0

    @property
    def label(self) -> str:
        """The name once authenticated, the peer's address before."""
        return self.name if self.name is not None else self.peer

    def held(self, *, udp: bool = False) -> dict[int, ProxymeRequest]:
        """Its TCP ports, or (``udp``) its UDP ones."""
        return self.udp_ports if udp else self.ports

    def track(self, stream: StreamHandle) -> None:
        """Count ``stream`` 's bytes in this tunnel's status."""
        self.prune_streams()
        self.streams.add(stream)

    def prune_streams(self) -> None:
        """Fold the byte counts of finished streams into the totals."""
        for stream in [s for s in self.streams if s.finished]:
            self.streams.discard(stream)
            self.done_bytes_in += stream.bytes_received
            self.done_bytes_out += stream.bytes_sent


S = TypeVar("S", bound=TunnelSession)
#: A binding's route handler (what its route hook returns).
H = TypeVar("H")
#: Builds a binding's session: ``(tunnel, tunnel_id, peer, connected_at)``.
SessionFactory = Callable[[TunnelConnection, str, str, float], S]


@dataclass(frozen=True, slots=True)
class PortPending:
    """(:meth:`Aggregator.allocate_port`) The port is being freed by a displaced tunnel
    of the same name: ask again once a port is released."""


PORT_PENDING: Final = PortPending()


@dataclass(frozen=True, slots=True)
class PortRefusal:
    """Why a port request is denied (told to the client with ``proxyme-options``), and
    whether asking again can help (a port in use may be free later; one outside the
    range never is)."""

    reason: str
    retry: bool


def _sticky_key(session: TunnelSession, request: ProxymeRequest) -> str:
    """Sticky ports are remembered per tunnel name and target: a client with several
    targets gets each one's port back."""
    return f"{session.label} {request.target()}"


class _PortBooks:
    """The ports of one protocol: the range, who holds which, and sticky memory."""

    def __init__(self, port_range: PortRange, remember_for: float) -> None:
        self.range = port_range
        self.allocator = PortAllocator(port_range)
        self.sticky = StickyPorts(remember_for=remember_for)


class RouteKind(Enum):
    #: Refuse without a report (the tunnel or the server is going away).
    DROP = auto()
    #: Refuse, and report ``reason``.
    REFUSE = auto()
    #: Accept and serve the ``proxyme`` exchange for ``request``.
    PROXYME = auto()
    #: Ask the application's route hook.
    HOOK = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDecision:
    kind: RouteKind
    reason: str = ""
    request: ProxymeRequest | None = None


class Aggregator(Generic[S]):
    """See the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        session_factory: SessionFactory[S],
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.registry = TunnelRegistry(limit=config.limits.max_subscriber_backlog)
        #: False once shutdown began: no new tunnels, streams, ports or connections.
        self.accepting = True
        self._factory = session_factory
        self._random_bytes = random_bytes
        self._tcp = _PortBooks(config.port_range, config.sticky_port_seconds)
        self._allocator = self._tcp.allocator
        self._sticky = self._tcp.sticky
        #: The UDP range's books (``udp-datagrams``), if the server serves UDP.
        self._udp = (
            None
            if config.udp_port_range is None
            else _PortBooks(config.udp_port_range, config.sticky_port_seconds)
        )
        self._sessions: dict[TunnelConnection, S] = {}
        self._by_id: dict[str, S] = {}
        #: What each tunnel publishes by name, and the pools (docs/protocol.md 3.14).
        self.names: NameRoutes[S] = NameRoutes(config.pools)
        #: Closed sessions that still hold ports (their listeners are closing).
        self._closing: list[S] = []

    # Sessions -----------------------------------------------------------------

    def session(self, tunnel: TunnelConnection, wall_time: float) -> S:
        """The session of ``tunnel``, created on first sight."""
        session = self._sessions.get(tunnel)
        if session is None:
            tunnel_id = self._random_bytes(6).hex()
            while tunnel_id in self._by_id:
                tunnel_id = self._random_bytes(6).hex()
            address = tunnel.peer_address
            peer = "" if address is None else format_address(address)
            session = self._factory(tunnel, tunnel_id, peer, wall_time)
            self._sessions[tunnel] = session
            self._by_id[tunnel_id] = session
        return session

    def get(self, tunnel: TunnelConnection) -> S | None:
        return self._sessions.get(tunnel)

    def sessions(self) -> list[S]:
        return list(self._sessions.values())

    def route_to(self, name: str) -> S | None:
        """The session an outbound stream for ``name`` goes to: the newest of that name."""
        record = self.registry.route(name)
        return None if record is None else self._by_id.get(record.tunnel_id)

    def has_tunnel(self, label: str) -> bool:
        """Whether a tunnel is up whose name ``label`` reaches (by name, lower-case)."""
        return any(
            session.registered and not session.closed and host_label(session.name) == label
            for session in self._sessions.values()
        )

    # Tunnel decisions ---------------------------------------------------------

    def on_handshake(self) -> CloseVerdict | None:
        """A handshake completed: close the tunnel if the server is shutting down."""
        return None if self.accepting else (CloseCode.SHUTTING_DOWN, SHUTTING_DOWN)

    def decide_credential(self, session: S, *, lookup_failed: bool) -> CloseVerdict | None:
        """After the credential lookup: how to reject it (pass both to
        ``TunnelConnection.reject_credential``), or None: the tunnel is admitted."""
        if not self.accepting:
            return CloseCode.SHUTTING_DOWN, SHUTTING_DOWN
        if lookup_failed:
            # Not AUTHENTICATION_FAILED, which tells the client its token is wrong and
            # stops it: the credential store failing is the aggregator's fault, and
            # passing, so the client should try again.
            return CloseCode.INTERNAL_ERROR, CREDENTIAL_LOOKUP_FAILED
        if self._at_tunnel_limit():
            return CloseCode.LIMIT_EXCEEDED, AT_TUNNEL_LIMIT
        session.admitted = True
        return None

    def settle_credential(
        self, session: S, secret: bytes | None, *, lookup_failed: bool
    ) -> LocalProtocolError | None:
        """After the credential lookup: :meth:`decide_credential`, and give the tunnel
        the secret or the refusal.  If the tunnel rejects that (e.g. the lookup returned
        a str), it is closed instead and the error returned for the binding to log."""
        tunnel = session.tunnel
        refusal = self.decide_credential(session, lookup_failed=lookup_failed)
        try:
            if refusal is not None:
                code, reason = refusal
                tunnel.reject_credential(reason, code)
            else:
                tunnel.supply_credential(secret)
        except LocalProtocolError as exc:
            tunnel.close(CloseCode.AUTHENTICATION_FAILED, "credential check failed")
            return exc
        return None

    def on_authenticated(
        self, session: S, *, name: str, scheme: str, wall_time: float
    ) -> CloseVerdict | None:
        """Register an authenticated tunnel, or say why to close it instead.  A
        node-to-node link (scheme ``fleet``) is no tunnel: it is neither counted nor
        registered, and serves only relay streams."""
        if not self.accepting:
            return CloseCode.SHUTTING_DOWN, SHUTTING_DOWN
        if scheme == SCHEME_FLEET:
            session.name, session.scheme, session.is_link = name, scheme, True
            return None
        if not session.admitted:  # SimpleAck: no credential step came before
            if self._at_tunnel_limit():
                return CloseCode.LIMIT_EXCEEDED, AT_TUNNEL_LIMIT
            session.admitted = True
        session.name = name
        session.scheme = scheme
        self.registry.register(
            TunnelRecord(
                tunnel_id=session.tunnel_id,
                name=name,
                peer=session.peer,
                scheme=scheme,
                registered_at=wall_time,
            )
        )
        session.registered = True
        return None

    def take_over(self, session: S) -> list[tuple[S, CloseVerdict]]:
        """After ``session`` authenticated: the other live tunnels of its name, which it
        displaces (one name, one tunnel), and how to close each.  Their ports stay
        theirs until their listeners close; :meth:`allocate_port` makes the newcomer
        wait for them (:data:`PORT_PENDING`) rather than take others."""
        name = session.name
        if name is None or session.is_link or self.names.is_pool(name):
            return []  # a pool's tunnels serve its name together
        displaced = [
            other
            for other in self._sessions.values()
            if other is not session
            and other.name == name
            and not other.closed
            and not other.is_link
        ]
        for other in displaced:
            other.taken_over = True
        reason = TAKEN_OVER_REASON.format(name=name)
        return [(other, (CloseCode.TAKEN_OVER, reason)) for other in displaced]

    def on_closed(self, tunnel: TunnelConnection, reason: str) -> S | None:
        """Forget a closed tunnel; its session (None if it never completed a handshake).

        Its ports stay allocated until the binding has closed their listeners and
        called :meth:`port_released`."""
        session = self._sessions.pop(tunnel, None)
        if session is None:
            return None
        self._by_id.pop(session.tunnel_id, None)
        session.closed = True
        self.names.forget(session)
        session.prune_streams()
        self.registry.deregister(session.tunnel_id, reason)
        if session.ports or session.udp_ports:
            self._closing.append(session)
        return session

    def revoked(
        self, old: Mapping[str, bytes], new: Mapping[str, bytes]
    ) -> list[tuple[S, CloseVerdict]]:
        """After a tokens change from ``old`` to ``new``: the token-scheme tunnels whose
        name lost its token or got another one, and how to close each (the client is
        told why, and does not retry with a token that cannot work)."""
        closing: list[tuple[S, CloseVerdict]] = []
        for session in self._sessions.values():
            name = session.name
            if session.scheme != SCHEME_TOKEN or name is None or session.closed:
                continue
            if name not in new:
                closing.append((session, (CloseCode.AUTHENTICATION_FAILED, TOKEN_REVOKED)))
            elif not hmac.compare_digest(new[name], old.get(name, b"")):
                closing.append((session, (CloseCode.AUTHENTICATION_FAILED, TOKEN_CHANGED)))
        return closing

    def _at_tunnel_limit(self) -> bool:
        limit = self.config.max_tunnels
        if limit is None:
            return False
        return sum(1 for s in self._sessions.values() if s.admitted) >= limit

    # Stream decisions ---------------------------------------------------------

    def route(self, session: S, address: RouteAddress) -> RouteDecision:
        """What to do with a stream the client of ``session`` opened to ``address``."""
        if session.is_link:
            # A node link carries the fleet's relay streams only (the route hook).
            return RouteDecision(kind=RouteKind.HOOK)
        if not self.accepting or session.closed or not session.registered:
            return RouteDecision(kind=RouteKind.DROP)
        if self.config.proxyme:
            try:
                request = ProxymeRequest.from_address(address)
            except ProtocolError as exc:
                return RouteDecision(kind=RouteKind.REFUSE, reason=f"bad proxyme request: {exc}")
            if request is not None:
                return RouteDecision(kind=RouteKind.PROXYME, request=request)
        return RouteDecision(kind=RouteKind.HOOK)

    def dispatch(
        self,
        session: S,
        address: RouteAddress,
        hook: Callable[[TunnelStatus, RouteAddress], H | None] | None,
        hook_failed: Callable[[RouteAddress], None],
    ) -> tuple[RouteDecision, H | None]:
        """:meth:`route`, with :attr:`RouteKind.HOOK` settled: the decision and, for
        ``HOOK``, the handler ``hook`` picked (no handler becomes a ``REFUSE``).
        If the hook raises, ``hook_failed(address)`` is called from the ``except``
        block (so the binding can log the traceback) and the stream is refused."""
        decision = self.route(session, address)
        if decision.kind is not RouteKind.HOOK:
            return decision, None
        handler: H | None = None
        if hook is not None:
            try:
                handler = hook(self.status(session), address)
            except Exception:
                hook_failed(address)
        if handler is None:
            return RouteDecision(kind=RouteKind.REFUSE, reason=NO_SERVICE), None
        return decision, handler

    # Ports --------------------------------------------------------------------

    @property
    def ports_in_use(self) -> frozenset[int]:
        return self._allocator.allocated

    @property
    def udp_ports_in_use(self) -> frozenset[int]:
        return frozenset() if self._udp is None else self._udp.allocator.allocated

    def _books(self, udp: bool) -> _PortBooks:
        if not udp:
            return self._tcp
        if self._udp is None:
            raise LocalProtocolError("this aggregator serves no UDP ports")
        return self._udp

    def allocate_port(
        self,
        session: S,
        request: ProxymeRequest,
        now: float,
        exclude: set[int],
        wanted: int | None = None,
        *,
        wait_for_takeover: bool = True,
        udp: bool = False,
    ) -> int | PortRefusal | PortPending:
        """A port to bind for ``request`` of ``session``, or why there is none.

        ``wanted``: the port the client asked for (``proxyme-options``), granted only
        if it is in range and free.  Otherwise the port this name had for this target
        before, if it is free (sticky ports), else the lowest free one.  Pass the ports
        the operating system refused as ``exclude``; give every port that could not be
        bound back with :meth:`port_unavailable`.  ``udp``: a port of the UDP range
        (``udp-datagrams``), with books of its own."""
        if not self.accepting:
            return PortRefusal(SHUTTING_DOWN, retry=True)
        if udp and self._udp is None:
            return PortRefusal("this aggregator forwards no UDP (no --udp-ports)", retry=False)
        books = self._books(udp)
        allocator = books.allocator
        port_range = books.range
        if wanted is not None:
            if wanted not in port_range:
                return PortRefusal(
                    f"port {wanted} is outside this aggregator's range {port_range}", retry=False
                )
            if wanted in exclude:
                return PortRefusal(f"port {wanted} cannot be bound on the aggregator", retry=True)
            if allocator.is_allocated(wanted):
                if wait_for_takeover and any(
                    other.taken_over and wanted in other.held(udp=udp)
                    for other in self._sessions_of_name(session)
                ):
                    return PORT_PENDING  # the displaced tunnel of this name is freeing it
                return PortRefusal(f"port {wanted} is in use by another tunnel", retry=True)
            allocator.claim(wanted)
            return wanted
        key = _sticky_key(session, request)
        if wait_for_takeover and any(
            other.taken_over
            and any(_sticky_key(other, r) == key for r in other.held(udp=udp).values())
            for other in self._sessions_of_name(session)
        ):
            return PORT_PENDING  # the displaced tunnel's port: wait until it is free
        preferred = books.sticky.recall(key, now)
        try:
            return allocator.allocate(preferred=preferred, exclude=exclude)
        except PortsExhausted:
            detail = f" ({len(exclude)} refused by the OS)" if exclude else ""
            return PortRefusal(f"no free port in {port_range}{detail}", retry=True)

    def _sessions_of_name(self, session: S) -> list[S]:
        """The other sessions (closing ones included) of ``session``'s name."""
        return [
            other
            for other in self._closing + list(self._sessions.values())
            if other is not session and other.name == session.name
        ]

    def port_unavailable(self, port: int, *, udp: bool = False) -> None:
        """The port could not be bound: it goes back to the allocator."""
        self._books(udp).allocator.release(port)

    def port_granted(
        self, session: S, port: int, request: ProxymeRequest, *, udp: bool = False
    ) -> None:
        """The port's listener is bound and the grant is on its way to the client."""
        session.held(udp=udp)[port] = request
        if not udp:
            self._update_record_ports(session)

    def port_released(self, session: S, port: int, now: float, *, udp: bool = False) -> bool:
        """The port's listener is closed: free the port, remember it for the name.

        False if it was never granted (denied before the grant went out)."""
        books = self._books(udp)
        if books.allocator.is_allocated(port):
            books.allocator.release(port)
        request = session.held(udp=udp).pop(port, None)
        if (
            session.closed
            and not session.ports
            and not session.udp_ports
            and session in self._closing
        ):
            self._closing.remove(session)
        if request is None:
            return False
        books.sticky.handle_timer(now)
        books.sticky.remember(_sticky_key(session, request), port, now)
        if not udp:
            self._update_record_ports(session)
        return True

    def _update_record_ports(self, session: S) -> None:
        record = self.registry.get(session.tunnel_id)
        if record is not None:
            self.registry.update(record.with_ports(tuple(sorted(session.ports))))

    # Status and shutdown ------------------------------------------------------

    def status(self, session: S) -> TunnelStatus:
        session.prune_streams()
        return TunnelStatus(
            tunnel_id=session.tunnel_id,
            name=session.label,
            peer=session.peer,
            scheme=session.scheme,
            ports=tuple(sorted(session.ports)),
            connected_at=session.connected_at,
            open_streams=len(session.streams),
            bytes_in=session.done_bytes_in + sum(s.bytes_received for s in session.streams),
            bytes_out=session.done_bytes_out + sum(s.bytes_sent for s in session.streams),
            names=self.names.services_of(session),
            udp_ports=tuple(sorted(session.udp_ports)),
        )

    def statuses(self) -> list[TunnelStatus]:
        """The authenticated tunnels, oldest first."""
        return [
            self.status(self._by_id[record.tunnel_id])
            for record in self.registry
            if record.tunnel_id in self._by_id
        ]

    def finish(self, reason: str) -> frozenset[int]:
        """After the binding has stopped everything: drop what is left.

        Returns the ports that were still allocated (a bug in the binding: every
        lease frees its port as it unwinds); they are released."""
        for record in self.registry:
            self.registry.deregister(record.tunnel_id, reason)
        self._sessions.clear()
        self._by_id.clear()
        self._closing.clear()
        self.accepting = False
        leftover = self._allocator.allocated
        for port in leftover:
            self._allocator.release(port)
        if self._udp is not None:
            for port in self._udp.allocator.allocated:
                self._udp.allocator.release(port)
        return leftover
