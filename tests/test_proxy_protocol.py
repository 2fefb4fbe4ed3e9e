"""HAProxy's PROXY protocol v1 and v2: the spec's vectors byte for byte, round trips,
every refusal, every split, and the limits."""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.limits import MIN_PROXY_HEADER_BYTES, Limits
from snocat_proto._wire.peek import NEED_MORE
from snocat_proto._wire.proxy_protocol import (
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_SIGNATURE,
    MalformedProxyHeader,
    NotProxyHeader,
    ProxyAddresses,
    ProxyCommand,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyHeaderTooLarge,
    encode_v1,
    encode_v2,
)

LIMITS = Limits()
SPEC_V1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
SPEC_REQUEST = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
SPEC_ADDRESSES = ProxyAddresses(IPv4Address("192.168.0.1"), 56324, IPv4Address("192.168.0.11"), 443)
V6_ADDRESSES = ProxyAddresses(IPv6Address("2001:db8::1"), 1234, IPv6Address("2001:db8::2"), 443)
PROXY = ProxyCommand.PROXY
LOCAL = ProxyCommand.LOCAL


def feed_all(chunks: list[bytes], limits: Limits = LIMITS) -> object:
    parser = ProxyHeaderParser(limits=limits)
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            assert parser.buffered <= parser.limit
            if result is not NEED_MORE:
                return result
        parser.receive_eof()
    except ProxyHeaderError as error:
        return type(error)
    raise AssertionError("receive_eof() before a result must raise")


def outcome(data: bytes, limits: Limits = LIMITS) -> object:
    ways = [[data], [data[i : i + 1] for i in range(len(data))], [data[:13], data[13:]]]
    answers = [feed_all(chunks, limits) for chunks in ways]
    assert all(answer == answers[0] for answer in answers), answers
    return answers[0]


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


# --- the spec's vectors -----------------------------------------------------------------


def test_constants_are_the_spec_bytes() -> None:
    assert bytes.fromhex("0D0A0D0A000D0A515549540A") == V2_SIGNATURE
    assert V1_PREFIX == b"\x50\x52\x4f\x58\x59\x20"
    assert V1_MAX_LENGTH == 107
    assert MIN_PROXY_HEADER_BYTES == 16 + 216


def test_the_spec_example_v1_before_an_http_request() -> None:
    assert encode_v1(SPEC_ADDRESSES) == SPEC_V1
    expected = ProxyHeader(1, PROXY, SPEC_ADDRESSES, len(SPEC_V1))
    assert outcome(SPEC_V1 + SPEC_REQUEST) == expected
    assert outcome(SPEC_V1) == expected
    parser = ProxyHeaderParser(limits=LIMITS)
    answers = [parser.feed(SPEC_V1[i : i + 1]) for i in range(len(SPEC_V1))]
    assert answers == [NEED_MORE] * (len(SPEC_V1) - 1) + [expected]


FF6 = b":".join([b"ffff"] * 8)


def pair(source: str, source_port: int, destination: str, port: int) -> ProxyAddresses:
    return ProxyAddresses(ip_address(source), source_port, ip_address(destination), port)


@pytest.mark.parametrize(
    ("line", "addresses"),
    [
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            pair("255.255.255.255", 65535, "255.255.255.255", 65535),
        ),
        (
            b"PROXY TCP6 " + FF6 + b" " + FF6.upper() + b" 65535 65535\r\n",
            pair(FF6.decode(), 65535, FF6.decode(), 65535),
        ),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN " + FF6 + b" " + FF6 + b" 65535 65535\r\n", None),
        (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 1\r\n", pair("0.0.0.0", 0, "10.0.0.1", 1)),
        (b"PROXY TCP6 ::1 ::ffff:102:304 1 2\r\n", pair("::1", 1, "::ffff:1.2.3.4", 2)),
        (b"PROXY UNKNOWN anything at all: 1.2.3.4 \r\n", None),
    ],
)
def test_v1_lines_of_the_spec(line: bytes, addresses: ProxyAddresses | None) -> None:
    assert outcome(line + b"SSH-2.0-x\r\n") == ProxyHeader(1, PROXY, addresses, len(line))


def test_the_longest_v1_lines() -> None:
    worst = (
        b"PROXY UNKNOWN "
        + b":".join([b"ffff"] * 8)
        + b" "
        + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n"
    )
    assert len(worst) == 107
    assert len(b"PROXY TCP6 " + FF6 + b" " + FF6 + b" 65535 65535\r\n") == 104
    assert outcome(worst) == ProxyHeader(1, PROXY, None, 107)
    longer = worst[:-2] + b"f\r\n"
    assert outcome(longer) is ProxyHeaderTooLarge
    assert outcome(b"PROXY UNKNOWN " + b"x" * 200) is ProxyHeaderTooLarge
    parser = ProxyHeaderParser(limits=LIMITS)
    assert parser.feed(longer[:106]) is NEED_MORE
    with pytest.raises(ProxyHeaderTooLarge):
        parser.feed(longer[106:107])  # the 107th byte is not the LF


def test_v2_ipv4_byte_for_byte() -> None:
    expected = bytes.fromhex(
        "0D0A0D0A000D0A515549540A"  # signature
        "21"  # version 2, PROXY
        "11"  # AF_INET, STREAM
        "000C"  # 12 address bytes
        "C0A80001"  # 192.168.0.1
        "C0A8000B"  # 192.168.0.11
        "DC04"  # 56324
        "01BB"  # 443
    )
    assert encode_v2(SPEC_ADDRESSES) == expected
    assert outcome(expected + SPEC_REQUEST) == ProxyHeader(2, PROXY, SPEC_ADDRESSES, 28)


def test_v2_ipv6_byte_for_byte() -> None:
    expected = (
        V2_SIGNATURE
        + bytes.fromhex("21 21 0024")
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("20010db8000000000000000000000002")
        + bytes.fromhex("04D2 01BB")
    )
    assert encode_v2(V6_ADDRESSES) == expected
    assert outcome(expected) == ProxyHeader(2, PROXY, V6_ADDRESSES, 16 + 36)


def test_v2_local_and_unspec() -> None:
    local = encode_v2(None, command=LOCAL)
    assert local == V2_SIGNATURE + bytes.fromhex("20 00 0000")
    assert outcome(local + b"x") == ProxyHeader(2, LOCAL, None, 16)
    unspec = encode_v2(None)
    assert unspec == V2_SIGNATURE + bytes.fromhex("21 00 0000")
    assert outcome(unspec) == ProxyHeader(2, PROXY, None, 16)
    assert encode_v1(None) == b"PROXY UNKNOWN\r\n"


def test_v2_local_skips_whatever_address_block_it_has() -> None:
    """Receivers must use the length, not assume zero for LOCAL (spec, 2.2)."""
    data = v2(0x20, 0x11, bytes(12) + tlv(0x04, b"pad")) + b"service"
    assert outcome(data) == ProxyHeader(2, LOCAL, None, 16 + 12 + 6)


@pytest.mark.parametrize("fam", [0x00, 0x01, 0x02, 0x10, 0x12, 0x20, 0x22, 0x30, 0x31, 0x32])
def test_v2_families_we_do_not_read_fall_back_to_unspec(fam: int) -> None:
    data = v2(0x21, fam, bytes(216))
    assert outcome(data) == ProxyHeader(2, PROXY, None, 16 + 216)


def test_v2_tlvs_are_skipped() -> None:
    block = encode_v2(SPEC_ADDRESSES)[16:]
    tlvs = tlv(0x02, b"office-1.tunnels.example.com") + tlv(0x04, b"") + tlv(0xEA, bytes(40))
    data = v2(0x21, 0x11, block + tlvs)
    assert outcome(data + b"rest") == ProxyHeader(2, PROXY, SPEC_ADDRESSES, len(data))


@pytest.mark.parametrize(
    "tail",
    [b"\x04", b"\x04\x00", b"\x04\x00\x01", b"\x04\x00\x05abcd", tlv(4, b"ok") + b"\x02\xff\xff"],
)
def test_v2_tlvs_that_do_not_fit_are_refused(tail: bytes) -> None:
    block = encode_v2(SPEC_ADDRESSES)[16:]
    assert outcome(v2(0x21, 0x11, block + tail)) is MalformedProxyHeader


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", NotProxyHeader),
        (b"GET / HTTP/1.1\r\n", NotProxyHeader),
        (b"\x16\x03\x01\x02\x00", NotProxyHeader),
        (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", NotProxyHeader),
        (b"PROXI", NotProxyHeader),
        (b"\r\n\r\nGET", NotProxyHeader),
        (b"\r\n\r\n\x00\r\nQUIT\r", NotProxyHeader),
        (b"PROXY\r\n", MalformedProxyHeader),
        (b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", MalformedProxyHeader),  # LF alone
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rGET", MalformedProxyHeader),  # CR alone
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n", MalformedProxyHeader),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY UNKNOWNX\r\n", MalformedProxyHeader),
        (b"PROXY \r\n", MalformedProxyHeader),
        (b"PROXY TCP4 192.168.000.1 1.2.3.4 1 2\r\n", MalformedProxyHeader),  # octal-looking
        (b"PROXY TCP4 256.1.1.1 1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", MalformedProxyHeader),  # dotted tail
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP6 [::1] ::1 1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 0443 2\r\n", MalformedProxyHeader),  # leading zero
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 +2\r\n", MalformedProxyHeader),
        (b"PROXY UNKNOWN \xff\r\n", MalformedProxyHeader),
        (b"PROXY UNKNOWN \x00\r\n", MalformedProxyHeader),
        (b"PROXY TCP4 1.2.3.4", MalformedProxyHeader),  # ends early
        (v2(0x11, 0x11, bytes(12)), MalformedProxyHeader),  # version 1 in v2 form
        (v2(0x31, 0x11, bytes(12)), MalformedProxyHeader),
        (v2(0x22, 0x11, bytes(12)), MalformedProxyHeader),  # command 2
        (v2(0x2F, 0x11, bytes(12)), MalformedProxyHeader),
        (v2(0x21, 0x41, bytes(12)), MalformedProxyHeader),  # family 4
        (v2(0x21, 0x13, bytes(12)), MalformedProxyHeader),  # transport 3
        (v2(0x21, 0x11, bytes(11)), MalformedProxyHeader),  # short AF_INET block
        (v2(0x21, 0x21, bytes(35)), MalformedProxyHeader),  # short AF_INET6 block
        (v2(0x21, 0x11, bytes(12))[:-1], MalformedProxyHeader),  # ends early
        (V2_SIGNATURE[:7], MalformedProxyHeader),
    ],
)
def test_refusals(data: bytes, error: type[ProxyHeaderError]) -> None:
    assert outcome(data) is error


def test_a_bad_signature_is_refused_on_its_first_wrong_byte() -> None:
    parser = ProxyHeaderParser(limits=LIMITS)
    assert parser.feed(V2_SIGNATURE[:5]) is NEED_MORE
    with pytest.raises(NotProxyHeader):
        parser.feed(b"X")
    parser = ProxyHeaderParser(limits=LIMITS)
    with pytest.raises(NotProxyHeader, match="0x47"):
        parser.feed(b"G")


def test_feeding_after_the_answer_is_an_api_error() -> None:
    parser = ProxyHeaderParser(limits=LIMITS)
    assert isinstance(parser.feed(SPEC_V1), ProxyHeader)
    with pytest.raises(LocalProtocolError):
        parser.feed(b"GET")
    parser.receive_eof()
    assert issubclass(ProxyHeaderError, RemoteProtocolError)


# --- the v2 limit -------------------------------------------------------------------


def test_a_v2_header_of_exactly_the_limit_is_read_one_byte_more_is_refused_at_once() -> None:
    limit = LIMITS.max_proxy_header_bytes
    block = encode_v2(V6_ADDRESSES)[16:]
    exact = v2(0x21, 0x21, block + tlv(0x04, bytes(limit - 16 - 36 - 3)))
    assert len(exact) == limit
    assert outcome(exact + b"service") == ProxyHeader(2, PROXY, V6_ADDRESSES, limit)
    over = v2(0x21, 0x21, block + tlv(0x04, bytes(limit - 16 - 36 - 2)))
    parser = ProxyHeaderParser(limits=LIMITS)
    with pytest.raises(ProxyHeaderTooLarge):
        parser.feed(over[:16])  # from the length field alone
    assert outcome(over) is ProxyHeaderTooLarge


def test_the_v2_limit_is_a_setting_with_a_floor() -> None:
    small = Limits(max_proxy_header_bytes=MIN_PROXY_HEADER_BYTES)
    assert outcome(v2(0x21, 0x31, bytes(216)), small) == ProxyHeader(2, PROXY, None, 232)
    assert outcome(v2(0x21, 0x31, bytes(217)), small) is ProxyHeaderTooLarge
    with pytest.raises(LocalProtocolError, match="max_proxy_header_bytes"):
        Limits(max_proxy_header_bytes=MIN_PROXY_HEADER_BYTES - 1)


def test_nothing_past_the_limit_is_buffered() -> None:
    data = encode_v2(V6_ADDRESSES) + bytes(1_000_000)
    parser = ProxyHeaderParser(limits=LIMITS)
    assert parser.feed(data) == ProxyHeader(2, PROXY, V6_ADDRESSES, 52)
    assert parser.buffered == 0
    parser = ProxyHeaderParser(limits=LIMITS)
    assert parser.feed(V2_SIGNATURE + b"\x21\x21\x0f") is NEED_MORE
    assert parser.buffered == 15


# --- addresses ------------------------------------------------------------------------


def test_from_socket_addresses() -> None:
    make = ProxyAddresses.from_sockaddrs
    assert make(("192.0.2.1", 5000), ("10.0.0.1", 80)) == ProxyAddresses(
        IPv4Address("192.0.2.1"), 5000, IPv4Address("10.0.0.1"), 80
    )
    # A dual-stack listener's IPv4 visitor.
    assert make(("::ffff:192.0.2.1", 5000, 0, 0), ("::ffff:10.0.0.1", 80, 0, 0)) == ProxyAddresses(
        IPv4Address("192.0.2.1"), 5000, IPv4Address("10.0.0.1"), 80
    )
    assert make(("fe80::1%2", 1, 0, 2), ("fe80::2%2", 2, 0, 2)).source == IPv6Address("fe80::1")
    assert make(("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0)).ipv6
    with pytest.raises(LocalProtocolError):
        make(("2001:db8::1", 1, 0, 0), ("10.0.0.1", 2))
    with pytest.raises(LocalProtocolError):
        make(("localhost", 1), ("10.0.0.1", 2))


@pytest.mark.parametrize(
    "arguments",
    [
        ("1.2.3.4", 1, IPv4Address("1.2.3.4"), 2),
        (IPv4Address("1.2.3.4"), 1, IPv6Address("::1"), 2),
        (IPv4Address("1.2.3.4"), -1, IPv4Address("1.2.3.4"), 2),
        (IPv4Address("1.2.3.4"), 1, IPv4Address("1.2.3.4"), 65536),
        (IPv4Address("1.2.3.4"), True, IPv4Address("1.2.3.4"), 2),
        (IPv6Address("fe80::1%eth0"), 1, IPv6Address("::1"), 2),
    ],
)
def test_invalid_addresses_are_api_errors(arguments: tuple[object, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        ProxyAddresses(*arguments)  # type: ignore[arg-type]


def test_local_takes_no_addresses() -> None:
    with pytest.raises(LocalProtocolError):
        encode_v2(SPEC_ADDRESSES, command=LOCAL)
    with pytest.raises(LocalProtocolError):
        encode_v2(SPEC_ADDRESSES, command=1)  # type: ignore[arg-type]


# --- round trips and arbitrary bytes --------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)
addresses = st.one_of(
    st.builds(ProxyAddresses, v4, ports, v4, ports), st.builds(ProxyAddresses, v6, ports, v6, ports)
)


@settings(max_examples=300, deadline=None)
@given(st.none() | addresses, st.binary(max_size=20), st.lists(st.integers(0, 200), max_size=4))
def test_round_trips_in_any_split_with_trailing_data(
    value: ProxyAddresses | None, trailing: bytes, cuts: list[int]
) -> None:
    for version, wire in ((1, encode_v1(value)), (2, encode_v2(value))):
        data = wire + trailing
        points = sorted({cut % (len(data) + 1) for cut in cuts})
        chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
        expected = ProxyHeader(version, PROXY, value, len(wire))
        assert feed_all(chunks) == expected
        assert feed_all([data[i : i + 1] for i in range(len(data))]) == expected
        assert len(wire) <= (V1_MAX_LENGTH if version == 1 else 52)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(
        [b"", V1_PREFIX, V2_SIGNATURE, V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x21\x11"]
    ).flatmap(lambda prefix: st.binary(max_size=80).map(lambda tail: prefix + tail)),
    st.lists(st.integers(min_value=0, max_value=100), max_size=6),
)
def test_arbitrary_bytes_give_a_header_or_a_proxy_header_error(
    data: bytes, cuts: list[int]
) -> None:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    answer = feed_all(chunks)
    assert answer == feed_all([data])
    if isinstance(answer, ProxyHeader):
        assert answer.size <= len(data)
        assert feed_all([data[: answer.size]]) == answer
        if answer.addresses is not None:
            # What we read, written again, reads the same.
            encode = encode_v1 if answer.version == 1 else encode_v2
            again = encode(answer.addresses)
            assert feed_all([again]) == ProxyHeader(
                answer.version, PROXY, answer.addresses, len(again)
            )
    else:
        assert isinstance(answer, type) and issubclass(answer, ProxyHeaderError)
