"""The core modules both bindings share: stream handles, attempt verdicts, the
aggregator's books, the client's allow-list check.  Pure: fake tunnels, no I/O."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from snocat_proto._service.aggregator import (
    Aggregator,
    PortRefusal,
    RouteKind,
    TunnelSession,
    endpoint_capacity,
)
from snocat_proto._service.allowlist import AllowList
from snocat_proto._service.attempts import (
    AttemptEnd,
    ErrorKind,
    check_pinned_certificate,
    diagnose_early_close,
    lost_tunnel,
    no_answer,
    unresolvable,
)
from snocat_proto._service.config import ServerConfig
from snocat_proto._service.ports import PortRange
from snocat_proto._service.stream_handle import Blocked, FailureKind, Opening, StreamHandle
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.certificates import fingerprint, generate_self_signed
from snocat_proto._wire.codes import CloseCode, StreamCode
from snocat_proto._wire.events import (
    ConnectionTerminated,
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
    StreamWritable,
)
from snocat_proto._wire.network import port_of
from snocat_proto._wire.proxyme import ProxymeRequest
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.tunnel import TunnelConnection

NOW = datetime.datetime(2026, 11, 25, tzinfo=datetime.UTC)
ADDRESS = RouteAddress.parse("/svc")


@dataclass(eq=False)
class FakeTunnel:
    """The calls a StreamHandle makes, recorded; ``capacity`` is the send room."""

    capacity: int = 1000
    acknowledged: int = 0
    sent: list[tuple[bytes, bool]] = field(default_factory=list)
    closed_streams: list[int] = field(default_factory=list)
    reset_streams: list[tuple[int, int]] = field(default_factory=list)
    peer_address: tuple[str, int] | None = ("127.0.0.1", 5000)

    def acknowledge_received_data(self, stream_id: int, amount: int) -> None:
        self.acknowledged += amount

    def send_capacity(self, stream_id: int) -> int:
        return self.capacity

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        assert len(data) <= self.capacity
        self.capacity -= len(data)
        self.sent.append((data, end_stream))

    def close_stream(self, stream_id: int) -> None:
        self.closed_streams.append(stream_id)

    def reset_stream(self, stream_id: int, code: int = StreamCode.CANCELLED) -> None:
        self.reset_streams.append((stream_id, code))


def handle(tunnel: FakeTunnel, *, accepted: bool = True) -> StreamHandle:
    return StreamHandle(cast(TunnelConnection, tunnel), 4, ADDRESS, accepted=accepted)


def closed(code: int, *, by_peer: bool = True, application: bool = True) -> ConnectionTerminated:
    return ConnectionTerminated(code=code, reason="why", by_peer=by_peer, application=application)


# StreamHandle ---------------------------------------------------------------------


class TestStreamHandle:
    def test_reads_split_chunks_and_acknowledge_what_was_read(self) -> None:
        tunnel = FakeTunnel()
        stream = handle(tunnel)
        assert stream.read(10) is Blocked.WAIT
        assert stream.on_event(DataReceived(stream_id=4, data=b"hello world"))
        assert stream.buffered == 11
        assert stream.read(5) == b"hello"
        assert tunnel.acknowledged == 5
        assert stream.read(100) == b" world"
        assert (tunnel.acknowledged, stream.bytes_received) == (11, 11)

    def test_the_end_comes_after_the_buffered_data(self) -> None:
        stream = handle(FakeTunnel())
        stream.on_event(DataReceived(stream_id=4, data=b"x"))
        stream.on_event(StreamEnded(stream_id=4))
        assert stream.read(10) == b"x"
        assert stream.read(10) is Blocked.END

    def test_a_reset_fails_reads_and_writes_after_the_buffered_data(self) -> None:
        tunnel = FakeTunnel()
        stream = handle(tunnel)
        stream.on_event(DataReceived(stream_id=4, data=b"x"))
        stream.on_event(StreamReset(stream_id=4, code=7, by_peer=True, reason="gone"))
        assert stream.finished
        assert stream.read(10) == b"x"
        assert stream.read(10) is Blocked.FAILED
        assert stream.write(b"y") is Blocked.FAILED
        failure = stream.failure
        assert failure is not None
        assert (failure.kind, failure.code, failure.by_peer) == (FailureKind.RESET, 7, True)
        assert stream.close()  # the core already dropped it: no close_stream call
        assert tunnel.closed_streams == []

    def test_writes_take_what_the_send_buffer_takes(self) -> None:
        tunnel = FakeTunnel(capacity=4)
        stream = handle(tunnel)
        assert stream.write(b"abcdef") == 4
        assert stream.write(b"ef") is Blocked.WAIT
        assert stream.on_event(StreamWritable(stream_id=4))
        tunnel.capacity = 10
        assert stream.write(memoryview(b"ef")) == 2
        assert stream.bytes_sent == 6
        assert stream.send_eof() is None
        assert stream.send_eof() is None  # idempotent
        assert tunnel.sent[-1] == (b"", True)
        assert len(tunnel.sent) == 3
        assert stream.write(b"z") is Blocked.EOF_SENT

    def test_close_and_reset_are_idempotent_and_final(self) -> None:
        tunnel = FakeTunnel()
        stream = handle(tunnel)
        stream.on_event(DataReceived(stream_id=4, data=b"unread"))
        assert stream.close()
        assert not stream.close()
        assert not stream.reset()
        assert tunnel.closed_streams == [4]
        assert stream.read(1) is Blocked.CLOSED
        assert stream.write(b"x") is Blocked.CLOSED
        other = handle(tunnel)
        assert other.reset(StreamCode.TIMEOUT)
        assert tunnel.reset_streams == [(4, StreamCode.TIMEOUT)]

    def test_discarding_acknowledges_everything_and_reads_the_end(self) -> None:
        tunnel = FakeTunnel()
        stream = handle(tunnel)
        stream.on_event(DataReceived(stream_id=4, data=b"abc"))
        stream.discard_incoming()
        assert tunnel.acknowledged == 3
        assert not stream.on_event(DataReceived(stream_id=4, data=b"de"))
        assert tunnel.acknowledged == 5
        assert stream.read(10) is Blocked.END
        assert stream.bytes_received == 5

    def test_opening_outcomes(self) -> None:
        stream = handle(FakeTunnel(), accepted=False)
        assert stream.opening.name == "PENDING"
        assert not stream.finished
        stream.on_event(StreamAccepted(stream_id=4))
        assert stream.opening is Opening.ACCEPTED

        refused = handle(FakeTunnel(), accepted=False)
        refused.on_event(StreamRejected(stream_id=4, reason="no route"))
        assert (refused.opening, refused.refusal, refused.finished) == (
            Opening.REFUSED,
            "no route",
            True,
        )

        orphan = handle(FakeTunnel(), accepted=False)
        orphan.on_tunnel_closed(CloseCode.SHUTTING_DOWN, "bye")
        assert orphan.opening is Opening.TUNNEL_CLOSED
        assert orphan.failure is not None
        assert orphan.failure.kind is FailureKind.TUNNEL_CLOSED
        assert "bye" in orphan.refusal

    def test_unrelated_events_wake_nobody(self) -> None:
        stream = handle(FakeTunnel())
        assert not stream.on_event(closed(0))

    @given(
        chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=20),
        sizes=st.lists(st.integers(1, 64), min_size=1, max_size=20),
    )
    def test_reads_return_every_byte_once_in_order(
        self, chunks: list[bytes], sizes: list[int]
    ) -> None:
        tunnel = FakeTunnel()
        stream = handle(tunnel)
        for chunk in chunks:
            stream.on_event(DataReceived(stream_id=4, data=chunk))
        stream.on_event(StreamEnded(stream_id=4))
        out = bytearray()
        turn = 0
        while isinstance(data := stream.read(sizes[turn % len(sizes)]), bytes):
            assert 0 < len(data) <= sizes[turn % len(sizes)]
            out += data
            turn += 1
        assert data is Blocked.END
        assert bytes(out) == b"".join(chunks)
        assert tunnel.acknowledged == len(out)


# Attempt verdicts -----------------------------------------------------------------


def diagnose(event: ConnectionTerminated, **options: Any) -> AttemptEnd:
    settings: dict[str, Any] = {
        "handshake_done": True,
        "pin_problem": None,
        "server_label": "agg:9090",
        "server_name": "agg",
        **options,
    }
    return diagnose_early_close(event, **settings)


class TestAttempts:
    def test_a_refused_credential_is_fatal(self) -> None:
        end = diagnose(closed(CloseCode.AUTHENTICATION_FAILED))
        assert (end.fatal, end.kind) == (True, ErrorKind.AUTHENTICATION)
        assert "the aggregator refused authentication: why" in end.message

    def test_the_same_number_as_a_transport_error_is_not_an_auth_failure(self) -> None:
        # 0x10 is also QUIC's NO_VIABLE_PATH.
        end = diagnose(closed(CloseCode.AUTHENTICATION_FAILED, application=False))
        assert (end.fatal, end.kind) == (False, ErrorKind.CONNECT)

    def test_tls_alerts(self) -> None:
        untrusted = diagnose(closed(0x100 + 42, by_peer=False, application=False))
        assert untrusted.fatal and "not trusted" in untrusted.message
        aborted = diagnose(closed(0x100 + 40, application=False))
        assert aborted.fatal and "ALPN" in aborted.message
        # An application close with such a number is no TLS alert.
        assert not diagnose(closed(0x128, application=True)).fatal

    def test_a_pin_mismatch_is_fatal(self) -> None:
        end = diagnose(closed(CloseCode.REFUSED, by_peer=False), pin_problem="mismatch")
        assert end.fatal and end.message.startswith("mismatch")

    def test_silence_and_losses_are_retried(self) -> None:
        quiet = diagnose(closed(0, application=False), handshake_done=False)
        assert (quiet.fatal, quiet.no_answer) == (False, True)
        assert not diagnose(closed(CloseCode.LIMIT_EXCEEDED)).fatal
        assert not diagnose(closed(CloseCode.INTERNAL_ERROR)).fatal  # e.g. its store failed
        assert no_answer("agg:9090", "within 2 s").no_answer
        assert not unresolvable("nowhere", "no addresses").fatal
        lost = lost_tunnel(closed(CloseCode.SHUTTING_DOWN))
        assert (lost.fatal, lost.kind, lost.code) == (
            False,
            ErrorKind.TUNNEL_CLOSED,
            CloseCode.SHUTTING_DOWN,
        )
        assert "0x15" in lost.reason

    def test_port_of(self) -> None:
        assert port_of(("127.0.0.1:8080",)) == 8080
        assert port_of(("garbage", "[::]:8081")) == 8081
        assert port_of(("x:99999",)) == 0

    def test_pinned_certificate(self) -> None:
        pem, _ = generate_self_signed(["localhost"], now=NOW)
        certificate = x509.load_pem_x509_certificate(pem)

        @dataclass
        class Tunnel:
            peer_certificate: x509.Certificate | None

        def tunnel(cert: x509.Certificate | None) -> TunnelConnection:
            return cast(TunnelConnection, Tunnel(cert))

        good = fingerprint(certificate)
        assert check_pinned_certificate(tunnel(certificate), good.lower()) is None
        other = "AA:" * 31 + "AA"
        assert "mismatch" in (check_pinned_certificate(tunnel(certificate), other) or "")
        assert "no certificate" in (check_pinned_certificate(tunnel(None), good) or "")


# The aggregator's books -------------------------------------------------------------


def books(**options: Any) -> Aggregator[TunnelSession]:
    settings: dict[str, Any] = {
        "certificate_pem": b"",
        "private_key_pem": b"",
        "port_range": PortRange(8080, 8082),
        **options,
    }
    counter = iter(range(1000))
    return Aggregator(
        ServerConfig(**settings),
        TunnelSession,
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def fake_tunnel() -> TunnelConnection:
    return cast(TunnelConnection, FakeTunnel())


class TestAggregator:
    def test_sessions_get_unique_ids_and_register_when_authenticated(self) -> None:
        agg = books()
        tunnel = fake_tunnel()
        session = agg.session(tunnel, 100.0)
        assert agg.session(tunnel, 200.0) is session
        assert (session.peer, session.connected_at, session.label) == (
            "127.0.0.1:5000",
            100.0,
            "127.0.0.1:5000",
        )
        other = agg.session(fake_tunnel(), 1.0)
        assert other.tunnel_id != session.tunnel_id
        assert agg.decide_credential(session, lookup_failed=False) is None
        assert agg.on_authenticated(session, name="alpha", scheme="token", wall_time=5) is None
        assert session.registered and session.label == "alpha"
        assert agg.route_to("alpha") is session
        assert [s.name for s in agg.statuses()] == ["alpha"]
        assert agg.on_closed(tunnel, "bye") is session
        assert session.closed
        assert agg.route_to("alpha") is None
        assert agg.on_closed(tunnel, "again") is None

    def test_the_tunnel_limit_and_shutdown_refuse_with_their_codes(self) -> None:
        agg = books(max_tunnels=1)
        first, second = agg.session(fake_tunnel(), 0), agg.session(fake_tunnel(), 0)
        assert agg.decide_credential(first, lookup_failed=False) is None
        assert agg.decide_credential(second, lookup_failed=False) == (
            CloseCode.LIMIT_EXCEEDED,
            "aggregator is at its tunnel limit",
        )
        # SimpleAck has no credential step: the limit is checked at authentication.
        assert agg.on_authenticated(second, name="b", scheme="simple-ack", wall_time=0) == (
            CloseCode.LIMIT_EXCEEDED,
            "aggregator is at its tunnel limit",
        )
        assert agg.decide_credential(second, lookup_failed=True) == (
            CloseCode.INTERNAL_ERROR,
            "the aggregator could not check the credential; try again later",
        )
        agg.accepting = False
        assert agg.on_handshake() == (CloseCode.SHUTTING_DOWN, "the aggregator is shutting down")
        assert agg.decide_credential(second, lookup_failed=False) is not None

    def test_routing_decisions(self) -> None:
        agg = books()
        session = agg.session(fake_tunnel(), 0)
        proxyme = RouteAddress.parse("/proxyme/0.0.1/localhost/5000")
        assert agg.route(session, proxyme).kind is RouteKind.DROP  # not registered yet
        agg.decide_credential(session, lookup_failed=False)
        agg.on_authenticated(session, name="a", scheme="token", wall_time=0)
        decision = agg.route(session, proxyme)
        assert decision.kind is RouteKind.PROXYME
        assert decision.request is not None and decision.request.port == 5000
        bad = agg.route(session, RouteAddress.parse("/proxyme/9.9.9/1"))
        assert bad.kind is RouteKind.REFUSE and "bad proxyme request" in bad.reason
        assert agg.route(session, ADDRESS).kind is RouteKind.HOOK
        assert books(proxyme=False).route(session, proxyme).kind is RouteKind.HOOK

    def test_ports_are_leased_remembered_and_released(self) -> None:
        agg = books(sticky_port_seconds=10)
        session = agg.session(fake_tunnel(), 0)
        agg.decide_credential(session, lookup_failed=False)
        agg.on_authenticated(session, name="a", scheme="token", wall_time=0)
        web, ssh = ProxymeRequest("127.0.0.1", 80), ProxymeRequest("127.0.0.1", 22)
        assert agg.allocate_port(session, web, 0, {8080}) == 8081  # 8080: the OS refused it
        agg.port_granted(session, 8081, web)
        assert agg.registry.by_port(8081) is not None
        assert agg.statuses()[0].ports == (8081,)
        assert agg.port_released(session, 8081, 1.0)
        assert not agg.ports_in_use
        assert agg.registry.by_port(8081) is None
        # The same name gets its port back for the same target (sticky), unless it is
        # taken or too late; another target of the name gets another port.
        assert agg.allocate_port(session, ssh, 2.0, set()) == 8080
        agg.port_unavailable(8080)
        assert agg.allocate_port(session, web, 2.0, set()) == 8081
        agg.port_unavailable(8081)
        assert agg.allocate_port(session, web, 20.0, set()) == 8080
        assert agg.allocate_port(session, web, 20.0, set()) == 8081
        assert agg.allocate_port(session, web, 20.0, set()) == 8082
        assert agg.allocate_port(session, web, 20.0, set()) == PortRefusal(
            "no free port in 8080:8082", retry=True
        )
        refusal = agg.allocate_port(session, web, 20.0, {1})
        assert isinstance(refusal, PortRefusal) and "1 refused by the OS" in refusal.reason
        # A port released that was never granted (denied before the grant went out).
        assert not agg.port_released(session, 8082, 21.0)
        assert agg.finish("stopped") == frozenset({8080, 8081})
        assert not agg.ports_in_use and not len(agg.registry)
        assert agg.allocate_port(session, web, 22.0, set()) == PortRefusal(
            "the aggregator is shutting down", retry=True
        )

    def test_a_port_asked_for_is_granted_only_if_in_range_and_free(self) -> None:
        agg = books()
        session = agg.session(fake_tunnel(), 0)
        agg.decide_credential(session, lookup_failed=False)
        agg.on_authenticated(session, name="a", scheme="token", wall_time=0)
        web = ProxymeRequest("127.0.0.1", 80)
        assert agg.allocate_port(session, web, 0, set(), wanted=8082) == 8082
        assert agg.allocate_port(session, web, 0, set(), wanted=8082) == PortRefusal(
            "port 8082 is in use by another tunnel", retry=True
        )
        assert agg.allocate_port(session, web, 0, set(), wanted=9000) == PortRefusal(
            "port 9000 is outside this aggregator's range 8080:8082", retry=False
        )
        assert agg.allocate_port(session, web, 0, {8081}, wanted=8081) == PortRefusal(
            "port 8081 cannot be bound on the aggregator", retry=True
        )
        assert agg.allocate_port(session, web, 0, set()) == 8080  # the rest as before

    def test_status_counts_the_bytes_of_tracked_streams(self) -> None:
        agg = books()
        tunnel = FakeTunnel()
        session = agg.session(cast(TunnelConnection, tunnel), 0)
        agg.decide_credential(session, lookup_failed=False)
        agg.on_authenticated(session, name="a", scheme="token", wall_time=0)
        first, second = handle(tunnel), handle(tunnel)
        session.track(first)
        session.track(second)
        first.on_event(DataReceived(stream_id=4, data=b"12345"))
        second.write(b"abc")
        status = agg.status(session)
        assert (status.open_streams, status.bytes_in, status.bytes_out) == (2, 5, 3)
        first.close()
        status = agg.status(session)
        assert (status.open_streams, status.bytes_in, status.bytes_out) == (1, 5, 3)

    def test_endpoint_capacity_leaves_room_for_handshakes(self) -> None:
        assert endpoint_capacity(None) is None
        assert endpoint_capacity(1) == 17
        assert endpoint_capacity(1000) == 1250


# The client's allow-list check ------------------------------------------------------


def test_the_allow_list_check_names_the_target_or_the_reason() -> None:
    allowed = ProxyTcpTarget.parse_host_port("127.0.0.1:5000")
    allow = AllowList([allowed])
    assert allow.check(allowed.to_address()) == allowed
    # The aggregator names the target as the client asked for it: kinds may differ.
    as_dns = allow.check(RouteAddress.parse("/proxy-tcp/dns/127.0.0.1/tcp/5000"))
    assert isinstance(as_dns, ProxyTcpTarget) and as_dns.port == 5000
    assert "allow-list" in str(allow.check(RouteAddress.parse("/proxy-tcp/dns/a/tcp/5000")))
    assert "only proxy-tcp" in str(allow.check(RouteAddress.parse("/echo")))
    assert "malformed" in str(allow.check(RouteAddress.parse("/proxy-tcp/dns/a/udp/5")))
