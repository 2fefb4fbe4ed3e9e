"""The ``proxyme`` demand proxy: a client asks the aggregator for a public port.

This module owns the ``/proxyme/0.0.1/...`` route address and the two sans-IO
state machines that run on the negotiated stream. Listening on the port, and the
``proxy-tcp`` streams the server opens for each forwarded connection, belong to
the caller (:meth:`ProxymeRequest.target` names what those streams ask for).

Wire (snocat 0.8), after NYAN negotiation of ``/proxyme/0.0.1/<host>/<port>``
(or ``/proxyme/0.0.1/<port>``, host ``localhost``):

1. client -> server: one frame holding a JSON string, the subject (``""``);
2. server -> client: one frame holding JSON ``null`` (denied) or a list of
   socket-address strings where the port now listens (``["[::]:8080"]``);
3. release: the client sends 8 bytes (any 8 bytes count) or ends its send side;
   the server stops listening, frees the port and answers with 8 zero bytes.

**Addition (not in snocat 0.8), negotiated** (``proxyme-options``, see
:mod:`~snocat_proto._wire.features`): the subject may be a JSON object asking for a
public port, ``{"port": 8085}``, and a denial may be an object saying why and whether
asking again can help, ``{"denied": "port 8085 is in use", "retry": true}``.  Neither
is ever sent to a peer that did not agree to it.  With ``udp-datagrams`` agreed as well
(docs/protocol.md 3.17), the subject object may ask for a UDP port instead,
``{"udp": true}``; the grant and the release are the same, and each visitor of that
port becomes a flow (:mod:`~snocat_proto._wire.udp_flows`) rather than a stream.  With
``by-name`` agreed as well (docs/protocol.md 3.14.6) it may publish the target by name
on the aggregator's shared listeners instead of asking for a port, ``{"http": true}``
or ``{"tls": true}``: the grant then lists where the name is reached
(``["office-1.tunnels.example.com:443"]``), and the release withdraws it.

Choices the reference leaves open, decided here:

* Client: 8 bytes from the server after a grant mean the port is gone, whether or
  not :meth:`ProxymeClient.release` was called (the reference client reads them
  the same way; a server that withdraws the port on its own sends them too).
  The end of the server's data after a grant, with no acknowledgement bytes, is
  also reported as :class:`Released`: the server ended the service, so the port
  is no longer ours. An end of data in the middle of the 8 bytes is an error.
* Server: the end of the client's data after a grant is a release request (as in
  the reference); after a denial or a release it is the normal end. The end of
  data before a decision is an error. :meth:`ProxymeServer.release_ack` may also
  be called before any request, to withdraw the port; a release request that
  crosses it is then absorbed without another event.

Each class keeps a small state enum, and a table ``(state, input) -> state`` is the
only place a state changes. Bad bytes from the peer raise
:class:`~snocat_proto.errors.RemoteProtocolError` and leave the machine failed;
calling a method the current state does not allow raises
:class:`~snocat_proto.errors.LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto

from .address import RouteAddress
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FrameDecoder, encode_frame
from .limits import Limits
from .targets import ProxyTcpTarget, TargetKind, parse_port, validate_host_name

__all__ = [
    "DEFAULT_HOST",
    "NAMED_SERVICES",
    "PROXYME",
    "PROXYME_VERSION",
    "RELEASE_ACK",
    "RELEASE_REQUEST",
    "SERVICE_HTTP",
    "SERVICE_TLS",
    "Denied",
    "Granted",
    "ProxymeClient",
    "ProxymeEvent",
    "ProxymeRequest",
    "ProxymeServer",
    "ReleaseRequested",
    "Released",
    "SubjectReceived",
]

#: The first segment of every ``proxyme`` route address.
PROXYME = "proxyme"
#: The only version segment the reference accepts (compared exactly).
PROXYME_VERSION = "0.0.1"
#: The host a ``/proxyme/0.0.1/<port>`` request names.
DEFAULT_HOST = "localhost"
#: What the client sends to give the port back (the reference reads any 8 bytes).
RELEASE_REQUEST = bytes(8)
#: What the server sends once the port is freed.
RELEASE_ACK = bytes(8)

#: The services a target may be published as by name (``by-name``): the subject's
#: member, and the shared listener that reaches it.
SERVICE_HTTP = "http"
SERVICE_TLS = "tls"
NAMED_SERVICES = (SERVICE_HTTP, SERVICE_TLS)

_RELEASE_SIZE = 8
_JSON_SEPARATORS = (",", ":")


# --- the route address ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxymeRequest:
    """What a ``proxyme`` client asks for: forward a public port to ``host:port``.

    ``host`` is as the client's side resolves it (the reference sends the
    ``--target`` host as typed, IP literals included); it must pass the DNS host
    checks of :func:`~snocat_proto.targets.validate_host_name`.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        problem = validate_host_name(self.host)
        if problem is not None:
            raise LocalProtocolError(problem)
        port: object = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise LocalProtocolError(f"port must be an int in 1..65535, not {port!r}")

    @classmethod
    def from_address(cls, address: RouteAddress) -> ProxymeRequest | None:
        """The request an address names.

        ``None`` when it is not a ``proxyme`` address (first segment differs);
        :class:`RemoteProtocolError` for another version, a missing or extra
        segment, a bad port or a bad host.
        """
        segments = address.segments
        if not segments or segments[0] != PROXYME:
            return None
        if len(segments) < 2 or segments[1] != PROXYME_VERSION:
            version = segments[1][:32] if len(segments) > 1 else None
            raise RemoteProtocolError(
                f"unsupported proxyme version {version!r}; only {PROXYME_VERSION!r} exists"
            )
        rest = segments[2:]
        if len(rest) == 1:
            host, port_text = DEFAULT_HOST, rest[0]
        elif len(rest) == 2:
            host, port_text = rest
        else:
            raise RemoteProtocolError(
                "proxyme address must be /proxyme/0.0.1/<host>/<port> or "
                f"/proxyme/0.0.1/<port>, not {str(address)[:128]!r}"
            )
        port = parse_port(port_text)
        if port is None:
            raise RemoteProtocolError(f"invalid port {port_text[:32]!r} in proxyme address")
        try:
            return cls(host, port)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"invalid proxyme request: {exc.reason}") from None

    def to_address(self) -> RouteAddress:
        """``/proxyme/0.0.1/<host>/<port>`` (always the long form)."""
        return RouteAddress((PROXYME, PROXYME_VERSION, self.host, str(self.port)))

    def target(self) -> ProxyTcpTarget:
        """What the server's stream for each forwarded connection names (``dns`` form)."""
        return ProxyTcpTarget(TargetKind.DNS, self.host, self.port)


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxymeEvent:
    """Base of everything the two ``proxyme`` machines report."""


@dataclass(frozen=True, slots=True)
class Granted(ProxymeEvent):
    """Client: the server listens for us at these socket addresses (``"[::]:8080"``)."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Denied(ProxymeEvent):
    """Client: the server refused to give us a port (JSON ``null``; with
    ``proxyme-options`` it may say why, and whether asking again can help)."""

    reason: str = ""
    retry: bool = True


@dataclass(frozen=True, slots=True)
class Released(ProxymeEvent):
    """Client: the port is no longer ours (acknowledged, withdrawn, or service ended)."""


@dataclass(frozen=True, slots=True)
class SubjectReceived(ProxymeEvent):
    """Server: the client's subject arrived; now call ``grant()`` or ``deny()``.
    ``port``: the public port it asks for (``proxyme-options`` only), else None;
    ``udp``: it asks for a UDP port (``udp-datagrams`` too), not a TCP one;
    ``service``: it publishes the target by name as this service (``"http"`` or
    ``"tls"``, with ``by-name`` too), not on a port of its own."""

    subject: str
    port: int | None = None
    udp: bool = False
    service: str | None = None


@dataclass(frozen=True, slots=True)
class ReleaseRequested(ProxymeEvent):
    """Server: the client gives the port back; stop listening, then ``release_ack()``."""


# --- JSON helpers ---------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _load_json(payload: bytes, what: str) -> object:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{what} is not valid JSON: {exc}") from None


def _is_clean_text(value: str) -> bool:
    # JSON may spell lone surrogates (\ud800) that no UTF-8 text can hold.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise LocalProtocolError(f"{what} must be a port number in 1..65535, not {port!r}")


def _clean_reason(reason: str, limit: int) -> str:
    """A denial's reason is shown to the client's operator: printable, at most
    ``Limits.max_reason_length`` characters."""
    cleaned = "".join(c if c.isprintable() else "?" for c in reason)
    return cleaned[:limit]


def _dump_json(value: object, what: str) -> bytes:
    try:
        return json.dumps(value, separators=_JSON_SEPARATORS, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} must be encodable as UTF-8") from None


# --- client ---------------------------------------------------------------------------


class _ClientState(Enum):
    AWAIT_RESPONSE = auto()
    GRANTED = auto()
    RELEASING = auto()
    RELEASED = auto()
    DENIED = auto()
    FAILED = auto()


class _ClientInput(Enum):
    PEER_GRANT = auto()
    PEER_DENY = auto()
    SEND_RELEASE = auto()
    PEER_RELEASED = auto()
    PEER_ERROR = auto()


_CLIENT_TRANSITIONS: dict[tuple[_ClientState, _ClientInput], _ClientState] = {
    (_ClientState.AWAIT_RESPONSE, _ClientInput.PEER_GRANT): _ClientState.GRANTED,
    (_ClientState.AWAIT_RESPONSE, _ClientInput.PEER_DENY): _ClientState.DENIED,
    (_ClientState.GRANTED, _ClientInput.SEND_RELEASE): _ClientState.RELEASING,
    (_ClientState.GRANTED, _ClientInput.PEER_RELEASED): _ClientState.RELEASED,
    (_ClientState.RELEASING, _ClientInput.PEER_RELEASED): _ClientState.RELEASED,
    **{
        (state, _ClientInput.PEER_ERROR): _ClientState.FAILED
        for state in _ClientState
        if state is not _ClientState.FAILED
    },
}


class ProxymeClient:
    """The client side of a negotiated ``proxyme`` stream.

    Write :meth:`initial_data`, feed received bytes to :meth:`receive_data` and
    the end of them to :meth:`receive_eof`; after :class:`Granted`, write
    :meth:`release` when done and wait for :class:`Released`.
    """

    __slots__ = (
        "_ack_received",
        "_eof",
        "_frames",
        "_initial_sent",
        "_max_reason",
        "_options",
        "_state",
        "_subject",
    )

    def __init__(
        self,
        subject: str = "",
        *,
        limits: Limits,
        options: bool = False,
        public_port: int | None = None,
        udp: bool = False,
        service: str | None = None,
    ) -> None:
        """``options``: the tunnel agreed on ``proxyme-options``; only then may
        ``public_port`` ask for a given public port, ``udp`` (if ``udp-datagrams``
        was agreed too) for a UDP port, and ``service`` (if ``by-name`` was agreed
        too) publish the target by name as ``"http"`` or ``"tls"``."""
        if not isinstance(subject, str):
            raise LocalProtocolError(f"subject must be str, not {type(subject).__name__}")
        if (public_port is not None or udp or service is not None) and not options:
            raise LocalProtocolError(
                "asking for a public port, a UDP port or a name needs proxyme-options"
            )
        if service is not None and (service not in NAMED_SERVICES or public_port or udp):
            raise LocalProtocolError(
                f"service must be one of {', '.join(NAMED_SERVICES)}, alone, not {service!r}"
            )
        if public_port is not None or udp or service is not None:
            request: dict[str, object] = {}
            if public_port is not None:
                _check_port(public_port, "the public port asked for")
                request["port"] = public_port
            if udp:
                request["udp"] = True
            if service is not None:
                request[service] = True
            payload = _dump_json(request, "the proxyme subject")
        else:
            payload = _dump_json(subject, "the proxyme subject")
        self._options = options
        self._max_reason = limits.max_reason_length
        if len(payload) > limits.max_proxyme_subject_size:
            raise LocalProtocolError(
                f"the proxyme subject is {len(payload)} bytes as JSON; "
                f"the limit is {limits.max_proxyme_subject_size}"
            )
        self._subject = payload
        self._frames = FrameDecoder(limits.max_frame_size)
        self._ack_received = 0
        self._eof = False
        self._initial_sent = False
        self._state = _ClientState.AWAIT_RESPONSE

    @property
    def granted(self) -> bool:
        """Whether the port is ours now (granted, not yet released)."""
        return self._state in (_ClientState.GRANTED, _ClientState.RELEASING)

    def initial_data(self) -> bytes:
        """The subject frame: write it once, right after negotiation."""
        if self._initial_sent:
            raise LocalProtocolError("the proxyme subject was already produced")
        self._initial_sent = True
        return encode_frame(self._subject)

    def release(self) -> bytes:
        """The bytes that give the port back; then wait for :class:`Released`."""
        if self._state is not _ClientState.GRANTED:
            raise LocalProtocolError(
                f"cannot release: the proxyme client is {self._state.name.lower()}"
            )
        self._advance(_ClientInput.SEND_RELEASE)
        return RELEASE_REQUEST

    def receive_data(self, data: bytes) -> list[ProxymeEvent]:
        """Feed received bytes; the events they complete."""
        self._check_receiving()
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._advance(_ClientInput.PEER_ERROR)
            raise

    def receive_eof(self) -> list[ProxymeEvent]:
        """The server finished sending (see the module docstring for what it means)."""
        if self._eof:
            raise LocalProtocolError("the end of the peer's data was already received")
        self._eof = True
        if self._state is _ClientState.FAILED:
            return []  # the failure was reported once; the end adds nothing
        if self._state in (_ClientState.GRANTED, _ClientState.RELEASING):
            if self._ack_received == 0:
                self._advance(_ClientInput.PEER_RELEASED)
                return [Released()]
            self._advance(_ClientInput.PEER_ERROR)
            raise RemoteProtocolError("stream ended inside the proxyme release acknowledgement")
        if self._state is _ClientState.AWAIT_RESPONSE:
            self._advance(_ClientInput.PEER_ERROR)
            raise RemoteProtocolError("stream ended before the proxyme response")
        return []

    def _check_receiving(self) -> None:
        if self._eof:
            raise LocalProtocolError("the proxyme server's end of data was already received")
        if self._state is _ClientState.FAILED:
            raise LocalProtocolError("the proxyme client already failed")

    def _receive(self, data: bytes) -> list[ProxymeEvent]:
        events: list[ProxymeEvent] = []
        if self._state is _ClientState.AWAIT_RESPONSE:
            self._frames.feed(data)
            payload = self._frames.next_frame()
            if payload is None:
                return events
            events.append(self._response(payload))
            data = self._frames.take_remainder()
        if data and self._state in (_ClientState.GRANTED, _ClientState.RELEASING):
            taken = min(_RELEASE_SIZE - self._ack_received, len(data))
            self._ack_received += taken
            data = data[taken:]
            if self._ack_received == _RELEASE_SIZE:
                self._advance(_ClientInput.PEER_RELEASED)
                events.append(Released())
        if data:
            raise RemoteProtocolError(
                f"unexpected bytes from the proxyme server after it {self._state.name.lower()}"
            )
        return events

    def _response(self, payload: bytes) -> ProxymeEvent:
        value = _load_json(payload, "the proxyme response")
        if value is None:
            self._advance(_ClientInput.PEER_DENY)
            return Denied()
        if self._options and isinstance(value, dict):
            reason, retry = value.get("denied"), value.get("retry", True)
            if not isinstance(reason, str) or not _is_clean_text(reason):
                raise RemoteProtocolError('a proxyme denial object needs a "denied" string')
            if not isinstance(retry, bool):
                raise RemoteProtocolError('a proxyme denial\'s "retry" must be true or false')
            self._advance(_ClientInput.PEER_DENY)
            return Denied(_clean_reason(reason, self._max_reason), retry)
        if not isinstance(value, list) or not all(
            isinstance(item, str) and _is_clean_text(item) for item in value
        ):
            raise RemoteProtocolError(
                "the proxyme response must be null or a list of address strings"
            )
        self._advance(_ClientInput.PEER_GRANT)
        return Granted(tuple(value))

    def _advance(self, event: _ClientInput) -> None:
        next_state = _CLIENT_TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(
                f"proxyme client cannot take {event.name} in state {self._state.name}"
            )
        self._state = next_state


# --- server ---------------------------------------------------------------------------


class _ServerState(Enum):
    AWAIT_SUBJECT = auto()
    DECIDING = auto()
    DENIED = auto()
    GRANTED = auto()
    RELEASE_REQUESTED = auto()
    WITHDRAWN = auto()
    DONE = auto()
    FAILED = auto()


class _ServerInput(Enum):
    PEER_SUBJECT = auto()
    GRANT = auto()
    DENY = auto()
    PEER_RELEASE = auto()
    SEND_ACK = auto()
    PEER_ERROR = auto()


_SERVER_TRANSITIONS: dict[tuple[_ServerState, _ServerInput], _ServerState] = {
    (_ServerState.AWAIT_SUBJECT, _ServerInput.PEER_SUBJECT): _ServerState.DECIDING,
    (_ServerState.DECIDING, _ServerInput.GRANT): _ServerState.GRANTED,
    (_ServerState.DECIDING, _ServerInput.DENY): _ServerState.DENIED,
    (_ServerState.GRANTED, _ServerInput.PEER_RELEASE): _ServerState.RELEASE_REQUESTED,
    (_ServerState.GRANTED, _ServerInput.SEND_ACK): _ServerState.WITHDRAWN,
    (_ServerState.RELEASE_REQUESTED, _ServerInput.SEND_ACK): _ServerState.DONE,
    (_ServerState.WITHDRAWN, _ServerInput.PEER_RELEASE): _ServerState.DONE,
    **{
        (state, _ServerInput.PEER_ERROR): _ServerState.FAILED
        for state in _ServerState
        if state is not _ServerState.FAILED
    },
}
# States in which the client may still send (part of) its 8-byte release request.
_SERVER_AWAITING_RELEASE = frozenset({_ServerState.GRANTED, _ServerState.WITHDRAWN})


class ProxymeServer:
    """The server side of a negotiated ``proxyme`` stream.

    Feed received bytes to :meth:`receive_data`; on :class:`SubjectReceived` write
    :meth:`grant` (and start listening) or :meth:`deny`; on
    :class:`ReleaseRequested` stop listening, free the port and write
    :meth:`release_ack`.
    """

    __slots__ = (
        "_by_name",
        "_eof",
        "_frames",
        "_max_reason",
        "_max_response",
        "_options",
        "_release_received",
        "_state",
        "_udp",
    )

    def __init__(
        self, *, limits: Limits, options: bool = False, udp: bool = False, by_name: bool = False
    ) -> None:
        """``options``: the tunnel agreed on ``proxyme-options`` (port requests in the
        subject, reasons in a denial); ``udp``: it agreed on ``udp-datagrams`` too (the
        subject may ask for a UDP port; without it a ``udp`` member is ignored, as any
        member we do not know); ``by_name``: it agreed on ``by-name`` too (the subject
        may publish the target as ``http`` or ``tls``; without it those are ignored)."""
        self._options = options
        self._udp = options and udp
        self._by_name = options and by_name
        self._max_reason = limits.max_reason_length
        self._frames = FrameDecoder(limits.max_proxyme_subject_size)
        self._max_response = limits.max_frame_size
        self._release_received = 0
        self._eof = False
        self._state = _ServerState.AWAIT_SUBJECT

    @property
    def granted(self) -> bool:
        """Whether a port was granted and not yet released or withdrawn."""
        return self._state in (_ServerState.GRANTED, _ServerState.RELEASE_REQUESTED)

    def grant(self, addresses: Sequence[str]) -> bytes:
        """The grant frame: the socket addresses where the port listens."""
        if (
            isinstance(addresses, str | bytes)
            or not isinstance(addresses, Sequence)
            or not all(isinstance(address, str) for address in addresses)
        ):
            raise LocalProtocolError("grant() takes a sequence of address strings")
        payload = _dump_json(list(addresses), "granted addresses")
        if len(payload) > self._max_response:
            raise LocalProtocolError(
                f"the grant is {len(payload)} bytes; the limit is {self._max_response}"
            )
        self._decide(_ServerInput.GRANT)
        return encode_frame(payload)

    def deny(self, reason: str = "", *, retry: bool = True) -> bytes:
        """The refusal frame: JSON ``null``, or with ``proxyme-options`` an object with
        ``reason`` and whether asking again can help."""
        self._decide(_ServerInput.DENY)
        if not (self._options and reason):
            return encode_frame(b"null")
        shown = _clean_reason(reason, self._max_reason)
        return encode_frame(_dump_json({"denied": shown, "retry": retry}, "the denial"))

    def release_ack(self) -> bytes:
        """The 8 zero bytes that say the port is freed (after a request, or to withdraw)."""
        if self._state not in (_ServerState.GRANTED, _ServerState.RELEASE_REQUESTED):
            raise LocalProtocolError(
                f"cannot acknowledge a release: the proxyme server is {self._state.name.lower()}"
            )
        self._advance(_ServerInput.SEND_ACK)
        return RELEASE_ACK

    def receive_data(self, data: bytes) -> list[ProxymeEvent]:
        """Feed received bytes; the events they complete."""
        self._check_receiving()
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._advance(_ServerInput.PEER_ERROR)
            raise

    def receive_eof(self) -> list[ProxymeEvent]:
        """The client finished sending: a release request if the port is still granted."""
        if self._eof:
            raise LocalProtocolError("the end of the peer's data was already received")
        self._eof = True
        if self._state is _ServerState.FAILED:
            return []  # the failure was reported once; the end adds nothing
        if self._state is _ServerState.GRANTED:
            self._advance(_ServerInput.PEER_RELEASE)
            return [ReleaseRequested()]
        if self._state is _ServerState.WITHDRAWN:
            self._advance(_ServerInput.PEER_RELEASE)
            return []
        if self._state in (_ServerState.AWAIT_SUBJECT, _ServerState.DECIDING):
            self._advance(_ServerInput.PEER_ERROR)
            raise RemoteProtocolError("stream ended before the proxyme exchange finished")
        return []

    def _decide(self, decision: _ServerInput) -> None:
        if self._state is not _ServerState.DECIDING:
            raise LocalProtocolError(
                f"cannot {decision.name.lower()}: the proxyme server is {self._state.name.lower()}"
            )
        self._advance(decision)

    def _check_receiving(self) -> None:
        if self._eof:
            raise LocalProtocolError("the proxyme client's end of data was already received")
        if self._state is _ServerState.FAILED:
            raise LocalProtocolError("the proxyme server already failed")

    def _receive(self, data: bytes) -> list[ProxymeEvent]:
        events: list[ProxymeEvent] = []
        if self._state is _ServerState.AWAIT_SUBJECT:
            self._frames.feed(data)
            payload = self._frames.next_frame()
            if payload is None:
                return events
            events.append(self._subject(payload))
            data = self._frames.take_remainder()
        if data and self._state in _SERVER_AWAITING_RELEASE:
            taken = min(_RELEASE_SIZE - self._release_received, len(data))
            self._release_received += taken
            data = data[taken:]
            if self._release_received == _RELEASE_SIZE:
                if self._state is _ServerState.GRANTED:
                    events.append(ReleaseRequested())
                self._advance(_ServerInput.PEER_RELEASE)
        if data:
            raise RemoteProtocolError(
                "unexpected bytes from the proxyme client while the server is "
                f"{self._state.name.lower()}"
            )
        return events

    def _subject(self, payload: bytes) -> SubjectReceived:
        value = _load_json(payload, "the proxyme subject")
        if self._options and isinstance(value, dict):
            port = value.get("port")
            if port is not None:
                try:
                    _check_port(port, "the public port asked for")
                except LocalProtocolError as exc:
                    raise RemoteProtocolError(exc.reason) from None
            udp = value.get("udp", False) if self._udp else False
            if not isinstance(udp, bool):
                raise RemoteProtocolError('a proxyme subject\'s "udp" must be true or false')
            service = self._service(value) if self._by_name else None
            if service is not None and (port is not None or udp):
                raise RemoteProtocolError(
                    f'a proxyme subject publishing "{service}" by name asks for no port'
                )
            self._advance(_ServerInput.PEER_SUBJECT)
            return SubjectReceived("", port if isinstance(port, int) else None, udp, service)
        if not isinstance(value, str) or not _is_clean_text(value):
            raise RemoteProtocolError("the proxyme subject must be a JSON string")
        self._advance(_ServerInput.PEER_SUBJECT)
        return SubjectReceived(value)

    @staticmethod
    def _service(value: dict[str, object]) -> str | None:
        """The service a subject object publishes by name (``{"http": true}``), if any."""
        services = []
        for name in NAMED_SERVICES:
            flag = value.get(name, False)
            if not isinstance(flag, bool):
                raise RemoteProtocolError(f'a proxyme subject\'s "{name}" must be true or false')
            if flag:
                services.append(name)
        if len(services) > 1:
            raise RemoteProtocolError("a proxyme subject publishes one service by name at most")
        return services[0] if services else None

    def _advance(self, event: _ServerInput) -> None:
        next_state = _SERVER_TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(
                f"proxyme server cannot take {event.name} in state {self._state.name}"
            )
        self._state = next_state
