"""Peeking at a TLS ClientHello's server name: real ClientHellos from Python's ``ssl``,
built ones for every refusal, every split, and the limit."""

from __future__ import annotations

import contextlib
import itertools
import ssl
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.peek import NEED_MORE, NeedMore
from snocat_proto._wire.sni import (
    UNRECOGNIZED_NAME,
    ClientHelloError,
    ClientHelloParser,
    ClientHelloTooLarge,
    InvalidServerName,
    MalformedClientHello,
    NotClientHello,
    NotTLS,
    ServerNameFound,
    encode_unrecognized_name_alert,
)

LIMITS = Limits()
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


def client_context(version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def start_client(
    server_hostname: str | None, version: ssl.TLSVersion | None = None
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(version).wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return client, incoming, outgoing


def real_hello(server_hostname: str | None, version: ssl.TLSVersion | None = None) -> bytes:
    """The bytes Python's ssl module writes first, without any socket."""
    _, _, outgoing = start_client(server_hostname, version)
    return outgoing.read()


# --- building ClientHellos ------------------------------------------------------------


def vec(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!H", kind) + vec(2, data)


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + vec(2, name) for name in names)
    return extension(0, vec(2, entries))


def hello_body(extensions: bytes | None, *, session_id: bytes = b"\x11" * 32) -> bytes:
    body = b"\x03\x03" + bytes(range(32)) + vec(1, session_id)
    body += vec(2, b"\x13\x01\x13\x02\xc0\x2f") + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, extensions)
    return body


def handshake(body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, fragment: int = 2**14, content: int = 22) -> bytes:
    out = b""
    for start in range(0, len(message), fragment):
        chunk = message[start : start + fragment]
        out += bytes([content]) + b"\x03\x01" + vec(2, chunk)
    return out


def hello(extensions: bytes | None = None, **kwargs: bytes) -> bytes:
    return records(handshake(hello_body(extensions, **kwargs)))


def with_name(name: bytes, *others: bytes) -> bytes:
    return hello(sni_extension(name) + b"".join(others))


def reframe(wire: bytes, fragment: int) -> bytes:
    """The same ClientHello (one record in ``wire``) in records of ``fragment`` bytes."""
    assert wire[0] == 22
    length = int.from_bytes(wire[3:5], "big")
    return records(wire[5 : 5 + length], fragment)


def feed_all(chunks: list[bytes], limits: Limits = LIMITS) -> object:
    parser = ClientHelloParser(limits=limits)
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            assert parser.buffered <= parser.limit
            if result is not NEED_MORE:
                return result
        parser.receive_eof()
    except ClientHelloError as error:
        return type(error)
    raise AssertionError("receive_eof() before a result must raise")


def splits(data: bytes) -> list[list[bytes]]:
    return [
        [data],
        [data[i : i + 1] for i in range(len(data))],
        [data[:5], data[5:9], data[9:]],
        [data[i : i + 7] for i in range(0, len(data), 7)],
    ]


def outcome(data: bytes, limits: Limits = LIMITS) -> object:
    """The one answer of every split (asserting that they agree)."""
    answers = [feed_all(chunks, limits) for chunks in splits(data)]
    assert all(answer == answers[0] for answer in answers), answers
    return answers[0]


def name_of(data: bytes, limits: Limits = LIMITS) -> str | None:
    answer = outcome(data, limits)
    assert isinstance(answer, ServerNameFound), answer
    return answer.server_name


# --- real ClientHellos ----------------------------------------------------------------


@pytest.mark.parametrize("version", [None, TLS12, TLS13], ids=["default", "tls1.2", "tls1.3"])
@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [
        ("example.com", "example.com"),
        ("Office-1.Tunnels.Example.COM", "office-1.tunnels.example.com"),
        ("a" * 63 + ".example.com", "a" * 63 + ".example.com"),
        (None, None),
        ("127.0.0.1", None),  # ssl sends no SNI for an IP address
        ("::1", None),
    ],
)
def test_real_client_hellos_whole_bytewise_and_with_trailing_data(
    version: ssl.TLSVersion | None, server_hostname: str | None, expected: str | None
) -> None:
    wire = real_hello(server_hostname, version)
    found = ServerNameFound(expected, len(wire))
    assert outcome(wire) == found
    assert outcome(wire + b"\x14\x03\x03\x00\x01\x01" + b"early data") == found
    parser = ClientHelloParser(limits=LIMITS)
    answers = [parser.feed(wire[i : i + 1]) for i in range(len(wire))]
    assert answers == [NEED_MORE] * (len(wire) - 1) + [found]
    assert parser.done and parser.result == found and parser.buffered == 0


@pytest.mark.parametrize("version", [TLS12, TLS13])
@pytest.mark.parametrize("fragment", [1, 2, 3, 4, 5, 100, 511])
def test_a_client_hello_split_across_several_records(
    version: ssl.TLSVersion, fragment: int
) -> None:
    wire = reframe(real_hello("split.example.com", version), fragment)
    assert outcome(wire) == ServerNameFound("split.example.com", len(wire))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=600),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_any_fragmentation_and_any_split(fragment: int, cuts: list[int]) -> None:
    wire = reframe(REAL_TLS13, fragment)
    points = sorted({cut % (len(wire) + 1) for cut in cuts})
    chunks = [wire[a:b] for a, b in itertools.pairwise([0, *points, len(wire)])]
    assert feed_all(chunks) == ServerNameFound("example.com", len(wire))


REAL_TLS13 = real_hello("example.com", TLS13)


def test_the_peeked_bytes_complete_a_real_handshake(server_identity: Any) -> None:
    """The parser consumes nothing: the bytes it saw, forwarded as they were, are a
    ClientHello the real server completes a handshake with, seeing the same name."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(
        server_identity.certificate_path, server_identity.private_key_path
    )
    seen: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: seen.append(name)
    to_server, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    client, to_client, from_client = start_client("localhost")

    parser = ClientHelloParser(limits=LIMITS)
    read = b""
    result: ServerNameFound | NeedMore = NEED_MORE
    first = from_client.read()
    for i in range(0, len(first), 100):  # as a TCP reader would see it
        read += first[i : i + 100]
        result = parser.feed(first[i : i + 100])
    assert result == ServerNameFound("localhost", len(first))
    to_server.write(read)
    for _ in range(10):
        for side in (server, client):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        to_client.write(from_server.read())
        to_server.write(from_client.read())
    client.write(b"ping")
    to_server.write(from_client.read())
    assert server.read(4) == b"ping"
    assert seen == ["localhost"]


# --- the alert --------------------------------------------------------------------------


def test_the_unrecognized_name_alert_bytes() -> None:
    assert encode_unrecognized_name_alert() == bytes.fromhex("15 0303 0002 02 70")
    assert UNRECOGNIZED_NAME == 112


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_a_real_client_reads_the_alert_as_unrecognized_name(version: ssl.TLSVersion) -> None:
    client, incoming, _ = start_client("nobody.example.com", version)
    incoming.write(encode_unrecognized_name_alert())
    with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
        client.do_handshake()


# --- built ClientHellos -----------------------------------------------------------------


def test_built_hellos_parse() -> None:
    assert name_of(with_name(b"x.example.com")) == "x.example.com"
    assert outcome(hello(None)) == ServerNameFound(None, len(hello(None)))  # TLS 1.2: none
    assert name_of(hello(b"")) is None
    other = extension(43, b"\x02\x03\x04") + extension(10, b"\x00\x02\x00\x1d")
    assert name_of(with_name(b"y.example.com", other)) == "y.example.com"
    assert name_of(with_name(b"trailing.dot.")) == "trailing.dot"
    assert name_of(hello(sni_extension(b"a.b"), session_id=b"")) == "a.b"


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", NotTLS),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotTLS),
        (b"\x80\x2e\x01\x03\x01", NotTLS),  # an SSL 2 compatible hello
        (b"\x16\x02\x00\x00\x10", NotTLS),
        (b"\x00", NotTLS),
        (b"\x15\x03\x03\x00\x02\x02\x28", NotClientHello),  # an alert
        (b"\x17\x03\x03\x00\x05hello", NotClientHello),  # application data
        (b"\x14\x07", NotTLS),
        (records(handshake(b"\x03\x03" + bytes(40), kind=2)), NotClientHello),  # ServerHello
        (b"\x16\x03\x01\x00\x00", MalformedClientHello),  # an empty record
        (b"\x16\x03\x01\x40\x01", MalformedClientHello),  # a record over 2^14
        (with_name(b"a.example.com")[:-1], MalformedClientHello),  # cut (then the end)
        (hello(sni_extension(b"a.com") + sni_extension(b"b.com")), MalformedClientHello),
        (hello(extension(5, b"") + extension(5, b"")), MalformedClientHello),
        (hello(sni_extension(b"a.com", b"b.com")), MalformedClientHello),
        (hello(sni_extension(b"a.com", name_type=1)), MalformedClientHello),
        (hello(extension(0, b"")), MalformedClientHello),
        (hello(extension(0, vec(2, b""))), MalformedClientHello),
        (hello(extension(0, vec(2, b"\x00" + vec(2, b"a.com")) + b"x")), MalformedClientHello),
        (hello(sni_extension(b"")), InvalidServerName),
        (hello(sni_extension(b"a_b.example.com")), InvalidServerName),
        (hello(sni_extension(b"192.0.2.1")), InvalidServerName),
        (hello(sni_extension(b"[::1]")), InvalidServerName),
        (hello(sni_extension("\u00e9.example.com".encode())), InvalidServerName),
        (hello(sni_extension(b"a\x00.example.com")), InvalidServerName),
        (hello(sni_extension(b"a..b")), InvalidServerName),
        (hello(sni_extension(b"x" * 64 + b".com")), InvalidServerName),
        (hello(None, session_id=b"\x01" * 33), MalformedClientHello),
    ],
)
def test_refusals(wire: bytes, error: type[ClientHelloError]) -> None:
    assert outcome(wire) is error


def lie(body: bytes, offset: int, delta: int, size: int) -> bytes:
    """``body`` with the ``size``-byte length at ``offset`` changed by ``delta``."""
    value = int.from_bytes(body[offset : offset + size], "big") + delta
    return body[:offset] + value.to_bytes(size, "big") + body[offset + size :]


@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (34, 1),  # legacy_session_id
        (67, 2),  # cipher_suites
        (75, 1),  # compression methods
        (77, 2),  # extensions
        (81, 2),  # the server_name extension's data
        (83, 2),  # server_name_list
        (86, 2),  # HostName
    ],
)
def test_every_length_that_lies_is_refused(offset: int, size: int, delta: int) -> None:
    body = hello_body(sni_extension(b"host.example.com") + extension(23, b""))
    assert body[86:88] == b"\x00\x10"  # the offsets above point where they should
    assert name_of(records(handshake(body))) == "host.example.com"
    assert outcome(records(handshake(lie(body, offset, delta, size)))) in (
        MalformedClientHello,
        InvalidServerName,
    )


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_handshake_length_that_lies_is_refused(delta: int) -> None:
    message = handshake(hello_body(sni_extension(b"a.example.com")))
    lied = lie(message, 1, delta, 3)
    wire = records(lied)
    # One byte short: the hello ends inside its record. One byte long: the record ends
    # first, and then the stream.
    assert outcome(wire) is MalformedClientHello


def test_a_record_of_another_type_inside_the_client_hello_is_refused() -> None:
    message = handshake(hello_body(sni_extension(b"a.example.com")))
    wire = records(message[:50]) + b"\x14\x03\x03\x00\x01\x01" + records(message[50:])
    assert outcome(wire) is MalformedClientHello
    assert outcome(records(message[:50]) + b"\x16\x04") is MalformedClientHello


def test_bytes_after_the_client_hello_in_its_record_are_refused() -> None:
    message = handshake(hello_body(sni_extension(b"a.example.com")))
    assert outcome(records(message + b"\x00")) is MalformedClientHello
    # A separate record after it is the target's business.
    assert name_of(records(message) + b"\x16\x03\x01\x00\x01\x00") == "a.example.com"


def test_the_end_of_the_stream() -> None:
    assert outcome(b"") is NotTLS
    assert outcome(b"\x16\x03") is MalformedClientHello
    parser = ClientHelloParser(limits=LIMITS)
    parser.feed(REAL_TLS13)
    parser.receive_eof()  # after the answer, the end adds nothing


def test_feeding_after_the_answer_is_an_api_error() -> None:
    parser = ClientHelloParser(limits=LIMITS)
    assert isinstance(parser.feed(REAL_TLS13), ServerNameFound)
    with pytest.raises(LocalProtocolError):
        parser.feed(b"x")
    failed = ClientHelloParser(limits=LIMITS)
    with pytest.raises(NotTLS):
        failed.feed(b"GET")
    assert failed.failed
    with pytest.raises(LocalProtocolError):
        failed.feed(b"x")
    failed.receive_eof()


# --- the limit -----------------------------------------------------------------------


def padded_hello(total: int, fragment: int = 2**14) -> bytes:
    """A ClientHello whose records take exactly ``total`` bytes (a padding extension)."""
    for extra in range(total, 0, -1):  # more records may be needed for more bytes
        body = hello_body(sni_extension(b"big.example.com") + extension(21, bytes(extra)))
        wire = records(handshake(body), fragment)
        if len(wire) == total:
            return wire
    raise AssertionError(total)


@pytest.mark.parametrize("fragment", [2**14, 1000])
def test_a_client_hello_of_exactly_the_limit_is_read_one_byte_more_is_refused(
    fragment: int,
) -> None:
    limit = LIMITS.max_sniff_bytes
    exact = padded_hello(limit, fragment)
    assert outcome(exact) == ServerNameFound("big.example.com", limit)
    over = padded_hello(limit + 1, fragment)
    assert outcome(over) is ClientHelloTooLarge


def test_an_announced_length_over_the_limit_is_refused_at_once() -> None:
    parser = ClientHelloParser(limits=LIMITS)
    assert parser.feed(b"\x16\x03\x01\x40\x00\x01\x00") is NEED_MORE
    with pytest.raises(ClientHelloTooLarge):
        parser.feed(b"\x40\x00")  # a ClientHello of 16 KiB: more than fits with its header
    small = Limits(max_sniff_bytes=600)
    assert name_of(REAL_TLS13, small) == "example.com"
    exact = Limits(max_sniff_bytes=len(REAL_TLS13))
    assert name_of(REAL_TLS13, exact) == "example.com"
    assert outcome(REAL_TLS13, Limits(max_sniff_bytes=len(REAL_TLS13) - 1)) is ClientHelloTooLarge


def test_nothing_past_the_limit_is_buffered() -> None:
    # The announced lengths fit in 100 bytes, but the second record's header does not.
    body = hello_body(extension(21, bytes(8)))
    assert len(body) == 91
    wire = records(handshake(body), fragment=94)
    assert len(wire) == 105
    parser = ClientHelloParser(limits=Limits(max_sniff_bytes=100))
    assert parser.feed(wire[:100]) is NEED_MORE
    assert parser.buffered == 100
    with pytest.raises(ClientHelloTooLarge):
        parser.feed(wire[100:] + b"\x16" * 10_000)
    assert parser.buffered == 0
    fits = ClientHelloParser(limits=Limits(max_sniff_bytes=105))
    assert fits.feed(wire + bytes(10_000)) == ServerNameFound(None, 105)


# --- arbitrary bytes ------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_arbitrary_bytes_give_an_answer_or_a_client_hello_error(
    data: bytes, cuts: list[int]
) -> None:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    answer = feed_all(chunks, Limits(max_sniff_bytes=200))
    assert answer == feed_all([data], Limits(max_sniff_bytes=200))
    assert isinstance(answer, ServerNameFound) or issubclass(answer, ClientHelloError)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.integers(min_value=1, max_value=50))
def test_arbitrary_extensions_in_a_valid_frame(extensions: bytes, fragment: int) -> None:
    wire = records(handshake(hello_body(extensions)), fragment)
    answer = outcome(wire)
    assert isinstance(answer, ServerNameFound) or answer in (
        MalformedClientHello,
        InvalidServerName,
    )


def test_errors_are_remote_protocol_errors() -> None:
    for error in (
        NotTLS,
        NotClientHello,
        MalformedClientHello,
        InvalidServerName,
        ClientHelloTooLarge,
    ):
        assert issubclass(error, ClientHelloError)
        assert issubclass(error, RemoteProtocolError)
