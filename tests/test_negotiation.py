"""NYAN version 0 negotiation: both sides, byte-exact and against arbitrary input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.errors import (
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    UnsupportedVersion,
)
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.negotiation import (
    HEADER,
    MAGIC,
    STATUS_ACCEPTED,
    STATUS_REFUSED,
    VERSION,
    Accepted,
    AcceptorNegotiation,
    AddressReceived,
    OpenerNegotiation,
    Refused,
)

# The "valid result or ProtocolError" properties get more examples than the rest.
ARBITRARY_EXAMPLES = 500

LIMITS = Limits()
PROXYME_TRACE = bytes.fromhex("4E59414E00 0000001D") + b"/proxyme/0.0.1/127.0.0.1/5000"
PROXY_TCP_TRACE = bytes.fromhex("4E59414E00 00000021") + b"/proxy-tcp/dns/127.0.0.1/tcp/5000"
ACCEPT_TRACE = bytes.fromhex("4E59414E00 00")

cut_points = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=10)
segment_text = st.text(
    alphabet=st.sampled_from("ab/\\") | st.characters(codec="utf-8"), max_size=30
)
addresses = st.lists(segment_text, max_size=6).map(lambda s: RouteAddress(tuple(s)))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def chunkings(data: bytes, cuts: list[int]) -> list[list[bytes]]:
    return [[data], [data[i : i + 1] for i in range(len(data))], split_at(data, cuts)]


Outcome = tuple[str, object, bytes]


def run_opener(chunks: list[bytes], eof: bool = False) -> Outcome:
    """(kind, result, service bytes after it) — or the error class as the kind."""
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    opener.initial_data()
    try:
        for index, chunk in enumerate(chunks):
            result = opener.receive_data(chunk)
            if result is not None:
                tail = b"".join(chunks[index + 1 :])
                if isinstance(result, Accepted):
                    return "accepted", None, result.remainder + tail
                return "refused", result.status, b""
        if eof:
            opener.receive_eof()
    except RemoteProtocolError as exc:
        return type(exc).__name__, None, b""
    return "pending", None, b""


def run_acceptor(chunks: list[bytes], limits: Limits = LIMITS, eof: bool = False) -> Outcome:
    acceptor = AcceptorNegotiation(limits=limits)
    acceptor.initial_data()
    try:
        for index, chunk in enumerate(chunks):
            result = acceptor.receive_data(chunk)
            if result is not None:
                return "address", result.address, result.remainder + b"".join(chunks[index + 1 :])
        if eof:
            acceptor.receive_eof()
    except RemoteProtocolError as exc:
        return type(exc).__name__, None, b""
    return "pending", None, b""


# --- byte traces -------------------------------------------------------------------


def test_constants() -> None:
    assert MAGIC == b"NYAN"
    assert VERSION == 0
    assert bytes.fromhex("4E59414E00") == HEADER
    assert (STATUS_ACCEPTED, STATUS_REFUSED) == (0, 1)


@pytest.mark.parametrize(
    ("address", "trace"),
    [
        (RouteAddress.of("proxyme", "0.0.1", "127.0.0.1", "5000"), PROXYME_TRACE),
        (RouteAddress.of("proxy-tcp", "dns", "127.0.0.1", "tcp", "5000"), PROXY_TCP_TRACE),
    ],
)
def test_traces_both_ways(address: RouteAddress, trace: bytes) -> None:
    opener = OpenerNegotiation(address, limits=LIMITS)
    acceptor = AcceptorNegotiation(limits=LIMITS)
    assert opener.initial_data() == trace
    assert acceptor.initial_data() == HEADER
    assert acceptor.receive_data(trace) == AddressReceived(address, b"")
    assert acceptor.complete and not acceptor.decided
    assert HEADER + acceptor.accept() == ACCEPT_TRACE
    assert acceptor.decided
    assert opener.receive_data(ACCEPT_TRACE) == Accepted(b"")
    assert opener.complete
    opener.receive_eof()  # after the result, the end of data is the service's business
    acceptor.receive_eof()


def test_trace_consumed_byte_by_byte() -> None:
    acceptor = AcceptorNegotiation(limits=LIMITS)
    results = [acceptor.receive_data(PROXYME_TRACE[i : i + 1]) for i in range(len(PROXYME_TRACE))]
    assert results[:-1] == [None] * (len(PROXYME_TRACE) - 1)
    assert results[-1] == AddressReceived(RouteAddress.parse("/proxyme/0.0.1/127.0.0.1/5000"), b"")
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    results2 = [opener.receive_data(ACCEPT_TRACE[i : i + 1]) for i in range(6)]
    assert results2 == [None] * 5 + [Accepted(b"")]


def test_refusal_trace() -> None:
    acceptor = AcceptorNegotiation(limits=LIMITS)
    acceptor.initial_data()
    acceptor.receive_data(PROXYME_TRACE)
    assert acceptor.refuse() == b"\x01"
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    assert opener.receive_data(HEADER + b"\x01") == Refused(1)


@pytest.mark.parametrize("status", [1, 2, 0x7F, 0xFF])
def test_any_nonzero_status_is_refused(status: int) -> None:
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    assert opener.receive_data(HEADER + bytes([status]) + b"junk") == Refused(status)


def test_service_bytes_are_kept_as_remainder() -> None:
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    assert opener.receive_data(ACCEPT_TRACE + b"HTTP/1.1 200") == Accepted(b"HTTP/1.1 200")
    acceptor = AcceptorNegotiation(limits=LIMITS)
    # Service bytes that look like an enormous frame header are not judged as one.
    result = acceptor.receive_data(PROXY_TCP_TRACE + b"\xff\xff\xff\xffGET /")
    assert result is not None and result.remainder == b"\xff\xff\xff\xffGET /"


def test_pipelined_pair_in_memory() -> None:
    address = RouteAddress.of("svc", "a/b", "c\\d", "")
    opener = OpenerNegotiation(address, limits=LIMITS)
    acceptor = AcceptorNegotiation(limits=LIMITS)
    to_acceptor = opener.initial_data() + b"early"
    to_opener = acceptor.initial_data()
    assert opener.receive_data(to_opener) is None
    received = acceptor.receive_data(to_acceptor)
    assert received == AddressReceived(address, b"early")
    assert opener.receive_data(acceptor.accept() + b"reply") == Accepted(b"reply")


@given(addresses, cut_points, cut_points)
def test_roundtrip_any_address_any_chunking(
    address: RouteAddress, cuts_a: list[int], cuts_b: list[int]
) -> None:
    opener = OpenerNegotiation(address, limits=LIMITS)
    acceptor = AcceptorNegotiation(limits=LIMITS)
    outcome = run_acceptor(split_at(opener.initial_data() + b"svc", cuts_a))
    assert outcome == ("address", address, b"svc")
    reply = acceptor.initial_data() + b"\x00" + b"back"
    assert run_opener(split_at(reply, cuts_b)) == ("accepted", None, b"back")


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"X", b"NYAX", b"nyan\x00", b"HTTP/1.1", b"\x00\x00\x00\x05"])
def test_wrong_magic(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="magic"):
        OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS).receive_data(bad)
    with pytest.raises(RemoteProtocolError, match="magic"):
        AcceptorNegotiation(limits=LIMITS).receive_data(bad)


@pytest.mark.parametrize("version", [1, 2, 255])
def test_unsupported_version(version: int) -> None:
    header = MAGIC + bytes([version])
    with pytest.raises(UnsupportedVersion):
        OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS).receive_data(header + b"\x00")
    acceptor = AcceptorNegotiation(limits=LIMITS)
    assert acceptor.receive_data(MAGIC) is None
    with pytest.raises(UnsupportedVersion):
        acceptor.receive_data(bytes([version]))


@pytest.mark.parametrize("cut", range(len(ACCEPT_TRACE)))
def test_opener_eof_during_negotiation(cut: int) -> None:
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    assert opener.receive_data(ACCEPT_TRACE[:cut]) is None
    with pytest.raises(RemoteProtocolError, match="stream ended during negotiation"):
        opener.receive_eof()
    opener.receive_eof()  # the failure was reported once; the end adds nothing


@pytest.mark.parametrize("cut", [0, 3, 5, 8, 9, len(PROXYME_TRACE) - 1])
def test_acceptor_eof_during_negotiation(cut: int) -> None:
    acceptor = AcceptorNegotiation(limits=LIMITS)
    assert acceptor.receive_data(PROXYME_TRACE[:cut]) is None
    with pytest.raises(RemoteProtocolError, match="stream ended during negotiation"):
        acceptor.receive_eof()
    with pytest.raises(LocalProtocolError):
        acceptor.accept()


def test_address_size_limit() -> None:
    fits = RouteAddress.of("a" * 2047)
    assert len(fits.encode()) == 2048
    assert run_acceptor([HEADER + OpenerNegotiation(fits, limits=LIMITS).initial_data()[5:]])[
        :2
    ] == ("address", fits)
    too_big = b"/" + b"a" * 2048
    assert len(too_big) == 2049
    acceptor = AcceptorNegotiation(limits=LIMITS)
    # Refused on the length header alone, before any of the 2049 bytes arrive.
    with pytest.raises(FrameTooLarge):
        acceptor.receive_data(HEADER + (2049).to_bytes(4, "big"))
    with pytest.raises(LocalProtocolError, match="2049 bytes"):
        OpenerNegotiation(RouteAddress.of("a" * 2048), limits=LIMITS)


def test_custom_address_limit() -> None:
    limits = Limits(max_address_size=10)
    OpenerNegotiation(RouteAddress.of("123456789"), limits=limits)
    with pytest.raises(LocalProtocolError):
        OpenerNegotiation(RouteAddress.of("1234567890"), limits=limits)
    data = HEADER + (11).to_bytes(4, "big") + b"/1234567890"
    assert run_acceptor([data], limits=limits)[0] == "FrameTooLarge"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"/\xff\xfe", "UTF-8"),
        (b"/a\xed\xa0\x80", "UTF-8"),
        (b"no-slash", "start with '/'"),
        (b"/bad\\escape", "invalid escape"),
        (b"/trailing\\", "lone backslash"),
    ],
)
def test_bad_address_payload(payload: bytes, fragment: str) -> None:
    acceptor = AcceptorNegotiation(limits=LIMITS)
    with pytest.raises(RemoteProtocolError, match=fragment):
        acceptor.receive_data(HEADER + len(payload).to_bytes(4, "big") + payload)
    with pytest.raises(LocalProtocolError):
        acceptor.receive_data(b"")  # a failed machine takes no more input
    acceptor.receive_eof()


def test_empty_address_is_valid() -> None:
    assert run_acceptor([HEADER + bytes(4)])[:2] == ("address", RouteAddress(()))


# --- misuse ------------------------------------------------------------------------


def test_acceptor_misuse() -> None:
    acceptor = AcceptorNegotiation(limits=LIMITS)
    with pytest.raises(LocalProtocolError):
        acceptor.accept()  # no address yet
    acceptor.receive_data(PROXYME_TRACE)
    with pytest.raises(LocalProtocolError, match="initial_data"):
        acceptor.accept()  # our header must go first
    acceptor.initial_data()
    with pytest.raises(LocalProtocolError):
        acceptor.initial_data()
    assert acceptor.accept() == b"\x00"
    with pytest.raises(LocalProtocolError):
        acceptor.accept()
    with pytest.raises(LocalProtocolError):
        acceptor.refuse()
    with pytest.raises(LocalProtocolError, match="service"):
        acceptor.receive_data(b"more")


def test_refuse_then_accept() -> None:
    acceptor = AcceptorNegotiation(limits=LIMITS)
    acceptor.initial_data()
    acceptor.receive_data(PROXYME_TRACE)
    assert acceptor.refuse() == b"\x01"
    with pytest.raises(LocalProtocolError):
        acceptor.accept()
    with pytest.raises(LocalProtocolError):
        acceptor.refuse()


def test_opener_misuse() -> None:
    opener = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    assert opener.address == RouteAddress.of("x")
    opener.initial_data()
    with pytest.raises(LocalProtocolError):
        opener.initial_data()
    assert opener.receive_data(ACCEPT_TRACE) == Accepted(b"")
    with pytest.raises(LocalProtocolError, match="service"):
        opener.receive_data(b"more")
    refused = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    refused.receive_data(HEADER + b"\x01")
    with pytest.raises(LocalProtocolError):
        refused.receive_data(b"")
    failed = OpenerNegotiation(RouteAddress.of("x"), limits=LIMITS)
    with pytest.raises(RemoteProtocolError):
        failed.receive_data(b"BAD")
    with pytest.raises(LocalProtocolError):
        failed.receive_data(HEADER)


# --- arbitrary input ---------------------------------------------------------------

opener_input = st.one_of(
    st.binary(max_size=16),
    st.binary(max_size=8).map(lambda tail: ACCEPT_TRACE[:6] + tail),
    st.tuples(st.integers(0, 255), st.binary(max_size=8)).map(
        lambda v: HEADER + bytes([v[0]]) + v[1]
    ),
    st.tuples(st.integers(0, 5), st.binary(max_size=4)).map(lambda v: HEADER[: v[0]] + v[1]),
)
acceptor_input = st.one_of(
    st.binary(max_size=32),
    st.binary(max_size=24).map(lambda body: HEADER + body),
    st.tuples(st.binary(max_size=20), st.integers(0, 24), st.binary(max_size=8)).map(
        lambda v: HEADER + len(v[0]).to_bytes(4, "big") + v[0][: v[1]] + v[2]
    ),
    st.tuples(segment_text, st.binary(max_size=8)).map(
        lambda v: HEADER + len(v[0].encode()).to_bytes(4, "big") + v[0].encode() + v[1]
    ),
)


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(opener_input, cut_points)
def test_opener_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    outcomes = {run_opener(chunks, eof=True) for chunks in chunkings(data, cuts)}
    assert len(outcomes) == 1
    kind, status, tail = outcomes.pop()
    if kind == "accepted":
        assert data == HEADER + b"\x00" + tail
    elif kind == "refused":
        assert data[:5] == HEADER and data[5] == status != 0


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(acceptor_input, cut_points)
def test_acceptor_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    small = Limits(max_address_size=16)
    for limits in (LIMITS, small):
        outcomes = {run_acceptor(chunks, limits, eof=True) for chunks in chunkings(data, cuts)}
        assert len(outcomes) == 1
        kind, address, tail = outcomes.pop()
        if kind == "address":
            assert isinstance(address, RouteAddress)
            encoded = address.encode()
            assert data == HEADER + len(encoded).to_bytes(4, "big") + encoded + tail
