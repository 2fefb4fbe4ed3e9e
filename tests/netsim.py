"""An in-memory network on a fake clock, for driving two core peers.

Datagrams travel with a delay and may be lost, duplicated or reordered, all from a
seeded random source so that a failing run can be replayed.  Nothing here opens a
socket or reads the clock: it is the ``roundtrip`` of aioquic's tests, grown up.
"""

from __future__ import annotations

import datetime
import hashlib
import heapq
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.auth import Authenticator
from snocat_proto._wire.endpoint import ServerEndpoint
from snocat_proto._wire.engine import (
    ALPN,
    NetworkAddress,
    QuicConfiguration,
    quic_configuration,
    quic_events,
)
from snocat_proto._wire.events import (
    ConnectionTerminated,
    CredentialRequired,
    DataReceived,
    FlowDatagramReceived,
    FlowRequested,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamRequested,
    StreamReset,
    StreamWritable,
    TunnelEvent,
)
from snocat_proto._wire.handshake_rate import DEFAULT_HANDSHAKE_RATE, HandshakeRate
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.tunnel import (
    CONNECT_KEEPALIVE_INTERVAL,
    LISTEN_KEEPALIVE_INTERVAL,
    TunnelConnection,
)

SERVER_ADDR = ("10.0.0.1", 4433)
CLIENT_ADDR = ("10.0.0.2", 50000)


def make_certificate(
    name: str = "localhost",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


_CERT = make_certificate()


def server_configuration(limits: Limits, **kwargs: object) -> QuicConfiguration:
    config = quic_configuration(is_client=False, limits=limits, **kwargs)  # type: ignore[arg-type]
    config.certificate, config.private_key = _CERT
    return config


def client_configuration(
    limits: Limits, *, trust: bool = True, **kwargs: object
) -> QuicConfiguration:
    config = quic_configuration(
        is_client=True,
        limits=limits,
        server_name="localhost",
        **kwargs,  # type: ignore[arg-type]
    )
    if trust:
        config.cadata = _CERT[0].public_bytes(encoding=Encoding.PEM)
    return config


@dataclass
class Link:
    """Fault settings of the simulated path (same both ways)."""

    delay: float = 0.005
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    #: A bottleneck, in bytes a second each way (None: none); datagrams queue behind it
    #: and are dropped once ``queue`` bytes wait (drop-tail, as a router does).
    bandwidth: float | None = None
    queue: int = 64 * 1024
    #: The largest datagram the path carries (None: any); larger ones vanish without a
    #: word, as on a path whose ICMP "too big" messages are filtered.  May change
    #: during a run (a route change: a black hole for the size in use).
    mtu: int | None = None


@dataclass
class App:
    """What one side's application saw and does (a minimal, synchronous 'adapter')."""

    events: list[TunnelEvent] = field(default_factory=list)
    #: The simulated time at which each event in ``events`` was handled.
    times: list[float] = field(default_factory=list)
    received: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    ended: set[int] = field(default_factory=set)
    #: Secrets by tunnel name, for CredentialRequired.
    credentials: dict[str, bytes] = field(default_factory=dict)
    #: When True, CredentialRequired is left unanswered (the test answers it).
    hold_credentials: bool = False
    #: Decides StreamRequested: True accepts, False refuses, None leaves it pending.
    route: Callable[[RouteAddress], bool | None] = lambda address: True
    #: When False, DataReceived is not acknowledged (a stalled reader).
    consume: bool = True
    unacknowledged: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    #: Decides FlowRequested: True accepts, False refuses, None leaves it pending.
    flow_route: Callable[[FlowRequested], bool | None] = lambda request: True
    #: Every datagram payload received, by flow.
    flow_data: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))

    def handle(self, tunnel: TunnelConnection, event: TunnelEvent, now: float = 0.0) -> None:
        self.events.append(event)
        self.times.append(now)
        if isinstance(event, CredentialRequired):
            if not self.hold_credentials:
                tunnel.supply_credential(self.credentials.get(event.name))
        elif isinstance(event, StreamRequested):
            decision = self.route(event.address)
            if decision is True:
                tunnel.accept_stream(event.stream_id)
            elif decision is False:
                tunnel.refuse_stream(event.stream_id)
        elif isinstance(event, DataReceived):
            self.received[event.stream_id] += event.data
            if self.consume:
                tunnel.acknowledge_received_data(event.stream_id, len(event.data))
            else:
                self.unacknowledged[event.stream_id] += len(event.data)
        elif isinstance(event, StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, FlowRequested):
            flow_decision = self.flow_route(event)
            if flow_decision is True:
                tunnel.accept_flow(event.flow_id, now)
            elif flow_decision is False:
                tunnel.refuse_flow(event.flow_id)
        elif isinstance(event, FlowDatagramReceived):
            self.flow_data[event.flow_id].append(event.data)

    def of_type(self, kind: type[TunnelEvent]) -> list[TunnelEvent]:
        return [e for e in self.events if isinstance(e, kind)]

    def first(self, kind: type[TunnelEvent]) -> tuple[float, TunnelEvent] | None:
        """The first event of ``kind`` and when it was handled, or None."""
        for at, event in zip(self.times, self.events, strict=True):
            if isinstance(event, kind):
                return at, event
        return None

    @property
    def closed(self) -> ConnectionTerminated | None:
        closes = [e for e in self.events if isinstance(e, ConnectionTerminated)]
        assert len(closes) <= 1, f"ConnectionTerminated reported {len(closes)} times"
        return closes[0] if closes else None

    def acknowledge_all(self, tunnel: TunnelConnection) -> None:
        for stream_id, amount in self.unacknowledged.items():
            tunnel.acknowledge_received_data(stream_id, amount)
        self.unacknowledged.clear()

    def clone(self) -> App:
        """A fresh App with the same decisions (for another tunnel of the same server)."""
        return App(
            credentials=self.credentials,
            hold_credentials=self.hold_credentials,
            route=self.route,
            consume=self.consume,
            flow_route=self.flow_route,
        )


@dataclass
class Client:
    """One Connect-side peer of a simulation: its address, tunnel and application."""

    address: NetworkAddress
    tunnel: TunnelConnection
    app: App


class RawStreams:
    """Drive streams of a tunnel's engine directly, below the tunnel (a misbehaving peer).

    The tunnel never hears of the streams opened here: their QUIC events are taken out
    of the engine's queue and recorded, and their bytes are credited as consumed.
    """

    def __init__(self, tunnel: TunnelConnection) -> None:
        self._quic = tunnel._quic
        self.ids: set[int] = set()
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        original = self._quic.next_event

        def next_event() -> quic_events.QuicEvent | None:
            while True:
                event = original()
                if event is None or getattr(event, "stream_id", None) not in self.ids:
                    return event
                self._record(event)

        self._quic.next_event = next_event  # type: ignore[method-assign]

    def open(self, data: bytes, *, end: bool = False) -> int:
        """Open a new stream with ``data`` (a stream exists only once written to)."""
        stream_id = self._quic.get_next_available_stream_id()
        self.ids.add(stream_id)
        self.send(stream_id, data, end=end)
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=end)

    def _record(self, event: quic_events.QuicEvent) -> None:
        if isinstance(event, quic_events.StreamDataReceived):
            self.received[event.stream_id] += event.data
            self._quic.acknowledge_received(event.stream_id, len(event.data))
            if event.end_stream:
                self.ended.add(event.stream_id)
        elif isinstance(event, quic_events.StreamReset):
            self.resets[event.stream_id] = event.error_code
        elif isinstance(event, quic_events.StopSendingReceived):
            self.stops[event.stream_id] = event.error_code


class Simulation:
    """A server endpoint and client tunnels joined by a simulated :class:`Link`.

    ``client``/``client_app`` are the first client; :meth:`add_client` adds more.
    The first server tunnel reports to ``server_app``; later ones to a clone of it
    (see :meth:`server_app_of`).  After calling a server tunnel's methods directly,
    call :meth:`touch` (the adapter's duty: ``ServerEndpoint.mark_dirty``).
    """

    #: Steps without the clock moving after which the simulation is declared livelocked.
    LIVELOCK_STEPS = 20_000

    def __init__(
        self,
        *,
        server_auth: Callable[[str], Authenticator | Mapping[str, Authenticator]],
        client_auth: Authenticator,
        limits: Limits | None = None,
        client_limits: Limits | None = None,
        link: Link | None = None,
        seed: int = 0,
        retry: bool = True,
        trust: bool = True,
        keepalive_interval: float | None = CONNECT_KEEPALIVE_INTERVAL,
        server_keepalive_interval: float | None = LISTEN_KEEPALIVE_INTERVAL,
        server_idle_timeout: float = 30.0,
        max_tunnels: int | None = None,
        handshake_rate: HandshakeRate | None = DEFAULT_HANDSHAKE_RATE,
        client_token: bytes = b"",
        client_alpn: Sequence[str] = (ALPN,),
        server_alpn: Sequence[str] = (ALPN,),
        server_datagrams: bool = False,
        client_datagrams: bool = False,
        quic_options: Mapping[str, object] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.client_alpn = client_alpn
        self.link = link or Link()
        self.rng = random.Random(seed)
        self.now = 1000.0
        self.keepalive_interval = keepalive_interval
        self.trust = trust
        #: More ``quic_configuration`` settings for both sides (``max_datagram_size``,
        #: ``path_mtu_discovery``).
        self.quic_options = dict(quic_options or {})
        self.server = ServerEndpoint(
            server_configuration(
                self.limits,
                idle_timeout=server_idle_timeout,
                alpn_protocols=server_alpn,
                datagrams=server_datagrams,
                **self.quic_options,
            ),
            authenticator_factory=server_auth,
            limits=self.limits,
            retry=retry,
            max_tunnels=max_tunnels,
            keepalive_interval=server_keepalive_interval,
            handshake_rate=handshake_rate,
            random_bytes=self.rng.randbytes,
        )
        self.server_app = App()
        self._server_apps: dict[TunnelConnection, App] = {}
        self.clients: list[Client] = []
        self.add_client(
            CLIENT_ADDR,
            client_auth,
            limits=client_limits,
            token=client_token,
            datagrams=client_datagrams,
        )
        self._queue: list[tuple[float, int, NetworkAddress, NetworkAddress, bytes]] = []
        self._seq = 0
        #: When each direction's bottleneck is free again (``Link.bandwidth``), by source.
        self._link_free_at: dict[NetworkAddress, float] = {}
        self.datagrams_sent = 0
        #: Datagrams the path dropped for being over ``Link.mtu``.
        self.too_big = 0
        #: Set to a list to record each datagram put on the link: ``(time, source, size)``.
        self.sent_log: list[tuple[float, NetworkAddress, int]] | None = None
        #: Called after every step; an assertion there stops the run at the first breach.
        self.checks: list[Callable[[], None]] = []
        self._still_steps = 0

    def add_client(
        self,
        address: NetworkAddress,
        client_auth: Authenticator,
        *,
        limits: Limits | None = None,
        token: bytes = b"",
        datagrams: bool = False,
    ) -> Client:
        limits = limits or self.limits
        configuration = client_configuration(
            limits,
            trust=self.trust,
            alpn_protocols=self.client_alpn,
            datagrams=datagrams,
            **self.quic_options,
        )
        configuration.token = token
        tunnel = TunnelConnection.connect(
            configuration,
            address=SERVER_ADDR,
            authenticator=client_auth,
            limits=limits,
            now=self.now,
            keepalive_interval=self.keepalive_interval,
        )
        client = Client(address=address, tunnel=tunnel, app=App())
        self.clients.append(client)
        return client

    # Convenience -------------------------------------------------------------

    @property
    def client(self) -> TunnelConnection:
        return self.clients[0].tunnel

    @property
    def client_app(self) -> App:
        return self.clients[0].app

    @property
    def server_tunnel(self) -> TunnelConnection:
        (tunnel,) = list(self.server.tunnels)
        return tunnel

    def server_app_of(self, tunnel: TunnelConnection) -> App:
        app = self._server_apps.get(tunnel)
        if app is None:
            app = self.server_app if not self._server_apps else self.server_app.clone()
            self._server_apps[tunnel] = app
        return app

    def touch(self, tunnel: TunnelConnection) -> None:
        """The application called ``tunnel`` directly: let its output and events flow."""
        if all(tunnel is not c.tunnel for c in self.clients):
            self.server.mark_dirty(tunnel)

    # Driving -----------------------------------------------------------------

    def flush(self) -> None:
        """Put every datagram that is ready now on the wire (without advancing time)."""
        self._transmit()

    def _transmit(self) -> None:
        for client in self.clients:
            for data, _addr in client.tunnel.datagrams_to_send(self.now):
                self._send(data, client.address, SERVER_ADDR)
        for data, addr in self.server.datagrams_to_send(self.now):
            self._send(data, SERVER_ADDR, addr)

    def _send(self, data: bytes, source: NetworkAddress, destination: NetworkAddress) -> None:
        self.datagrams_sent += 1
        if self.sent_log is not None:
            self.sent_log.append((self.now, source, len(data)))
        link = self.link
        if self.rng.random() < link.loss:
            return
        if link.mtu is not None and len(data) > link.mtu:
            self.too_big += 1
            return
        departs = self.now
        if link.bandwidth is not None:
            source_key = SERVER_ADDR if source == SERVER_ADDR else CLIENT_ADDR
            start = max(self.now, self._link_free_at.get(source_key, self.now))
            if (start - self.now) * link.bandwidth > link.queue:
                return  # the bottleneck's queue is full
            departs = start + len(data) / link.bandwidth
            self._link_free_at[source_key] = departs
        copies = 2 if self.rng.random() < link.duplicate else 1
        for _ in range(copies):
            at = departs + link.delay + self.rng.random() * link.jitter
            self._seq += 1
            heapq.heappush(self._queue, (at, self._seq, destination, source, data))

    def _deliver(self, data: bytes, source: NetworkAddress, destination: NetworkAddress) -> None:
        if destination == SERVER_ADDR:
            self.server.receive_datagram(data, source, self.now)
            return
        for client in self.clients:
            if client.address == destination:
                client.tunnel.receive_datagram(data, source, self.now)

    def _drain_events(self) -> None:
        for client in self.clients:
            while (event := client.tunnel.next_event()) is not None:
                client.app.handle(client.tunnel, event, self.now)
        while (item := self.server.next_event()) is not None:
            tunnel, event = item
            self.server_app_of(tunnel).handle(tunnel, event, self.now)
            self.server.mark_dirty(tunnel)

    def _timers(self) -> list[float]:
        timers = [c.tunnel.get_timer() for c in self.clients] + [self.server.get_timer()]
        return [t for t in timers if t is not None]

    def step(self, until: float | None = None) -> bool:
        """Advance to the next datagram or timer, but not past ``until``; False when
        nothing is left to do."""
        self._drain_events()
        self._transmit()
        candidates = self._timers()
        if self._queue:
            candidates.append(self._queue[0][0])
        if not candidates:
            return False
        target = max(self.now, min(candidates))
        if until is not None and target > until:
            self.now = max(self.now, until)
            return True
        self._still_steps = self._still_steps + 1 if target == self.now else 0
        if self._still_steps > self.LIVELOCK_STEPS:
            raise AssertionError(f"livelock: the clock is stuck at {self.now}")
        self.now = target
        while self._queue and self._queue[0][0] <= self.now:
            _, _, destination, source, data = heapq.heappop(self._queue)
            self._deliver(data, source, destination)
        for client in self.clients:
            timer = client.tunnel.get_timer()
            if timer is not None and timer <= self.now:
                client.tunnel.handle_timer(self.now)
        timer = self.server.get_timer()
        if timer is not None and timer <= self.now:
            self.server.handle_timer(self.now)
        self._drain_events()
        self._transmit()
        for check in self.checks:
            check()
        return True

    def run_until(self, condition: Callable[[], object], *, timeout: float = 60.0) -> None:
        deadline = self.now + timeout
        while not condition():
            if self.now >= deadline or not self.step(until=deadline):
                raise AssertionError(f"condition not reached by t+{timeout}s (now={self.now})")

    def run_for(self, seconds: float) -> None:
        deadline = self.now + seconds
        while self.now < deadline and self.step(until=deadline):
            pass

    def run_until_quiet(self, *, timeout: float = 120.0) -> None:
        """Run until no datagram is in flight and no timer is armed (all terminated)."""
        deadline = self.now + timeout
        while self.step(until=deadline + 1):
            if self.now > deadline:
                raise AssertionError(f"still busy after {timeout}s")


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Writer:
    """Writes ``data`` to one stream as fast as its send capacity allows."""

    sim: Simulation
    tunnel: TunnelConnection
    stream_id: int
    data: bytes
    end: bool = True
    offset: int = 0
    done: bool = False

    def pump(self) -> bool:
        """Write what fits now; True once everything (and the FIN) is written."""
        if self.done:
            return True
        capacity = self.tunnel.send_capacity(self.stream_id)
        if capacity and self.offset < len(self.data):
            chunk = self.data[self.offset : self.offset + capacity]
            self.tunnel.send_data(self.stream_id, chunk)
            self.offset += len(chunk)
            self.sim.touch(self.tunnel)
        if self.offset == len(self.data):
            if self.end:
                self.tunnel.send_data(self.stream_id, b"", end_stream=True)
                self.sim.touch(self.tunnel)
            self.done = True
        return self.done


def pump_all(sim: Simulation, writers: list[Writer], *, timeout: float = 60.0) -> None:
    """Run the simulation until every writer has written all its data."""
    deadline = sim.now + timeout
    while not all([w.pump() for w in writers]):
        if sim.now >= deadline or not sim.step(until=deadline):
            raise AssertionError(f"writers not done by t+{timeout}s (now={sim.now})")


def send_all(
    sim: Simulation,
    tunnel: TunnelConnection,
    stream_id: int,
    data: bytes,
    *,
    end: bool = True,
    timeout: float = 60.0,
) -> None:
    """Write ``data`` respecting send capacity, running the simulation while it is full."""
    pump_all(sim, [Writer(sim, tunnel, stream_id, data, end=end)], timeout=timeout)


__all__ = [
    "App",
    "Client",
    "Link",
    "RawStreams",
    "Simulation",
    "StreamAccepted",
    "StreamRejected",
    "StreamReset",
    "StreamWritable",
    "Writer",
    "digest",
    "payload",
    "pump_all",
    "send_all",
]
