"""The host of an HTTP/1.x request, peeked at the start of a connection; error replies.

This module owns reading the request head (request line and header lines, up to the
empty line) of the first request on a connection, to learn which host it is for,
and the small complete responses a shared HTTP listener answers with when it cannot
forward (:func:`http_error_response`).  Which tunnel a host reaches belongs to
:mod:`~snocat_proto._wire.names`; the connection and forwarding to the caller.

:class:`RequestHeadParser` follows the peek contract of
:mod:`~snocat_proto._wire.peek`: feed it the connection's first bytes in any split;
it answers :data:`~snocat_proto._wire.peek.NEED_MORE`, :class:`RequestHead`, or
raises a :class:`RequestHeadError` (each names the status to answer with).  It
consumes nothing: the caller forwards every byte it read, the head included, to the
target unchanged.  Routing is per connection: later requests on a kept-alive
connection go where the first one went, whatever their ``Host``.

Rules (RFC 9112; where it lets a recipient choose, the choice is said):

* Lines end with CRLF or a bare LF (RFC 9112, 2.2 allows LF alone, as most servers
  do); a CR anywhere else is refused.  Empty lines before the request line are
  skipped (2.2).
* The request line is ``METHOD SP TARGET SP HTTP/1.x`` with single spaces and
  visible ASCII; anything else is :class:`NotHTTP1`, and the HTTP/2 preface
  (``PRI * HTTP/2.0``) is :class:`HTTP2Preface`.  A connection that starts with a
  byte no method starts with (a TLS ClientHello, a PROXY v2 header) is refused on
  that byte.
* Header lines are ``NAME ":" OWS VALUE OWS``.  Refused: whitespace before the
  colon (5.1), a line starting with whitespace (obs-fold, 5.2, or whitespace after
  the request line, 2.2), control characters, and non-ASCII in a field name or in
  ``Host``.  Other field values may hold obs-text (bytes 0x80-0xFF: browsers send
  raw UTF-8 cookies); they are not read.
* ``Host`` (3.2): at most one (:class:`DuplicateHost`); HTTP/1.1 requires one
  (:class:`MissingHost`); its host is ``[IPv6]``, an IPv4 address or a DNS host name
  (:func:`~snocat_proto._wire.names.check_host_name`) with an optional port, else
  :class:`InvalidHost`.  An absolute-form target (``http://HOST:PORT/...``, 3.2.2)
  names the host that wins over ``Host``; userinfo in it is refused.
* ``Limits.max_http_header_bytes`` bounds the head, from its first byte through the
  empty line that ends it: a head of exactly that many bytes is read; when that
  many bytes have arrived without the end of the head, the next byte is refused
  with :class:`RequestHeadTooLarge` (431).

Why not ``h11``: it folds obs-fold lines into the value (a folded ``Host`` routes by
the joined text), takes non-ASCII ``Host`` values and ``PRI * HTTP/2.0`` as a
request, and checks its size bound only while a head is incomplete, so the same
20 KiB head is read when it arrives at once and refused when it trickles in; and it
consumes what it parses.  The rules above are a few dozen lines; every one of
those would need a check around h11 anyway.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar

from .errors import LocalProtocolError, RemoteProtocolError
from .limits import Limits
from .names import check_host_name
from .peek import NEED_MORE, NeedMore, PeekParser

__all__ = [
    "NEED_MORE",
    "DuplicateHost",
    "HTTP2Preface",
    "InvalidHost",
    "MalformedRequestHead",
    "MissingHost",
    "NeedMore",
    "NotHTTP1",
    "RequestHead",
    "RequestHeadError",
    "RequestHeadParser",
    "RequestHeadTooLarge",
    "http_error_response",
]

_TCHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(
    rb"(?P<method>"
    + _TOKEN
    + rb") (?P<target>[\x21-\x7e]+) HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])"
)
_FIELD_LINE = re.compile(rb"(?P<name>" + _TOKEN + rb"):(?P<value>.*)", re.DOTALL)
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://(?P<authority>[^/?#]*)")
# Bytes never allowed, and a CR not followed by LF.  The request line takes visible
# ASCII and spaces only; header lines also HTAB and obs-text (0x80-0xFF).
_BAD_IN_REQUEST_LINE = re.compile(rb"[^\x20-\x7e\r\n]|\r(?!\n)")
_BAD_IN_HEADER_LINE = re.compile(rb"[^\t\x20-\x7e\x80-\xff\r\n]|\r(?!\n)")
_CR = 0x0D
_LF = 0x0A
_MAX_PORT = 65535
_SHOWN = 80  # characters of a bad line quoted in an error


class RequestHeadError(RemoteProtocolError):
    """The connection does not start with a request head we can route;
    ``status`` is the reply the caller should give (then close)."""

    status: ClassVar[int] = 400


class NotHTTP1(RequestHeadError):
    """The connection does not start with an HTTP/1.x request line."""


class HTTP2Preface(NotHTTP1):
    """The HTTP/2 connection preface (``PRI * HTTP/2.0``): prior-knowledge h2c."""


class MalformedRequestHead(RequestHeadError):
    """A header line breaks RFC 9112 (obs-fold, whitespace before a colon, a bare CR,
    a control character, non-ASCII in a name), or the head ended early."""


class MissingHost(RequestHeadError):
    """No host to route by: an HTTP/1.1 request without ``Host``, or an empty one."""


class DuplicateHost(RequestHeadError):
    """More than one ``Host`` line (RFC 9112, 3.2: a 400)."""


class InvalidHost(RequestHeadError):
    """A ``Host`` (or absolute-form authority) that is no host with an optional port."""


class RequestHeadTooLarge(RequestHeadError):
    """The head does not end within ``Limits.max_http_header_bytes`` bytes."""

    status: ClassVar[int] = 431


@dataclass(frozen=True, slots=True)
class RequestHead:
    """The first request's head is complete.

    ``host``: the ``Host`` header's host (lower-cased, port and IPv6 brackets
    removed, no trailing dot; ``None`` if absent or empty), ``target_host``: the host
    of an absolute-form request target, likewise (``None`` for the other forms),
    ``size``: the bytes of the head, through its empty line."""

    method: str
    target: str
    http_version: str
    host: str | None
    target_host: str | None
    size: int

    @property
    def route_host(self) -> str:
        """The host to route by: the absolute-form target's, else ``Host``'s."""
        host = self.target_host or self.host
        assert host is not None, "the parser reports no head without a host"
        return host


class RequestHeadParser(PeekParser[RequestHead]):
    """Peeks at a connection's first bytes for its first request's host."""

    __slots__ = (
        "_checked",
        "_host",
        "_host_lines",
        "_line_start",
        "_request",
        "_target_host",
    )

    def __init__(self, *, limits: Limits) -> None:
        super().__init__(limits.max_http_header_bytes)
        self._line_start = 0  # where the line being read starts
        self._checked = 0  # bytes of that line whose characters are known good
        self._request: tuple[str, str, str] | None = None  # method, target, version
        self._target_host: str | None = None
        self._host: str | None = None
        self._host_lines = 0

    def _too_large(self) -> RemoteProtocolError:
        return RequestHeadTooLarge(
            f"the request head does not end within {self.limit} bytes "
            "(Limits.max_http_header_bytes)"
        )

    def _truncated(self) -> RemoteProtocolError:
        if not self.buffered:
            return NotHTTP1("the connection ended before a request")
        return MalformedRequestHead(
            f"the connection ended {self.buffered} bytes into the request head"
        )

    def _examine(self, buffer: bytearray) -> RequestHead | None:
        while True:
            end = buffer.find(b"\n", self._checked)
            self._check_characters(buffer, end)
            if end < 0:
                return None
            line = buffer[self._line_start : end]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line_start = self._checked = end + 1
            if self._request is None:
                if line:  # empty lines before the request line are skipped
                    self._request_line(bytes(line))
            elif line:
                self._field_line(bytes(line))
            else:
                return self._finish(end + 1)

    def _check_characters(self, buffer: bytearray, newline: int) -> None:
        """Refuse the first bad byte of the current line that has arrived."""
        in_request_line = self._request is None
        if self._checked == self._line_start < len(buffer) and in_request_line:
            first = buffer[self._line_start]
            if first not in _TCHARS and first not in (_CR, _LF):
                raise NotHTTP1(_describe_first_byte(first))
        if newline >= 0:
            stop = newline + 1
        else:
            stop = len(buffer)
            if stop > self._checked and buffer[stop - 1] == _CR:
                stop -= 1  # whether this CR ends the line is up to the next byte
        pattern = _BAD_IN_REQUEST_LINE if in_request_line else _BAD_IN_HEADER_LINE
        bad = pattern.search(buffer, self._checked, stop)
        if bad is not None:
            byte = buffer[bad.start()]
            what = "a CR not followed by LF" if byte == _CR else f"the byte 0x{byte:02x}"
            if in_request_line:
                raise NotHTTP1(f"{what} in the request line")
            raise MalformedRequestHead(f"{what} in a header line")
        self._checked = stop

    def _request_line(self, line: bytes) -> None:
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            raise NotHTTP1(f"the request line is not METHOD SP TARGET SP HTTP/1.x: {_show(line)}")
        method, target = match["method"].decode("ascii"), match["target"].decode("ascii")
        major, minor = match["major"].decode("ascii"), match["minor"].decode("ascii")
        if major != "1":
            if (method, target, major, minor) == ("PRI", "*", "2", "0"):
                raise HTTP2Preface(
                    "the HTTP/2 connection preface (HTTP/2 with prior knowledge): "
                    "this listener speaks HTTP/1.x only"
                )
            raise NotHTTP1(f"HTTP/{major}.{minor}: this listener speaks HTTP/1.x only")
        absolute = _ABSOLUTE_FORM.match(match["target"])
        if absolute is not None:
            authority = absolute["authority"].decode("ascii")
            if "@" in authority:
                raise InvalidHost("userinfo in the request target (RFC 9110, 4.2.4)")
            self._target_host = _parse_host(authority, "the request target's authority")
            if self._target_host is None:
                raise InvalidHost("an absolute-form request target with an empty host")
        self._request = (method, target, f"{major}.{minor}")

    def _field_line(self, line: bytes) -> None:
        if line[0] in b" \t":
            raise MalformedRequestHead(
                "a header line starting with whitespace (obs-fold, RFC 9112, 5.2; or "
                f"whitespace after the request line, 2.2): {_show(line)}"
            )
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            colon = line.find(b":")
            if colon < 0:
                raise MalformedRequestHead(f"a header line without a colon: {_show(line)}")
            if line[:colon].rstrip(b" \t") != line[:colon]:
                raise MalformedRequestHead(
                    f"whitespace between a field name and its colon (RFC 9112, 5.1): {_show(line)}"
                )
            raise MalformedRequestHead(f"an invalid field name: {_show(line)}")
        if match["name"].lower() != b"host":
            return
        self._host_lines += 1
        if self._host_lines > 1:
            raise DuplicateHost("more than one Host header line (RFC 9112, 3.2)")
        value = match["value"].strip(b" \t")
        if not value.isascii():
            raise InvalidHost(f"a Host that is not ASCII: {_show(value)}")
        self._host = _parse_host(value.decode("ascii"), "Host")

    def _finish(self, size: int) -> RequestHead:
        assert self._request is not None
        method, target, version = self._request
        if version != "1.0" and self._host_lines == 0:
            raise MissingHost(f"an HTTP/{version} request without Host (RFC 9112, 3.2)")
        if self._target_host is None and self._host is None:
            raise MissingHost("no host to route by: no Host, or an empty one")
        return RequestHead(method, target, version, self._host, self._target_host, size)


def _parse_host(text: str, what: str) -> str | None:
    """``uri-host [":" port]`` -> the host, normalized; ``None`` if ``text`` is empty."""
    if not text:
        return None
    if text.startswith("["):
        close = text.find("]")
        literal, rest = text[1:close], text[close + 1 :]
        if close < 0 or "%" in literal:
            raise InvalidHost(f"{what} {text[:_SHOWN]!r}: not a bracketed IPv6 address")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise InvalidHost(f"{what} {text[:_SHOWN]!r}: not an IPv6 address") from None
    else:
        host, colon, port = text.partition(":")
        rest = colon + port
        if ":" in port:
            raise InvalidHost(f"{what} {text[:_SHOWN]!r}: an IPv6 address needs brackets")
        host = host.lower()
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            problem = check_host_name(host)
            if problem is not None:
                raise InvalidHost(f"{what} {text[:_SHOWN]!r}: {problem}") from None
            host = host.removesuffix(".")
    if rest:
        digits = rest[1:]  # an empty port is allowed (RFC 3986, 3.2.3)
        in_range = len(digits) <= 5 and digits.isascii() and digits.isdigit()
        valid = rest[0] == ":" and (not digits or (in_range and int(digits) <= _MAX_PORT))
        if not valid:
            raise InvalidHost(f"{what} {text[:_SHOWN]!r}: the port is not 0..65535")
    return host


def _describe_first_byte(byte: int) -> str:
    if byte == 0x16:
        return "not HTTP/1.x: the connection starts with a TLS handshake (use the TLS listener)"
    if byte == 0x0D or byte == 0x00:
        return f"not HTTP/1.x: first byte 0x{byte:02x} (a PROXY protocol v2 header?)"
    return f"not HTTP/1.x: first byte 0x{byte:02x}"


def _show(data: bytes) -> str:
    return repr(data[:_SHOWN])


def http_error_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response to send before closing: ``status`` (400..599) and
    ``reason`` (printable ASCII) on the status line, ``message`` (one line of text,
    control characters shown as ``?``) as a ``text/plain`` body.

    ``Connection: close`` (the caller closes after it), ``Cache-Control: no-store``
    (a 404 is cacheable by default, and the tunnel may be there a second later) and
    ``X-Content-Type-Options: nosniff`` (the body quotes what a visitor sent)."""
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise LocalProtocolError(f"an error response needs a status in 400..599, not {status!r}")
    if (
        not isinstance(reason, str)
        or not reason
        or not reason.isascii()
        or not reason.isprintable()
    ):
        raise LocalProtocolError(f"a reason phrase must be printable ASCII, not {reason!r}")
    if not isinstance(message, str):
        raise LocalProtocolError(f"the message must be str, not {type(message).__name__}")
    text = "".join(c if c.isprintable() else "?" for c in message)
    body = (text + "\n").encode("utf-8", errors="replace")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body
