"""NYAN version 0: the per-stream negotiation that names a stream's service.

This module owns the two sides of one stream's negotiation as sans-IO state
machines, and nothing after it: once a result is reported, every further byte on
the stream belongs to the service.

Wire (snocat 0.8): both sides write ``NYAN`` and a version byte ``00`` at once.
The opener then sends one frame holding the route address; the acceptor answers
with one status byte, ``00`` accepted or ``01`` refused (the opener treats any
non-zero byte as refused). Service bytes follow.

Our opener writes its header and the address frame together in
:meth:`OpenerNegotiation.initial_data`; the reference opener waits for the peer's
header first, but a reference acceptor reads the same bytes either way.

Each class keeps a small state enum, and a table ``(state, input) -> state`` is the
only place a state changes. Bad bytes from the peer raise
:class:`~snocat_proto.errors.RemoteProtocolError` (or a subclass) and leave the
machine failed; calling a method the current state does not allow raises
:class:`~snocat_proto.errors.LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from .address import RouteAddress
from .errors import LocalProtocolError, RemoteProtocolError, UnsupportedVersion
from .framing import FrameDecoder, encode_frame
from .limits import Limits

__all__ = [
    "HEADER",
    "MAGIC",
    "STATUS_ACCEPTED",
    "STATUS_REFUSED",
    "VERSION",
    "Accepted",
    "AcceptorNegotiation",
    "AddressReceived",
    "OpenerNegotiation",
    "Refused",
]

MAGIC = b"NYAN"
VERSION = 0
HEADER = MAGIC + bytes([VERSION])
STATUS_ACCEPTED = 0
STATUS_REFUSED = 1

_ACCEPT_BYTE = bytes([STATUS_ACCEPTED])
_REFUSE_BYTE = bytes([STATUS_REFUSED])


@dataclass(frozen=True, slots=True)
class Accepted:
    """The acceptor took the address; ``remainder`` is the first service bytes."""

    remainder: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """The acceptor refused the address with this (non-zero) status byte."""

    status: int


@dataclass(frozen=True, slots=True)
class AddressReceived:
    """The opener named ``address``; ``remainder`` is any service bytes that followed."""

    address: RouteAddress
    remainder: bytes


class _PeerHeader:
    """Checks the peer's ``NYAN`` + version bytes, however they are split."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen = bytearray()

    def feed(self, data: bytes) -> bytes | None:
        """Consume header bytes; the bytes after a complete header, else ``None``."""
        missing = len(HEADER) - len(self._seen)
        self._seen += data[:missing]
        # Compare what we have so far, so a wrong magic fails on its first wrong byte.
        checked = min(len(self._seen), len(MAGIC))
        if self._seen[:checked] != MAGIC[:checked]:
            raise RemoteProtocolError(
                f"stream does not start with the NYAN magic: got {bytes(self._seen[:checked])!r}"
            )
        if len(self._seen) < len(HEADER):
            return None
        version = self._seen[len(MAGIC)]
        if version > VERSION:
            raise UnsupportedVersion(
                f"peer speaks NYAN version {version}; only version {VERSION} is supported"
            )
        return bytes(data[missing:])


# --- opener -------------------------------------------------------------------------


class _OpenerState(Enum):
    AWAIT_HEADER = auto()
    AWAIT_STATUS = auto()
    ACCEPTED = auto()
    REFUSED = auto()
    FAILED = auto()


class _OpenerInput(Enum):
    PEER_HEADER = auto()
    STATUS_ACCEPTED = auto()
    STATUS_REFUSED = auto()
    PEER_ERROR = auto()


_OPENER_TRANSITIONS: dict[tuple[_OpenerState, _OpenerInput], _OpenerState] = {
    (_OpenerState.AWAIT_HEADER, _OpenerInput.PEER_HEADER): _OpenerState.AWAIT_STATUS,
    (_OpenerState.AWAIT_STATUS, _OpenerInput.STATUS_ACCEPTED): _OpenerState.ACCEPTED,
    (_OpenerState.AWAIT_STATUS, _OpenerInput.STATUS_REFUSED): _OpenerState.REFUSED,
    (_OpenerState.AWAIT_HEADER, _OpenerInput.PEER_ERROR): _OpenerState.FAILED,
    (_OpenerState.AWAIT_STATUS, _OpenerInput.PEER_ERROR): _OpenerState.FAILED,
}
_OPENER_RECEIVING = frozenset({_OpenerState.AWAIT_HEADER, _OpenerState.AWAIT_STATUS})


class OpenerNegotiation:
    """The side that opened the stream: names an address, learns the verdict.

    Write :meth:`initial_data` as soon as the stream exists, feed every received
    byte to :meth:`receive_data` until it returns :class:`Accepted` or
    :class:`Refused`, and report the end of the peer's data with
    :meth:`receive_eof`.
    """

    __slots__ = ("_address", "_header", "_initial_sent", "_state")

    def __init__(self, address: RouteAddress, *, limits: Limits) -> None:
        encoded = address.encode()
        if len(encoded) > limits.max_address_size:
            raise LocalProtocolError(
                f"route address is {len(encoded)} bytes; the limit is {limits.max_address_size}"
            )
        self._address = address
        self._header = _PeerHeader()
        self._initial_sent = False
        self._state = _OpenerState.AWAIT_HEADER

    @property
    def address(self) -> RouteAddress:
        """The address this opener names."""
        return self._address

    @property
    def complete(self) -> bool:
        """Whether a result (accepted or refused) has been reported."""
        return self._state in (_OpenerState.ACCEPTED, _OpenerState.REFUSED)

    def initial_data(self) -> bytes:
        """Our header and the address frame: write them once, at the start."""
        if self._initial_sent:
            raise LocalProtocolError("the opener's initial data was already produced")
        self._initial_sent = True
        return HEADER + encode_frame(self._address.encode())

    def receive_data(self, data: bytes) -> Accepted | Refused | None:
        """Feed received bytes; the result once the status byte has arrived."""
        if self._state not in _OPENER_RECEIVING:
            raise LocalProtocolError(
                f"opener negotiation is {self._state.name.lower()}; "
                "bytes after the result belong to the service"
            )
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._advance(_OpenerInput.PEER_ERROR)
            raise

    def receive_eof(self) -> None:
        """The peer finished sending; an error unless the result is already known."""
        if self._state is _OpenerState.FAILED:
            return  # already reported; the end of a broken stream adds nothing
        if not self.complete:
            self._advance(_OpenerInput.PEER_ERROR)
            raise RemoteProtocolError("stream ended during negotiation")

    def _receive(self, data: bytes) -> Accepted | Refused | None:
        if self._state is _OpenerState.AWAIT_HEADER:
            rest = self._header.feed(data)
            if rest is None:
                return None
            self._advance(_OpenerInput.PEER_HEADER)
            data = rest
        if not data:
            return None
        status = data[0]
        if status == STATUS_ACCEPTED:
            self._advance(_OpenerInput.STATUS_ACCEPTED)
            return Accepted(bytes(data[1:]))
        # The acceptor drops the stream after a refusal; whatever follows is moot.
        self._advance(_OpenerInput.STATUS_REFUSED)
        return Refused(status)

    def _advance(self, event: _OpenerInput) -> None:
        next_state = _OPENER_TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(
                f"opener negotiation cannot take {event.name} in state {self._state.name}"
            )
        self._state = next_state


# --- acceptor -----------------------------------------------------------------------


class _AcceptorState(Enum):
    AWAIT_HEADER = auto()
    AWAIT_ADDRESS = auto()
    DECIDING = auto()
    ACCEPTED = auto()
    REFUSED = auto()
    FAILED = auto()


class _AcceptorInput(Enum):
    PEER_HEADER = auto()
    PEER_ADDRESS = auto()
    ACCEPT = auto()
    REFUSE = auto()
    PEER_ERROR = auto()


_ACCEPTOR_TRANSITIONS: dict[tuple[_AcceptorState, _AcceptorInput], _AcceptorState] = {
    (_AcceptorState.AWAIT_HEADER, _AcceptorInput.PEER_HEADER): _AcceptorState.AWAIT_ADDRESS,
    (_AcceptorState.AWAIT_ADDRESS, _AcceptorInput.PEER_ADDRESS): _AcceptorState.DECIDING,
    (_AcceptorState.DECIDING, _AcceptorInput.ACCEPT): _AcceptorState.ACCEPTED,
    (_AcceptorState.DECIDING, _AcceptorInput.REFUSE): _AcceptorState.REFUSED,
    (_AcceptorState.AWAIT_HEADER, _AcceptorInput.PEER_ERROR): _AcceptorState.FAILED,
    (_AcceptorState.AWAIT_ADDRESS, _AcceptorInput.PEER_ERROR): _AcceptorState.FAILED,
}
_ACCEPTOR_RECEIVING = frozenset({_AcceptorState.AWAIT_HEADER, _AcceptorState.AWAIT_ADDRESS})


class AcceptorNegotiation:
    """The side the peer opened the stream to: learns the address, gives the verdict.

    Write :meth:`initial_data` as soon as the stream exists, feed received bytes to
    :meth:`receive_data` until it returns :class:`AddressReceived`, then write the
    bytes of :meth:`accept` or :meth:`refuse` (the decision may be made later, by
    the application). An oversized, non-UTF-8 or unparsable address raises
    :class:`~snocat_proto.errors.RemoteProtocolError`; the reference then drops the
    stream without a reply.
    """

    __slots__ = ("_frames", "_header", "_initial_sent", "_state")

    def __init__(self, *, limits: Limits) -> None:
        self._header = _PeerHeader()
        self._frames = FrameDecoder(limits.max_address_size)
        self._initial_sent = False
        self._state = _AcceptorState.AWAIT_HEADER

    @property
    def complete(self) -> bool:
        """Whether the address has arrived (and the peer's part is over)."""
        return self._state in (
            _AcceptorState.DECIDING,
            _AcceptorState.ACCEPTED,
            _AcceptorState.REFUSED,
        )

    @property
    def decided(self) -> bool:
        """Whether :meth:`accept` or :meth:`refuse` has been called."""
        return self._state in (_AcceptorState.ACCEPTED, _AcceptorState.REFUSED)

    def initial_data(self) -> bytes:
        """Our header: write it once, at the start."""
        if self._initial_sent:
            raise LocalProtocolError("the acceptor's initial data was already produced")
        self._initial_sent = True
        return HEADER

    def receive_data(self, data: bytes) -> AddressReceived | None:
        """Feed received bytes; the address once its frame is complete."""
        if self._state not in _ACCEPTOR_RECEIVING:
            raise LocalProtocolError(
                f"acceptor negotiation is {self._state.name.lower()}; "
                "bytes after the address belong to the service"
            )
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._advance(_AcceptorInput.PEER_ERROR)
            raise

    def receive_eof(self) -> None:
        """The peer finished sending; an error unless the address has arrived."""
        if self._state is _AcceptorState.FAILED:
            return  # already reported; the end of a broken stream adds nothing
        if not self.complete:
            self._advance(_AcceptorInput.PEER_ERROR)
            raise RemoteProtocolError("stream ended during negotiation")

    def accept(self) -> bytes:
        """The status byte that accepts the address."""
        self._decide(_AcceptorInput.ACCEPT)
        return _ACCEPT_BYTE

    def refuse(self) -> bytes:
        """The status byte that refuses the address (then drop the stream)."""
        self._decide(_AcceptorInput.REFUSE)
        return _REFUSE_BYTE

    def _decide(self, decision: _AcceptorInput) -> None:
        if not self._initial_sent:
            # The status byte must follow our header on the wire.
            raise LocalProtocolError("send initial_data() before the accept/refuse byte")
        if self._state is not _AcceptorState.DECIDING:
            raise LocalProtocolError(
                f"cannot {decision.name.lower()}: negotiation is {self._state.name.lower()}"
            )
        self._advance(decision)

    def _receive(self, data: bytes) -> AddressReceived | None:
        if self._state is _AcceptorState.AWAIT_HEADER:
            rest = self._header.feed(data)
            if rest is None:
                return None
            self._advance(_AcceptorInput.PEER_HEADER)
            data = rest
        self._frames.feed(data)
        payload = self._frames.next_frame()
        if payload is None:
            return None
        address = RouteAddress.decode(payload)
        self._advance(_AcceptorInput.PEER_ADDRESS)
        return AddressReceived(address, self._frames.take_remainder())

    def _advance(self, event: _AcceptorInput) -> None:
        next_state = _ACCEPTOR_TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(
                f"acceptor negotiation cannot take {event.name} in state {self._state.name}"
            )
        self._state = next_state
