"""What a running aggregator tells its observers: Prometheus metrics and a status document.

:class:`ServerMetrics` is a ``prometheus_client`` collector over the live server: each
scrape reads :meth:`TunnelServer.tunnels` (the same :class:`TunnelStatus` snapshots
the live table shows), the port books, the feed's laggards and
:meth:`TunnelServer.counters` (the QUIC endpoint's counts).  What the server keeps
no count of (refusals, failed logins, the bytes of tunnels that are gone) is counted
here from the activity feed, by a subscription taken before the server starts and
drained before every scrape, so a scrape sees every record published before it.
Free-text reasons become a few fixed classes (:func:`authentication_failure_class`,
:func:`port_refusal_class`, :func:`stream_refusal_class`), so the label sets stay
small whatever clients do.

Per-tunnel series exist only when asked (``per_tunnel``), and then for at most
:data:`PER_TUNNEL_NAMES` names; the rest are summed under ``name="other"``.

Everything here runs on the server's event loop (its state is only safe to read
there): the admin endpoint (:mod:`._admin`) calls :meth:`ServerMetrics.collect` and
:meth:`ServerMetrics.status` from a task, never from a thread.  Nothing secret is
read: tokens and keys are not part of any snapshot used here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from snocat_proto._service import activity
from snocat_proto._service.aggregator import NO_SERVICE, SHUTTING_DOWN, TunnelStatus
from snocat_proto._service.heap import LongLivedHeap
from snocat_proto._service.visitors import FAILURES
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.network import format_host_port
from snocat_proto._wire.proxyme import NAMED_SERVICES

from ._errors import FeedOverflowError
from ._server import TunnelServer, forwarded_connections

__all__ = [
    "AUTHENTICATION_FAILURE_CLASSES",
    "EMBEDDED_REGISTRY",
    "OTHER",
    "PER_TUNNEL_NAMES",
    "PORT_REFUSAL_CLASSES",
    "STREAM_REFUSAL_CLASSES",
    "RegistryHealth",
    "ServerMetrics",
    "authentication_failure_class",
    "port_refusal_class",
    "stream_refusal_class",
]

logger = logging.getLogger("snocat.metrics")

#: With ``--metrics-per-tunnel``, the tunnel names that get series of their own: the
#: oldest ones (a name keeps its series while it stays connected); the others are
#: summed under ``name="other"``.  Each name costs 5 series, so at most ~500 per
#: aggregator whatever ``--max-tunnels`` says: enough to chart the tunnels that
#: matter, small next to what one Prometheus holds per target.  Without a bound, a
#: name would be a new series at every reconnect under SimpleAck (its name is the
#: peer's address) and 5,000 series at the default tunnel limit, which is the
#: cardinality Prometheus's own guidelines warn against.
PER_TUNNEL_NAMES = 100
#: The label value of the tunnels beyond :data:`PER_TUNNEL_NAMES` (a tunnel really
#: named ``other`` is counted there too, so no two series share a label set).
OTHER = "other"

# Reason classes --------------------------------------------------------------------

#: ``snocat_authentication_failures_total{reason}``: tunnels closed before they
#: authenticated (their QUIC handshake had completed), by why.
AUTHENTICATION_FAILURE_CLASSES = (
    "bad_credential",  # unknown name, wrong secret, scheme mismatch (close 0x10)
    "timeout",  # no answer within the authentication deadline (0x11)
    "tunnel_limit",  # the aggregator was at --max-tunnels (0x14)
    "shutting_down",  # the aggregator was stopping (0x15)
    "server_error",  # the credential lookup failed, or a bug (0x17)
    "protocol",  # the peer broke the protocol or spoke another version (0x12, 0x13)
    "peer_closed",  # the client closed first (it gave up, or refused us)
    "other",
)
_CLOSE_CLASSES: dict[int, str] = {
    CloseCode.AUTHENTICATION_FAILED: "bad_credential",
    CloseCode.AUTHENTICATION_TIMEOUT: "timeout",
    CloseCode.LIMIT_EXCEEDED: "tunnel_limit",
    CloseCode.SHUTTING_DOWN: "shutting_down",
    CloseCode.INTERNAL_ERROR: "server_error",
    CloseCode.PROTOCOL_VIOLATION: "protocol",
    CloseCode.UNSUPPORTED_VERSION: "protocol",
}

#: ``snocat_port_refusals_total{reason}``: public ports asked for and not granted.
PORT_REFUSAL_CLASSES = (
    "exhausted",  # no free port in the range
    "in_use",  # the port asked for is another tunnel's
    "out_of_range",  # the port asked for is not in --ports
    "bind_failed",  # the operating system would not let us listen on it
    "registry_unreachable",  # a node of a fleet: its store did not answer in time
    "shutting_down",
    "other",
)
#: How the aggregator words each (snocat_proto/_service/aggregator.py;
#: snocat_anyio/_server_flows.py and _server_udp.py for a port that cannot be bound;
#: a fleet node's claims in _fleet.py, which name a UDP port so): matched at the start.
_PORT_PATTERNS = (
    ("shutting_down", re.escape(SHUTTING_DOWN)),
    ("out_of_range", r"(UDP )?port \d+ is outside"),
    ("in_use", r"(UDP )?port \d+ is in use"),
    ("exhausted", r"no free (UDP )?port"),
    ("bind_failed", r"port \d+ cannot be bound|cannot listen on port|cannot bind UDP port"),
    ("registry_unreachable", r"the fleet's registry is unreachable"),
)

#: ``snocat_stream_refusals_total{reason}``: streams that were not carried, either
#: way (a visitor's connection the client would not take, a stream a client opened
#: that the aggregator does not serve).
STREAM_REFUSAL_CLASSES = (
    "peer_refused",  # the client refused (its target is down, or not allowed)
    "tunnel_closed",  # the tunnel closed (or was closing) first
    "timeout",  # the stream's negotiation timed out
    "no_service",  # a client opened a stream to an address nothing serves
    "bad_request",  # a malformed proxyme request
    "shutting_down",
    "other",
)
#: How the core (StreamHandle, TunnelConnection) and the server word each: matched at
#: the start, so that what follows (a tunnel's close reason) cannot decide.
_STREAM_PATTERNS = (
    ("tunnel_closed", r"tunnel closed|the tunnel is closed|the tunnel cannot open"),
    ("shutting_down", r"the aggregator is (not running or is )?shutting down"),
    ("timeout", r"stream negotiation timed out"),
    ("peer_refused", r"peer refused the route|(reset by peer|peer stopped reading) during"),
    ("no_service", re.escape(NO_SERVICE)),
    ("bad_request", r"bad proxyme request"),
)


def _classify(reason: str, patterns: Sequence[tuple[str, str]]) -> str:
    for name, pattern in patterns:
        if re.match(pattern, reason):
            return name
    return "other"


def authentication_failure_class(record: activity.TunnelClosed) -> str:
    """The reason class of a tunnel closed before it authenticated."""
    if record.by_peer:
        return "peer_closed"
    # The record does not say whether the code is ours or QUIC's (a transport error,
    # e.g. a handshake that broke down); ours are the ones that matter here.
    return _CLOSE_CLASSES.get(record.code, "other")


def port_refusal_class(reason: str) -> str:
    """The reason class of a :class:`~activity.PortDenied` record's ``reason``."""
    return _classify(reason, _PORT_PATTERNS)


def stream_refusal_class(reason: str) -> str:
    """The reason class of a :class:`~activity.StreamRefused` record's ``reason``."""
    return _classify(reason, _STREAM_PATTERNS)


# Registry health -------------------------------------------------------------------


class RegistryHealth(Protocol):
    """Where ``snocat_registry_up`` comes from: the embedded registry is always up; a
    fleet registry (shared between aggregators) says whether it can reach its store.
    Called on the event loop at every scrape: answer from what is known, never wait."""

    @property
    def kind(self) -> str: ...

    def healthy(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Embedded:
    kind: str = "embedded"

    def healthy(self) -> bool:
        return True


#: The in-process registry of a lone aggregator (``snocat_registry_up{registry="embedded"} 1``).
EMBEDDED_REGISTRY: RegistryHealth = _Embedded()


# The collector ---------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("snocat")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(slots=True)
class _Bytes:
    received: int = 0
    sent: int = 0


class ServerMetrics:
    """The collector and status document of one :class:`TunnelServer`.

    Create it before the server starts (it subscribes to the activity feed then) and
    run :meth:`run` in a task while it serves.  :attr:`registry` is what to expose:
    this collector plus ``prometheus_client``'s process, platform and GC collectors.
    """

    def __init__(
        self,
        server: TunnelServer,
        *,
        per_tunnel: bool = False,
        tunnel_names: int = PER_TUNNEL_NAMES,
        registry_health: RegistryHealth = EMBEDDED_REGISTRY,
        heap: LongLivedHeap | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.server = server
        self.per_tunnel = per_tunnel
        self.tunnel_names = tunnel_names
        self.registry_health = registry_health
        self.heap = heap
        self.version = _version()
        self._clock = clock
        self._started_at = clock()
        self._subscription = server.activity.subscribe()
        self.handshakes_completed = 0
        self.authentications = 0
        self.authentication_failures = dict.fromkeys(AUTHENTICATION_FAILURE_CLASSES, 0)
        self.port_refusals = dict.fromkeys(PORT_REFUSAL_CLASSES, 0)
        self.stream_refusals = dict.fromkeys(STREAM_REFUSAL_CLASSES, 0)
        #: UDP flows (``udp-datagrams``): opened, ended, their datagrams (counted as
        #: each flow ends) and the datagrams dropped, by reason.
        self.udp_flows_opened = 0
        self.udp_flows_closed = 0
        self.udp_datagrams = {"received": 0, "sent": 0}
        self.udp_drops: dict[str, int] = {}
        #: Bytes of every stream whose StreamClosed record came, of any tunnel.
        self._finished = _Bytes()
        #: The same per live tunnel (by tunnel id): the part of its TunnelStatus that
        #: ``_finished`` holds already.
        self._finished_of: dict[str, _Bytes] = {}
        #: The byte counters as last reported: they never go down (see _bytes).
        self._reported = _Bytes()
        self._adopt_live_tunnels()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    # The activity feed ---------------------------------------------------------

    async def run(self) -> None:
        """Count the activity records as they come, until the feed ends."""
        while True:
            try:
                async for record in self._subscription:
                    self._count(record)
                return
            except FeedOverflowError:
                # Fell behind (records came faster than this task ran): what it missed
                # is not counted.  Take a new subscription and carry on.
                logger.warning("the metrics fell behind the activity feed; some records lost")
                self._subscription = self.server.activity.subscribe()
                self._adopt_live_tunnels()

    def close(self) -> None:
        self._subscription.close()

    def _drain(self) -> None:
        while (record := self._subscription.get_nowait()) is not None:
            self._count(record)

    def _adopt_live_tunnels(self) -> None:
        """Tunnels already up when subscribing: their TunnelStatus holds all their bytes."""
        for status in self.server.tunnels():
            self._finished_of.setdefault(status.tunnel_id, _Bytes())

    def _count(self, record: activity.Activity) -> None:
        if isinstance(record, activity.StreamClosed):
            self._finished.received += record.bytes_in
            self._finished.sent += record.bytes_out
            of_tunnel = self._finished_of.get(record.tunnel_id)
            if of_tunnel is not None:
                of_tunnel.received += record.bytes_in
                of_tunnel.sent += record.bytes_out
        elif isinstance(record, activity.TunnelConnected):
            self.handshakes_completed += 1
        elif isinstance(record, activity.TunnelAuthenticated):
            self.authentications += 1
            self._finished_of[record.tunnel_id] = _Bytes()
        elif isinstance(record, activity.TunnelClosed):
            self._finished_of.pop(record.tunnel_id, None)
            if record.name is None:
                self.authentication_failures[authentication_failure_class(record)] += 1
        elif isinstance(record, activity.PortDenied):
            self.port_refusals[port_refusal_class(record.reason)] += 1
        elif isinstance(record, activity.StreamRefused):
            self.stream_refusals[stream_refusal_class(record.reason)] += 1
        elif isinstance(record, activity.UdpFlowOpened):
            self.udp_flows_opened += 1
        elif isinstance(record, activity.UdpFlowClosed):
            self.udp_flows_closed += 1
            self.udp_datagrams["received"] += record.datagrams_in
            self.udp_datagrams["sent"] += record.datagrams_out
            self._udp_dropped(record.drops)
        elif isinstance(record, activity.UdpDropped):
            self._udp_dropped(record.drops)

    def _udp_dropped(self, drops: dict[str, int]) -> None:
        for reason, count in drops.items():
            self.udp_drops[reason] = self.udp_drops.get(reason, 0) + count

    def _bytes(self, statuses: Sequence[TunnelStatus]) -> _Bytes:
        """Bytes to and from the tunnels since the start, live ones and gone ones.

        A live tunnel counts with its TunnelStatus; one that is gone with the
        StreamClosed records of its streams (every stream carrying a visitor's
        connection or a routed service has one).  What a gone tunnel's status counted
        beyond those (its proxyme exchanges, data that arrived but was never read) is
        dropped then; so that a counter never goes down, which Prometheus would take
        for a restart, the reported value holds until the traffic passes it again."""
        received, sent = self._finished.received, self._finished.sent
        for status in statuses:
            done = self._finished_of.get(status.tunnel_id, _Bytes())
            received += max(0, status.bytes_in - done.received)
            sent += max(0, status.bytes_out - done.sent)
        self._reported.received = max(self._reported.received, received)
        self._reported.sent = max(self._reported.sent, sent)
        return _Bytes(self._reported.received, self._reported.sent)

    # prometheus_client's Collector ---------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic series: nothing to check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        self._drain()
        server = self.server
        statuses = server.tunnels()
        counters = server.counters()
        config = server.config
        traffic = self._bytes(statuses)

        info = InfoMetricFamily("snocat_build", "The snocat that is running.")
        info.add_metric([], {"version": self.version, "python": platform.python_version()})
        yield info
        yield _gauge(
            "snocat_start_time_seconds",
            "When this aggregator started, in seconds since the epoch.",
            self._started_at,
        )
        yield _gauge("snocat_tunnels", "Authenticated tunnels now.", len(statuses))
        if config.max_tunnels is not None:
            yield _gauge(
                "snocat_tunnels_max", "Tunnels allowed at once (--max-tunnels).", config.max_tunnels
            )
        yield _gauge(
            "snocat_streams_open",
            "Open tunnel streams now, including the one that holds each granted port.",
            sum(status.open_streams for status in statuses),
        )
        yield _gauge(
            "snocat_forwarded_connections",
            "Visitors' TCP connections being forwarded now (the live table's conns).",
            sum(forwarded_connections(status) for status in statuses),
        )
        yield _counter(
            "snocat_received_bytes",
            "Bytes received from the tunnels (the live table's in).",
            traffic.received,
        )
        yield _counter(
            "snocat_sent_bytes",
            "Bytes sent to the tunnels (the live table's out).",
            traffic.sent,
        )
        yield _counter(
            "snocat_handshakes_started",
            "QUIC handshakes begun (past Retry and the handshake rate).",
            counters.handshakes_started,
        )
        yield _counter(
            "snocat_handshakes_completed",
            "QUIC handshakes completed (the tunnel then authenticates).",
            self.handshakes_completed,
        )
        yield _counter(
            "snocat_handshakes_refused",
            "Connection attempts refused: their address was over --handshake-rate.",
            counters.handshakes_refused,
        )
        yield _counter(
            "snocat_authentications", "Tunnels that authenticated.", self.authentications
        )
        yield _by_label(
            "snocat_authentication_failures",
            "Tunnels closed before they authenticated, by reason.",
            self.authentication_failures,
        )
        yield _by_label(
            "snocat_port_refusals",
            "Public ports asked for and not granted, by reason.",
            self.port_refusals,
        )
        yield _by_label(
            "snocat_stream_refusals",
            "Streams refused (a visitor's connection, or a stream a client opened), by reason.",
            self.stream_refusals,
        )
        yield _by_label(
            "snocat_name_routing_failures",
            "Visitors of the public listeners not forwarded (shared --http/--tls, and PROXY "
            "headers on the ports), by reason.",
            {failure.value: 0 for failure in FAILURES} | dict(counters.name_routing_failures),
        )
        published = GaugeMetricFamily(
            "snocat_names_published",
            "Tunnels that publish a target by name on the shared listeners now, by service.",
            labels=["service"],
        )
        for service in NAMED_SERVICES:
            published.add_metric([service], sum(service in status.names for status in statuses))
        yield published
        if self.heap is not None and self.heap.installed:
            yield from _heap_families(self.heap)
        yield _gauge("snocat_ports_in_use", "Public ports granted now.", len(server.ports_in_use))
        yield _gauge(
            "snocat_port_range_size",
            "Public ports the aggregator may grant (--ports).",
            len(config.port_range),
        )
        udp_range = config.udp_port_range
        yield _gauge(
            "snocat_udp_ports_in_use", "Public UDP ports granted now.", len(server.udp_ports_in_use)
        )
        yield _gauge(
            "snocat_udp_port_range_size",
            "Public UDP ports the aggregator may grant (--udp-ports; 0: none).",
            0 if udp_range is None else len(udp_range),
        )
        yield _counter(
            "snocat_udp_flows", "UDP flows opened (visitor addresses).", self.udp_flows_opened
        )
        yield _gauge(
            "snocat_udp_flows_open",
            "UDP flows open now.",
            self.udp_flows_opened - self.udp_flows_closed,
        )
        yield _by_label(
            "snocat_udp_datagrams",
            "UDP datagrams of ended flows: received from the tunnel (to visitors), sent "
            "into it (from visitors).",
            self.udp_datagrams,
            label="direction",
        )
        yield _by_label(
            "snocat_udp_datagrams_dropped",
            "UDP datagrams of visitors not carried, by reason (too_big, over_rate, "
            "congested, flow_limit, ...), counted as each flow or port ends.",
            self.udp_drops,
        )
        yield _counter(
            "snocat_activity_laggards",
            "Activity subscribers closed because they fell too far behind.",
            server.activity.laggards,
        )
        yield _by_label(
            "snocat_datagrams_dropped",
            "UDP datagrams dropped: received ones that belonged to no tunnel and could "
            "start none, and ones not sent because the socket's buffer was full.",
            {
                "received": counters.datagrams_dropped_received,
                "sent": counters.datagrams_dropped_sent,
            },
            label="direction",
        )
        yield _counter(
            "snocat_tunnels_failed",
            "Tunnels closed because handling them raised (a bug: see the log).",
            counters.tunnels_failed,
        )
        health = GaugeMetricFamily(
            "snocat_registry_up",
            "Whether the tunnel registry is usable (the embedded one always is).",
            labels=["registry"],
        )
        health.add_metric([self.registry_health.kind], 1 if self.registry_health.healthy() else 0)
        yield health
        if self.per_tunnel:
            yield from self._per_tunnel(statuses)

    def _per_tunnel(self, statuses: Sequence[TunnelStatus]) -> Iterator[Metric]:
        groups = group_by_name(statuses, self.tunnel_names)
        families = (
            ("snocat_tunnel_received_bytes", "Bytes received from the tunnel(s) of a name.", True),
            ("snocat_tunnel_sent_bytes", "Bytes sent to the tunnel(s) of a name.", True),
            ("snocat_tunnel_streams_open", "Open streams of the tunnel(s) of a name.", False),
            (
                "snocat_tunnel_forwarded_connections",
                "Visitors' connections the tunnel(s) of a name forward now.",
                False,
            ),
            ("snocat_tunnel_ports", "Public ports granted to the tunnel(s) of a name.", False),
        )
        values: list[Callable[[TunnelStatus], int]] = [
            lambda s: s.bytes_in,
            lambda s: s.bytes_out,
            lambda s: s.open_streams,
            forwarded_connections,
            lambda s: len(s.ports),
        ]
        for (name, help_text, is_counter), value in zip(families, values, strict=True):
            family: CounterMetricFamily | GaugeMetricFamily
            if is_counter:
                family = CounterMetricFamily(name, help_text, labels=["name"])
            else:
                family = GaugeMetricFamily(name, help_text, labels=["name"])
            for label, members in groups.items():
                family.add_metric([label], sum(value(status) for status in members))
            yield family
        other_names = {status.name for status in groups.get(OTHER, ())}
        yield _gauge(
            "snocat_tunnel_other_names",
            f'Tunnel names summed under name="{OTHER}" (beyond the first {self.tunnel_names}).',
            len(other_names),
        )

    # /status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The node and its tunnels, as ``/status`` serves them (JSON-ready)."""
        now = self._clock()
        try:
            quic = format_host_port(*self.server.quic_address)
        except RuntimeError:  # not started yet
            quic = ""
        return {
            "node": {
                "version": self.version,
                "quic": quic,
                "started_at": self._started_at,
                "uptime": round(max(0.0, now - self._started_at), 3),
            },
            "tunnels": [tunnel_document(status, now) for status in self.server.tunnels()],
        }


def tunnel_document(status: TunnelStatus, now: float) -> dict[str, Any]:
    """One tunnel of ``/status``; :func:`status_from_document` reads it back."""
    return {
        "name": status.name,
        "tunnel_id": status.tunnel_id,
        "peer": status.peer,
        "scheme": status.scheme,
        "ports": list(status.ports),
        "udp_ports": list(status.udp_ports),
        "names": list(status.names),
        "age": round(max(0.0, now - status.connected_at), 3),
        "open_streams": status.open_streams,
        "connections": forwarded_connections(status),
        "bytes_in": status.bytes_in,
        "bytes_out": status.bytes_out,
    }


def status_from_document(tunnel: dict[str, Any], now: float) -> TunnelStatus:
    """A ``/status`` tunnel as a :class:`TunnelStatus` (for the live table's rendering).

    Raises ``KeyError``, ``TypeError`` or ``ValueError`` if it is not one."""
    return TunnelStatus(
        tunnel_id=str(tunnel.get("tunnel_id", "")),
        name=str(tunnel["name"]),
        peer=str(tunnel["peer"]),
        scheme=str(tunnel.get("scheme", "")),
        ports=tuple(int(port) for port in tunnel["ports"]),
        names=tuple(str(service) for service in tunnel.get("names", ())),
        udp_ports=tuple(int(port) for port in tunnel.get("udp_ports", ())),
        connected_at=now - float(tunnel["age"]),
        open_streams=int(tunnel["open_streams"]),
        bytes_in=int(tunnel["bytes_in"]),
        bytes_out=int(tunnel["bytes_out"]),
    )


def group_by_name(
    statuses: Sequence[TunnelStatus], limit: int = PER_TUNNEL_NAMES
) -> dict[str, list[TunnelStatus]]:
    """The tunnels by label: the first ``limit`` names of ``statuses`` (oldest first,
    so a name keeps its label while it stays), each with its tunnels (two during a
    takeover), and :data:`OTHER` with the rest (always present, maybe empty)."""
    groups: dict[str, list[TunnelStatus]] = {}
    other: list[TunnelStatus] = []
    for status in statuses:
        if status.name in groups:
            groups[status.name].append(status)
        elif status.name != OTHER and len(groups) < limit:
            groups[status.name] = [status]
        else:
            other.append(status)
    groups[OTHER] = other
    return groups


def _heap_families(heap: LongLivedHeap) -> Iterator[Metric]:
    counts = heap.counts()
    yield _gauge(
        "snocat_gc_frozen_objects",
        "Objects frozen out of the garbage collector's full collections (--heap-freeze).",
        counts.frozen,
    )
    yield _by_label(
        "snocat_gc_full_collections",
        "Full garbage collections since --heap-freeze began, by kind: shallow (only objects "
        "made since the last one) or deep (every object, once the frozen ones grew).",
        {"shallow": counts.shallow, "deep": counts.deep},
        label="kind",
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_label(
    name: str, documentation: str, counts: dict[str, int], label: str = "reason"
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family
