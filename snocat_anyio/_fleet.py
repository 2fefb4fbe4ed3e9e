"""An aggregator node of a fleet: one registry on Valkey/Redis, any node serves any tunnel.

:class:`FleetServer` is a :class:`~snocat_anyio.TunnelServer` whose registry is shared:
it claims names and public ports in the store, renews its claims, follows the fleet's
event stream, listens on the ports the other nodes hold, and relays a visitor who
arrives there to the node that holds the tunnel, over a node-to-node QUIC link (ALPN
``snocat-fleet-1``, :mod:`snocat_proto._wire.fleet_auth`).  UDP ports (``--udp-ports``)
are claimed and followed the same way, apart from the TCP ones; a visitor address on
a UDP port held elsewhere is a stream of the link carrying its datagrams
(:mod:`snocat_proto._wire.fleet_udp`).  The key layout, the scripts, the records, the
conflict rules and what a node makes of each change are the core's
(:mod:`snocat_proto._service.fleet`); this module runs them.

The store is reached through ``coredis`` (built on anyio: asyncio and trio alike).  It
may be away: at start the node says so in one line and keeps trying; while running,
existing tunnels and streams go on, new claims wait for it, and the node's claims are
set again when it is back (a restarted store is rebuilt from what the nodes hold).
Meanwhile the node reports itself degraded.  The blocking binding stays single-node.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.abc
import coredis
import coredis.exceptions
from coredis.tokens import PureToken

from snocat_proto._service import activity, notices
from snocat_proto._service.aggregator import PortRefusal, TunnelStatus
from snocat_proto._service.backoff import Backoff
from snocat_proto._service.config import FleetConfig, ServerConfig
from snocat_proto._service.fleet import (
    CLAIM_NAME,
    CLAIM_PORT,
    EVENTS_KEPT,
    NODE_LEFT,
    RELEASE,
    RENEW,
    UPDATE,
    EventKind,
    FleetEvent,
    FleetKeys,
    FleetView,
    NameClaim,
    NodeRecord,
    PortClaim,
    Stored,
    ViewChange,
    renew_interval,
)
from snocat_proto._service.ports import PortRange
from snocat_proto._service.visitors import Failure, Forward, ListenerKind
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import NONCE_SIZE, Authenticator
from snocat_proto._wire.certificates import load_identity
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.endpoint import ClientEndpoint
from snocat_proto._wire.engine import ALPN, quic_configuration
from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.events import AuthenticationCompleted, ConnectionTerminated, TunnelEvent
from snocat_proto._wire.features import VISITOR_ADDRESS
from snocat_proto._wire.fleet_auth import FLEET_ALPN, SCHEME_FLEET, FleetConnector, FleetListener
from snocat_proto._wire.fleet_udp import (
    MAX_RELAYED_DATAGRAM,
    RelayedDatagrams,
    UdpRelayRequest,
    encode_relayed_datagram,
)
from snocat_proto._wire.network import NetworkAddress, format_host_port, parse_host_port
from snocat_proto._wire.proxy_protocol import ProxyAddresses
from snocat_proto._wire.proxyme import ProxymeRequest
from snocat_proto._wire.targets import TargetKind
from snocat_proto._wire.tunnel import TunnelConnection, TunnelState
from snocat_proto._wire.udp_flows import UdpTarget
from snocat_proto._wire.visitor import split_visitor, with_visitor

from ._backend import (
    BROKEN_OR_REFUSED,
    Connection,
    Listener,
    TaskSet,
    UdpSockets,
    accepted,
    connect_name,
    current_time,
    relay,
    shield,
)
from ._bind import bind_port
from ._errors import StreamRefusedError, TunnelClosedError
from ._host import TunnelHost
from ._server import RouteHandler, Router, TunnelServer
from ._server_flows import _Lease, _Session
from ._server_udp import UdpFlow
from ._stream import TunnelStream
from ._udp import bind_udp, send_one

__all__ = ["FleetServer", "StoreUnavailable"]

logger = logging.getLogger("snocat.fleet")
T = TypeVar("T")

#: The route addresses of relay streams on a node link (docs/protocol.md 3.16): a
#: visitor of a public port, /fleet/relay/PORT/FENCE, and of a name on a shared
#: listener, /fleet/name/NAME/SERVICE; either followed by the visitor's address (3.18).
RELAY = ("fleet", "relay")
BY_NAME = ("fleet", "name")
#: How long a claim waits for an unreachable store before it is refused (the client
#: asks again), and how long making a node link may take.
STORE_WAIT = 10.0
LINK_TIMEOUT = 5.0
#: The view is rebuilt from the keys this often (a dead node's claims lapse without
#: an event), in leases.
REBUILD_EVERY = 1.0
#: What a relayed UDP flow's stream raises once it cannot carry datagrams any more.
RELAY_ENDED: tuple[type[BaseException], ...] = (*BROKEN_OR_REFUSED, LocalProtocolError)


class StoreUnavailable(Exception):
    """The store did not answer (it is down, restarting, or unreachable)."""


def redacted(url: str) -> str:
    """The registry URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user + ':***@' if user else '***@'}{host}"


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _entry_id(text: str) -> tuple[int, int]:
    """A stream entry id (``MS-SEQ``) as a pair that orders as the store does."""
    ms, _, seq = text.partition("-")
    return int(ms or 0), int(seq or 0)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _describe(exc: BaseException) -> str:
    leaf = _leaf(exc)
    return str(leaf) or type(leaf).__name__


# The store --------------------------------------------------------------------------


class FleetStore:
    """The fleet's keys and events on Valkey/Redis: each method runs one of the core's
    operations (one round trip unless it says otherwise)."""

    def __init__(self, fleet: FleetConfig, on_health: Callable[[bool, str], None]) -> None:
        self.keys = FleetKeys(fleet.prefix)
        self.node = fleet.node
        self._fleet = fleet
        self._lease_ms = max(1, round(fleet.lease * 1000))
        self._on_health = on_health
        self._client: coredis.Redis[bytes] | None = None
        self.healthy = False
        self.reason = "not connected yet"
        # anyio primitives need a running event loop: prepare() makes them.
        self._changed: anyio.Event
        self._broken: anyio.Event
        #: Operations made, by kind: one round trip each, except a scan (a few per 500
        #: keys).  The benchmark's "round trips per new tunnel" figure.
        self.round_trips: collections.Counter[str] = collections.Counter()

    def prepare(self) -> None:
        """(In the event loop, before anything else)"""
        self._changed = anyio.Event()
        self._broken = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a client to the store and watch its health; never returns.  Reports
        itself started after the first attempt, whether it reached the store or not."""
        backoff = Backoff(0.5, 10.0)
        started = False
        while True:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                self._fleet.registry_url,
                password=self._fleet.registry_password,
                decode_responses=False,
                connect_timeout=2.0,
                stream_timeout=5.0,
            )
            try:
                async with client:
                    self._client = client
                    while True:
                        try:
                            await client.ping()
                        except (coredis.exceptions.RedisError, TimeoutError, OSError) as exc:
                            self._set_health(False, _describe(exc))
                        else:
                            self._set_health(True, "")
                            backoff.reset()
                        if not started:
                            started = True
                            task_status.started()
                        if self.healthy:
                            self._broken = anyio.Event()
                            await self._broken.wait()
                        else:
                            await self._pause(backoff.next_delay())
            except Exception as exc:  # a failed connect comes as an exception group
                self._client = None
                self._set_health(False, _describe(exc))
            if not started:
                started = True
                task_status.started()
            await self._pause(backoff.next_delay())

    async def _pause(self, delay: float) -> None:
        logger.warning(
            "the registry %s is unreachable (%s); trying again in %.1f s",
            redacted(self._fleet.registry_url),
            self.reason,
            delay,
        )
        await anyio.sleep(delay)

    def _set_health(self, healthy: bool, reason: str) -> None:
        self.reason = reason
        if healthy != self.healthy:
            self.healthy = healthy
            self._on_health(healthy, reason)
            self._changed.set()
            self._changed = anyio.Event()
        if not healthy:
            self._broken.set()

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the store to be reachable."""
        with anyio.move_on_after(max(0.0, timeout)):
            while not self.healthy:
                await self._changed.wait()
        return self.healthy

    async def call(self, what: str, operation: Callable[[coredis.Redis[bytes]], Awaitable[T]]) -> T:
        """Run ``operation`` (named ``what``) on the store; :class:`StoreUnavailable` if
        it cannot."""
        client = self._client
        if client is None or not self.healthy:
            raise StoreUnavailable(self.reason)
        self.round_trips[what] += 1
        try:
            return await operation(client)
        except (coredis.exceptions.ConnectionError, TimeoutError, OSError) as exc:
            self._set_health(False, _describe(exc))
            raise StoreUnavailable(self.reason) from None

    async def _eval(self, what: str, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self.call(what, lambda client: client.eval(script, keys=keys, args=args))

    # The operations ----------------------------------------------------------------

    async def claim_port(
        self, claim: PortClaim, *, take_over: bool = True
    ) -> tuple[Stored | None, PortClaim | None]:
        """Claim ``claim.port``: ``(stored, None)`` if it is ours now, else ``(None,
        holder)`` (None if the holder's value is not a snocat claim).  ``take_over``:
        a holder of the same name and target gives way (not so in a pool)."""
        keys = self.keys
        won, detail = await self._eval(
            "claim_port",
            CLAIM_PORT,
            [keys.port(claim.port, claim.protocol), keys.fence, keys.events],
            [
                claim.encode(),
                self._lease_ms,
                claim.name,
                claim.target,
                self.node,
                EVENTS_KEPT,
                EventKind.PORT_CLAIMED.value,
                "1" if take_over else "0",
            ],
        )
        if won:
            return Stored(int(detail), claim.encode()), None
        with contextlib.suppress(LocalProtocolError):
            return None, PortClaim.decode(Stored.parse(detail).body)
        return None, None

    async def claim_name(self, record: NameClaim) -> tuple[Stored, NameClaim | None]:
        """Take ``record.name`` (the newest tunnel wins); the previous holder's record."""
        keys = self.keys
        key = keys.of_tunnel(record)
        fence, previous = await self._eval(
            "claim_name",
            CLAIM_NAME,
            [key, keys.fence, keys.events],
            [
                record.encode(),
                self._lease_ms,
                self.node,
                EVENTS_KEPT,
                EventKind.TUNNEL_REGISTERED.value,
            ],
        )
        held = None
        if previous:
            with contextlib.suppress(LocalProtocolError):
                held = NameClaim.decode(Stored.parse(previous).body)
        return Stored(int(fence), record.encode()), held

    async def update(self, key: str, old: Stored, new: Stored, kind: EventKind) -> bool:
        """Change a claim's record (same fence, same lease) if it is still ours."""
        changed = await self._eval(
            "update",
            UPDATE,
            [key, self.keys.fence, self.keys.events],
            [old.value, new.value, self.node, EVENTS_KEPT, kind.value, self._lease_ms, old.fence],
        )
        return bool(changed)

    async def renew(self, held: list[tuple[str, Stored]]) -> list[int]:
        """Renew ``(key, stored)`` claims; the indexes (0-based) of those taken."""
        if not held:
            return []
        lost = await self._eval(
            "renew",
            RENEW,
            [self.keys.fence, *(key for key, _ in held)],
            [self._lease_ms, *(stored.value for _, stored in held), max(s.fence for _, s in held)],
        )
        return [int(index) - 1 for index in lost]

    async def release(self, key: str, stored: Stored, kind: EventKind) -> bool:
        released = await self._eval(
            "release",
            RELEASE,
            [key, self.keys.events],
            [stored.value, self.node, EVENTS_KEPT, kind.value],
        )
        return bool(released)

    async def put_node(self, record: NodeRecord, *, announce: bool) -> None:
        keys = self.keys

        async def run(client: coredis.Redis[bytes]) -> None:
            await client.set(keys.node(record.node), record.encode(), px=self._lease_ms)
            if announce:
                await client.xadd(
                    keys.events,
                    {
                        b"kind": EventKind.NODE_JOINED.value,
                        b"node": record.node,
                        b"body": record.encode(),
                    },
                    trim_strategy=PureToken.MAXLEN,
                    threshold=EVENTS_KEPT,
                    trim_operator=PureToken.APPROXIMATELY,
                )

        await self.call("put_node", run)

    async def drop_node(self, record: NodeRecord) -> None:
        """This node leaves: its key goes, and the fleet is told."""
        keys = self.keys
        await self.call("drop_node", lambda client: client.delete([keys.node(record.node)]))
        await self.node_left(record)

    async def node_left(self, record: NodeRecord) -> None:
        """Say (once across the fleet) that ``record`` 's node has left."""
        keys = self.keys
        await self._eval(
            "node_left",
            NODE_LEFT,
            [keys.node(record.node), keys.gone(record.node, record.started), keys.events],
            [
                record.node,
                record.encode(),
                self._lease_ms * 6,
                EVENTS_KEPT,
                EventKind.NODE_LEFT.value,
            ],
        )

    async def sticky(self, name: str, target: str, protocol: str = "tcp") -> int | None:
        key = self.keys.sticky(name, target, protocol)
        value = await self.call("sticky", lambda client: client.get(key))
        return int(value) if value is not None and value.isdigit() else None

    async def remember(
        self, name: str, target: str, port: int, seconds: float, protocol: str = "tcp"
    ) -> None:
        key = self.keys.sticky(name, target, protocol)
        ms = max(1, round(seconds * 1000))
        await self.call("remember", lambda client: client.set(key, str(port).encode(), px=ms))

    async def snapshot(
        self,
    ) -> tuple[list[NodeRecord], dict[str, dict[int, Stored]], dict[str, Stored]]:
        """Every node record, port claim (by protocol) and tunnel record in the store
        (a few round trips per 500 keys)."""
        keys = self.keys
        nodes = []
        for value in (await self._scan(keys.node_pattern)).values():
            with contextlib.suppress(LocalProtocolError):
                nodes.append(NodeRecord.decode(value))
        ports: dict[str, dict[int, Stored]] = {}
        for protocol in ("tcp", "udp"):
            claims = ports[protocol] = {}
            prefix = keys.port(0, protocol)[:-1]
            for key, value in (await self._scan(keys.port_pattern_of(protocol))).items():
                with contextlib.suppress(LocalProtocolError, ValueError):
                    claims[int(key.removeprefix(prefix))] = Stored.parse(value)
        tunnels: dict[str, Stored] = {}
        prefix = keys.name("")
        for key, value in (await self._scan(keys.name_pattern)).items():
            with contextlib.suppress(LocalProtocolError):
                tunnels[key.removeprefix(prefix)] = Stored.parse(value)
        prefix = keys.pool_member("", "")[:-1]
        for key, value in (await self._scan(keys.pool_pattern)).items():
            name, _, tunnel_id = key.removeprefix(prefix).rpartition(":")
            with contextlib.suppress(LocalProtocolError):
                tunnels[f"{name}@{tunnel_id}"] = Stored.parse(value)
        return nodes, ports, tunnels

    async def _scan(self, pattern: str) -> dict[str, bytes]:
        async def run(client: coredis.Redis[bytes]) -> dict[str, bytes]:
            names = [key async for key in client.scan_iter(match=pattern, count=500)]
            found: dict[str, bytes] = {}
            for start in range(0, len(names), 500):
                batch = names[start : start + 500]
                for key, value in zip(batch, await client.mget(batch), strict=True):
                    if value is not None:
                        found[key.decode("utf-8", "replace")] = value
            return found

        return await self.call("scan", run)

    async def last_event_id(self) -> str:
        entries = await self.call(
            "last_event", lambda client: client.xrevrange(self.keys.events, count=1)
        )
        return _text(entries[0].identifier) if entries else "0-0"

    async def has_events_after(self, last_id: str) -> bool:
        """Whether the stream still holds everything after ``last_id`` (its oldest
        entry is ``last_id`` or older, or it is empty and was never trimmed past it)."""

        async def run(client: coredis.Redis[bytes]) -> Any:
            return await client.xrange(self.keys.events, count=1)

        entries = await self.call("first_event", run)
        if not entries:
            return last_id == "0-0"
        return _entry_id(_text(entries[0].identifier)) <= _entry_id(last_id)

    async def events_after(self, last_id: str, block: float) -> tuple[str, list[FleetEvent]]:
        """The entries after ``last_id`` (waiting up to ``block`` seconds for one): the
        last id read, and the events this version reads."""
        key = self.keys.events

        async def run(client: coredis.Redis[bytes]) -> Any:
            return await client.xread(
                {key: last_id.encode()}, count=500, block=max(1, round(block * 1000))
            )

        found = await self.call("events", run)
        events: list[FleetEvent] = []
        for entry in (found or {}).get(key.encode(), ()):
            last_id = _text(entry.identifier)
            event = FleetEvent.decode(last_id, entry.field_values)
            if event is not None:
                events.append(event)
        return last_id, events


# Node links -----------------------------------------------------------------------


class FleetLink:
    """This node's QUIC link to another node, made on first use and again after a loss."""

    def __init__(self, server: FleetServer, record: NodeRecord) -> None:
        self.record = record
        self._server = server
        self._tunnel: TunnelConnection | None = None
        self._host: TunnelHost | None = None
        self._sock: socket.socket | None = None
        self._ready = anyio.Event()
        self._lock = anyio.Lock()

    @property
    def up(self) -> bool:
        return self._tunnel is not None and self._tunnel.state is TunnelState.AUTHENTICATED

    async def open_stream(self, address: RouteAddress) -> TunnelStream:
        async with self._lock:
            if not self.up:
                await self._connect()
        assert self._host is not None and self._tunnel is not None
        return await self._host.open_stream(self._tunnel, address, LINK_TIMEOUT)

    async def _connect(self) -> None:
        self.close()
        server = self._server
        host, port = parse_host_port(self.record.advertise)
        configuration = quic_configuration(
            is_client=True,
            limits=server.config.limits,
            server_name=host,
            idle_timeout=server.config.idle_timeout,
            alpn_protocols=(FLEET_ALPN,),
        )
        # The fleet proof binds the link to the certificate the peer shows: no CA.
        configuration.verify_mode = ssl.CERT_NONE
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, *_, sockaddr = infos[0]
        sock = bind_udp("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
        self._sock = sock
        sock.connect(sockaddr[:2])
        self._ready = anyio.Event()
        tunnel = TunnelConnection.connect(
            configuration,
            address=sock.getpeername(),
            authenticator=FleetConnector(
                os.urandom(NONCE_SIZE),
                secret=server.fleet.secret,
                node=server.fleet.node,
                limits=server.config.limits,
            ),
            limits=server.config.limits,
            now=current_time(),
        )
        self._tunnel = tunnel
        self._host = TunnelHost(
            ClientEndpoint(tunnel),
            sock,
            self._on_event,
            limits=server.config.limits,
            name=f"snocat-link-{self.record.node}",
        )
        server.spawn_task(self._pump, self._host, sock, name=f"link-{self.record.node}")
        with anyio.move_on_after(LINK_TIMEOUT):
            await self._ready.wait()
        if not self.up:
            self.close()
            raise OSError(f"no link to node {self.record.node} at {self.record.advertise}")
        logger.info("linked up to node %s at %s", self.record.node, self.record.advertise)

    def _on_event(
        self, tunnel: TunnelConnection, event: TunnelEvent, stream: TunnelStream | None
    ) -> None:
        if isinstance(event, AuthenticationCompleted | ConnectionTerminated):
            self._ready.set()
            if isinstance(event, ConnectionTerminated):
                logger.info("link to node %s closed: %s", self.record.node, event.reason)
        elif stream is not None and self._host is not None:
            self._host.refuse(stream)  # a link carries this node's streams only

    @staticmethod
    async def _pump(host: TunnelHost, sock: socket.socket) -> None:
        """Run the link's pump until :meth:`close` stops it, then close its socket
        (never while the pump may still wait on it)."""
        try:
            async with anyio.create_task_group() as group:
                host.start(group)
        finally:
            sock.close()

    def close(self) -> None:
        """Say goodbye and stop the pump (which then closes the socket)."""
        if self._tunnel is not None and self._host is not None:
            if self._tunnel.state is not TunnelState.CLOSED:
                self._tunnel.close(CloseCode.NORMAL, "link closed")
                self._host.flush(self._tunnel)
            self._host.stop()
        self._tunnel = self._host = self._sock = None


# The node -------------------------------------------------------------------------


class _RegistryHealth:
    """The store's health as /metrics reports it (``snocat_registry_up{registry}``)."""

    kind = "redis"

    def __init__(self, store: FleetStore) -> None:
        self._store = store

    def healthy(self) -> bool:
        return self._store.healthy


@dataclass(eq=False)
class _Held:
    """A claim this node holds, for one tunnel: its key and stored value."""

    key: str
    stored: Stored
    session: _Session


#: A port's claim in the embedded books (``ServerCore._claim_port``,
#: ``ServerUdp._claim_udp_port``) ...
_LocalClaim = Callable[
    [_Session, ProxymeRequest, int | None, set[int]], Awaitable[int | PortRefusal]
]
#: ... and its release (``_release_port``, ``_release_udp_port``).
_LocalRelease = Callable[[_Session, int], Awaitable[bool]]


@dataclass(eq=False, kw_only=True)
class _PortBook:
    """One protocol's public ports across the fleet, TCP or UDP: the claims this node
    holds, its view of every node's, and what tells the two apart (the key and the
    sticky namespace, which follow :attr:`protocol`; the range; how a refusal names
    them).  Claiming, giving back and releasing are written once, over a book
    (:meth:`FleetServer._claim_in_store`)."""

    #: The view of this protocol's claims (the TCP one also follows nodes and tunnels).
    view: FleetView
    port_range: PortRange | None
    #: How a refusal names a port ("port", "UDP port") and the range ("range", "UDP range").
    noun: str
    range_noun: str
    #: The target of a ``proxyme`` request, as a claim records it.
    target: Callable[[ProxymeRequest], str]
    #: Applies a change of :attr:`view`: claims lost, ports to relay for others or not.
    apply: Callable[[ViewChange], Awaitable[None]]
    #: The port is this node's now: stop relaying it to another node.
    take_home: Callable[[int], Awaitable[None]]
    #: The embedded books' claim and release, which the fleet's wrap.
    claim_here: _LocalClaim
    release_here: _LocalRelease
    #: This node's claims, by port.
    held: dict[int, _Held] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        """``"tcp"`` or ``"udp"``: the claims' key prefix and sticky namespace."""
        return self.view.protocol


@dataclass(eq=False)
class _Registration:
    """One registered tunnel's record in the store, kept in step by one task."""

    session: _Session
    since: float
    changed: anyio.Event = field(default_factory=anyio.Event)
    held: _Held | None = None
    #: Another node took the name: the tunnel is closing, the record is not ours.
    lost: bool = False


class _RelayedFlow:
    """(At a node that does not hold the UDP port) One visitor address, relayed to the
    holder on a stream of the node link (docs/protocol.md 3.16.1)."""

    def __init__(
        self, key: tuple[int, NetworkAddress], sock: socket.socket, claim: PortClaim
    ) -> None:
        self.key = key
        self.sock = sock
        self.addr: NetworkAddress = key[1]
        self.claim = claim
        #: What the visitor sent while the stream was being opened (bounded).
        self.queue: list[bytes] = []
        self.stream: TunnelStream | None = None
        self.active = current_time()
        self.scope = anyio.CancelScope()
        self.drops: dict[str, int] = {}

    def count(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


class _RelayedUdpPort:
    """A UDP port another node holds, open here: its sockets and relayed visitors."""

    def __init__(self, port: int, sockets: UdpSockets) -> None:
        self.port = port
        self.sockets = sockets
        self.flows: dict[tuple[int, NetworkAddress], _RelayedFlow] = {}
        #: Datagrams dropped outside any flow (over the link's flow limit), by holder.
        self.drops: dict[str, int] = {}
        self.stopped = False


class FleetServer(TunnelServer):
    """An aggregator node of a fleet; see the module docstring.

    ``route`` sees the streams tunnel clients open, as with :class:`TunnelServer`;
    the fleet's own relay streams never reach it."""

    serves_fleet = True

    def __init__(
        self,
        config: ServerConfig,
        *,
        authenticate: Callable[[str], Awaitable[bytes | None]] | None = None,
        route: Router | None = None,
    ) -> None:
        if config.fleet is None:
            raise ValueError("a FleetServer needs ServerConfig.fleet")
        super().__init__(config, authenticate=authenticate, route=self._route_fleet)
        self.fleet = config.fleet
        self._user_route = route
        self._store = FleetStore(self.fleet, self._health_changed)
        self._registrations: dict[str, _Registration] = {}  # by tunnel id
        self._remote: dict[int, Listener] = {}
        self._closing: dict[int, anyio.Event] = {}
        #: The UDP ports this node relays for other nodes (with how many relayed flows
        #: each node's link carries).
        self._udp_remote: dict[int, _RelayedUdpPort] = {}
        self._udp_closing: dict[int, _RelayedUdpPort] = {}
        self._udp_relayed: collections.Counter[str] = collections.Counter()
        self._links: dict[str, FleetLink] = {}
        #: Visitors waiting for a relay stream, by port (see :meth:`_port_moved`).
        self._relaying: dict[int, set[anyio.CancelScope]] = {}
        self._tasks: TaskSet | None = None
        self._started_at = time.time()
        #: Pause detection: when the watch last ran, and since when the node has
        #: been suspect (it was paused: its claims may be another node's now) until
        #: a renewal that started after it.
        self._tick_at = 0.0
        self._announced = False
        self._leaving = False
        self._suspect_since: float | None = None
        #: Until when a rebuild keeps what the store lacks (it restarted empty, and the
        #: live nodes set their claims again within a renewal).
        self._keep_missing_until = -float("inf")
        # anyio primitives need a running event loop: _begin() makes them.
        self._renew_now: anyio.Event
        #: Renewals, releases and updates of this node's claims, one at a time.
        self._claims_lock: anyio.Lock
        #: The public ports, one book per protocol (this node's claims, the view).
        self._tcp = _PortBook(
            view=FleetView(self._record(), self._store.keys),
            port_range=config.port_range,
            noun="port",
            range_noun="range",
            target=lambda request: str(request.target()),
            apply=self._apply_change,
            take_home=self._take_tcp_home,
            claim_here=super()._claim_port,
            release_here=super()._release_port,
        )
        self._udp = _PortBook(
            view=FleetView(self._record(), self._store.keys, protocol="udp"),
            port_range=config.udp_port_range,
            noun="UDP port",
            range_noun="UDP range",
            target=lambda request: str(UdpTarget(TargetKind.DNS, request.host, request.port)),
            apply=self._apply_udp_change,
            take_home=self._stop_udp_relay,
            claim_here=super()._claim_udp_port,
            release_here=super()._release_udp_port,
        )
        self._port_books = (self._tcp, self._udp)
        #: The fleet as this node sees it: its nodes and tunnels, and the TCP ports.
        self._view = self._tcp.view
        certificate, _ = load_identity(config.certificate_pem, config.private_key_pem)
        self._certificate = certificate[0]

    # Public API ---------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Whether the registry is unreachable (tunnels go on; new claims wait)."""
        return not self._store.healthy

    @property
    def registry_health(self) -> _RegistryHealth:
        """For ``snocat_registry_up`` on /metrics."""
        return _RegistryHealth(self._store)

    @property
    def store_operations(self) -> collections.Counter[str]:
        """The store operations made so far, by kind (see :class:`FleetStore`)."""
        return collections.Counter(self._store.round_trips)

    def nodes(self) -> list[NodeRecord]:
        """The nodes of the fleet this node knows of (itself included), by name."""
        return sorted(self._view.nodes.values(), key=lambda record: record.node)

    def fleet_summary(self) -> str:
        """One line on the fleet for the live table: its nodes, its tunnels, the store."""
        nodes = [f"{r.node} (this)" if r.node == self.fleet.node else r.node for r in self.nodes()]
        store = (
            "registry reachable"
            if self._store.healthy
            else f"registry unreachable ({self._store.reason}): degraded, tunnels go on"
        )
        count = len(self._view.tunnels)
        tunnels = f"{count} tunnel{'s' if count != 1 else ''} in the fleet"
        return f"fleet: {', '.join(nodes)}; {tunnels}; {store}"

    def fleet_tunnels(self) -> list[NameClaim]:
        """Every tunnel registered in the fleet, as this node last saw them."""
        return sorted((r for _, r in self._view.tunnels.values()), key=lambda r: r.since)

    # Lifecycle ------------------------------------------------------------------

    def _open(self) -> None:
        super()._open()
        me = self._record()
        for book in self._port_books:
            book.view.me = me

    def _begin(self, group: Any) -> None:
        super()._begin(group)
        self._renew_now = anyio.Event()
        self._claims_lock = anyio.Lock()
        self._tick_at = current_time()
        self._store.prepare()
        tasks = self._tasks = TaskSet(group, logger, f"node {self.fleet.node}")
        tasks.spawn(self._store.run, name="store")
        tasks.spawn(self._keep_claims, name="renew")
        tasks.spawn(self._follow_events, name="events")
        tasks.spawn(self._watch_pauses, name="pauses")

    async def _wind_down(self, grace: float) -> None:
        for port in list(self._remote):
            await self._stop_listening(port)
        for port in list(self._udp_remote):
            await self._stop_udp_relay(port)
        await super()._wind_down(grace)
        with shield(), anyio.move_on_after(2.0):
            await self._leave()
        if self._tasks is not None:
            self._tasks.cancel()
        for link in list(self._links.values()):
            link.close()

    async def _leave(self) -> None:
        """Give back what is still held (normally released as tunnels closed), and
        tell the fleet this node left."""
        with contextlib.suppress(StoreUnavailable):
            for held in self._held_ports():
                await self._release_claim(held.key, held.stored, EventKind.PORT_RELEASED)
            for registration in list(self._registrations.values()):
                if registration.held is not None:
                    held = registration.held
                    await self._release_claim(held.key, held.stored, EventKind.TUNNEL_DEREGISTERED)
            async with self._claims_lock:
                self._leaving = True
                await self._store.drop_node(self._view.me)
        self._leaving = True
        for book in self._port_books:
            book.held.clear()
        self._registrations.clear()

    def _health_changed(self, healthy: bool, reason: str) -> None:
        node = self.fleet.node
        if healthy:
            logger.info("the registry is reachable: node %s serves the fleet", node)
            # It may have come back empty (restarted): live nodes set their claims again
            # within a renewal, so until then a rebuild keeps what the keys lack.
            self._keep_missing_until = current_time() + self.fleet.lease
            self.activity.publish(activity.FleetRecovered(at=time.time(), node=node))
        else:
            logger.warning("the registry is unreachable (%s): node %s is degraded", reason, node)
            self.activity.publish(activity.FleetDegraded(at=time.time(), node=node, reason=reason))

    def _record(self) -> NodeRecord:
        host, port = self.fleet.advertise
        return NodeRecord(
            node=self.fleet.node,
            advertise=format_host_port(host, port),
            tcp=self.config.tcp_bind,
            group=self.fleet.group,
            started=self._started_at,
        )

    # Authentication: node links beside tunnels -------------------------------------

    def _new_authenticator(self, peer_name: str) -> Authenticator:
        return {  # type: ignore[return-value]  # TunnelConnection picks one by ALPN
            ALPN: super()._new_authenticator(peer_name),
            FLEET_ALPN: FleetListener(
                os.urandom(NONCE_SIZE),
                secret=self.fleet.secret,
                node=self.fleet.node,
                certificate=self._certificate,
                limits=self.config.limits,
            ),
        }

    def _link_up(self, session: _Session) -> None:
        logger.info("node %s linked up from %s", session.name, session.peer)

    # Tunnels: their records ---------------------------------------------------------

    def _registered(self, session: _Session) -> None:
        registration = _Registration(session, time.time())
        self._registrations[session.tunnel_id] = registration
        self.spawn_task(self._keep_record, registration, name="record")

    def _deregistered(self, session: _Session) -> None:
        registration = self._registrations.get(session.tunnel_id)
        if registration is not None:
            registration.changed.set()  # its task releases the record and ends

    def _tunnel_record(self, registration: _Registration) -> NameClaim:
        session = registration.session
        assert session.name is not None
        return NameClaim(
            name=session.name,
            node=self.fleet.node,
            tunnel_id=session.tunnel_id,
            scheme=session.scheme,
            since=registration.since,
            ports=tuple(sorted(session.ports)),
            services=self._books.names.services_of(session),
            pool=self._books.names.is_pool(session.name),
        )

    def _publications_changed(self, session: _Session) -> None:
        self._record_changed(session)

    async def _keep_record(self, registration: _Registration) -> None:
        """Claim the tunnel's name, keep its record's ports up to date, and release
        it when the tunnel closes (waiting for the store meanwhile)."""
        session = registration.session
        try:
            while not session.closed and not registration.lost:
                registration.changed = anyio.Event()
                record = self._tunnel_record(registration)
                if not await self._store.wait_healthy(STORE_WAIT):
                    continue
                try:
                    await self._sync_record(registration, record)
                except StoreUnavailable:
                    continue
                await registration.changed.wait()
        finally:
            self._registrations.pop(session.tunnel_id, None)
            held = registration.held
            if held is not None:
                self._view.drop(held.key)
                with shield(), contextlib.suppress(StoreUnavailable):
                    await self._release_claim(held.key, held.stored, EventKind.TUNNEL_DEREGISTERED)

    async def _sync_record(self, registration: _Registration, record: NameClaim) -> None:
        held = registration.held
        if held is None:
            stored, previous = await self._store.claim_name(record)
            key = self._store.keys.of_tunnel(record)
            registration.held = _Held(key, stored, registration.session)
            self._view.hold(key, stored.fence)
            if previous is not None and previous.node != self.fleet.node:
                logger.info(
                    "tunnel %s (%s) took its name over from node %s",
                    record.tunnel_id,
                    record.name,
                    previous.node,
                )
        elif held.stored.body != record.encode():
            new = Stored(held.stored.fence, record.encode())
            if await self._update_claim(held.key, held.stored, new):
                held.stored = new
            else:
                self._lost(held)

    # Ports, TCP and UDP: atomic claims across the fleet --------------------------------

    async def _claim_port(
        self, session: _Session, request: ProxymeRequest, wanted: int | None, refused: set[int]
    ) -> int | PortRefusal:
        return await self._claim_in_fleet(self._tcp, session, request, wanted, refused)

    async def _claim_udp_port(
        self, session: _Session, request: ProxymeRequest, wanted: int | None, refused: set[int]
    ) -> int | PortRefusal:
        return await self._claim_in_fleet(self._udp, session, request, wanted, refused)

    async def _claim_in_fleet(
        self,
        book: _PortBook,
        session: _Session,
        request: ProxymeRequest,
        wanted: int | None,
        refused: set[int],
    ) -> int | PortRefusal:
        """A port of ``book`` claimed in the store once it answers, again after each
        StoreUnavailable, for at most STORE_WAIT; refused if the store stays away or
        the tunnel closes."""
        port_range = book.port_range
        assert port_range is not None  # a UDP request is served only with a range
        if wanted is not None and wanted not in port_range:
            return PortRefusal(
                f"{book.noun} {wanted} is outside this aggregator's {book.range_noun} {port_range}",
                False,
            )
        deadline = current_time() + STORE_WAIT
        while not session.closed:
            if not await self._store.wait_healthy(deadline - current_time()):
                return PortRefusal("the fleet's registry is unreachable; ask again later", True)
            try:
                return await self._claim_in_store(
                    book, port_range, session, request, wanted, refused
                )
            except StoreUnavailable:
                continue  # wait for the store, then claim again
        return PortRefusal("the tunnel closed", True)

    async def _claim_in_store(
        self,
        book: _PortBook,
        port_range: PortRange,
        session: _Session,
        request: ProxymeRequest,
        wanted: int | None,
        refused: set[int],
    ) -> int | PortRefusal:
        name, target = session.label, book.target(request)
        if wanted is not None:
            candidates = [wanted]
        else:
            sticky = await self._store.sticky(name, target, book.protocol)
            candidates = book.view.port_candidates(name, target, sticky, port_range, refused)
        for port in candidates:
            claim = PortClaim(
                port=port,
                node=self.fleet.node,
                tunnel_id=session.tunnel_id,
                name=name,
                target=target,
                protocol=book.protocol,
            )
            pool = self._books.names.is_pool(session.name)
            stored, holder = await self._store.claim_port(claim, take_over=not pool)
            if stored is None:
                if wanted is not None:
                    where = f" on node {holder.node}" if holder is not None else ""
                    return PortRefusal(
                        f"{book.noun} {port} is in use by another tunnel{where}", True
                    )
                continue
            # Ours now: our own listener or sockets serve it, so stop relaying it elsewhere.
            book.held[port] = _Held(self._store.keys.port(port, book.protocol), stored, session)
            await book.apply(book.view.claimed_port(stored.fence, claim))
            await book.take_home(port)
            # The embedded books keep the local truth (and the one-name rule).
            local = await book.claim_here(session, request, port, refused)
            if isinstance(local, PortRefusal):
                await self._give_back(book, session, port)
                if wanted is not None:
                    return local
                refused.add(port)
                continue
            return local
        return PortRefusal(f"no free {book.noun} in {port_range} across the fleet", True)

    async def _unclaim_port(self, session: _Session, port: int) -> None:
        await super()._unclaim_port(session, port)
        await self._give_back(self._tcp, session, port)

    async def _unclaim_udp_port(self, session: _Session, port: int) -> None:
        await super()._unclaim_udp_port(session, port)
        await self._give_back(self._udp, session, port)

    async def _release_port(self, session: _Session, port: int) -> bool:
        return await self._release_in_fleet(self._tcp, session, port)

    async def _release_udp_port(self, session: _Session, port: int) -> bool:
        return await self._release_in_fleet(self._udp, session, port)

    async def _release_in_fleet(self, book: _PortBook, session: _Session, port: int) -> bool:
        """A granted port is closed: free it here, give its claim back and remember it
        for the name (the sticky port)."""
        held = book.held.get(port)
        released = await book.release_here(session, port)
        if held is not None and held.session is session:
            await self._give_back(book, session, port)
            with contextlib.suppress(StoreUnavailable, LocalProtocolError):
                claim = PortClaim.decode(held.stored.body)
                await self._store.remember(
                    claim.name, claim.target, port, self.config.sticky_port_seconds, book.protocol
                )
        return released

    async def _give_back(self, book: _PortBook, session: _Session, port: int) -> None:
        """Release ``session`` 's claim of ``port`` (not a newer tunnel's of its name)."""
        held = book.held.get(port)
        if held is None or held.session is not session:
            return
        del book.held[port]
        book.view.drop(held.key)
        with contextlib.suppress(StoreUnavailable):
            await self._release_claim(held.key, held.stored, EventKind.PORT_RELEASED)

    async def _take_tcp_home(self, port: int) -> None:
        """TCP ``port`` is this node's now: stop listening for its old holder (also if
        the events task is closing that listener), and move its waiting visitors."""
        await self._stop_listening(port)
        self._port_moved(port)

    def _port_granted(self, session: _Session, lease: _Lease) -> None:
        super()._port_granted(session, lease)
        self._record_changed(session)

    async def _stop_lease(self, session: _Session, lease: _Lease) -> None:
        await super()._stop_lease(session, lease)
        self._record_changed(session)

    def _record_changed(self, session: _Session) -> None:
        registration = self._registrations.get(session.tunnel_id)
        if registration is not None:
            registration.changed.set()

    def _visitor_datagrams(
        self,
        session: _Session,
        lease: Any,
        sock: socket.socket,
        batch: list[tuple[bytes, NetworkAddress]],
    ) -> None:
        if not self._claims_fresh():
            return  # paused past the lease: another node may hold the port now
        super()._visitor_datagrams(session, lease, sock, batch)

    async def _apply_udp_change(self, change: ViewChange) -> None:
        """The UDP view changed: claims lost, ports to open or close for other nodes
        (its node changes are the TCP view's to report)."""
        for key in change.lost:
            for held in self._held_under(key):
                self._lost(held)
        for port in sorted(change.unlisten):
            await self._stop_udp_relay(port)
        for port in sorted(change.listen):
            self._relay_udp_port(port)

    # UDP ports held elsewhere: open them here, relay each visitor's flow -------------

    def _relay_udp_port(self, port: int) -> None:
        """Open UDP ``port`` (held by another node) on this node's address."""
        if port in self._udp_remote or port in self._udp_closing or self._tasks is None:
            return
        if not self._udp.view.should_listen(port):
            return
        try:
            sockets = UdpSockets(
                bind_port(self.config.tcp_bind or None, port, socket.SOCK_DGRAM),
                self.config.limits.udp_receive_batch,
            )
        except OSError as exc:
            holder = self._udp.view.holder_of(port)
            logger.warning(
                "cannot open UDP port %d for node %s: %s",
                port,
                holder.node if holder else "?",
                exc,
            )
            return
        relayed = self._udp_remote[port] = _RelayedUdpPort(port, sockets)
        sockets.start(self._host, self._tasks, functools.partial(self._udp_visitors, relayed))

    async def _stop_udp_relay(self, port: int) -> None:
        """Close UDP ``port`` opened for another node, ending its relayed flows; returns
        once its sockets are closed (also when another task is closing them)."""
        relayed = self._udp_remote.pop(port, None) or self._udp_closing.get(port)
        if relayed is None:
            return
        self._udp_closing[port] = relayed
        try:
            relayed.stopped = True
            for flow in list(relayed.flows.values()):
                flow.scope.cancel()
            await relayed.sockets.aclose()
        finally:
            if self._udp_closing.get(port) is relayed:
                del self._udp_closing[port]

    def _udp_port_moved(self, claim: PortClaim) -> None:
        """UDP ``claim.port`` has a new holder: relayed flows to another node end (the
        visitor's next datagram opens a flow to the new holder)."""
        relayed = self._udp_remote.get(claim.port)
        for flow in list(relayed.flows.values()) if relayed is not None else ():
            if flow.claim.node != claim.node:
                flow.scope.cancel()

    def _udp_visitors(
        self,
        relayed: _RelayedUdpPort,
        sock: socket.socket,
        batch: list[tuple[bytes, NetworkAddress]],
    ) -> None:
        """(Never blocks) Datagrams from visitors on a UDP port another node holds:
        each into its visitor's relayed flow, a new flow for a new visitor."""
        if relayed.stopped or not self._books.accepting:
            return
        limits = self.config.limits
        claim = self._udp.view.holder_of(relayed.port)
        if claim is None or self._udp.view.relay_to(relayed.port) is None:
            return
        now = current_time()
        fd = sock.fileno()
        for data, addr in batch:
            key = (fd, addr)
            flow = relayed.flows.get(key)
            if flow is None:
                if self._udp_relayed[claim.node] >= limits.udp_max_flows:
                    relayed.drops["flow_limit"] = relayed.drops.get("flow_limit", 0) + 1
                    continue
                flow = relayed.flows[key] = _RelayedFlow(key, sock, claim)
                self._udp_relayed[claim.node] += 1
                self.spawn_task(
                    self._run_relayed_flow, relayed, flow, name=f"udp-relay-{relayed.port}"
                )
            flow.active = now
            self._relay_out(flow, data)

    def _relay_out(self, flow: _RelayedFlow, data: bytes) -> None:
        """A visitor's datagram onto its flow's stream, if the stream takes it whole
        now; queued (bounded) while the stream opens; else dropped and counted."""
        if len(data) > MAX_RELAYED_DATAGRAM:
            flow.count("too_big")
        elif flow.stream is None:
            if len(flow.queue) < self.config.limits.udp_flow_queue:
                flow.queue.append(data)
            else:
                flow.count("queue_full")
        else:
            try:
                taken = flow.stream.try_send(encode_relayed_datagram(data))
            except BROKEN_OR_REFUSED:
                flow.count("flow_ended")
                flow.scope.cancel()
                return
            if not taken:
                flow.count("congested")

    async def _run_relayed_flow(self, relayed: _RelayedUdpPort, flow: _RelayedFlow) -> None:
        """One relayed visitor: open its stream to the holder, send what it queued,
        and carry the holder's replies back from this port, until either side ends
        the stream, the port closes here, or the flow is idle for
        ``udp_flow_idle_timeout``."""
        limits = self.config.limits
        holder = self._udp.view.relay_to(relayed.port)
        try:
            with flow.scope:
                if holder is None or holder[0].node != flow.claim.node:
                    flow.drops["flow_ended"] = len(flow.queue)
                    return
                node, fence = holder
                host, port = flow.addr[0], flow.addr[1]
                route = UdpRelayRequest(relayed.port, fence, (host, port)).to_address()
                opened = await self._link_stream(node, route, current_time() + LINK_TIMEOUT)
                if isinstance(opened, BaseException):
                    logger.info(
                        "no UDP relay to node %s for port %d: %s", node.node, relayed.port, opened
                    )
                    if flow.queue:
                        flow.drops["flow_ended"] = len(flow.queue)
                    return
                flow.stream = opened
                queued, flow.queue = flow.queue, []
                for data in queued:
                    self._relay_out(flow, data)
                frames = RelayedDatagrams()
                while True:
                    idle_at = flow.active + limits.udp_flow_idle_timeout
                    if current_time() >= idle_at:
                        break
                    with anyio.move_on_after(idle_at - current_time()):
                        try:
                            data = await opened.receive()
                        except anyio.EndOfStream:
                            break
                        for reply in frames.feed(data):
                            if not send_one(flow.sock, reply, flow.addr):
                                flow.count("visitor_unreachable")
                        flow.active = current_time()
        except BROKEN_OR_REFUSED as exc:
            logger.debug("UDP relay of %s on port %d ended: %s", flow.addr, relayed.port, exc)
        finally:
            if relayed.flows.get(flow.key) is flow:
                del relayed.flows[flow.key]
            self._udp_relayed[flow.claim.node] -= 1
            if self._udp_relayed[flow.claim.node] <= 0:
                del self._udp_relayed[flow.claim.node]
            if flow.stream is not None:
                with shield():
                    await flow.stream.aclose()
            drops = {reason: n for reason, n in flow.drops.items() if n}
            for reason, n in relayed.drops.items():
                drops[reason] = drops.get(reason, 0) + n
            relayed.drops.clear()
            if drops:
                self._report(
                    notices.udp_dropped,
                    flow.claim.tunnel_id,
                    relayed.port,
                    drops,
                    name=flow.claim.name,
                )

    async def _serve_udp_relay(
        self, session: _Session, request: UdpRelayRequest, stream: TunnelStream
    ) -> None:
        """(The node that holds the UDP port) A visitor relayed from another node: a
        flow of the tunnel, as for a visitor of this node, whose replies go back on
        the stream."""

        def reply(data: bytes) -> str | None:
            try:
                return None if stream.try_send(encode_relayed_datagram(data)) else "congested"
            except RELAY_ENDED:
                return "flow_ended"

        scope = anyio.CancelScope()
        flow = self._open_relayed_flow(
            session, request.port, stream, request.visitor, reply, scope.cancel
        )
        if not isinstance(flow, UdpFlow):
            logger.debug("UDP port %d: no flow for %s: %s", request.port, request.visitor, flow)
            return
        cause = "peer closed"
        frames = RelayedDatagrams()
        try:
            with scope:
                while True:
                    try:
                        data = await stream.receive()
                    except anyio.EndOfStream:
                        break
                    self._relayed_datagrams(session, flow, frames.feed(data))
        except BROKEN_OR_REFUSED:
            cause = "reset"
        finally:
            self._end_relayed_flow(session, flow, cause)

    def _accepted(self, session: _Session, lease: _Lease, client: socket.socket) -> None:
        if not self._claims_fresh():
            # Paused or cut off past the lease: another node may hold the port now.
            client.close()
            return
        super()._accepted(session, lease, client)

    def _claims_fresh(self) -> bool:
        """False while this node may have been paused past its claims (SIGSTOP, a
        frozen VM): until a renewal confirms them, it serves no new visitor.  A store
        that is merely unreachable does not count: nobody can claim meanwhile."""
        gap = current_time() - self._tick_at
        return self._suspect_since is None and gap < renew_interval(self.fleet.lease)

    async def _watch_pauses(self) -> None:
        tick = min(0.5, renew_interval(self.fleet.lease) / 4)
        while True:
            await anyio.sleep(tick)
            now = current_time()
            if now - self._tick_at >= renew_interval(self.fleet.lease):
                logger.warning(
                    "node %s did not run for %.1f s: serving no new visitors until its "
                    "claims are confirmed",
                    self.fleet.node,
                    now - self._tick_at,
                )
                self._suspect_since = now
                self._renew_now.set()
            self._tick_at = now

    # Keeping the claims: leases and fencing ---------------------------------------

    async def _keep_claims(self) -> None:
        """Renew this node's claims every third of the lease; close what was lost;
        now and then rebuild the view from the keys."""
        interval = renew_interval(self.fleet.lease)
        self._announced = False
        rebuilt_at = -float("inf")
        while True:
            if not await self._store.wait_healthy(interval):
                continue
            started = current_time()
            try:
                async with self._claims_lock:  # what is held is what is renewed
                    if self._leaving:
                        return  # its key must not come back after it said goodbye
                    await self._store.put_node(self._view.me, announce=not self._announced)
                    self._announced = True
                    held = [r.held for r in self._registrations.values() if r.held is not None]
                    held += self._held_ports()
                    lost = await self._store.renew([(h.key, h.stored) for h in held])
                if current_time() - rebuilt_at >= REBUILD_EVERY * self.fleet.lease:
                    rebuilt_at = current_time()
                    await self._rebuild()
            except StoreUnavailable:
                continue
            for index in lost:
                self._lost(held[index], while_away=True)
            if self._suspect_since is not None and self._suspect_since < started:
                logger.info("node %s: its claims are confirmed", self.fleet.node)
                self._suspect_since = None
            self._renew_now = anyio.Event()
            with anyio.move_on_after(max(0.0, interval - (current_time() - started))):
                await self._renew_now.wait()

    def _lost(self, held: _Held, *, while_away: bool = False) -> None:
        """Another node claimed what this one held: stop serving it.  Seen in the
        fleet's changes, a newer tunnel of the name came through there (the client of
        this one is taken over, and stops); found by a renewal, this node was away
        past its lease (its client, if still here, reconnects)."""
        session = held.session
        for book in self._port_books:
            book.view.drop(held.key)
            for port in [p for p, h in book.held.items() if h.session is session]:
                book.view.drop(book.held.pop(port).key)
        registration = self._registrations.get(session.tunnel_id)
        if registration is not None:
            registration.held, registration.lost = None, True
            registration.changed.set()
        if session.closed:
            return
        logger.warning(
            "tunnel %s (%s): another node holds its claim now (%s); closing it",
            session.tunnel_id,
            session.label,
            held.key,
        )
        if while_away:
            code = CloseCode.SHUTTING_DOWN
            reason = "this node lost the tunnel's claims while it was away; reconnect"
        else:
            code = CloseCode.TAKEN_OVER
            reason = "a newer tunnel of this name authenticated on another node"
        with self._lock:
            if session.tunnel.state is not TunnelState.CLOSED:
                session.tunnel.close(code, reason)
                self._flush(session.tunnel)

    async def _rebuild(self) -> None:
        """Rebuild the view from the keys, and say which nodes' records lapsed."""
        nodes, ports, tunnels = await self._store.snapshot()
        keep = current_time() < self._keep_missing_until
        change = self._view.rebuild(nodes, ports["tcp"], tunnels, keep_missing=keep)
        for record in change.left:
            await self._store.node_left(record)
        change.left = []  # reported as the event comes back
        await self._apply_change(change)
        udp_change = self._udp.view.rebuild(nodes, ports["udp"], {}, keep_missing=keep)
        await self._apply_udp_change(udp_change)

    # The event stream -------------------------------------------------------------

    async def _follow_events(self) -> None:
        """Follow the event stream in order.  At start, from its newest entry; after a
        disconnect, from the last entry read (no event is lost that the store still
        has), once the view is rebuilt from the keys; entries the store no longer has
        (it restarted, or trimmed them while this node was away) are said in a line."""
        last: str | None = None
        resync = True
        while True:
            if not await self._store.wait_healthy(STORE_WAIT):
                continue
            try:
                if resync:
                    if last is None:
                        last = await self._store.last_event_id()
                    elif not await self._store.has_events_after(last):
                        logger.warning(
                            "the registry no longer has the fleet's changes since %s (it "
                            "restarted, or this node was away long); rebuilt from its keys",
                            last,
                        )
                    await self._rebuild()
                    resync = False
                assert last is not None
                last, events = await self._store.events_after(last, block=1.0)
            except StoreUnavailable:
                resync = True
                continue
            for event in events:
                if event.kind is EventKind.NODE_LEFT and event.node == self.fleet.node:
                    # Its key lapsed while it was away: say again that it is here.
                    self._announced = False
                    self._renew_now.set()
                self._report_event(event)
                await self._apply_change(self._view.apply(event))
                await self._apply_udp_change(self._udp.view.apply(event))
                if event.kind is EventKind.PORT_CLAIMED and isinstance(event.record, PortClaim):
                    if event.record.protocol == "udp":
                        self._udp_port_moved(event.record)
                    else:
                        self._port_moved(event.record.port)

    def _report_event(self, event: FleetEvent) -> None:
        record = event.record
        name = tunnel_id = protocol = None
        ports: tuple[int, ...] = ()
        if isinstance(record, NameClaim):
            name, tunnel_id, ports = record.name, record.tunnel_id, record.ports
        elif isinstance(record, PortClaim):
            name, tunnel_id, ports = record.name, record.tunnel_id, (record.port,)
            protocol = record.protocol
        node = record.node if isinstance(record, NodeRecord) else event.node
        self.activity.publish(
            activity.FleetChanged(
                at=time.time(),
                change=event.kind.value,
                node=node,
                name=name,
                tunnel_id=tunnel_id,
                ports=ports,
                protocol=protocol,
            )
        )

    async def _apply_change(self, change: ViewChange) -> None:
        for key in change.lost:
            for held in self._held_under(key):
                self._lost(held)
        for record in change.joined:
            if record.node != self.fleet.node:
                logger.info("node %s joined the fleet (%s)", record.node, record.advertise)
        for record in change.left:
            logger.info("node %s left the fleet", record.node)
            link = self._links.pop(record.node, None)
            if link is not None:
                link.close()
        if change.listen or change.unlisten:
            logger.debug(
                "listening for other nodes on %s, no longer on %s",
                sorted(change.listen),
                sorted(change.unlisten),
            )
        for port in sorted(change.unlisten):
            await self._stop_listening(port)
        for port in sorted(change.listen):
            self.spawn_task(self._listen_for_other, port, name=f"remote-{port}")

    def _held_under(self, key: str) -> Iterable[_Held]:
        for registration in list(self._registrations.values()):
            if registration.held is not None and registration.held.key == key:
                yield registration.held
        for held in self._held_ports():
            if held.key == key:
                yield held

    def _held_ports(self) -> list[_Held]:
        """This node's claims of ports, TCP and UDP."""
        return [held for book in self._port_books for held in book.held.values()]

    # Ports held elsewhere: listen, and relay to the node that holds the tunnel ----------

    async def _listen_for_other(self, port: int) -> None:
        if port in self._remote or not self._view.should_listen(port):
            return
        try:
            listener = await Listener.open(self.config.tcp_bind or None, port)
        except OSError as exc:
            holder = self._view.holder_of(port)
            logger.warning(
                "cannot listen on port %d for node %s: %s",
                port,
                holder.node if holder else "?",
                exc,
            )
            return
        if port in self._remote or not self._view.should_listen(port) or self._tasks is None:
            await listener.aclose()
            return
        self._remote[port] = listener
        listener.start(self._host, self._tasks, functools.partial(self._visitor, port))

    async def _stop_listening(self, port: int) -> None:
        """Stop listening on ``port`` for another node; returns once the socket is
        closed, also when another task is closing it (the events task and a claim may
        both see that the port is this node's now)."""
        listener = self._remote.pop(port, None)
        if listener is None:
            closing = self._closing.get(port)
            if closing is not None:
                await closing.wait()
            return
        closed = self._closing[port] = anyio.Event()
        try:
            await listener.aclose()
        finally:
            closed.set()
            if self._closing.get(port) is closed:
                del self._closing[port]

    def _visitor(self, port: int, client: socket.socket) -> None:
        if self._tasks is None or not self._books.accepting:
            client.close()
            return
        self._tasks.spawn(self._relay_visitor, port, client, name="relay")

    async def _relay_visitor(self, port: int, client: socket.socket) -> None:
        """A visitor on a port another node holds: relay it there, with its address
        (and past the PROXY header rules of a public port, as a local visitor).  If
        the port moves meanwhile (its tunnel came back through this node, or another),
        the visitor goes where it is now instead of waiting on the old holder."""
        chunk = self.config.limits.relay_chunk_size
        try:
            conn = await accepted(client)
            started = await self._visitor_start(ListenerKind.PORT, client, conn)
            if started is None:
                return  # refused (a PROXY header it may not send), or gone
            start, guard = started
            deadline = current_time() + LINK_TIMEOUT
            while current_time() < deadline:
                held = self._tcp.held.get(port)
                if held is not None:  # ours now: serve it here, once it is granted
                    lease = held.session.leases.get(port)
                    if lease is None:
                        await anyio.sleep(0.05)
                        continue
                    target = lease.request.target().to_address()
                    address = self._with_visitor(held.session, target, start)
                    try:
                        stream = await self._open_on(held.session, address, LINK_TIMEOUT)
                    except (StreamRefusedError, TunnelClosedError, TimeoutError) as exc:
                        logger.info("port %d: %s", port, exc)
                        break
                    await relay(stream, conn, chunk, initial=start.data, guard=guard)
                    return
                holder = self._view.relay_to(port)
                if holder is None:
                    break
                node, fence = holder
                route = with_visitor(RouteAddress((*RELAY, str(port), str(fence))), start.visitor)
                opened = await self._open_relay(port, node, route, deadline)
                if opened is None:
                    continue  # the port moved: look again
                if isinstance(opened, BaseException):
                    logger.info("no relay to node %s for port %d: %s", node.node, port, opened)
                    break
                await relay(opened, conn, chunk, initial=start.data, guard=guard)
                return
            with shield():
                await conn.aclose()
        finally:
            client.close()

    async def _open_relay(
        self, port: int, node: NodeRecord, address: RouteAddress, deadline: float
    ) -> TunnelStream | BaseException | None:
        """A relay stream for ``port`` to ``node``; the error if there is none by
        ``deadline``; None if the port moved meanwhile."""
        with anyio.CancelScope() as scope:
            waiting = self._relaying.setdefault(port, set())
            waiting.add(scope)
            try:
                return await self._link_stream(node, address, deadline)
            finally:
                waiting.discard(scope)
                if not waiting:
                    self._relaying.pop(port, None)
        return None  # cancelled: the port moved

    async def _link_stream(
        self, node: NodeRecord, address: RouteAddress, deadline: float
    ) -> TunnelStream | BaseException:
        """A stream to ``address`` over the link to ``node``, or why there is none."""
        link = self._links.get(node.node)
        if link is None or link.record != node:
            if link is not None:
                link.close()
            link = self._links[node.node] = FleetLink(self, node)
        try:
            with anyio.fail_after(max(0.0, deadline - current_time())):
                return await link.open_stream(address)
        except (
            OSError,
            TimeoutError,
            StreamRefusedError,
            TunnelClosedError,
            LocalProtocolError,
        ) as exc:
            return exc

    def _port_moved(self, port: int) -> None:
        """``port`` has a new holder: visitors waiting on a relay for it look again."""
        for scope in list(self._relaying.get(port, ())):
            scope.cancel()

    def _route_fleet(self, status: TunnelStatus, address: RouteAddress) -> RouteHandler | None:
        if status.scheme != SCHEME_FLEET:
            return None if self._user_route is None else self._user_route(status, address)
        try:
            udp = UdpRelayRequest.from_address(address)
        except (RemoteProtocolError, LocalProtocolError):
            return None
        if udp is not None:
            held = self._udp.held.get(udp.port)
            if held is None or held.stored.fence != udp.fence or held.session.closed:
                return None  # not (any more) this node's: refused, the other node drops it
            return functools.partial(self._serve_udp_relay, held.session, udp)
        try:
            base, visitor = split_visitor(address)
        except LocalProtocolError:
            return None
        segments = tuple(base.segments)
        if len(segments) != 4:
            return None
        if segments[:2] == RELAY and segments[2].isdigit() and segments[3].isdigit():
            port, fence = int(segments[2]), int(segments[3])
            held = self._tcp.held.get(port)
            holder = self._view.holder_of(port)
            if held is not None and held.stored.fence == fence:
                pass
            elif holder is None or not self._view.is_sibling(holder.node):
                return None  # not (any more) this node's: refused, the other node gives up
            return functools.partial(self._serve_relay, port, fence, visitor)
        if segments[:2] == BY_NAME and segments[3] in ("http", "tls"):
            name, service = segments[2], segments[3]
            if not self._books.names.publishers(name, service):
                return None  # not (any more) published here
            return functools.partial(self._serve_relayed_name, name, service, visitor)
        return None

    async def _serve_relay(
        self, port: int, fence: int, visitor: ProxyAddresses | None, stream: TunnelStream
    ) -> None:
        """(The node that holds the port) A visitor relayed from another node."""
        held = self._tcp.held.get(port)
        if held is not None and held.stored.fence == fence and not held.session.closed:
            lease = held.session.leases.get(port)
            if lease is None:
                raise OSError(f"port {port} is not listening here")
            target = lease.request.target().to_address()
            address = self._visitor_route(held.session, target, visitor)
            tunnel_stream = await self._open_on(held.session, address)
            await relay(tunnel_stream, stream, self.config.limits.relay_chunk_size)
            return
        claim = self._view.holder_of(port)
        if claim is not None and self._view.is_sibling(claim.node):
            # The link came in on the port our workers share and reached this one: the
            # holder listens on this address, so hand the visitor to its listener.
            host = self.config.tcp_bind
            if host in ("", "0.0.0.0", "::"):
                host = "::1" if host == "::" else "127.0.0.1"
            try:
                conn = await connect_name(host, port, LINK_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                raise OSError(f"port {port}: its worker does not answer: {exc}") from None
            await relay(stream, conn, self.config.limits.relay_chunk_size)
            return
        raise OSError(f"port {port} (fence {fence}) is not held here")

    # By name: any node routes any name -----------------------------------------

    async def _carry_by_name(self, kind: ListenerKind, conn: Connection, start: Forward) -> None:
        """A visitor of a shared listener: to a tunnel of its name on this node, else
        relayed to a node that has one (the bytes read so far first)."""
        name, service = start.name, kind.value
        assert name is not None
        with self._lock:
            local = bool(self._books.names.publishers(name, service))
        remote = [] if local else self._view.publishers(name, service)
        deadline = current_time() + LINK_TIMEOUT
        for node in remote[:2]:  # a second node if the first refuses
            route = with_visitor(RouteAddress((*BY_NAME, name, service)), start.visitor)
            opened = await self._link_stream(node, route, deadline)
            if isinstance(opened, BaseException):
                logger.info("no relay to node %s for %s (%s): %s", node.node, name, service, opened)
                continue
            await relay(opened, conn, self.config.limits.relay_chunk_size, initial=start.data)
            return
        await super()._carry_by_name(kind, conn, start)  # here, or the refusal

    def _unroutable(self, name: str, service: str) -> Failure:
        if self._view.publishers(name, service):
            return Failure.REFUSED  # the nodes that publish it did not take the visitor
        if self._view.has_name(name):
            return Failure.NO_SERVICE
        return super()._unroutable(name, service)

    async def _serve_relayed_name(
        self, name: str, service: str, visitor: ProxyAddresses | None, stream: TunnelStream
    ) -> None:
        """(A node with a tunnel of ``name``) A by-name visitor relayed from another
        node: to one of this node's tunnels that publish ``service``."""
        with self._lock:
            choice = self._route_name(name, service, ())
        if choice is None:
            raise OSError(f"{name} publishes no {service} here any more")
        session, target = choice
        address = self._visitor_route(session, target.to_address(), visitor)
        tunnel_stream = await self._open_on(session, address)
        with self._lock:
            self._books.names.opened(session)
        try:
            await relay(tunnel_stream, stream, self.config.limits.relay_chunk_size)
        finally:
            with self._lock:
                self._books.names.finished(session)

    def _visitor_route(
        self, session: _Session, address: RouteAddress, visitor: ProxyAddresses | None
    ) -> RouteAddress:
        """``address`` with the visitor's address, where the tunnel agreed on it."""
        if visitor is not None and VISITOR_ADDRESS in session.tunnel.features:
            return with_visitor(address, visitor)
        return address

    # Helpers --------------------------------------------------------------------

    async def _release_claim(self, key: str, stored: Stored, kind: EventKind) -> bool:
        # Never between a renewal's snapshot and its script: it would set the key again.
        async with self._claims_lock:
            return await self._store.release(key, stored, kind)

    async def _update_claim(self, key: str, old: Stored, new: Stored) -> bool:
        async with self._claims_lock:
            return await self._store.update(key, old, new, EventKind.TUNNEL_UPDATED)

    def spawn_task(self, fn: Callable[..., Awaitable[object]], *args: Any, name: str) -> None:
        """Run ``fn(*args)`` among the node's own tasks (stopped when it stops)."""
        if self._tasks is not None:
            self._tasks.spawn(fn, *args, name=name)
