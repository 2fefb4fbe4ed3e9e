"""The visitor's address on a proxy-tcp route address (visitor-address, docs/protocol.md 3.18)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snocat_proto._service.allowlist import AllowList
from snocat_proto._service.publications import client_route, proxy_header
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.features import FEATURES, VISITOR_ADDRESS
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.proxy_protocol import (
    ProxyAddresses,
    ProxyHeader,
    ProxyHeaderParser,
    encode_v1,
    encode_v2,
)
from snocat_proto._wire.targets import ProxyTcpTarget
from snocat_proto._wire.visitor import format_endpoint, split_visitor, with_visitor

TARGET = RouteAddress.parse("/proxy-tcp/dns/127.0.0.1/tcp/8000")
V4 = ProxyAddresses(IPv4Address("203.0.113.7"), 40000, IPv4Address("198.51.100.1"), 443)
V6 = ProxyAddresses(IPv6Address("2001:db8::7"), 1, IPv6Address("2001:db8::1"), 65535)


def test_the_suffix_byte_for_byte() -> None:
    address = with_visitor(TARGET, V4)
    assert str(address) == (
        "/proxy-tcp/dns/127.0.0.1/tcp/8000"
        "/from/ip4/203.0.113.7/tcp/40000/to/ip4/198.51.100.1/tcp/443"
    )
    assert split_visitor(address) == (TARGET, V4)
    six = with_visitor(TARGET, V6)
    assert str(six).endswith("/from/ip6/2001:db8::7/tcp/1/to/ip6/2001:db8::1/tcp/65535")
    assert split_visitor(six) == (TARGET, V6)
    assert format_endpoint(V4.source, V4.source_port) == "203.0.113.7:40000"
    assert format_endpoint(V6.source, V6.source_port) == "[2001:db8::7]:1"


def test_an_address_without_a_suffix_is_the_snocat_08_one() -> None:
    assert split_visitor(TARGET) == (TARGET, None)
    local = RouteAddress.parse("/proxy-tcp/tcp/22")
    assert split_visitor(local) == (local, None)
    # The longest suffix (two full IPv6 addresses) fits the 0.8 address bound.
    widest = ProxyAddresses(
        IPv6Address("ffff:" * 7 + "ffff"), 65535, IPv6Address("ffff:" * 7 + "fffe"), 65535
    )
    long_host = RouteAddress(("proxy-tcp", "dns", "a" * 253, "tcp", "65535"))
    assert len(str(with_visitor(long_host, widest)).encode()) < Limits().max_address_size


@pytest.mark.parametrize(
    "suffix",
    [
        "/from/ip4/203.0.113.7/tcp/40000/at/ip4/198.51.100.1/tcp/443",  # not "to"
        "/from/ip5/203.0.113.7/tcp/40000/to/ip4/198.51.100.1/tcp/443",  # family
        "/from/ip4/203.0.113.7/udp/40000/to/ip4/198.51.100.1/tcp/443",  # protocol
        "/from/ip4/203.0.113.07/tcp/40000/to/ip4/198.51.100.1/tcp/443",  # not canonical
        "/from/ip6/2001:DB8::7/tcp/1/to/ip6/2001:db8::1/tcp/2",  # not canonical
        "/from/ip6/fe80::1%eth0/tcp/1/to/ip6/fe80::2/tcp/2",  # a zone
        "/from/ip4/203.0.113.7/tcp/040000/to/ip4/198.51.100.1/tcp/443",  # leading zero
        "/from/ip4/203.0.113.7/tcp/65536/to/ip4/198.51.100.1/tcp/443",  # port range
        "/from/ip4/203.0.113.7/tcp/+1/to/ip4/198.51.100.1/tcp/443",  # sign
        "/from/ip4/203.0.113.7/tcp/1/to/ip6/2001:db8::1/tcp/443",  # two families
        "/from/ip6/203.0.113.7/tcp/1/to/ip6/2001:db8::1/tcp/443",  # v4 text as ip6
    ],
)
def test_a_broken_suffix_is_a_protocol_error(suffix: str) -> None:
    with pytest.raises(RemoteProtocolError, match="visitor"):
        split_visitor(RouteAddress.parse(str(TARGET) + suffix))


def test_with_visitor_takes_addresses_only() -> None:
    with pytest.raises(LocalProtocolError):
        with_visitor(TARGET, "203.0.113.7:1")  # type: ignore[arg-type]


@given(
    st.one_of(
        st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
    ),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_every_visitor_round_trips_through_the_wire_text(
    pair: tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address], sport: int, dport: int
) -> None:
    source, destination = pair
    visitor = ProxyAddresses(source, sport, destination, dport)
    address = with_visitor(TARGET, visitor)
    assert split_visitor(RouteAddress.decode(address.encode())) == (TARGET, visitor)


# The client's side: where a stream goes, and the header it writes ---------------------

ALLOW = AllowList([ProxyTcpTarget.parse_host_port("127.0.0.1:8000")])


def test_the_client_reads_the_suffix_only_where_it_was_agreed() -> None:
    with_suffix = with_visitor(TARGET, V4)
    assert client_route(with_suffix, FEATURES, ALLOW) == (ALLOW.check(TARGET), TARGET, V4)
    # Without the agreement the suffix is what a 0.8 client sees: a malformed address.
    refused = client_route(with_suffix, frozenset(), ALLOW)
    assert isinstance(refused, str) and "malformed proxy-tcp address" in refused
    # With it, a plain 0.8 address still works (an aggregator that knows no visitor).
    assert client_route(TARGET, {VISITOR_ADDRESS}, ALLOW) == (ALLOW.check(TARGET), TARGET, None)
    broken = RouteAddress.parse(str(TARGET) + "/from/ip4/1.2.3.4/tcp/1/to/ip4/x/tcp/2")
    assert "malformed visitor address" in str(client_route(broken, FEATURES, ALLOW))
    other = RouteAddress.parse("/proxy-tcp/dns/127.0.0.1/tcp/9999")
    assert "allow-list" in str(client_route(with_visitor(other, V4), FEATURES, ALLOW))


@pytest.mark.parametrize("version", [1, 2])
def test_the_proxy_header_a_target_sees(version: int) -> None:
    header = proxy_header(version, V4)
    assert header == (encode_v1(V4) if version == 1 else encode_v2(V4))
    parsed = ProxyHeaderParser(limits=Limits()).feed(header + b"GET / HTTP/1.1\r\n")
    assert isinstance(parsed, ProxyHeader) and parsed.addresses == V4
    unknown = proxy_header(version, None)
    assert unknown == (b"PROXY UNKNOWN\r\n" if version == 1 else encode_v2(None))
    told = ProxyHeaderParser(limits=Limits()).feed(unknown)
    assert isinstance(told, ProxyHeader) and told.addresses is None
    assert proxy_header(None, V4) == b""
    if version == 1:
        assert header == b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n"
