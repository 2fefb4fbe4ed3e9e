"""The collector behind ``/metrics`` and the ``/status`` document (snocat_anyio._metrics),
over a stand-in server whose tunnels and activity records each test sets; and the
reason classes, fed the very texts the server's code produces.  The real server and
client, scraped over HTTP, are tests/test_cli_metrics.py."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import anyio
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from snocat_anyio._feed import ActivityFeed
from snocat_anyio._metrics import (
    AUTHENTICATION_FAILURE_CLASSES,
    OTHER,
    PER_TUNNEL_NAMES,
    PORT_REFUSAL_CLASSES,
    STREAM_REFUSAL_CLASSES,
    ServerMetrics,
    authentication_failure_class,
    port_refusal_class,
    status_from_document,
    stream_refusal_class,
    tunnel_document,
)
from snocat_anyio._server import ServerCounters, TunnelServer
from snocat_proto._service import activity
from snocat_proto._service.aggregator import (
    NO_SERVICE,
    SHUTTING_DOWN,
    Aggregator,
    PortRefusal,
    TunnelSession,
    TunnelStatus,
)
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.ports import PortRange
from snocat_proto._service.stream_handle import StreamHandle
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.codes import CloseCode
from snocat_proto._wire.events import StreamRejected
from snocat_proto._wire.proxyme import ProxymeRequest
from snocat_proto._wire.tunnel import TunnelConnection

NOW = 1_800_000_000.0


class StandIn:
    """What ServerMetrics reads of a TunnelServer, set by the test."""

    def __init__(self, **config: Any) -> None:
        self.config = ServerConfig(
            certificate_pem=b"", private_key_pem=b"", port_range=PortRange(8080, 8089), **config
        )
        self.activity = ActivityFeed(1000)
        self.statuses: list[TunnelStatus] = []
        self.counts = ServerCounters()
        self.ports_in_use: frozenset[int] = frozenset()
        self.udp_ports_in_use: frozenset[int] = frozenset()
        self.quic_address = ("127.0.0.1", 9090)

    def tunnels(self) -> list[TunnelStatus]:
        return list(self.statuses)

    def counters(self) -> ServerCounters:
        return self.counts


def metrics_of(server: StandIn, **options: Any) -> ServerMetrics:
    return ServerMetrics(cast(TunnelServer, server), clock=lambda: NOW, **options)


def tunnel(name: str, tunnel_id: str = "", **fields: Any) -> TunnelStatus:
    values: dict[str, Any] = {
        "tunnel_id": tunnel_id or f"id-{name}",
        "name": name,
        "peer": "192.0.2.1:40000",
        "scheme": "token",
        "ports": (),
        "connected_at": NOW - 60,
        "open_streams": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        **fields,
    }
    return TunnelStatus(**values)


def scrape(metrics: ServerMetrics) -> list[Sample]:
    """What a scrape returns, parsed back as Prometheus would."""
    text = generate_latest(metrics.registry).decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], metric: str, /, **labels: str) -> float:
    found = [s.value for s in samples if s.name == metric and s.labels == labels]
    assert len(found) == 1, (metric, labels, [s for s in samples if s.name == metric])
    return found[0]


def authenticated(tunnel_id: str, name: str) -> activity.TunnelAuthenticated:
    return activity.TunnelAuthenticated(
        at=NOW, tunnel_id=tunnel_id, name=name, peer="192.0.2.1:1", scheme="token"
    )


def stream_closed(tunnel_id: str, bytes_in: int, bytes_out: int) -> activity.StreamClosed:
    return activity.StreamClosed(
        at=NOW,
        tunnel_id=tunnel_id,
        stream_id=4,
        address="/proxy-tcp/dns/127.0.0.1/tcp/80",
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        error=None,
    )


def tunnel_closed(
    tunnel_id: str, name: str | None, code: int, *, by_peer: bool = False
) -> activity.TunnelClosed:
    return activity.TunnelClosed(
        at=NOW,
        tunnel_id=tunnel_id,
        name=name,
        peer="192.0.2.1:1",
        code=code,
        reason="why",
        by_peer=by_peer,
    )


# The node's series ------------------------------------------------------------------


def test_a_scrape_reads_the_live_state() -> None:
    server = StandIn(max_tunnels=50)
    metrics = metrics_of(server)
    server.statuses = [
        tunnel("alpha", ports=(8080,), open_streams=3, bytes_in=1000, bytes_out=10),
        tunnel("beta", ports=(8081, 8082), open_streams=2),
    ]
    server.ports_in_use = frozenset({8080, 8081, 8082})
    server.counts = ServerCounters(
        handshakes_started=7,
        handshakes_refused=2,
        datagrams_dropped_received=5,
        datagrams_dropped_sent=1,
        tunnels_failed=1,
    )
    samples = scrape(metrics)
    assert value(samples, "snocat_tunnels") == 2
    assert value(samples, "snocat_tunnels_max") == 50
    assert value(samples, "snocat_streams_open") == 5
    # The live table's conns: each granted port's proxyme stream is not a visitor.
    assert value(samples, "snocat_forwarded_connections") == 2
    assert value(samples, "snocat_received_bytes_total") == 1000
    assert value(samples, "snocat_sent_bytes_total") == 10
    assert value(samples, "snocat_ports_in_use") == 3
    assert value(samples, "snocat_port_range_size") == 10
    assert value(samples, "snocat_handshakes_started_total") == 7
    assert value(samples, "snocat_handshakes_refused_total") == 2
    assert value(samples, "snocat_datagrams_dropped_total", direction="received") == 5
    assert value(samples, "snocat_datagrams_dropped_total", direction="sent") == 1
    assert value(samples, "snocat_tunnels_failed_total") == 1
    assert value(samples, "snocat_activity_laggards_total") == 0
    assert value(samples, "snocat_registry_up", registry="embedded") == 1
    assert value(samples, "snocat_start_time_seconds") == NOW
    [build] = [s for s in samples if s.name == "snocat_build_info"]
    assert build.value == 1 and build.labels["version"] == metrics.version
    assert "process_cpu_seconds_total" in {s.name for s in samples}  # the usual extras
    # Without --metrics-per-tunnel, no series names a tunnel.
    assert not [s for s in samples if "name" in s.labels]


def test_name_routing_is_counted_by_reason_from_zero() -> None:
    server = StandIn()
    metrics = metrics_of(server)
    server.statuses = [
        tunnel("alpha", names=("http", "tls"), open_streams=3),
        tunnel("beta", names=("http",), open_streams=1),
    ]
    server.counts = ServerCounters(name_routing_failures={"timeout": 2, "offline": 1})
    samples = scrape(metrics)
    failures = "snocat_name_routing_failures_total"
    assert value(samples, failures, reason="timeout") == 2
    assert value(samples, failures, reason="offline") == 1
    for reason in ("unknown_name", "no_service", "refused", "busy", "proxy_header"):
        assert value(samples, failures, reason=reason) == 0
    assert value(samples, "snocat_names_published", service="http") == 2
    assert value(samples, "snocat_names_published", service="tls") == 1
    # A publication's stream is not a visitor's connection.
    assert value(samples, "snocat_forwarded_connections") == 1


def test_records_are_counted_by_reason_and_every_reason_is_there_from_the_start() -> None:
    server = StandIn()
    metrics = metrics_of(server)
    first = scrape(metrics)
    for family, classes in (
        ("snocat_authentication_failures_total", AUTHENTICATION_FAILURE_CLASSES),
        ("snocat_port_refusals_total", PORT_REFUSAL_CLASSES),
        ("snocat_stream_refusals_total", STREAM_REFUSAL_CLASSES),
    ):
        assert {s.labels["reason"] for s in first if s.name == family} == set(classes)
        assert all(s.value == 0 for s in first if s.name == family)
    publish = server.activity.publish
    publish(activity.TunnelConnected(at=NOW, tunnel_id="t1", peer="p"))
    publish(activity.TunnelConnected(at=NOW, tunnel_id="t2", peer="p"))
    publish(activity.TunnelConnected(at=NOW, tunnel_id="t3", peer="p"))
    publish(tunnel_closed("t1", None, CloseCode.AUTHENTICATION_FAILED))
    publish(tunnel_closed("t2", None, CloseCode.AUTHENTICATION_TIMEOUT))
    publish(authenticated("t3", "alpha"))
    publish(tunnel_closed("t3", "alpha", CloseCode.AUTHENTICATION_FAILED))  # revoked: no login
    publish(activity.PortDenied(at=NOW, tunnel_id="t3", name="alpha", reason="no free port in 1:2"))
    publish(activity.StreamRefused(at=NOW, tunnel_id="t3", address="/x", reason=NO_SERVICE))
    # Counted by the scrape itself: the records published before it are all in.
    samples = scrape(metrics)
    assert value(samples, "snocat_handshakes_completed_total") == 3
    assert value(samples, "snocat_authentications_total") == 1
    failures = "snocat_authentication_failures_total"
    assert value(samples, failures, reason="bad_credential") == 1
    assert value(samples, failures, reason="timeout") == 1
    assert sum(s.value for s in samples if s.name == failures) == 2
    assert value(samples, "snocat_port_refusals_total", reason="exhausted") == 1
    assert value(samples, "snocat_stream_refusals_total", reason="no_service") == 1


@pytest.mark.anyio
async def test_the_run_task_keeps_the_subscription_drained(anyio_backend: str) -> None:
    server = StandIn()
    metrics = metrics_of(server)
    async with anyio.create_task_group() as tg:
        tg.start_soon(metrics.run)
        for number in range(3):
            server.activity.publish(
                activity.TunnelConnected(at=NOW, tunnel_id=f"{number}", peer="")
            )
        with anyio.fail_after(10):
            while metrics.handshakes_completed < 3:
                await anyio.sleep(0.01)
        server.activity.close()  # the server stopped: run() returns
    assert metrics.handshakes_completed == 3


# Bytes -----------------------------------------------------------------------------------


def test_bytes_count_live_tunnels_and_those_gone_and_never_go_down() -> None:
    server = StandIn()
    metrics = metrics_of(server)
    publish = server.activity.publish
    publish(authenticated("a1", "alpha"))
    # One finished stream (in the status's totals and in a StreamClosed record) and
    # one open one: counted once each.
    publish(stream_closed("a1", 600, 60))
    server.statuses = [tunnel("alpha", "a1", bytes_in=1000, bytes_out=100)]
    samples = scrape(metrics)
    assert value(samples, "snocat_received_bytes_total") == 1000
    assert value(samples, "snocat_sent_bytes_total") == 100
    # The tunnel closes; its open stream ends after it: the StreamClosed records hold
    # every byte of its streams, the status a few more (its proxyme exchange).
    server.statuses = []
    publish(tunnel_closed("a1", "alpha", CloseCode.NORMAL, by_peer=True))
    samples = scrape(metrics)
    assert value(samples, "snocat_received_bytes_total") == 1000  # held, not 600
    publish(stream_closed("a1", 390, 38))
    samples = scrape(metrics)
    assert value(samples, "snocat_received_bytes_total") == 1000  # 990 counted: still held
    assert value(samples, "snocat_sent_bytes_total") == 100
    # A new tunnel's traffic moves the counters on from the truth, not from the mark.
    publish(authenticated("b1", "beta"))
    server.statuses = [tunnel("beta", "b1", bytes_in=500, bytes_out=500)]
    samples = scrape(metrics)
    assert value(samples, "snocat_received_bytes_total") == 990 + 500
    assert value(samples, "snocat_sent_bytes_total") == 98 + 500


def test_tunnels_up_before_the_subscription_are_not_counted_twice() -> None:
    server = StandIn()
    server.statuses = [tunnel("alpha", "a1", bytes_in=700, bytes_out=70)]
    metrics = metrics_of(server)
    server.activity.publish(stream_closed("a1", 200, 20))  # a stream its status counts
    samples = scrape(metrics)
    assert value(samples, "snocat_received_bytes_total") == 700
    assert value(samples, "snocat_sent_bytes_total") == 70


# Per-tunnel series: only when asked, and bounded -------------------------------------------


def test_per_tunnel_series_name_at_most_n_tunnels_and_sum_the_rest_under_other() -> None:
    server = StandIn()
    metrics = metrics_of(server, per_tunnel=True)
    assert metrics.tunnel_names == PER_TUNNEL_NAMES
    extra = 25
    # Oldest first, as TunnelServer.tunnels() gives them; one name twice (a takeover
    # in progress), and a tunnel really named "other".
    server.statuses = [
        tunnel(f"t{number:03d}", f"id{number}", ports=(8080,), open_streams=2, bytes_in=number)
        for number in range(PER_TUNNEL_NAMES + extra)
    ]
    server.statuses.insert(1, tunnel("t000", "again", bytes_in=1000))
    server.statuses.insert(2, tunnel(OTHER, "literal", bytes_in=5))
    samples = scrape(metrics)
    received = {
        s.labels["name"]: s.value for s in samples if s.name == "snocat_tunnel_received_bytes_total"
    }
    assert len(received) == PER_TUNNEL_NAMES + 1
    assert set(received) == {f"t{n:03d}" for n in range(PER_TUNNEL_NAMES)} | {OTHER}
    assert received["t000"] == 0 + 1000  # both tunnels of the name
    beyond = range(PER_TUNNEL_NAMES, PER_TUNNEL_NAMES + extra)
    assert received[OTHER] == sum(beyond) + 5
    assert value(samples, "snocat_tunnel_other_names") == extra + 1
    for family in (
        "snocat_tunnel_sent_bytes_total",
        "snocat_tunnel_streams_open",
        "snocat_tunnel_forwarded_connections",
        "snocat_tunnel_ports",
    ):
        assert len([s for s in samples if s.name == family]) == PER_TUNNEL_NAMES + 1, family
    assert value(samples, "snocat_tunnel_ports", name=OTHER) == extra
    assert value(samples, "snocat_tunnel_forwarded_connections", name="t001") == 1
    # Whatever the number of tunnels, the number of series stays put.
    server.statuses = [tunnel(f"n{number}", f"x{number}") for number in range(3 * PER_TUNNEL_NAMES)]
    assert len(scrape(metrics)) == len(samples)


def test_the_bound_is_a_parameter_and_other_is_there_when_empty() -> None:
    server = StandIn()
    metrics = metrics_of(server, per_tunnel=True, tunnel_names=2)
    server.statuses = [tunnel("a"), tunnel("b"), tunnel("c"), tunnel("d")]
    samples = scrape(metrics)
    names = [s.labels["name"] for s in samples if s.name == "snocat_tunnel_streams_open"]
    assert names == ["a", "b", OTHER]
    server.statuses = []
    samples = scrape(metrics)
    assert value(samples, "snocat_tunnel_received_bytes_total", name=OTHER) == 0


# The registry hook --------------------------------------------------------------------------


@dataclasses.dataclass
class FleetRegistry:
    kind: str = "fleet"
    up: bool = False

    def healthy(self) -> bool:
        return self.up


def test_another_registry_reports_its_own_health() -> None:
    server = StandIn()
    fleet = FleetRegistry()
    metrics = metrics_of(server, registry_health=fleet)
    assert value(scrape(metrics), "snocat_registry_up", registry="fleet") == 0
    fleet.up = True
    assert value(scrape(metrics), "snocat_registry_up", registry="fleet") == 1


# /status ------------------------------------------------------------------------------------


def test_the_status_document_and_reading_it_back() -> None:
    server = StandIn()
    metrics = metrics_of(server)
    status = tunnel("alpha", ports=(8080, 8081), open_streams=3, bytes_in=7, bytes_out=8)
    server.statuses = [status]
    document = metrics.status()
    assert document["node"] == {
        "version": metrics.version,
        "quic": "127.0.0.1:9090",
        "started_at": NOW,
        "uptime": 0.0,
    }
    [entry] = document["tunnels"]
    assert entry == {
        "name": "alpha",
        "tunnel_id": "id-alpha",
        "peer": "192.0.2.1:40000",
        "scheme": "token",
        "ports": [8080, 8081],
        "udp_ports": [],
        "names": [],
        "age": 60.0,
        "open_streams": 3,
        "connections": 1,
        "bytes_in": 7,
        "bytes_out": 8,
    }
    assert status_from_document(tunnel_document(status, NOW), NOW) == status


# Reason classes, fed what the code says -----------------------------------------------------


def _session_books() -> tuple[Aggregator[TunnelSession], TunnelSession]:
    class Tunnel:
        peer_address = ("127.0.0.1", 5000)

    config = ServerConfig(certificate_pem=b"", private_key_pem=b"", port_range=PortRange(1, 1))
    books: Aggregator[TunnelSession] = Aggregator(config, TunnelSession)
    session = books.session(cast(TunnelConnection, Tunnel()), 0)
    books.decide_credential(session, lookup_failed=False)
    books.on_authenticated(session, name="a", scheme="token", wall_time=0)
    return books, session


def test_port_refusals_as_the_aggregator_words_them() -> None:
    books, session = _session_books()
    web = ProxymeRequest("127.0.0.1", 80)

    def refusal(*args: Any, **kwargs: Any) -> str:
        result = books.allocate_port(session, web, 0, *args, **kwargs)
        assert isinstance(result, PortRefusal), result
        return result.reason

    assert port_refusal_class(refusal(set(), wanted=9)) == "out_of_range"
    assert port_refusal_class(refusal({1}, wanted=1)) == "bind_failed"
    assert books.allocate_port(session, web, 0, set()) == 1
    assert port_refusal_class(refusal(set(), wanted=1)) == "in_use"
    assert port_refusal_class(refusal(set())) == "exhausted"
    # snocat_anyio/_server_flows.py, when listening fails for another reason:
    assert port_refusal_class("cannot listen on port 1: Cannot assign address") == "bind_failed"
    books.accepting = False
    assert port_refusal_class(refusal(set())) == "shutting_down"
    assert port_refusal_class("something new") == "other"
    # snocat_anyio/_server_udp.py, and a fleet node's claims (_fleet.py), TCP and UDP:
    assert port_refusal_class("cannot bind UDP port 5300: Address in use") == "bind_failed"
    for noun in ("port", "UDP port"):
        assert port_refusal_class(f"{noun} 1 is in use by another tunnel on node b") == "in_use"
        assert port_refusal_class(f"no free {noun} in 1:4 across the fleet") == "exhausted"
        assert port_refusal_class(f"{noun} 9 is outside this aggregator's range") == "out_of_range"
    unreachable = "the fleet's registry is unreachable; ask again later"
    assert port_refusal_class(unreachable) == "registry_unreachable"


def test_stream_refusals_as_the_core_and_the_server_word_them() -> None:
    books, session = _session_books()
    bad = books.route(session, RouteAddress.parse("/proxyme/9.9.9/1"))
    assert stream_refusal_class(bad.reason) == "bad_request"
    assert stream_refusal_class(NO_SERVICE) == "no_service"
    # What a stream we opened is told (StreamHandle.refusal), from the core's events.
    handle = StreamHandle(cast(TunnelConnection, None), 4, RouteAddress.parse("/x"), accepted=False)
    handle.on_event(StreamRejected(stream_id=4, reason="peer refused the route (status 1)"))
    assert stream_refusal_class(handle.refusal) == "peer_refused"
    closing = StreamHandle(
        cast(TunnelConnection, None), 8, RouteAddress.parse("/x"), accepted=False
    )
    closing.on_tunnel_closed(CloseCode.NORMAL, "client shutting down")
    assert stream_refusal_class(closing.refusal) == "tunnel_closed"
    # The core's other verdicts (snocat_proto/_wire/tunnel.py), and the server's own.
    for reason, expected in (
        ("reset by peer during negotiation", "peer_refused"),
        ("peer stopped reading during negotiation", "peer_refused"),
        ("stream negotiation timed out", "timeout"),
        ("the tunnel is closed", "tunnel_closed"),
        ("the tunnel cannot open streams: closing", "tunnel_closed"),
        ("tunnel closed (code 0x0): bye", "tunnel_closed"),
        ("the aggregator is not running or is shutting down", "shutting_down"),
        (SHUTTING_DOWN, "shutting_down"),
        ("bad NYAN magic", "other"),
    ):
        assert stream_refusal_class(reason) == expected, reason


@pytest.mark.parametrize(
    ("code", "by_peer", "expected"),
    [
        (CloseCode.AUTHENTICATION_FAILED, False, "bad_credential"),
        (CloseCode.AUTHENTICATION_TIMEOUT, False, "timeout"),
        (CloseCode.LIMIT_EXCEEDED, False, "tunnel_limit"),
        (CloseCode.SHUTTING_DOWN, False, "shutting_down"),
        (CloseCode.INTERNAL_ERROR, False, "server_error"),
        (CloseCode.PROTOCOL_VIOLATION, False, "protocol"),
        (CloseCode.UNSUPPORTED_VERSION, False, "protocol"),
        (CloseCode.AUTHENTICATION_FAILED, True, "peer_closed"),
        (CloseCode.NORMAL, False, "other"),
        (0x1234, False, "other"),
    ],
)
def test_authentication_failures_by_close_code(code: int, by_peer: bool, expected: str) -> None:
    record = tunnel_closed("t", None, code, by_peer=by_peer)
    assert authentication_failure_class(record) == expected
    assert expected in AUTHENTICATION_FAILURE_CLASSES


def test_udp_flows_datagrams_and_drops_are_counted() -> None:
    server = StandIn(udp_port_range=PortRange(9053, 9062))
    metrics = metrics_of(server)
    server.udp_ports_in_use = frozenset({9053})
    flow: dict[str, Any] = {
        "tunnel_id": "t1",
        "flow_id": 1,
        "visitor": "192.0.2.7:4000",
        "target": "h:53",
    }
    server.activity.publish(activity.UdpFlowOpened(at=NOW, **flow))
    server.activity.publish(activity.UdpFlowOpened(at=NOW, **{**flow, "flow_id": 3}))
    server.activity.publish(
        activity.UdpFlowClosed(
            at=NOW,
            **flow,
            datagrams_in=7,
            datagrams_out=9,
            bytes_in=70,
            bytes_out=90,
            cause="idle",
            drops={"too_big": 2, "over_rate": 5},
        )
    )
    server.activity.publish(
        activity.UdpDropped(at=NOW, tunnel_id="t1", port=9053, drops={"flow_limit": 4})
    )
    metrics._drain()
    samples = scrape(metrics)
    assert value(samples, "snocat_udp_ports_in_use") == 1
    assert value(samples, "snocat_udp_port_range_size") == 10
    assert value(samples, "snocat_udp_flows_total") == 2
    assert value(samples, "snocat_udp_flows_open") == 1
    assert value(samples, "snocat_udp_datagrams_total", direction="received") == 7
    assert value(samples, "snocat_udp_datagrams_total", direction="sent") == 9
    assert value(samples, "snocat_udp_datagrams_dropped_total", reason="too_big") == 2
    assert value(samples, "snocat_udp_datagrams_dropped_total", reason="over_rate") == 5
    assert value(samples, "snocat_udp_datagrams_dropped_total", reason="flow_limit") == 4


def test_a_udp_port_is_no_visitor_and_shows_in_status() -> None:
    status = tunnel("alpha", ports=(8080,), udp_ports=(9053,), open_streams=3)
    document = tunnel_document(status, NOW)
    # Two proxyme streams hold the ports open; one stream is a visitor's.
    assert (document["udp_ports"], document["connections"]) == ([9053], 1)
    assert status_from_document(document, NOW) == status
