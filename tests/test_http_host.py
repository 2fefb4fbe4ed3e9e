"""Peeking at an HTTP/1.x request head for its host: every rule, every split, the
limit at its exact edge, and the error responses."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.errors import LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.http_host import (
    DuplicateHost,
    HTTP2Preface,
    InvalidHost,
    MalformedRequestHead,
    MissingHost,
    NotHTTP1,
    RequestHead,
    RequestHeadError,
    RequestHeadParser,
    RequestHeadTooLarge,
    http_error_response,
)
from snocat_proto._wire.limits import Limits
from snocat_proto._wire.peek import NEED_MORE

LIMITS = Limits()
LIMIT = LIMITS.max_http_header_bytes
SIMPLE = b"GET / HTTP/1.1\r\nHost: office-1.tunnels.example.com\r\nAccept: */*\r\n\r\n"


def feed_all(chunks: list[bytes], limits: Limits = LIMITS) -> object:
    parser = RequestHeadParser(limits=limits)
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            assert parser.buffered <= parser.limit
            if result is not NEED_MORE:
                return result
        parser.receive_eof()
    except RequestHeadError as error:
        return type(error)
    raise AssertionError("receive_eof() before a result must raise")


def splits(data: bytes) -> list[list[bytes]]:
    ways = [[data], [data[:3], data[3:]], [data[i : i + 9] for i in range(0, len(data), 9)]]
    if len(data) <= 4096:
        ways.append([data[i : i + 1] for i in range(len(data))])
    else:
        ways.append([data[i : i + 1000] for i in range(0, len(data), 1000)])
    return ways


def outcome(data: bytes, limits: Limits = LIMITS) -> object:
    answers = [feed_all(chunks, limits) for chunks in splits(data)]
    assert all(answer == answers[0] for answer in answers), answers
    return answers[0]


def head(data: bytes) -> RequestHead:
    answer = outcome(data)
    assert isinstance(answer, RequestHead), answer
    return answer


# --- what is read ------------------------------------------------------------------


def test_a_simple_request_whole_bytewise_and_with_trailing_data() -> None:
    expected = RequestHead("GET", "/", "1.1", "office-1.tunnels.example.com", None, len(SIMPLE))
    assert head(SIMPLE) == expected
    assert head(SIMPLE + b"GET /next HTTP/1.1\r\nHost: other\r\n\r\n") == expected
    assert head(SIMPLE + b"\x00\xff body bytes") == expected
    parser = RequestHeadParser(limits=LIMITS)
    answers = [parser.feed(SIMPLE[i : i + 1]) for i in range(len(SIMPLE))]
    assert answers == [NEED_MORE] * (len(SIMPLE) - 1) + [expected]
    assert expected.route_host == "office-1.tunnels.example.com"


@pytest.mark.parametrize(
    ("value", "host"),
    [
        (b"Example.COM", "example.com"),
        (b"example.com:8080", "example.com"),
        (b"example.com:", "example.com"),  # an empty port (RFC 3986)
        (b"example.com.", "example.com"),
        (b"  example.com \t", "example.com"),  # OWS around the value
        (b"192.0.2.1:80", "192.0.2.1"),
        (b"[::1]", "::1"),
        (b"[2001:DB8::0:1]:443", "2001:db8::1"),
        (b"localhost", "localhost"),
    ],
)
def test_the_host_is_normalized(value: bytes, host: str) -> None:
    assert head(b"GET / HTTP/1.1\r\nHost:" + value + b"\r\n\r\n").host == host


def test_line_endings_lf_alone_and_mixed() -> None:
    for data in (
        b"GET / HTTP/1.1\nHost: a.example\n\n",
        b"GET / HTTP/1.1\r\nHost: a.example\n\r\n",
        b"GET / HTTP/1.1\nHost: a.example\r\n\n",
    ):
        assert head(data) == RequestHead("GET", "/", "1.1", "a.example", None, len(data))


def test_empty_lines_before_the_request_line_are_skipped() -> None:
    data = b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert head(data).size == len(data)


def test_the_absolute_form_wins_over_host() -> None:
    data = b"GET http://Office-1.Tunnels.Example.COM:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n"
    result = head(data)
    assert (result.host, result.target_host) == ("other", "office-1.tunnels.example.com")
    assert result.route_host == "office-1.tunnels.example.com"
    assert head(b"GET https://a.example HTTP/1.1\r\nHost: b\r\n\r\n").route_host == "a.example"
    # HTTP/1.0 needs no Host when the target names the host.
    assert head(b"GET http://a.example/ HTTP/1.0\r\n\r\n").route_host == "a.example"
    # The authority form of CONNECT and the asterisk form are routed by Host.
    assert head(b"CONNECT a.example:443 HTTP/1.1\r\nHost: b\r\n\r\n").route_host == "b"
    assert head(b"OPTIONS * HTTP/1.1\r\nHost: b\r\n\r\n").target_host is None


def test_http_1_0_and_other_minor_versions() -> None:
    assert head(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n").http_version == "1.0"
    assert head(b"GET / HTTP/1.9\r\nHost: a\r\n\r\n").http_version == "1.9"


def test_other_headers_may_hold_obs_text() -> None:
    data = b"GET / HTTP/1.1\r\nCookie: n=\xc3\xa9\r\nX: a\tb\r\nHost: a.example\r\n\r\n"
    assert head(data).host == "a.example"


# --- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", NotHTTP1),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", NotHTTP1),  # a TLS ClientHello
        (b"\r\n\r\n\x00\r\nQUIT\n!\x11", NotHTTP1),  # a PROXY v2 header
        (b"SSH-2.0-OpenSSH_9.6\r\n", NotHTTP1),
        (b"GET /\r\n", NotHTTP1),  # HTTP/0.9
        (b"GET / HTTP/2.0\r\n\r\n", NotHTTP1),
        (b"GET / HTTP/3.0\r\n\r\n", NotHTTP1),
        (b"GET / http/1.1\r\n\r\n", NotHTTP1),
        (b"GET  / HTTP/1.1\r\n\r\n", NotHTTP1),
        (b"GET\t/ HTTP/1.1\r\n\r\n", NotHTTP1),
        (b"GET / HTTP/1.1 \r\n\r\n", NotHTTP1),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", NotHTTP1),
        (b"GET /\rx HTTP/1.1\r\n", NotHTTP1),
        (b"(GET) / HTTP/1.1\r\n", NotHTTP1),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", HTTP2Preface),
        (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost: a\r\n  b\r\n\r\n", MalformedRequestHead),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tcontinued\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\n: a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nX(y): a\r\nHost: a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nH\xc3\xb6st: a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", MalformedRequestHead),  # a bare CR
        (b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nX: \x7f\r\nHost: a\r\n\r\n", MalformedRequestHead),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", MalformedRequestHead),  # ends early
        (b"GET / HTTP/1.1\r\n\r\n", MissingHost),
        (b"GET / HTTP/1.0\r\n\r\n", MissingHost),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", MissingHost),
        (b"GET / HTTP/1.1\r\nHost:   \r\n\r\n", MissingHost),
        (b"GET http://a.example/ HTTP/1.1\r\n\r\n", MissingHost),  # 1.1 needs Host anyway
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", DuplicateHost),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nHOST: b\r\n\r\n", DuplicateHost),
        (b"GET / HTTP/1.1\r\nHost: \xc3\xa9.example\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a_b.example\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a.example:8x\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a.example:123456\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: [fe80::1%eth0]\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: [a.example]\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: 300.1.1.1\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: 01.2.3.4\r\n\r\n", InvalidHost),
        (b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", InvalidHost),
        (b"GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", InvalidHost),
        (b"GET http:///x HTTP/1.1\r\nHost: a.example\r\n\r\n", InvalidHost),
        (b"GET http://a_b/x HTTP/1.1\r\nHost: a.example\r\n\r\n", InvalidHost),
    ],
)
def test_refusals(data: bytes, error: type[RequestHeadError]) -> None:
    assert outcome(data) is error


def test_junk_is_refused_on_its_first_byte() -> None:
    parser = RequestHeadParser(limits=LIMITS)
    with pytest.raises(NotHTTP1, match="TLS"):
        parser.feed(b"\x16")
    parser = RequestHeadParser(limits=LIMITS)
    assert parser.feed(b"PRI * HTTP/2.0\r") is NEED_MORE
    with pytest.raises(HTTP2Preface, match=r"HTTP/1\.x only"):
        parser.feed(b"\n")


def test_errors_come_in_the_order_of_the_stream() -> None:
    # A duplicate Host before a bad byte, and after it: whichever comes first wins.
    first = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX: \x01\r\n\r\n"
    second = b"GET / HTTP/1.1\r\nX: \x01\r\nHost: a\r\nHost: b\r\n\r\n"
    assert outcome(first) is DuplicateHost
    assert outcome(second) is MalformedRequestHead


def test_statuses() -> None:
    assert RequestHeadError.status == MissingHost.status == InvalidHost.status == 400
    assert RequestHeadTooLarge.status == 431
    assert issubclass(HTTP2Preface, NotHTTP1)
    assert issubclass(RequestHeadError, RemoteProtocolError)


def test_feeding_after_the_answer_is_an_api_error() -> None:
    parser = RequestHeadParser(limits=LIMITS)
    assert isinstance(parser.feed(SIMPLE), RequestHead)
    with pytest.raises(LocalProtocolError):
        parser.feed(b"more")
    parser.receive_eof()


# --- the limit ------------------------------------------------------------------------


def sized_request(total: int, line_ending: bytes = b"\r\n") -> bytes:
    """A request head of exactly ``total`` bytes, the empty line included."""
    start = b"GET / HTTP/1.1" + line_ending + b"Host: big.example" + line_ending + b"X-Pad: "
    end = line_ending + line_ending
    return start + b"p" * (total - len(start) - len(end)) + end


@pytest.mark.parametrize("line_ending", [b"\r\n", b"\n"])
def test_a_head_of_exactly_the_limit_is_read_one_byte_more_is_refused(line_ending: bytes) -> None:
    exact = sized_request(LIMIT, line_ending)
    assert len(exact) == 16 * 1024
    assert head(exact + b"body") == RequestHead("GET", "/", "1.1", "big.example", None, LIMIT)
    over = sized_request(LIMIT + 1, line_ending)
    assert outcome(over) is RequestHeadTooLarge
    assert outcome(over + b"body") is RequestHeadTooLarge


def test_the_limit_is_a_setting() -> None:
    small = Limits(max_http_header_bytes=len(SIMPLE))
    assert isinstance(outcome(SIMPLE, small), RequestHead)
    assert outcome(SIMPLE, Limits(max_http_header_bytes=len(SIMPLE) - 1)) is RequestHeadTooLarge


def test_nothing_past_the_limit_is_buffered() -> None:
    parser = RequestHeadParser(limits=Limits(max_http_header_bytes=64))
    assert parser.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 45) is NEED_MORE
    assert parser.buffered == 64
    with pytest.raises(RequestHeadTooLarge):
        parser.feed(b"a" * 100_000)
    assert parser.buffered == 0
    parser = RequestHeadParser(limits=Limits(max_http_header_bytes=64))
    assert isinstance(parser.feed(SIMPLE[:60] + b"\r\n\r\n" + b"x" * 100_000), RequestHead)


def test_a_slow_sender_costs_linear_work() -> None:
    """16 KiB one byte at a time is re-scanned from where it stopped, not from the start."""
    data = sized_request(LIMIT)
    parser = RequestHeadParser(limits=LIMITS)
    for i in range(len(data) - 1):
        assert parser.feed(data[i : i + 1]) is NEED_MORE
    assert isinstance(parser.feed(data[-1:]), RequestHead)


# --- arbitrary bytes ------------------------------------------------------------------

fragments = st.sampled_from(
    [b"GET", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r", b"Host", b":",
     b"a.example", b"[::1]", b":80", b"\t", b"X-A", b"\xc3\xa9", b"\x00", b"http://b.example"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.lists(fragments | st.binary(max_size=4), max_size=30),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_arbitrary_bytes_give_a_head_or_a_request_head_error(
    pieces: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(pieces)
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    limits = Limits(max_http_header_bytes=64)
    answer = feed_all(chunks, limits)
    assert answer == feed_all([data], limits)
    if isinstance(answer, RequestHead):
        assert answer.size <= 64 and data[: answer.size].endswith(b"\n")
        assert answer.route_host == answer.route_host.lower()
    else:
        assert isinstance(answer, type) and issubclass(answer, RequestHeadError)


@given(
    st.from_regex(rb"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\Z"), st.integers(0, 65535)
)
def test_any_host_and_port_round_trip(host: bytes, port: int) -> None:
    if host.endswith(b"-") or b"-." in host:
        return
    data = b"GET / HTTP/1.1\r\nHost: " + host.upper() + b":" + str(port).encode() + b"\r\n\r\n"
    assert head(data).host == host.decode()


# --- error responses ------------------------------------------------------------------


def test_an_error_response_is_complete() -> None:
    response = http_error_response(404, "Not Found", "no tunnel named office-2")
    assert response == (
        b"HTTP/1.1 404 Not Found\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 25\r\n"
        b"Connection: close\r\n"
        b"Cache-Control: no-store\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"\r\n"
        b"no tunnel named office-2\n"
    )
    head_bytes, _, body = response.partition(b"\r\n\r\n")
    length = int(head_bytes.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert length == len(body)


@pytest.mark.parametrize(
    ("status", "reason", "message"),
    [
        (502, "Bad Gateway", "tunnel office-1 is offline"),
        (400, "Bad Request", "no Host header"),
        (431, "Request Header Fields Too Large", "the request head is over 16384 bytes"),
    ],
)
def test_error_responses_parse_as_http(status: int, reason: str, message: str) -> None:
    response = http_error_response(status, reason, message)
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == f"HTTP/1.1 {status} {reason}".encode()
    fields, _, body = rest.partition(b"\r\n\r\n")
    assert body == message.encode() + b"\n"
    assert f"Content-Length: {len(body)}".encode() in fields.split(b"\r\n")


def test_the_message_is_one_line_of_text() -> None:
    response = http_error_response(404, "Not Found", "no tunnel named é\r\nSet-Cookie: x")
    body = response.partition(b"\r\n\r\n")[2]
    assert body == "no tunnel named é??Set-Cookie: x\n".encode()
    assert response.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [(200, "OK"), (399, "X"), (600, "X"), (True, "X"), ("404", "Not Found"), (404, ""),
     (404, "Not\r\nFound"), (404, "Nicht gefunden ü"), (404, None)],
)  # fmt: skip
def test_bad_arguments_are_api_errors(status: object, reason: object) -> None:
    with pytest.raises(LocalProtocolError):
        http_error_response(status, reason, "x")  # type: ignore[arg-type]
