"""The server name of a TLS ClientHello, peeked without terminating TLS.

This module owns reading the SNI (RFC 6066, section 3) from the first bytes of a TLS
connection, and the one alert a shared TLS listener sends (``unrecognized_name``).
Which tunnel a name reaches belongs to :mod:`~snocat_proto._wire.names`; the
connection, and forwarding, to the caller.

:class:`ClientHelloParser` follows the peek contract of
:mod:`~snocat_proto._wire.peek`: feed it the connection's first bytes as they
arrive; it answers :data:`~snocat_proto._wire.peek.NEED_MORE`,
:class:`ServerNameFound` (``server_name`` ``None`` when the ClientHello has no SNI
extension), or raises a :class:`ClientHelloError`.  It consumes nothing: the caller
forwards every byte it read to the target unchanged, where TLS runs end to end.

What is read (RFC 8446, 4.1.2 and 5.1; RFC 5246, 7.4.1.2, for TLS 1.2 and older)::

    record:     type(1)=22 handshake  legacy_record_version(2)=3.x  length(2)  fragment
    handshake:  msg_type(1)=1 client_hello  length(3)  body
    body:       legacy_version(2)=3.x  random(32)  session_id<0..32>
                cipher_suites<2..2^16-2>  compression_methods<1..2^8-1>
                [extensions<0..2^16-1>: type(2) extension_data<0..2^16-1> ...]
    server_name (type 0) extension_data:
                server_name_list<1..2^16-1>: name_type(1)=0 host_name  HostName<1..2^16-1>

Rules we keep: the ClientHello may be split across several handshake records (each
of 1 to 2^14 bytes, no other record type between them); the record that completes
it ends with it; every length must fit exactly inside the one around it; an
extension type appears at most once; the SNI list holds exactly one ``host_name``
(as OpenSSL requires), which must be a DNS host name
(:func:`~snocat_proto._wire.names.check_host_name`; IP literals are not allowed by
RFC 6066).  The name is reported lower-cased, a trailing dot removed.  With
Encrypted Client Hello the name seen here is the outer (public) one.
``Limits.max_sniff_bytes`` bounds the records that carry the ClientHello, record
headers included: an announced length beyond it is refused as soon as it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RemoteProtocolError
from .limits import Limits
from .names import check_host_name
from .peek import NEED_MORE, NeedMore, PeekParser

__all__ = [
    "NEED_MORE",
    "UNRECOGNIZED_NAME",
    "ClientHelloError",
    "ClientHelloParser",
    "ClientHelloTooLarge",
    "InvalidServerName",
    "MalformedClientHello",
    "NeedMore",
    "NotClientHello",
    "NotTLS",
    "ServerNameFound",
    "encode_unrecognized_name_alert",
]

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
CONTENT_HEARTBEAT = 24
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST_NAME = 0
#: The ``unrecognized_name`` alert description (RFC 6066, section 3).
UNRECOGNIZED_NAME = 112
_ALERT_FATAL = 2
#: RFC 8446, 5.1: records after the initial ClientHello carry 0x0303; a TLS 1.2 or
#: older client checks only the major version of a record before the ServerHello.
_ALERT_RECORD_VERSION = b"\x03\x03"

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_FRAGMENT = 2**14
_MAX_SESSION_ID = 32
_CONTENT_NAMES = {
    CONTENT_CHANGE_CIPHER_SPEC: "change_cipher_spec",
    CONTENT_ALERT: "alert",
    CONTENT_APPLICATION_DATA: "application_data",
    CONTENT_HEARTBEAT: "heartbeat",
}


class ClientHelloError(RemoteProtocolError):
    """The connection does not start with a ClientHello we can route by."""


class NotTLS(ClientHelloError):
    """The first bytes are not a TLS record at all (plain HTTP, SSL 2, junk)."""


class NotClientHello(ClientHelloError):
    """A TLS record, but not a handshake record, or a handshake other than ClientHello."""


class MalformedClientHello(ClientHelloError):
    """A ClientHello whose lengths lie, whose fields are out of range, or that ended early."""


class InvalidServerName(ClientHelloError):
    """The SNI host name is not a DNS host name."""


class ClientHelloTooLarge(ClientHelloError):
    """The ClientHello's records would pass ``Limits.max_sniff_bytes``."""


@dataclass(frozen=True, slots=True)
class ServerNameFound:
    """The ClientHello is complete.  ``server_name``: its SNI, lower-cased, without a
    trailing dot (``None``: no server_name extension); ``size``: the bytes of the
    records that carry it (all of them still to be forwarded)."""

    server_name: str | None
    size: int


def encode_unrecognized_name_alert() -> bytes:
    """One TLS alert record: fatal, ``unrecognized_name`` (112); send it, then close,
    when the name a client asked for reaches no tunnel (plaintext: no keys exist yet)."""
    return (
        bytes([CONTENT_ALERT])
        + _ALERT_RECORD_VERSION
        + b"\x00\x02"
        + bytes([_ALERT_FATAL, UNRECOGNIZED_NAME])
    )


class ClientHelloParser(PeekParser[ServerNameFound]):
    """Peeks at a TLS connection's first bytes for the ClientHello's server name."""

    __slots__ = ("_handshake", "_needed", "_position", "_record_left", "_records")

    def __init__(self, *, limits: Limits) -> None:
        super().__init__(limits.max_sniff_bytes)
        self._position = 0  # stream bytes examined
        self._record_left = 0  # bytes of the current record's fragment still to come
        self._records = 0
        self._handshake = bytearray()  # the handshake bytes the fragments carried so far
        self._needed: int | None = None  # 4 + the ClientHello's length, once known

    def _too_large(self) -> RemoteProtocolError:
        return ClientHelloTooLarge(
            f"the ClientHello does not end within {self.limit} bytes (Limits.max_sniff_bytes)"
        )

    def _truncated(self) -> RemoteProtocolError:
        if not self.buffered:
            return NotTLS("the connection ended before its first byte")
        return MalformedClientHello(
            f"the connection ended {self.buffered} bytes into the ClientHello"
        )

    def _examine(self, buffer: bytearray) -> ServerNameFound | None:
        while self._position < len(buffer):
            if self._record_left == 0:
                if not self._record_header(buffer):
                    return None
                continue
            # Never past the handshake header before it is read, nor past the ClientHello.
            wanted = (self._needed or _HANDSHAKE_HEADER) - len(self._handshake)
            take = min(self._record_left, len(buffer) - self._position, wanted)
            self._handshake += buffer[self._position : self._position + take]
            self._position += take
            self._record_left -= take
            if self._needed is None and len(self._handshake) >= _HANDSHAKE_HEADER:
                self._handshake_header()
            if self._needed is not None and len(self._handshake) == self._needed:
                body = bytes(self._handshake[_HANDSHAKE_HEADER:])
                return ServerNameFound(_parse_client_hello(body), self._position)
        return None

    def _record_header(self, buffer: bytearray) -> bool:
        """Check the record header at the position, as far as it has arrived; whether
        it is complete (and now behind the position)."""
        header = buffer[self._position : self._position + _RECORD_HEADER]
        first = self._records == 0
        content = header[0]
        if first:
            _check_first_record(header)
        elif content != CONTENT_HANDSHAKE:
            name = _CONTENT_NAMES.get(content, f"type {content}")
            raise MalformedClientHello(f"a {name} record inside the ClientHello")
        elif len(header) >= 2 and header[1] != 3:
            raise MalformedClientHello(f"a record of version {header[1]}.x inside the ClientHello")
        if len(header) < _RECORD_HEADER:
            return False
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise MalformedClientHello("an empty handshake record (RFC 8446, 5.1)")
        if length > _MAX_FRAGMENT:
            raise MalformedClientHello(f"a record of {length} bytes; the limit is 2^14")
        self._position += _RECORD_HEADER
        self._record_left = length
        self._records += 1
        if self._needed is not None:
            self._check_record_fits()
        return True

    def _handshake_header(self) -> None:
        kind = self._handshake[0]
        if kind != HANDSHAKE_CLIENT_HELLO:
            raise NotClientHello(f"the first handshake message is type {kind}, not ClientHello")
        self._needed = _HANDSHAKE_HEADER + int.from_bytes(self._handshake[1:4], "big")
        self._check_record_fits()

    def _check_record_fits(self) -> None:
        assert self._needed is not None
        missing = self._needed - len(self._handshake)
        if self._position + missing > self.limit:
            raise ClientHelloTooLarge(
                f"the ClientHello needs {self._position + missing} bytes or more; "
                f"the limit is {self.limit} (Limits.max_sniff_bytes)"
            )
        if self._record_left > missing:
            raise MalformedClientHello(
                f"the record holding the end of the ClientHello has {self._record_left - missing}"
                " bytes after it"
            )


def _check_first_record(header: bytearray) -> None:
    """The first record must be handshake, TLS (major version 3): judged byte by byte."""
    content = header[0]
    if content == CONTENT_HANDSHAKE:
        if len(header) >= 2 and header[1] != 3:
            raise NotTLS(f"a handshake record of version {header[1]}.x: not TLS")
        return
    if content not in _CONTENT_NAMES:
        raise NotTLS(_describe_first_byte(content))
    if len(header) >= 2:
        if header[1] != 3:
            raise NotTLS(_describe_first_byte(content))
        raise NotClientHello(
            f"the connection starts with a TLS {_CONTENT_NAMES[content]} record, not a handshake"
        )


def _describe_first_byte(byte: int) -> str:
    if 0x41 <= byte <= 0x5A:
        return f"not TLS: the connection starts with the text {chr(byte)!r} (plain HTTP?)"
    if byte & 0x80:
        return f"not TLS: first byte 0x{byte:02x} (an SSL 2 hello?)"
    return f"not TLS: first byte 0x{byte:02x}"


class _Reader:
    """A cursor over a complete message; a short read is a lying length."""

    __slots__ = ("_data", "_offset", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise MalformedClientHello(
                f"{field} needs {size} bytes; {self.remaining} are left in the {self._what}"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def integer(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> bytes:
        return self.take(self.integer(length_size, f"the length of {field}"), field)

    def expect_end(self, after: str) -> None:
        if self.remaining:
            raise MalformedClientHello(f"{self.remaining} bytes after {after} in the {self._what}")


def _parse_client_hello(body: bytes) -> str | None:
    """The SNI host name of a complete ClientHello body, or ``None`` without one."""
    reader = _Reader(body, "ClientHello")
    version = reader.take(2, "legacy_version")
    if version[0] != 3:
        raise MalformedClientHello(f"ClientHello version {version[0]}.{version[1]}: not TLS")
    reader.take(32, "random")
    session_id = reader.vector(1, "legacy_session_id")
    if len(session_id) > _MAX_SESSION_ID:
        raise MalformedClientHello(f"a session id of {len(session_id)} bytes; the limit is 32")
    suites = reader.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise MalformedClientHello(f"cipher_suites of {len(suites)} bytes (even, at least 2)")
    if not reader.vector(1, "legacy_compression_methods"):
        raise MalformedClientHello("no compression methods (at least null is required)")
    if not reader.remaining:
        return None  # TLS 1.2 and older may omit the extensions
    extensions = _Reader(reader.vector(2, "extensions"), "extensions")
    reader.expect_end("the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    while extensions.remaining:
        kind = extensions.integer(2, "an extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise MalformedClientHello(f"extension {kind} appears twice (RFC 8446, 4.2)")
        seen.add(kind)
        if kind == EXTENSION_SERVER_NAME:
            server_name = _parse_server_name(data)
    return server_name


def _parse_server_name(data: bytes) -> str:
    outer = _Reader(data, "server_name extension")
    names = _Reader(outer.vector(2, "server_name_list"), "server_name_list")
    outer.expect_end("server_name_list")
    if not names.remaining:
        raise MalformedClientHello("an empty server_name_list")
    name_type = names.integer(1, "name_type")
    if name_type != NAME_TYPE_HOST_NAME:
        raise MalformedClientHello(f"server name of type {name_type}; only host_name (0) exists")
    raw = names.vector(2, "HostName")
    names.expect_end("the host_name (one name only)")
    if not raw:
        raise InvalidServerName("an empty SNI host name")
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidServerName("the SNI host name is not ASCII") from None
    problem = check_host_name(host)
    if problem is not None:
        raise InvalidServerName(f"SNI {host[:80]!r}: {problem}")
    return host.lower().removesuffix(".")
