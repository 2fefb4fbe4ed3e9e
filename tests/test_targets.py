"""proxy-tcp targets: route addresses and --target HOST:PORT text."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.targets import ProxyTcpTarget, TargetKind, parse_port

# The "valid result or ProtocolError" properties get more examples than the rest.
ARBITRARY_EXAMPLES = 500

T = ProxyTcpTarget
K = TargetKind

ports = st.integers(min_value=1, max_value=65535)
dns_names = st.text(
    alphabet=st.sampled_from("abcxyz019-.:_é") | st.characters(exclude_categories=("C", "Z")),
    min_size=1,
    max_size=40,
).filter(lambda h: "/" not in h and "\\" not in h)
ip4s = st.ip_addresses(v=4).map(str)
ip6s = st.ip_addresses(v=6).map(str)
targets = st.one_of(
    ports.map(lambda p: T(K.LOCAL, None, p)),
    st.builds(lambda h, p: T(K.IP4, h, p), ip4s, ports),
    st.builds(lambda h, p: T(K.IP6, h, p), ip6s, ports),
    st.builds(T, st.sampled_from([K.DNS, K.DNS4, K.DNS6]), dns_names, ports),
)


def addr(text: str) -> RouteAddress:
    return RouteAddress.parse(text)


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("/proxy-tcp/tcp/2468", T(K.LOCAL, None, 2468)),
        ("/proxy-tcp/ip4/127.0.0.1/tcp/2468", T(K.IP4, "127.0.0.1", 2468)),
        ("/proxy-tcp/ip6/::1/tcp/2468", T(K.IP6, "::1", 2468)),
        ("/proxy-tcp/dns/127.0.0.1/tcp/5000", T(K.DNS, "127.0.0.1", 5000)),
        ("/proxy-tcp/dns4/localhost/tcp/1", T(K.DNS4, "localhost", 1)),
        ("/proxy-tcp/dns6/example.com/tcp/65535", T(K.DNS6, "example.com", 65535)),
    ],
)
def test_address_forms(text: str, target: ProxyTcpTarget) -> None:
    assert ProxyTcpTarget.from_address(addr(text)) == target
    assert str(target.to_address()) == text


def test_trace_address_bytes() -> None:
    target = T(K.DNS, "127.0.0.1", 5000)
    assert target.to_address().encode() == b"/proxy-tcp/dns/127.0.0.1/tcp/5000"


def test_leading_zeros_are_read_like_the_reference() -> None:
    target = ProxyTcpTarget.from_address(addr("/proxy-tcp/tcp/0080"))
    assert target == T(K.LOCAL, None, 80)


@pytest.mark.parametrize(
    "text",
    ["", "/", "/tcp/80", "/ip4/1.2.3.4/tcp/80", "/dns/x/tcp/80", "/proxyme/0.0.1/80", "/proxy"],
)
def test_not_proxy_tcp(text: str) -> None:
    assert ProxyTcpTarget.from_address(addr(text)) is None


@pytest.mark.parametrize(
    "text",
    [
        "/proxy-tcp",
        "/proxy-tcp/",
        "/proxy-tcp/tcp",
        "/proxy-tcp/tcp/80/extra",
        "/proxy-tcp/ip4/1.2.3.4/tcp/80/extra",
        "/proxy-tcp/ip4/1.2.3.4/tcp",
        "/proxy-tcp/ip4/1.2.3.4/udp/80",
        "/proxy-tcp/udp/1.2.3.4/tcp/80",
        "/proxy-tcp/TCP/80",
        "/proxy-tcp/IP4/1.2.3.4/tcp/80",
        "/proxy-tcp/ip4/1.2.3/tcp/80",
        "/proxy-tcp/ip4/256.0.0.1/tcp/80",
        "/proxy-tcp/ip4/01.2.3.4/tcp/80",
        "/proxy-tcp/ip4/::1/tcp/80",
        "/proxy-tcp/ip6/1.2.3.4/tcp/80",
        "/proxy-tcp/ip6/[::1]/tcp/80",
        "/proxy-tcp/ip6/fe80::1%eth0/tcp/80",
        "/proxy-tcp/dns//tcp/80",
        "/proxy-tcp/dns/a b/tcp/80",
        "/proxy-tcp/dns/a\\/b/tcp/80",
        "/proxy-tcp/dns/" + "a" * 254 + "/tcp/80",
        "/proxy-tcp/tcp/0",
        "/proxy-tcp/tcp/65536",
        "/proxy-tcp/tcp/",
        "/proxy-tcp/tcp/+80",
        "/proxy-tcp/tcp/-1",
        "/proxy-tcp/tcp/ 80",
        "/proxy-tcp/tcp/80 ",
        "/proxy-tcp/tcp/8_0",
        "/proxy-tcp/tcp/0x50",
        "/proxy-tcp/tcp/1e3",
        "/proxy-tcp/tcp/٣",
        "/proxy-tcp/tcp/" + "0" * 5000 + "80000",
        "/proxy-tcp/tcp/" + "9" * 5000,
    ],
)
def test_malformed_proxy_tcp(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        ProxyTcpTarget.from_address(addr(text))


def test_parse_port() -> None:
    assert parse_port("1") == 1
    assert parse_port("65535") == 65535
    assert parse_port("000000000000000022") == 22
    for bad in ("0", "00", "65536", "", "+1", "-1", " 1", "1 ", "\u0661", "\u00b2", "1.0", "99999"):
        assert parse_port(bad) is None


def test_ip_hosts_are_canonical() -> None:
    assert T(K.IP6, "0:0:0:0:0:0:0:1", 22).host == "::1"
    assert T(K.IP6, "2001:DB8::1", 22).host == "2001:db8::1"
    target = ProxyTcpTarget.from_address(addr("/proxy-tcp/ip6/0:0::1/tcp/22"))
    assert target is not None and str(target.to_address()) == "/proxy-tcp/ip6/::1/tcp/22"
    # DNS names are kept exactly as given.
    assert T(K.DNS, "Example.COM", 1).host == "Example.COM"


@pytest.mark.parametrize(
    ("kind", "host", "port"),
    [
        (K.LOCAL, "localhost", 80),
        (K.LOCAL, None, 0),
        (K.LOCAL, None, 65536),
        (K.LOCAL, None, -1),
        (K.LOCAL, None, True),
        (K.LOCAL, None, "80"),
        (K.IP4, None, 80),
        (K.IP4, "::1", 80),
        (K.IP4, "localhost", 80),
        (K.IP6, "1.2.3.4", 80),
        (K.IP6, "fe80::1%1", 80),
        (K.DNS, None, 80),
        (K.DNS, "", 80),
        (K.DNS, "a/b", 80),
        (K.DNS, "a\\b", 80),
        (K.DNS, "a\nb", 80),
        (K.DNS, "x" * 254, 80),
        (K.DNS4, "x", 0),
        ("dns", "x", 80),
    ],
)
def test_validation(kind: TargetKind, host: str | None, port: int) -> None:
    with pytest.raises(LocalProtocolError):
        ProxyTcpTarget(kind, host, port)


def test_dns_length_limit_inclusive() -> None:
    assert T(K.DNS, "x" * 253, 1).host == "x" * 253


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("127.0.0.1:5000", T(K.IP4, "127.0.0.1", 5000)),
        ("0.0.0.0:1", T(K.IP4, "0.0.0.0", 1)),
        ("[::1]:5000", T(K.IP6, "::1", 5000)),
        ("[2001:DB8::0001]:443", T(K.IP6, "2001:db8::1", 443)),
        ("localhost:5000", T(K.DNS, "localhost", 5000)),
        ("example.com:080", T(K.DNS, "example.com", 80)),
        ("1.2.3:80", T(K.DNS, "1.2.3", 80)),
    ],
)
def test_parse_host_port(text: str, target: ProxyTcpTarget) -> None:
    assert ProxyTcpTarget.parse_host_port(text) == target


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("localhost", "HOST:PORT"),
        ("", "HOST:PORT"),
        (":80", "missing host"),
        ("::1:80", "bracketed"),
        ("[::1]", r"\[IPV6\]:PORT"),
        ("[::1]80", r"\[IPV6\]:PORT"),
        ("[::1:80", r"\[IPV6\]:PORT"),
        ("[1.2.3.4]:80", "IPv6"),
        ("[]:80", "IPv6"),
        ("host:", "invalid port"),
        ("host:0", "invalid port"),
        ("host:65536", "invalid port"),
        ("host:http", "invalid port"),
        ("host:+80", "invalid port"),
        ("host: 80", "invalid port"),
        ("a b:80", "character"),
        ("a/b:80", "character"),
    ],
)
def test_parse_host_port_errors(text: str, fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        ProxyTcpTarget.parse_host_port(text)


def test_str_and_connect_host() -> None:
    assert str(T(K.LOCAL, None, 22)) == "localhost:22"
    assert T(K.LOCAL, None, 22).connect_host() == "localhost"
    assert str(T(K.IP4, "10.0.0.1", 22)) == "10.0.0.1:22"
    assert str(T(K.IP6, "::1", 22)) == "[::1]:22"
    assert T(K.IP6, "::1", 22).connect_host() == "::1"
    assert str(T(K.DNS6, "example.com", 22)) == "example.com:22"
    assert str(T(K.DNS, "::1", 22)) == "[::1]:22"


@given(targets)
def test_roundtrip_through_address(target: ProxyTcpTarget) -> None:
    address = target.to_address()
    assert address.startswith("proxy-tcp")
    assert ProxyTcpTarget.from_address(address) == target
    assert ProxyTcpTarget.from_address(RouteAddress.decode(address.encode())) == target


@given(targets)
def test_roundtrip_through_host_port(target: ProxyTcpTarget) -> None:
    assume(target.kind in (K.IP4, K.IP6, K.DNS))
    if target.kind is K.DNS:
        assume(":" not in (target.host or "") and not (target.host or "").startswith("["))
        try:
            ipaddress.IPv4Address(target.host)
            assume(False)
        except ValueError:
            pass
    assert ProxyTcpTarget.parse_host_port(str(target)) == target


proxy_tcp_segments = st.lists(
    st.sampled_from(["tcp", "ip4", "ip6", "dns", "dns4", "dns6", "1.2.3.4", "::1", "80", "0", ""])
    | st.text(max_size=8),
    max_size=6,
).map(lambda rest: RouteAddress(("proxy-tcp", *rest)))


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(proxy_tcp_segments | st.lists(st.text(max_size=8), max_size=6).map(tuple).map(RouteAddress))
def test_arbitrary_addresses(address: RouteAddress) -> None:
    try:
        target = ProxyTcpTarget.from_address(address)
    except RemoteProtocolError:
        assert address.segments[0] == "proxy-tcp"
        return
    if target is None:
        assert address.segments[:1] != ("proxy-tcp",)
    else:
        assert ProxyTcpTarget.from_address(target.to_address()) == target


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(st.text(alphabet=st.sampled_from("[]:.0189abc ") | st.characters(), max_size=24))
def test_arbitrary_host_port_text(text: str) -> None:
    try:
        target = ProxyTcpTarget.parse_host_port(text)
    except LocalProtocolError:
        return
    assert 1 <= target.port <= 65535
    assert target.kind in (K.IP4, K.IP6, K.DNS)
