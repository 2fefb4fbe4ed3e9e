"""HAProxy's PROXY protocol, versions 1 and 2: the visitor's address ahead of its bytes.

This module owns the header a connection initiator writes before any data to say
whom a relayed connection is for (HAProxy, "The PROXY protocol, Versions 1 & 2",
2020/03/05): the encoders a client uses before the visitor's bytes when it connects
a target, and the parser an aggregator uses on connections from trusted load
balancers.  Whom to trust, and whether a listener expects a header at all, belong
to the caller: the spec forbids guessing whether a header is there (its section 5),
so a listener that is configured for it requires it.

Version 1 (section 2.1), one line of US-ASCII of at most 107 bytes::

    PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\\r\\n
    PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\\r\\n
    PROXY UNKNOWN[ anything]\\r\\n

Single spaces; IPv4 as four decimal numbers without leading zeros; IPv6 as hex
groups (one ``::`` at most, no dotted tail, no zone); ports 0..65535 without
leading zeros; the line ends with CRLF only (a lone CR or LF is refused).

Version 2 (section 2.2), binary::

    signature(12) = 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    version(4 bits) = 2 | command(4 bits): 0 LOCAL, 1 PROXY
    family(4 bits): 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX
        | transport(4 bits): 0 UNSPEC, 1 STREAM, 2 DGRAM
    length(2, big-endian) = the bytes that follow
    addresses: INET  src(4) dst(4) src_port(2) dst_port(2)      (12)
               INET6 src(16) dst(16) src_port(2) dst_port(2)    (36)
               UNIX  src(108) dst(108)                          (216)
    TLVs: type(1) length(2) value, to the end of the header

Reading, we keep to the spec: other version, command, family or transport values
are refused; LOCAL means "use the real connection's endpoints" (the load balancer's
own health check), as do PROXY with UNSPEC and the combinations we do not use
(UDP, UNIX), which the spec lets a receiver treat as UNSPEC; TCP over IPv4 or IPv6
reports its addresses, and then the TLVs after them must fit the header exactly
(we skip their values; a CRC32C TLV is not checked).  ``Limits.max_proxy_header_bytes``
bounds a v2 header, refused from its length field alone.

:class:`ProxyHeaderParser` follows the peek contract of
:mod:`~snocat_proto._wire.peek`; the caller strips exactly ``size`` bytes and hands
the rest to the service.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv6Address

from .errors import LocalProtocolError, RemoteProtocolError
from .limits import Limits
from .peek import NEED_MORE, NeedMore, PeekParser

__all__ = [
    "NEED_MORE",
    "V1_MAX_LENGTH",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "MalformedProxyHeader",
    "NeedMore",
    "NotProxyHeader",
    "ProxyAddresses",
    "ProxyCommand",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "ProxyHeaderTooLarge",
    "encode_v1",
    "encode_v2",
]

IPAddress = IPv4Address | IPv6Address

#: The first bytes of every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The first bytes of every version 1 header.
V1_PREFIX = b"PROXY "
#: The longest version 1 line, CRLF included (``PROXY UNKNOWN`` and two full IPv6).
V1_MAX_LENGTH = 107

_V2_HEADER = 16
_V2_VERSION = 2
_FAMILY_UNSPEC, _FAMILY_INET, _FAMILY_INET6, _FAMILY_UNIX = 0, 1, 2, 3
_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM = 0, 1, 2
_INET_BLOCK = 12
_INET6_BLOCK = 36
_TLV_HEADER = 3
_MAX_PORT = 65535
_CR, _LF = 0x0D, 0x0A
_SHOWN = 80  # characters of a bad line quoted in an error

_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:]{2,39}")
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyCommand(Enum):
    """The v2 command; a v1 header is always ``PROXY``."""

    LOCAL = 0  # the proxy's own connection (a health check): use the real endpoints
    PROXY = 1  # relayed for someone else: the header says whom


class ProxyHeaderError(RemoteProtocolError):
    """The connection does not start with a PROXY protocol header we accept."""


class NotProxyHeader(ProxyHeaderError):
    """The first bytes are neither ``PROXY `` nor the v2 signature: no header was sent
    (a client connected directly, or the load balancer is not configured for it)."""


class MalformedProxyHeader(ProxyHeaderError):
    """A header that does not match the spec byte for byte, or that ended early."""


class ProxyHeaderTooLarge(ProxyHeaderError):
    """A v1 line without CRLF in 107 bytes, or a v2 header over the limit."""


@dataclass(frozen=True, slots=True)
class ProxyAddresses:
    """A relayed TCP connection: the visitor (``source``) and the address it reached
    (``destination``), both of one family, ports 0..65535, no IPv6 scope."""

    source: IPAddress
    source_port: int
    destination: IPAddress
    destination_port: int

    def __post_init__(self) -> None:
        for name in ("source", "destination"):
            address = getattr(self, name)
            if not isinstance(address, IPv4Address | IPv6Address):
                raise LocalProtocolError(f"{name} must be an IP address, not {address!r}")
            if isinstance(address, IPv6Address) and address.scope_id is not None:
                raise LocalProtocolError(f"{name} {address} has a scope; the header has none")
        if type(self.source) is not type(self.destination):
            raise LocalProtocolError(
                f"source {self.source} and destination {self.destination} differ in family"
            )
        for name in ("source_port", "destination_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
                raise LocalProtocolError(f"{name} must be an int in 0..65535, not {port!r}")

    @property
    def ipv6(self) -> bool:
        """Whether the addresses are IPv6 (``TCP6``, ``AF_INET6``)."""
        return isinstance(self.source, IPv6Address)

    @classmethod
    def from_sockaddrs(
        cls,
        source: tuple[str, int] | tuple[str, int, int, int],
        destination: tuple[str, int] | tuple[str, int, int, int],
    ) -> ProxyAddresses:
        """From socket addresses (``getpeername()``, ``getsockname()``): a scope is
        dropped, and IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4
        visitors) become IPv4 when the other side is IPv4 too."""
        src, dst = _socket_ip(source[0]), _socket_ip(destination[0])
        src4, dst4 = _as_ipv4(src), _as_ipv4(dst)
        if src4 is not None and dst4 is not None:
            src, dst = src4, dst4
        return cls(src, int(source[1]), dst, int(destination[1]))


def _socket_ip(host: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(f"{host!r} is not an IP address") from None
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        return IPv6Address(int(address))
    return address


def _as_ipv4(address: IPAddress) -> IPv4Address | None:
    if isinstance(address, IPv4Address):
        return address
    return address.ipv4_mapped


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: ``version`` 1 or 2, the ``command``, the ``addresses``
    (``None``: use the real connection's endpoints: LOCAL, ``UNKNOWN``, UNSPEC and the
    families we do not read), and ``size``, the bytes the header took."""

    version: int
    command: ProxyCommand
    addresses: ProxyAddresses | None
    size: int


# --- encoders -------------------------------------------------------------------------


def _v1_text(address: IPAddress) -> str:
    text = str(address)
    if "." in text and isinstance(address, IPv6Address):
        return address.exploded  # v1 IPv6 is hex groups only (no dotted tail)
    return text


def encode_v1(addresses: ProxyAddresses | None) -> bytes:
    """The version 1 line for ``addresses``, or ``PROXY UNKNOWN`` for ``None``."""
    if addresses is None:
        return b"PROXY UNKNOWN\r\n"
    if not isinstance(addresses, ProxyAddresses):
        raise LocalProtocolError(f"encode_v1 takes ProxyAddresses or None, not {addresses!r}")
    family = "TCP6" if addresses.ipv6 else "TCP4"
    line = (
        f"PROXY {family} {_v1_text(addresses.source)} {_v1_text(addresses.destination)} "
        f"{addresses.source_port} {addresses.destination_port}\r\n"
    )
    return line.encode("ascii")


def encode_v2(
    addresses: ProxyAddresses | None, *, command: ProxyCommand = ProxyCommand.PROXY
) -> bytes:
    """The version 2 header: TCP over IPv4 or IPv6 for ``addresses``; ``None`` with
    PROXY is AF_UNSPEC (relayed, addresses unknown), with LOCAL the proxy's own
    connection (which takes no addresses)."""
    if not isinstance(command, ProxyCommand):
        raise LocalProtocolError(f"command must be a ProxyCommand, not {command!r}")
    ver_cmd = bytes([_V2_VERSION << 4 | command.value])
    if addresses is None:
        return V2_SIGNATURE + ver_cmd + b"\x00\x00\x00"
    if command is ProxyCommand.LOCAL:
        raise LocalProtocolError("a LOCAL header carries no addresses (spec, 2.2)")
    if not isinstance(addresses, ProxyAddresses):
        raise LocalProtocolError(f"encode_v2 takes ProxyAddresses or None, not {addresses!r}")
    family = _FAMILY_INET6 if addresses.ipv6 else _FAMILY_INET
    block = (
        addresses.source.packed
        + addresses.destination.packed
        + addresses.source_port.to_bytes(2, "big")
        + addresses.destination_port.to_bytes(2, "big")
    )
    fam = bytes([family << 4 | _TRANSPORT_STREAM])
    return V2_SIGNATURE + ver_cmd + fam + len(block).to_bytes(2, "big") + block


# --- the parser -----------------------------------------------------------------------


class ProxyHeaderParser(PeekParser[ProxyHeader]):
    """Reads the PROXY protocol header (either version) at the start of a connection."""

    __slots__ = ()

    def __init__(self, *, limits: Limits) -> None:
        super().__init__(limits.max_proxy_header_bytes)

    def _too_large(self) -> RemoteProtocolError:  # the length checks decide first
        return ProxyHeaderTooLarge(
            f"the header does not end within {self.limit} bytes (Limits.max_proxy_header_bytes)"
        )

    def _truncated(self) -> RemoteProtocolError:
        if not self.buffered:
            return NotProxyHeader("the connection ended before a PROXY protocol header")
        return MalformedProxyHeader(
            f"the connection ended {self.buffered} bytes into the PROXY protocol header"
        )

    def _examine(self, buffer: bytearray) -> ProxyHeader | None:
        if buffer[0] == V2_SIGNATURE[0]:
            return self._v2(buffer)
        return _v1(buffer)

    def _v2(self, buffer: bytearray) -> ProxyHeader | None:
        seen = bytes(buffer[: len(V2_SIGNATURE)])
        if not V2_SIGNATURE.startswith(seen):
            raise NotProxyHeader(f"not a PROXY protocol header: it starts with {seen!r}")
        if len(buffer) <= len(V2_SIGNATURE):
            return None
        version, command = buffer[12] >> 4, buffer[12] & 0x0F
        if version != _V2_VERSION:
            raise MalformedProxyHeader(f"the v2 signature with version {version}; only 2 exists")
        if command > ProxyCommand.PROXY.value:
            raise MalformedProxyHeader(f"v2 command {command}; only LOCAL (0) and PROXY (1) exist")
        if len(buffer) < 14:
            return None
        family, transport = buffer[13] >> 4, buffer[13] & 0x0F
        if family > _FAMILY_UNIX or transport > _TRANSPORT_DGRAM:
            raise MalformedProxyHeader(f"v2 family/transport byte 0x{buffer[13]:02x} is unassigned")
        if len(buffer) < _V2_HEADER:
            return None
        size = _V2_HEADER + int.from_bytes(buffer[14:16], "big")
        if size > self.limit:
            raise ProxyHeaderTooLarge(
                f"a v2 header of {size} bytes; the limit is {self.limit} "
                "(Limits.max_proxy_header_bytes)"
            )
        if len(buffer) < size:
            return None
        block = bytes(buffer[_V2_HEADER:size])
        if command == ProxyCommand.LOCAL.value:
            return ProxyHeader(2, ProxyCommand.LOCAL, None, size)
        addresses = None
        if transport == _TRANSPORT_STREAM and family in (_FAMILY_INET, _FAMILY_INET6):
            addresses = _v2_addresses(block, family)
        return ProxyHeader(2, ProxyCommand.PROXY, addresses, size)


def _v2_addresses(block: bytes, family: int) -> ProxyAddresses:
    ipv6 = family == _FAMILY_INET6
    width, needed = (16, _INET6_BLOCK) if ipv6 else (4, _INET_BLOCK)
    if len(block) < needed:
        raise MalformedProxyHeader(
            f"a v2 {'AF_INET6' if ipv6 else 'AF_INET'} header of {len(block)} address "
            f"bytes; {needed} are needed"
        )
    source, destination = block[:width], block[width : 2 * width]
    ports = block[2 * width : needed]
    _check_tlvs(block, needed)
    return ProxyAddresses(
        IPv6Address(source) if ipv6 else IPv4Address(source),
        int.from_bytes(ports[:2], "big"),
        IPv6Address(destination) if ipv6 else IPv4Address(destination),
        int.from_bytes(ports[2:], "big"),
    )


def _check_tlvs(block: bytes, offset: int) -> None:
    """The TLVs after the addresses must tile the rest of the header exactly."""
    while offset < len(block):
        if len(block) - offset < _TLV_HEADER:
            raise MalformedProxyHeader(f"{len(block) - offset} bytes after the last TLV")
        length = int.from_bytes(block[offset + 1 : offset + 3], "big")
        offset += _TLV_HEADER + length
        if offset > len(block):
            raise MalformedProxyHeader(
                f"TLV type 0x{block[offset - _TLV_HEADER - length]:02x} runs past the header"
            )


def _v1(buffer: bytearray) -> ProxyHeader | None:
    """A v1 line, judged byte by byte in the order the bytes arrive, and only its
    first 107 bytes (a byte past them never decides: the line is too long by then)."""
    window = min(len(buffer), V1_MAX_LENGTH)
    for index in range(window):
        byte = buffer[index]
        if index < len(V1_PREFIX):
            if byte != V1_PREFIX[index]:
                if index < len(V1_PREFIX) - 1:
                    raise NotProxyHeader(
                        f"not a PROXY protocol header: it starts with {bytes(buffer[:8])!r}"
                        if index
                        else f"not a PROXY protocol header: first byte 0x{byte:02x}"
                    )
                raise MalformedProxyHeader("PROXY not followed by a space")
        elif byte == _LF:
            if buffer[index - 1] != _CR:
                raise MalformedProxyHeader("a v1 line ended by LF alone (CRLF is required)")
            return ProxyHeader(
                1, ProxyCommand.PROXY, _v1_line(bytes(buffer[: index - 1])), index + 1
            )
        elif byte == _CR:
            if index + 1 < window and buffer[index + 1] != _LF:
                raise MalformedProxyHeader("a CR not followed by LF in a v1 line")
        elif not 0x20 <= byte <= 0x7E:
            raise MalformedProxyHeader(f"the byte 0x{byte:02x} in a v1 line (US-ASCII text only)")
    if len(buffer) >= V1_MAX_LENGTH:
        raise ProxyHeaderTooLarge(f"no CRLF in the first {V1_MAX_LENGTH} bytes of a v1 header")
    return None


def _v1_line(line: bytes) -> ProxyAddresses | None:
    text = line.decode("ascii")
    fields = text.split(" ")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return None  # whatever follows is to be ignored (spec, 2.1)
    if protocol not in ("TCP4", "TCP6"):
        raise MalformedProxyHeader(f"v1 protocol {protocol[:16]!r}; TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise MalformedProxyHeader(
            f"a v1 {protocol} line needs 4 fields after it, single spaces: {text[:_SHOWN]!r}"
        )
    source, destination = (_v1_address(field, protocol) for field in fields[2:4])
    source_port, destination_port = (_v1_port(field) for field in fields[4:6])
    return ProxyAddresses(source, source_port, destination, destination_port)


def _v1_address(text: str, protocol: str) -> IPAddress:
    try:
        if protocol == "TCP4":
            if _V1_IPV4.fullmatch(text):
                return IPv4Address(text)
        elif _V1_IPV6.fullmatch(text):
            return IPv6Address(text)
    except ValueError:
        pass
    raise MalformedProxyHeader(f"{text[:48]!r} is not an address a {protocol} line takes")


def _v1_port(text: str) -> int:
    if _V1_PORT.fullmatch(text) and int(text) <= _MAX_PORT:
        return int(text)
    raise MalformedProxyHeader(f"{text[:16]!r} is not a port (0..65535, no leading zeros)")
