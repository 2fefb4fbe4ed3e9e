"""The wire of relayed UDP flows between fleet nodes (docs/protocol.md 3.16.1): the
``/fleet/udp/...`` route address, the length-prefixed frames, and the whole-or-nothing
write a relayed datagram makes on a stream (``StreamHandle.write_whole``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_shared_core import FakeTunnel, handle

from snocat_proto._service.stream_handle import Blocked
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from snocat_proto._wire.fleet_udp import (
    MAX_RELAYED_DATAGRAM,
    RelayedDatagrams,
    UdpRelayRequest,
    encode_relayed_datagram,
)
from snocat_proto._wire.udp_flows import FlowRequest, UdpTarget

# The route address ----------------------------------------------------------------


def test_the_route_address_names_port_fence_and_visitor() -> None:
    request = UdpRelayRequest(9053, 41, ("203.0.113.7", 40000))
    address = request.to_address()
    assert str(address) == "/fleet/udp/9053/41/from/ip4/203.0.113.7/udp/40000"
    assert UdpRelayRequest.from_address(address) == request
    six = UdpRelayRequest(9053, 7, ("2001:DB8::1%eth0", 5))
    assert six.visitor == ("2001:db8::1", 5)
    assert str(six.to_address()) == "/fleet/udp/9053/7/from/ip6/2001:db8::1/udp/5"
    assert UdpRelayRequest.from_address(six.to_address()) == six


def test_the_visitor_segments_are_those_of_a_flow_setup() -> None:
    flow = FlowRequest(1, UdpTarget.parse_host_port("127.0.0.1:53"), ("203.0.113.7", 40000))
    relayed = UdpRelayRequest(53, 1, ("203.0.113.7", 40000)).to_address()
    assert flow.to_address().segments[-5:] == relayed.segments[-5:]


def test_other_addresses_are_not_relayed_flows() -> None:
    for text in ("/fleet/relay/80/3", "/proxy-udp/1/udp/53/from/ip4/1.2.3.4/udp/5", "/x"):
        assert UdpRelayRequest.from_address(RouteAddress.parse(text)) is None


@pytest.mark.parametrize(
    "text",
    [
        "/fleet/udp/9053/41",
        "/fleet/udp/9053/41/from/ip4/203.0.113.7/udp",
        "/fleet/udp/09053/41/from/ip4/203.0.113.7/udp/40000",
        "/fleet/udp/0/41/from/ip4/203.0.113.7/udp/40000",
        "/fleet/udp/9053/041/from/ip4/203.0.113.7/udp/40000",
        "/fleet/udp/9053/0/from/ip4/203.0.113.7/udp/40000",
        "/fleet/udp/9053/x/from/ip4/203.0.113.7/udp/40000",
        "/fleet/udp/9053/41/to/ip4/203.0.113.7/udp/40000",
        "/fleet/udp/9053/41/from/ip6/203.0.113.7/udp/40000",
        "/fleet/udp/9053/41/from/ip4/example.com/udp/40000",
        "/fleet/udp/9053/41/from/ip4/203.0.113.7/tcp/40000",
        "/fleet/udp/9053/41/from/ip4/203.0.113.7/udp/0",
        "/fleet/udp/9053/41/from/ip4/203.0.113.7/udp/40000/more",
        "/fleet/udp/9053/99999999999999999999/from/ip4/203.0.113.7/udp/40000",
    ],
)
def test_a_malformed_relayed_flow_address_is_a_remote_fault(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        UdpRelayRequest.from_address(RouteAddress.parse(text))


def test_a_request_is_checked_where_it_is_made() -> None:
    for port, fence, visitor in ((0, 1, ("1.2.3.4", 5)), (53, 0, ("1.2.3.4", 5))):
        with pytest.raises(LocalProtocolError):
            UdpRelayRequest(port, fence, visitor)
    with pytest.raises(LocalProtocolError):
        UdpRelayRequest(53, 1, ("not-an-ip", 5))


@given(st.lists(st.text(min_size=1, max_size=12), max_size=10))
def test_any_fleet_udp_address_parses_or_is_a_protocol_error(segments: list[str]) -> None:
    try:
        address = RouteAddress(("fleet", "udp", *segments))
    except ProtocolError:
        return
    try:
        request = UdpRelayRequest.from_address(address)
    except ProtocolError:
        return
    assert request is not None
    assert UdpRelayRequest.from_address(request.to_address()) == request


# Frames ---------------------------------------------------------------------------


def test_frames_whole_byte_at_a_time_and_with_trailing_data() -> None:
    payloads = [b"", b"x", b"hello", bytes(range(256)) * 4]
    wire = b"".join(encode_relayed_datagram(p) for p in payloads)
    assert encode_relayed_datagram(b"hi") == b"\x00\x02hi"
    reader = RelayedDatagrams()
    assert reader.feed(wire) == payloads
    reader.finish()
    reader = RelayedDatagrams()
    got = [d for i in range(len(wire)) for d in reader.feed(wire[i : i + 1])]
    assert got == payloads
    reader = RelayedDatagrams()
    assert reader.feed(wire + b"\x00\x05ab") == payloads
    assert reader.pending == 4
    with pytest.raises(RemoteProtocolError):
        reader.finish()
    assert reader.feed(b"cde") == [b"abcde"]
    assert reader.pending == 0


def test_a_frame_holds_at_most_65535_bytes() -> None:
    biggest = bytes(MAX_RELAYED_DATAGRAM)
    assert RelayedDatagrams().feed(encode_relayed_datagram(biggest)) == [biggest]
    with pytest.raises(LocalProtocolError):
        encode_relayed_datagram(biggest + b"x")
    reader = RelayedDatagrams()
    reader.feed(b"\xff\xff" + bytes(1000))
    assert reader.pending == 1002  # held only up to one frame


@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
)
def test_frames_round_trip_in_any_pieces(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_relayed_datagram(p) for p in payloads)
    reader = RelayedDatagrams()
    got: list[bytes] = []
    at, index = 0, 0
    while at < len(wire):
        step = cuts[index % len(cuts)]
        got += reader.feed(wire[at : at + step])
        at, index = at + step, index + 1
    assert got == payloads
    reader.finish()


# Whole or nothing on a stream -------------------------------------------------------


def test_a_relayed_datagram_is_written_whole_or_not_at_all() -> None:
    tunnel = FakeTunnel(capacity=10)
    stream = handle(tunnel)
    assert stream.write_whole(b"123456") is True
    assert stream.write_whole(b"123456") is False  # 4 bytes of room: nothing is split
    assert stream.write_whole(b"1234") is True
    assert tunnel.sent == [(b"123456", False), (b"1234", False)]
    assert stream.bytes_sent == 10
    stream.reset()
    assert stream.write_whole(b"x") is Blocked.CLOSED
