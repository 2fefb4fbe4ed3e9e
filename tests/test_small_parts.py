"""Tokens files, backoff, allow-lists, certificates, activity records, handshake rates."""

from __future__ import annotations

import datetime
import json
import random
from typing import Any

import pytest
from cryptography import x509

from snocat_proto._service.activity import PortGranted, TunnelClosed
from snocat_proto._service.allowlist import AllowList
from snocat_proto._service.backoff import Backoff
from snocat_proto._service.stream_table import StreamTable
from snocat_proto._service.tokens import format_tokens, parse_single_token, parse_tokens
from snocat_proto._wire.certificates import (
    fingerprint,
    generate_self_signed,
    install_identity,
    install_trust,
    parse_fingerprint,
)
from snocat_proto._wire.engine import quic_configuration
from snocat_proto._wire.errors import LocalProtocolError
from snocat_proto._wire.events import ConnectionTerminated, DataReceived
from snocat_proto._wire.handshake_rate import HandshakeBuckets, HandshakeRate, source_of
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.proxyme import ProxymeRequest
from snocat_proto._wire.targets import ProxyTcpTarget

SECRET = "0123456789abcdef-secret"
NOW = datetime.datetime(2026, 11, 25, tzinfo=datetime.UTC)


class TestTokens:
    def test_parses_names_and_secrets_skipping_comments(self) -> None:
        text = f"# fleet\n\nalpha {SECRET}\n  beta   {SECRET}x  \n"
        assert parse_tokens(text) == {"alpha": SECRET.encode(), "beta": (SECRET + "x").encode()}

    def test_round_trips_through_format(self) -> None:
        tokens = {"a": SECRET.encode(), "b.c": (SECRET * 2).encode()}
        assert parse_tokens(format_tokens(tokens)) == tokens

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("alpha", "line 1: expected 'NAME SECRET'"),
            (f"alpha {SECRET} extra", "line 1: expected 'NAME SECRET'"),
            ("alpha short", "shorter than 16"),
            (f"alpha {SECRET}\nalpha {SECRET}", "line 2: 'alpha' is listed twice"),
            (f"a/b {SECRET}", "line 1"),
        ],
    )
    def test_rejects_bad_lines_naming_them(self, text: str, message: str) -> None:
        with pytest.raises(LocalProtocolError, match=message):
            parse_tokens(text)

    def test_single_token_file_needs_exactly_one_line(self) -> None:
        assert parse_single_token(f"edge-1 {SECRET}\n") == ("edge-1", SECRET.encode())
        with pytest.raises(LocalProtocolError, match="exactly one"):
            parse_single_token(f"a {SECRET}\nb {SECRET}\n")
        with pytest.raises(LocalProtocolError, match="exactly one"):
            parse_single_token("# nothing\n")


class TestBackoff:
    def test_grows_to_the_cap_with_jitter_then_resets(self) -> None:
        backoff = Backoff(initial=1.0, maximum=8.0, rng=random.Random(7))
        delays = [backoff.next_delay() for _ in range(8)]
        bases = [1, 2, 4, 8, 8, 8, 8, 8]
        for delay, base in zip(delays, bases, strict=True):
            assert base / 2 <= delay <= base
        backoff.reset()
        assert 0.5 <= backoff.next_delay() <= 1.0

    def test_rejects_nonsense(self) -> None:
        with pytest.raises(LocalProtocolError):
            Backoff(initial=0)
        with pytest.raises(LocalProtocolError):
            Backoff(initial=5, maximum=1)


class TestAllowList:
    def test_permits_only_configured_host_and_port(self) -> None:
        allow = AllowList([ProxyTcpTarget.parse_host_port("127.0.0.1:5000")])
        assert allow.permits(ProxymeRequest(host="127.0.0.1", port=5000).target())
        assert not allow.permits(ProxyTcpTarget.parse_host_port("127.0.0.1:5001"))
        assert not allow.permits(ProxyTcpTarget.parse_host_port("10.0.0.1:5000"))

    def test_dns_names_compare_case_insensitively(self) -> None:
        allow = AllowList([ProxyTcpTarget.parse_host_port("Web.Internal:80")])
        assert allow.permits(ProxymeRequest(host="web.internal", port=80).target())

    def test_empty_list_permits_nothing(self) -> None:
        assert not AllowList([]).permits(ProxyTcpTarget.parse_host_port("127.0.0.1:80"))


class TestCertificates:
    def test_generated_identity_installs_and_fingerprints(self) -> None:
        cert_pem, key_pem = generate_self_signed(["localhost", "127.0.0.1"], now=NOW)
        config = quic_configuration(is_client=False, limits=Limits())
        printed = install_identity(config, cert_pem, key_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        assert printed == fingerprint(cert) == parse_fingerprint(printed.lower().replace(":", ""))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    def test_mismatched_key_and_garbage_are_refused(self) -> None:
        cert_pem, _ = generate_self_signed(["a"], now=NOW)
        _, other_key = generate_self_signed(["a"], now=NOW)
        config = quic_configuration(is_client=False, limits=Limits())
        with pytest.raises(LocalProtocolError, match="does not belong"):
            install_identity(config, cert_pem, other_key)
        with pytest.raises(LocalProtocolError, match="holds no PEM certificate"):
            install_identity(config, b"junk", other_key)
        with pytest.raises(LocalProtocolError, match="private key"):
            install_identity(config, cert_pem, b"junk")

    def test_fingerprint_parsing(self) -> None:
        digits = "ab" * 32
        assert parse_fingerprint("sha256:" + digits) == ":".join(["AB"] * 32)
        for bad in ["", "abc", "zz" * 32, "ab" * 31]:
            with pytest.raises(LocalProtocolError):
                parse_fingerprint(bad)

    def test_pinning_disables_chain_verification_and_authority_is_checked(self) -> None:
        import ssl

        config = quic_configuration(is_client=True, limits=Limits())
        install_trust(config, authority_pem=None, pinned="ab" * 32)
        assert config.verify_mode == ssl.CERT_NONE
        config = quic_configuration(is_client=True, limits=Limits())
        with pytest.raises(LocalProtocolError):
            install_trust(config, authority_pem=b"junk", pinned=None)

    def test_no_names_is_an_error(self) -> None:
        with pytest.raises(LocalProtocolError):
            generate_self_signed([], now=NOW)


class TestHandshakeRate:
    def test_a_source_is_an_ipv4_address_or_an_ipv6_64(self) -> None:
        assert source_of(("192.0.2.7", 1)) == source_of(("192.0.2.7", 2)) == "192.0.2.7"
        assert source_of(("::ffff:192.0.2.7", 3)) == "192.0.2.7"  # dual-stack socket
        assert source_of(("2001:db8:1:2:aaaa::1", 4)) == "2001:db8:1:2::/64"
        assert source_of(("2001:db8:1:2:ffff::9", 4)) == "2001:db8:1:2::/64"
        assert source_of(("2001:db8:1:3::1", 4)) != source_of(("2001:db8:1:2::1", 4))
        assert source_of(("fe80::1%eth0", 5)) == "fe80::/64"
        assert source_of(("not-an-ip", 6)) == "not-an-ip"

    def test_a_burst_then_the_rate(self) -> None:
        buckets = HandshakeBuckets(HandshakeRate(per_second=2.0, burst=3))
        host = ("198.51.100.1", 1000)
        assert [buckets.allow(host, 10.0) for _ in range(4)] == [True, True, True, False]
        assert buckets.allow(("198.51.100.2", 1), 10.0)  # another source has its own
        assert not buckets.allow(host, 10.4)  # 0.8 of a token earned
        assert buckets.allow(host, 10.5)
        # A long pause refills to the burst, not beyond.
        assert [buckets.allow(host, 100.0) for _ in range(4)] == [True, True, True, False]
        assert not buckets.allow(host, 99.0)  # a clock going back earns nothing

    def test_memory_is_bounded_by_forgetting_the_least_recent_source(self) -> None:
        buckets = HandshakeBuckets(HandshakeRate(per_second=1.0, burst=1), max_sources=100)
        for n in range(1000):
            assert buckets.allow((f"10.0.{n // 256}.{n % 256}", 1), 0.0)
        assert len(buckets) == 100
        assert not buckets.allow(("10.0.3.231", 1), 0.0)  # the latest is remembered
        assert buckets.allow(("10.0.0.0", 1), 0.0)  # the first was forgotten

    def test_settings_are_checked(self) -> None:
        assert HandshakeRate.of(20) == HandshakeRate(20, burst=100)
        assert HandshakeRate.of(0.01).burst == 1
        for bad in ({"per_second": 0.0}, {"per_second": float("nan")}, {"burst": 0}):
            with pytest.raises(ValueError):
                HandshakeRate(**bad)


def test_activity_records_serialise_to_json_lines() -> None:
    record = PortGranted(
        at=1.5, tunnel_id="t1", name="edge", port=8080, addresses=("[::]:8080",), target="x:1"
    )
    line = json.loads(json.dumps(record.to_dict()))
    assert line["event"] == "port_granted" and line["port"] == 8080
    closed = TunnelClosed(
        at=2, tunnel_id="t1", name=None, peer="p", code=0, reason="", by_peer=True
    )
    assert closed.to_dict()["event"] == "tunnel_closed"


# StreamTable ---------------------------------------------------------------------


class _Tunnel:
    def __init__(self) -> None:
        self.acknowledged: list[tuple[int, int]] = []

    def acknowledge_received_data(self, stream_id: int, amount: int) -> None:
        self.acknowledged.append((stream_id, amount))


class _Stream:
    def __init__(self, tunnel: _Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.events: list[object] = []
        self.closed: tuple[int, str] | None = None

    def on_event(self, event: object) -> None:
        self.events.append(event)

    def on_tunnel_closed(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_stream_table_routes_events_and_returns_credit_nobody_will_read() -> None:
    tunnel, other = _Tunnel(), _Tunnel()
    table: StreamTable[Any] = StreamTable()
    mine, theirs = _Stream(tunnel, 0), _Stream(other, 0)
    table.add(mine)
    table.add(theirs)
    assert table.deliver(tunnel, DataReceived(stream_id=0, data=b"abc"))  # type: ignore[arg-type]
    assert mine.events == [DataReceived(stream_id=0, data=b"abc")] and theirs.events == []
    table.forget(mine)
    assert not table.holds(mine) and table.holds(theirs)
    # Data for a stream the application let go of: its credit goes back at once.
    assert table.deliver(tunnel, DataReceived(stream_id=0, data=b"late"))  # type: ignore[arg-type]
    assert tunnel.acknowledged == [(0, 4)] and mine.events == [
        DataReceived(stream_id=0, data=b"abc")
    ]
    # A tunnel event is the application's; a close also ends that tunnel's streams.
    closed = ConnectionTerminated(code=1, reason="bye", by_peer=True, application=True)
    assert not table.deliver(other, closed)  # type: ignore[arg-type]
    assert theirs.closed == (1, "bye") and table.of(other) == []  # type: ignore[arg-type]


def test_refused_logins_and_refused_streams_are_warnings() -> None:
    """What an operator watches for is logged at WARNING, the rest of a tunnel's end
    at INFO."""
    from snocat_proto._service import notices
    from snocat_proto._wire.codes import CloseCode

    class Session:
        tunnel_id, peer, name = "t1", "127.0.0.1:5", None

    def closed(code: int, *, application: bool = True) -> notices.Notice:
        event = ConnectionTerminated(code=code, reason="r", by_peer=False, application=application)
        return notices.tunnel_closed(0.0, Session(), event)

    assert closed(CloseCode.AUTHENTICATION_FAILED).level is notices.Severity.WARNING
    assert closed(CloseCode.AUTHENTICATION_TIMEOUT).level is notices.Severity.WARNING
    assert closed(CloseCode.NORMAL).level is notices.Severity.INFO
    assert closed(0x10, application=False).level is notices.Severity.INFO  # a QUIC error
    refused = notices.client_stream_refused(0.0, "t1", "/proxy-tcp/tcp/1", "refused")
    assert refused.level is notices.Severity.WARNING
