"""A visitor's UDP flow relayed between two nodes of a fleet (docs/protocol.md 3.16.1).

A UDP port held by one node is open on every node of the fleet.  A datagram that
reaches a node which does not hold the port's tunnel travels to the node that does
on a **stream of the node link** (3.16) opened for that visitor address: one stream
per (port, visitor) flow, to the route address::

    /fleet/udp/<port>/<fence>/from/<ip4|ip6>/<address>/udp/<port>

(the port and its claim's fencing token in decimal, the visitor as in 3.17.3).  The
holder accepts (``00``) only while it holds the port with that token; it then makes the
visitor a flow of the tunnel as it would a visitor of its own.  After the status byte
each direction of the stream is a sequence of frames, one datagram each::

    u16 length (big-endian) || payload            (0..65535 bytes)

A stream is reliable and ordered where UDP is not; the bounds keep it from becoming a
queue: each side writes a frame only if the stream's send buffer takes all of it now,
and drops (and counts) it otherwise, so a slow link costs datagrams, never memory or
latency without bound.  Ending the stream ends the flow (either side, idle expiry
included).

This module owns the route address and the frame codec; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .address import RouteAddress
from .errors import LocalProtocolError, RemoteProtocolError
from .targets import parse_port
from .udp_flows import canonical_visitor, parse_visitor_segments, visitor_segments

__all__ = [
    "MAX_RELAYED_DATAGRAM",
    "UDP_RELAY",
    "RelayedDatagrams",
    "UdpRelayRequest",
    "encode_relayed_datagram",
]

#: The first two segments of a relayed flow's route address.
UDP_RELAY: Final = ("fleet", "udp")
#: The largest payload a frame carries (its length is two bytes; UDP's own ceiling
#: is 65,507 bytes over IPv4).
MAX_RELAYED_DATAGRAM: Final = 0xFFFF
_LENGTH = 2
_MAX_FENCE_DIGITS = 19  # fences count up from 1 in a 64-bit store counter


@dataclass(frozen=True, slots=True)
class UdpRelayRequest:
    """What a relayed flow's stream names: the public UDP port, the fencing token of
    the claim the sender saw, and the visitor (canonical IP address text and port)."""

    port: int
    fence: int
    visitor: tuple[str, int]

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535 or not 1 <= self.fence < 10**_MAX_FENCE_DIGITS:
            raise LocalProtocolError(f"a relayed flow needs a port and a fence, not {self!r}")
        visitor: object = self.visitor
        if not isinstance(visitor, tuple) or len(visitor) != 2:
            raise LocalProtocolError(f"visitor must be (host, port), not {visitor!r}")
        object.__setattr__(self, "visitor", canonical_visitor(visitor[0], visitor[1]))

    def to_address(self) -> RouteAddress:
        return RouteAddress(
            (*UDP_RELAY, str(self.port), str(self.fence), *visitor_segments(self.visitor))
        )

    @classmethod
    def from_address(cls, address: RouteAddress) -> UdpRelayRequest | None:
        """The request ``address`` names: None if it is not a ``/fleet/udp`` address,
        :class:`RemoteProtocolError` if it is one but malformed."""
        segments = tuple(address.segments)
        if segments[:2] != UDP_RELAY:
            return None
        if len(segments) != 9 or segments[4] != "from":
            raise RemoteProtocolError(
                "a relayed UDP flow is /fleet/udp/<port>/<fence>/from/<ip4|ip6>/<address>/"
                f"udp/<port>, not {str(address)[:128]!r}"
            )
        port, fence = parse_port(segments[2]), _parse_fence(segments[3])
        if port is None or str(port) != segments[2] or fence is None:
            raise RemoteProtocolError(f"invalid port or fence in {str(address)[:128]!r}")
        visitor = parse_visitor_segments(segments[5:], address)
        return cls(port, fence, visitor)


def _parse_fence(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_FENCE_DIGITS:
        return None
    if text[0] == "0":
        return None  # one spelling, and fences start at 1
    return int(text)


def encode_relayed_datagram(payload: bytes) -> bytes:
    """One frame: the payload's length in two bytes, then the payload."""
    if len(payload) > MAX_RELAYED_DATAGRAM:
        raise LocalProtocolError(
            f"a relayed datagram holds at most {MAX_RELAYED_DATAGRAM} bytes, not {len(payload)}"
        )
    return len(payload).to_bytes(_LENGTH, "big") + payload


class RelayedDatagrams:
    """Reads frames from a relayed flow's stream, as bytes arrive in any pieces.

    It holds at most one incomplete frame (``2 + MAX_RELAYED_DATAGRAM`` bytes): every
    two-byte length is valid, so the only fault is a stream that ends mid-frame
    (:meth:`finish`)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The datagrams completed by ``data``, in order."""
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        start = 0
        while len(buffer) - start >= _LENGTH:
            end = start + _LENGTH + int.from_bytes(buffer[start : start + _LENGTH], "big")
            if end > len(buffer):
                break
            datagrams.append(bytes(buffer[start + _LENGTH : end]))
            start = end
        del buffer[:start]
        return datagrams

    def finish(self) -> None:
        """The stream ended: :class:`RemoteProtocolError` if it ended mid-frame."""
        if self._buffer:
            raise RemoteProtocolError(
                f"a relayed UDP flow's stream ended inside a frame ({len(self._buffer)} bytes)"
            )
