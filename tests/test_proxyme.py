"""The proxyme demand proxy: its address, and both sides of its stream."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.framing import encode_frame
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.proxyme import (
    PROXYME_VERSION,
    RELEASE_ACK,
    RELEASE_REQUEST,
    Denied,
    Granted,
    ProxymeClient,
    ProxymeEvent,
    ProxymeRequest,
    ProxymeServer,
    Released,
    ReleaseRequested,
    SubjectReceived,
)
from snocat_proto._wire.targets import ProxyTcpTarget, TargetKind

# The "valid result or ProtocolError" properties get more examples than the rest.
ARBITRARY_EXAMPLES = 500

LIMITS = Limits()
SUBJECT_TRACE = bytes.fromhex("00000002") + b'""'
GRANT_TRACE = bytes.fromhex("0000000D") + b'["[::]:8080"]'
DENY_TRACE = bytes.fromhex("00000004") + b"null"

cut_points = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=10)
hosts = st.text(
    alphabet=st.sampled_from("abc019.-:") | st.characters(exclude_categories=("C", "Z")),
    min_size=1,
    max_size=30,
).filter(lambda h: "/" not in h and "\\" not in h)
requests = st.builds(ProxymeRequest, hosts, st.integers(1, 65535))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def chunkings(data: bytes, cuts: list[int]) -> list[list[bytes]]:
    return [[data], [data[i : i + 1] for i in range(len(data))], split_at(data, cuts)]


def feed(machine: ProxymeClient | ProxymeServer, chunks: list[bytes]) -> list[ProxymeEvent]:
    events: list[ProxymeEvent] = []
    for chunk in chunks:
        events.extend(machine.receive_data(chunk))
    return events


# --- the address -------------------------------------------------------------------


def test_constants() -> None:
    assert PROXYME_VERSION == "0.0.1"
    assert RELEASE_REQUEST == RELEASE_ACK == bytes(8)


def test_request_trace() -> None:
    request = ProxymeRequest("127.0.0.1", 5000)
    assert request.to_address().encode() == b"/proxyme/0.0.1/127.0.0.1/5000"
    assert ProxymeRequest.from_address(request.to_address()) == request
    target = request.target()
    assert target == ProxyTcpTarget(TargetKind.DNS, "127.0.0.1", 5000)
    assert target.to_address().encode() == b"/proxy-tcp/dns/127.0.0.1/tcp/5000"


def test_short_form_means_localhost() -> None:
    request = ProxymeRequest.from_address(RouteAddress.parse("/proxyme/0.0.1/5000"))
    assert request == ProxymeRequest("localhost", 5000)
    assert str(request.to_address()) == "/proxyme/0.0.1/localhost/5000"


@pytest.mark.parametrize("text", ["", "/", "/proxy-tcp/tcp/80", "/PROXYME/0.0.1/80", "/x/proxyme"])
def test_not_proxyme(text: str) -> None:
    assert ProxymeRequest.from_address(RouteAddress.parse(text)) is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("/proxyme", "version"),
        ("/proxyme/0.0.2/h/80", "version"),
        ("/proxyme/0.0.1.0/h/80", "version"),
        ("/proxyme//h/80", "version"),
        ("/proxyme/0.0.1", "must be"),
        ("/proxyme/0.0.1/h/80/extra", "must be"),
        ("/proxyme/0.0.1/h/80/", "must be"),
        ("/proxyme/0.0.1/h/0", "port"),
        ("/proxyme/0.0.1/h/65536", "port"),
        ("/proxyme/0.0.1/h/+80", "port"),
        ("/proxyme/0.0.1/h/", "port"),
        ("/proxyme/0.0.1/h", "port"),
        ("/proxyme/0.0.1//80", "host"),
        ("/proxyme/0.0.1/a\\/b/80", "host"),
        ("/proxyme/0.0.1/a b/80", "host"),
    ],
)
def test_bad_request_address(text: str, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment):
        ProxymeRequest.from_address(RouteAddress.parse(text))


@pytest.mark.parametrize(("host", "port"), [("", 80), ("a/b", 80), ("h", 0), ("h", 70000)])
def test_request_validation(host: str, port: int) -> None:
    with pytest.raises(LocalProtocolError):
        ProxymeRequest(host, port)


@given(requests)
def test_request_roundtrip(request: ProxymeRequest) -> None:
    address = RouteAddress.decode(request.to_address().encode())
    assert ProxymeRequest.from_address(address) == request
    target = request.target()
    assert ProxyTcpTarget.from_address(target.to_address()) == target


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(
    st.lists(
        st.sampled_from(["proxyme", "0.0.1", "h", "80", "0", ""]) | st.text(max_size=6), max_size=5
    )
)
def test_arbitrary_request_addresses(segments: list[str]) -> None:
    address = RouteAddress(tuple(segments))
    try:
        request = ProxymeRequest.from_address(address)
    except RemoteProtocolError:
        assert segments[0] == "proxyme"
        return
    if request is not None:
        assert segments[:2] == ["proxyme", "0.0.1"]


# --- byte traces -------------------------------------------------------------------


def test_grant_and_release_traces() -> None:
    client = ProxymeClient(limits=LIMITS)
    server = ProxymeServer(limits=LIMITS)
    assert client.initial_data() == SUBJECT_TRACE
    assert server.receive_data(SUBJECT_TRACE) == [SubjectReceived("")]
    assert server.grant(["[::]:8080"]) == GRANT_TRACE
    assert server.granted
    assert client.receive_data(GRANT_TRACE) == [Granted(("[::]:8080",))]
    assert client.granted
    assert client.release() == bytes(8)
    assert client.granted  # still ours until the server acknowledges
    assert server.receive_data(bytes(8)) == [ReleaseRequested()]
    assert server.release_ack() == bytes(8)
    assert not server.granted
    assert client.receive_data(bytes(8)) == [Released()]
    assert not client.granted
    assert client.receive_eof() == []
    assert server.receive_eof() == []


def test_deny_trace() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    assert server.deny() == DENY_TRACE
    client = ProxymeClient(limits=LIMITS)
    assert client.receive_data(DENY_TRACE) == [Denied()]
    assert client.receive_eof() == []
    assert server.receive_eof() == []


def test_traces_byte_by_byte() -> None:
    server = ProxymeServer(limits=LIMITS)
    events = feed(server, [SUBJECT_TRACE[i : i + 1] for i in range(len(SUBJECT_TRACE))])
    assert events == [SubjectReceived("")]
    client = ProxymeClient(limits=LIMITS)
    stream = GRANT_TRACE + RELEASE_ACK
    assert feed(client, [stream[i : i + 1] for i in range(len(stream))]) == [
        Granted(("[::]:8080",)),
        Released(),
    ]


def test_compact_json_output() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    frame = server.grant(("0.0.0.0:8081", "[::]:8081", "ü"))
    assert frame[4:] == '["0.0.0.0:8081","[::]:8081","ü"]'.encode()
    client = ProxymeClient('a "quoted" ü', limits=LIMITS)
    assert client.initial_data()[4:] == '"a \\"quoted\\" ü"'.encode()


def test_subject_is_reported() -> None:
    server = ProxymeServer(limits=LIMITS)
    data = ProxymeClient("my laptop ✓", limits=LIMITS).initial_data()
    assert server.receive_data(data) == [SubjectReceived("my laptop ✓")]


def test_empty_grant_list() -> None:
    client = ProxymeClient(limits=LIMITS)
    assert client.receive_data(encode_frame(b"[]")) == [Granted(())]


def test_whitespace_json_is_accepted() -> None:
    server = ProxymeServer(limits=LIMITS)
    assert server.receive_data(encode_frame(b' "x" \n')) == [SubjectReceived("x")]


# --- release variants --------------------------------------------------------------


def test_any_8_bytes_request_release() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    server.grant(["a"])
    assert server.receive_data(b"1234") == []
    assert server.receive_data(b"5678") == [ReleaseRequested()]
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"9")


def test_client_eof_after_grant_is_release() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    server.grant(["a"])
    assert server.receive_data(b"123") == []
    assert server.receive_eof() == [ReleaseRequested()]
    assert server.release_ack() == RELEASE_ACK
    with pytest.raises(LocalProtocolError):
        server.receive_eof()


def test_server_withdraws_port() -> None:
    server = ProxymeServer(limits=LIMITS)
    client = ProxymeClient(limits=LIMITS)
    server.receive_data(client.initial_data())
    client.receive_data(server.grant(["[::]:8080"]))
    # The server withdraws; the client learns the port is gone.
    assert client.receive_data(server.release_ack()) == [Released()]
    with pytest.raises(LocalProtocolError):
        client.release()
    # A release request that crossed the withdrawal is absorbed without an event.
    assert server.receive_data(RELEASE_REQUEST) == []
    assert server.receive_eof() == []
    with pytest.raises(LocalProtocolError):
        server.release_ack()


def test_server_withdraws_then_client_eof() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    server.grant(["a"])
    server.release_ack()
    assert server.receive_eof() == []


def test_client_eof_after_grant_means_released() -> None:
    client = ProxymeClient(limits=LIMITS)
    client.receive_data(GRANT_TRACE)
    assert client.receive_eof() == [Released()]
    releasing = ProxymeClient(limits=LIMITS)
    releasing.receive_data(GRANT_TRACE)
    releasing.release()
    assert releasing.receive_eof() == [Released()]


def test_client_eof_inside_ack_is_an_error() -> None:
    client = ProxymeClient(limits=LIMITS)
    client.receive_data(GRANT_TRACE)
    client.release()
    assert client.receive_data(bytes(3)) == []
    with pytest.raises(RemoteProtocolError, match="acknowledgement"):
        client.receive_eof()


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"x", b"null", b"1", b"[]", b'["a"]', b"{}", b'"a', b'"\xff"', b'"\\ud800"', b"NaN"],
)
def test_bad_subject(payload: bytes) -> None:
    server = ProxymeServer(limits=LIMITS)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(encode_frame(payload))
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.grant(["a"])
    assert server.receive_eof() == []  # the failure was reported once
    with pytest.raises(LocalProtocolError):
        server.receive_eof()


def test_subject_size_limit() -> None:
    fits = encode_frame(b'"' + b"a" * 254 + b'"')
    assert ProxymeServer(limits=LIMITS).receive_data(fits) == [SubjectReceived("a" * 254)]
    with pytest.raises(FrameTooLarge):
        ProxymeServer(limits=LIMITS).receive_data((257).to_bytes(4, "big"))
    with pytest.raises(LocalProtocolError, match="limit"):
        ProxymeClient("a" * 255, limits=LIMITS)
    ProxymeClient("a" * 254, limits=LIMITS)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"1",
        b'"a"',
        b"{}",
        b"[1]",
        b'["a", null]',
        b"[[]]",
        b"true",
        b"NaN",
        b"[Infinity]",
        b'["\\udc00"]',
        b"\xff",
        b"[" * 5000 + b"]" * 5000,
        b"\xef\xbb\xbfnull",
        b"null null",
        b"1" * 5000,
    ],
)
def test_bad_response(payload: bytes) -> None:
    client = ProxymeClient(limits=LIMITS)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(encode_frame(payload))
    with pytest.raises(LocalProtocolError):
        client.release()
    assert client.receive_eof() == []


def test_response_size_limit() -> None:
    client = ProxymeClient(limits=Limits(max_frame_size=16))
    with pytest.raises(FrameTooLarge):
        client.receive_data((17).to_bytes(4, "big"))
    server = ProxymeServer(limits=Limits(max_frame_size=16))
    server.receive_data(SUBJECT_TRACE)
    with pytest.raises(LocalProtocolError, match="limit"):
        server.grant(["0123456789abcdef"])


@pytest.mark.parametrize(
    "stream",
    [
        DENY_TRACE + b"x",
        GRANT_TRACE + bytes(9),
        GRANT_TRACE + bytes(8) + b"x",
    ],
)
def test_unexpected_bytes_to_client(stream: bytes) -> None:
    client = ProxymeClient(limits=LIMITS)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(stream)


@pytest.mark.parametrize(
    "stream", [SUBJECT_TRACE + b"x", SUBJECT_TRACE + SUBJECT_TRACE, SUBJECT_TRACE + bytes(8)]
)
def test_bytes_before_the_decision(stream: bytes) -> None:
    server = ProxymeServer(limits=LIMITS)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(stream)


def test_bytes_after_deny() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    server.deny()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"x")


@pytest.mark.parametrize("cut", range(len(GRANT_TRACE)))
def test_client_eof_before_response(cut: int) -> None:
    client = ProxymeClient(limits=LIMITS)
    assert client.receive_data(GRANT_TRACE[:cut]) == []
    with pytest.raises(RemoteProtocolError, match="before the proxyme response"):
        client.receive_eof()


@pytest.mark.parametrize("cut", range(len(SUBJECT_TRACE) + 1))
def test_server_eof_before_decision(cut: int) -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE[:cut])
    with pytest.raises(RemoteProtocolError):
        server.receive_eof()


# --- misuse ------------------------------------------------------------------------


def test_client_misuse() -> None:
    client = ProxymeClient(limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        client.release()  # nothing granted
    client.initial_data()
    with pytest.raises(LocalProtocolError):
        client.initial_data()
    client.receive_data(GRANT_TRACE)
    client.release()
    with pytest.raises(LocalProtocolError):
        client.release()
    client.receive_eof()
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.receive_eof()
    with pytest.raises(LocalProtocolError):
        ProxymeClient(b"x", limits=LIMITS)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        ProxymeClient("\ud800", limits=LIMITS)
    denied = ProxymeClient(limits=LIMITS)
    denied.receive_data(DENY_TRACE)
    with pytest.raises(LocalProtocolError):
        denied.release()


def test_server_misuse() -> None:
    server = ProxymeServer(limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        server.grant(["a"])  # no subject yet
    with pytest.raises(LocalProtocolError):
        server.deny()
    with pytest.raises(LocalProtocolError):
        server.release_ack()
    server.receive_data(SUBJECT_TRACE)
    with pytest.raises(LocalProtocolError):
        server.grant("[::]:8080")
    with pytest.raises(LocalProtocolError):
        server.grant([8080])  # type: ignore[list-item]
    with pytest.raises(LocalProtocolError):
        server.grant({"a"})  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        server.grant(["\udc00"])
    with pytest.raises(LocalProtocolError):
        server.release_ack()  # still deciding
    server.grant(["a"])
    with pytest.raises(LocalProtocolError):
        server.grant(["a"])
    with pytest.raises(LocalProtocolError):
        server.deny()
    server.receive_data(RELEASE_REQUEST)
    server.release_ack()
    with pytest.raises(LocalProtocolError):
        server.release_ack()


def test_deny_twice() -> None:
    server = ProxymeServer(limits=LIMITS)
    server.receive_data(SUBJECT_TRACE)
    server.deny()
    with pytest.raises(LocalProtocolError):
        server.deny()
    with pytest.raises(LocalProtocolError):
        server.release_ack()


# --- a whole conversation, and arbitrary input -------------------------------------


@given(
    st.text(max_size=40).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) < 120),
    st.lists(st.text(max_size=20), max_size=4),
    st.booleans(),
    cut_points,
    cut_points,
)
def test_conversation_any_chunking(
    subject: str, addresses: list[str], by_eof: bool, cuts_a: list[int], cuts_b: list[int]
) -> None:
    try:
        client = ProxymeClient(subject, limits=LIMITS)
    except LocalProtocolError:
        return  # lone surrogates cannot be sent
    server = ProxymeServer(limits=LIMITS)
    try:
        server_bound = client.initial_data()
        assert feed(server, split_at(server_bound, cuts_a)) == [SubjectReceived(subject)]
        client_bound = server.grant(addresses)
    except LocalProtocolError:
        return
    assert feed(client, split_at(client_bound, cuts_b)) == [Granted(tuple(addresses))]
    if by_eof:
        assert server.receive_eof() == [ReleaseRequested()]
    else:
        assert feed(server, split_at(client.release(), cuts_a)) == [ReleaseRequested()]
    assert feed(client, split_at(server.release_ack(), cuts_b)) == [Released()]


Outcome = tuple[str, tuple[ProxymeEvent, ...] | None]


def run(
    machine_type: type[ProxymeClient | ProxymeServer], chunks: list[bytes], decide: bool
) -> Outcome:
    machine = machine_type(limits=Limits(max_frame_size=64))
    events: list[ProxymeEvent] = []
    try:
        for chunk in chunks:
            new = machine.receive_data(chunk)
            events.extend(new)
            granting = decide and isinstance(machine, ProxymeServer)
            if granting and any(isinstance(e, SubjectReceived) for e in new):
                machine.grant(["x"])  # type: ignore[union-attr]
        events.extend(machine.receive_eof())
    except RemoteProtocolError as exc:
        return type(exc).__name__, None
    return "ok", tuple(events)


client_input = st.one_of(
    st.binary(max_size=24),
    st.tuples(st.sampled_from([GRANT_TRACE, DENY_TRACE]), st.binary(max_size=10)).map(
        lambda v: v[0] + v[1]
    ),
    st.tuples(st.binary(max_size=12), st.binary(max_size=10)).map(
        lambda v: encode_frame(v[0]) + v[1]
    ),
)
server_input = st.one_of(
    st.binary(max_size=24),
    st.binary(max_size=10).map(lambda tail: SUBJECT_TRACE + tail),
    st.tuples(st.text(max_size=6), st.binary(max_size=10)).map(
        lambda v: encode_frame(f'"{v[0]}"'.encode("utf-8", "replace")) + v[1]
    ),
)


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(client_input, cut_points)
def test_client_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    outcomes = {run(ProxymeClient, chunks, False) for chunks in chunkings(data, cuts)}
    assert len(outcomes) == 1


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(server_input, cut_points)
def test_server_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    outcomes = {run(ProxymeServer, chunks, False) for chunks in chunkings(data, cuts)}
    assert len(outcomes) == 1


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(server_input, cut_points)
def test_server_arbitrary_bytes_with_grant(data: bytes, cuts: list[int]) -> None:
    # Client bytes before the grant break the protocol; whether the grant was already
    # made when they arrive depends on timing, so only the absence of surprises is
    # checked here (run() lets nothing but RemoteProtocolError through).
    for chunks in chunkings(data, cuts):
        run(ProxymeServer, chunks, True)


# proxyme-options (negotiated; docs/protocol.md 3.13) ----------------------------------


def test_options_ask_for_a_port_and_say_why_a_denial_came() -> None:
    client = ProxymeClient(limits=LIMITS, options=True, public_port=8085)
    server = ProxymeServer(limits=LIMITS, options=True)
    initial = client.initial_data()
    assert initial == encode_frame(b'{"port":8085}')
    for chunks in chunkings(initial, [1, 5]):
        again = ProxymeServer(limits=LIMITS, options=True)
        assert feed(again, chunks) == [SubjectReceived("", 8085)]
    assert server.receive_data(initial) == [SubjectReceived("", 8085)]
    denial = server.deny("port 8085 is in use by another tunnel", retry=False)
    body = b'{"denied":"port 8085 is in use by another tunnel","retry":false}'
    assert denial == encode_frame(body)
    assert client.receive_data(denial) == [Denied("port 8085 is in use by another tunnel", False)]


def test_options_without_a_port_keep_the_base_bytes() -> None:
    client = ProxymeClient(limits=LIMITS, options=True)
    server = ProxymeServer(limits=LIMITS, options=True)
    assert client.initial_data() == encode_frame(b'""')
    assert server.receive_data(encode_frame(b'""')) == [SubjectReceived("")]
    assert server.deny() == encode_frame(b"null")  # no reason: the 0.8 denial


def test_without_options_a_port_request_is_never_sent_nor_taken() -> None:
    with pytest.raises(LocalProtocolError, match="proxyme-options"):
        ProxymeClient(limits=LIMITS, public_port=8085)
    server = ProxymeServer(limits=LIMITS)
    with pytest.raises(RemoteProtocolError, match="JSON string"):
        server.receive_data(encode_frame(b'{"port":8085}'))
    quiet = ProxymeServer(limits=LIMITS)
    quiet.receive_data(encode_frame(b'""'))
    assert quiet.deny("a reason a 0.8 client could not read") == encode_frame(b"null")
    client = ProxymeClient(limits=LIMITS)
    client.initial_data()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(encode_frame(b'{"denied":"x","retry":true}'))


@pytest.mark.parametrize(
    "payload",
    [b'{"port":0}', b'{"port":65536}', b'{"port":"80"}', b'{"port":true}', b'{"port":1.5}'],
)
def test_a_bad_port_request_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="port number"):
        ProxymeServer(limits=LIMITS, options=True).receive_data(encode_frame(payload))


@pytest.mark.parametrize(
    "payload", [b'{"denied":1}', b'{"retry":false}', b'{"denied":"x","retry":"no"}']
)
def test_a_bad_denial_object_is_a_protocol_error(payload: bytes) -> None:
    client = ProxymeClient(limits=LIMITS, options=True)
    client.initial_data()
    with pytest.raises(RemoteProtocolError, match="denial"):
        client.receive_data(encode_frame(payload))


def test_a_denial_reason_is_printable_and_bounded() -> None:
    server = ProxymeServer(limits=LIMITS, options=True)
    server.receive_data(encode_frame(b'""'))
    frame = server.deny("bad\x1b[31m" + "x" * 500)
    client = ProxymeClient(limits=LIMITS, options=True)
    client.initial_data()
    (denied,) = client.receive_data(frame)
    assert isinstance(denied, Denied)
    assert denied.reason.startswith("bad?[31m") and len(denied.reason) == LIMITS.max_reason_length


# udp-datagrams: a UDP port (negotiated with proxyme-options; docs/protocol.md 3.17) ----


def test_a_udp_port_is_asked_for_in_the_subject_object() -> None:
    client = ProxymeClient(limits=LIMITS, options=True, udp=True)
    assert client.initial_data() == encode_frame(b'{"udp":true}')
    both = ProxymeClient(limits=LIMITS, options=True, public_port=9053, udp=True)
    assert both.initial_data() == encode_frame(b'{"port":9053,"udp":true}')
    for payload, expected in [
        (b'{"udp":true}', SubjectReceived("", None, True)),
        (b'{"port":9053,"udp":true}', SubjectReceived("", 9053, True)),
        (b'{"udp":false}', SubjectReceived("", None, False)),
        (b'{"port":9053}', SubjectReceived("", 9053, False)),
    ]:
        server = ProxymeServer(limits=LIMITS, options=True, udp=True)
        assert server.receive_data(encode_frame(payload)) == [expected]
    # The grant and release are the proxyme ones.
    assert server.grant(["[::]:9053"]) == encode_frame(b'["[::]:9053"]')


def test_without_udp_datagrams_a_udp_member_is_ignored_and_never_sent() -> None:
    with pytest.raises(LocalProtocolError, match="proxyme-options"):
        ProxymeClient(limits=LIMITS, udp=True)
    # A server that did not agree on udp-datagrams reads an unknown member (3.13).
    server = ProxymeServer(limits=LIMITS, options=True)
    assert server.receive_data(encode_frame(b'{"udp":true}')) == [SubjectReceived("")]
    assert ProxymeServer(limits=LIMITS, udp=True).receive_data(encode_frame(b'""')) == [
        SubjectReceived("")
    ]


@pytest.mark.parametrize("payload", [b'{"udp":1}', b'{"udp":"yes"}', b'{"udp":null}'])
def test_a_udp_member_that_is_not_a_boolean_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="udp"):
        ProxymeServer(limits=LIMITS, options=True, udp=True).receive_data(encode_frame(payload))


# by-name: a target published on the shared listeners (docs/protocol.md 3.14.6) ---------


@pytest.mark.parametrize("service", ["http", "tls"])
def test_a_target_is_published_by_name_in_the_subject_object(service: str) -> None:
    client = ProxymeClient(limits=LIMITS, options=True, service=service)
    initial = client.initial_data()
    assert initial == encode_frame(b'{"' + service.encode() + b'":true}')
    for chunks in chunkings(initial, [1, 3]):
        server = ProxymeServer(limits=LIMITS, options=True, by_name=True)
        assert feed(server, chunks) == [SubjectReceived("", None, False, service)]
    grant = server.grant(["office-1.tunnels.example.com:443"])
    assert client.receive_data(grant) == [Granted(("office-1.tunnels.example.com:443",))]
    # Released as a port is.
    assert client.release() == RELEASE_REQUEST
    assert server.receive_data(RELEASE_REQUEST) == [ReleaseRequested()]
    assert client.receive_data(server.release_ack()) == [Released()]


def test_without_by_name_a_name_is_never_sent_and_its_member_is_ignored() -> None:
    with pytest.raises(LocalProtocolError, match="proxyme-options"):
        ProxymeClient(limits=LIMITS, service="http")
    with pytest.raises(LocalProtocolError, match="service"):
        ProxymeClient(limits=LIMITS, options=True, service="ftp")
    with pytest.raises(LocalProtocolError, match="alone"):
        ProxymeClient(limits=LIMITS, options=True, service="http", public_port=8080)
    # An aggregator that did not agree on by-name reads an unknown member (3.13): the
    # client therefore asks only where by-name was agreed.
    server = ProxymeServer(limits=LIMITS, options=True)
    assert server.receive_data(encode_frame(b'{"http":true}')) == [SubjectReceived("")]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"http":1}', "http"),
        (b'{"tls":"yes"}', "tls"),
        (b'{"http":true,"tls":true}', "one service"),
        (b'{"http":true,"port":8080}', "no port"),
    ],
)
def test_a_bad_by_name_subject_is_a_protocol_error(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        ProxymeServer(limits=LIMITS, options=True, by_name=True).receive_data(encode_frame(payload))
