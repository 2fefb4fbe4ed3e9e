"""The authentication channel: both sides of both schemes, as byte-level state machines.

The tunnel code opens (Listen side) or accepts (Connect side) the auth stream and
shuttles its bytes through an :class:`Authenticator`; nothing here knows about QUIC.
Every authenticator has the same surface: ``receive_data`` / ``receive_eof`` in,
``data_to_send`` and ``next_event`` out, until one terminal event (:class:`Authenticated`
or :class:`Rejected`) has been reported. After that, input is ignored.

Two schemes:

``simple-ack`` (snocat 0.8 compat, exact bytes)
    Listen -> Connect: ``HELO`` + 60 NULs. Connect -> Listen: ``HELO/HELO`` + 55 NULs.
    No credential, no result message.

``token`` (our addition, wire name ``snocat-token-v1``)
    Listen -> Connect: 64 bytes: ``snocat-token-v1`` NUL-padded to 32 bytes, then a
    32-byte nonce chosen by the caller. Connect -> Listen: one frame (4-byte big-endian
    length + payload) holding ``{"name":NAME,"mac":HEX}`` where ``HEX`` is the lowercase
    hex HMAC-SHA256, keyed with the tunnel's pre-shared secret, of
    ``b"snocat-token-v1\\x00" + nonce + NAME.encode("utf-8")``. Listen -> Connect: one
    frame holding ``{"ok":true}`` or ``{"ok":false,"reason":TEXT}``. The secret never
    crosses the wire.

A peer's bytes never raise: whatever they are, the outcome is an event. Only misuse by
our own caller raises :class:`~snocat_proto.errors.LocalProtocolError`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import ClassVar, Final

from cryptography import x509

from .errors import FrameTooLarge, LocalProtocolError
from .features import FEATURES, parse_features
from .framing import FrameDecoder, encode_frame
from .limits import DEFAULT_MAX_REASON_LENGTH, DEFAULT_MAX_TUNNEL_NAME_LENGTH, Limits

__all__ = [
    "HELLO_SIZE",
    "MAX_REASON_LENGTH",
    "MAX_TUNNEL_NAME_LENGTH",
    "NONCE_SIZE",
    "SCHEMES",
    "SCHEME_SIMPLE_ACK",
    "SCHEME_TOKEN",
    "SIMPLE_ACK_ANSWER",
    "SIMPLE_ACK_HELLO",
    "TOKEN_WIRE_NAME",
    "AuthEvent",
    "Authenticated",
    "Authenticator",
    "ClientCredentials",
    "Rejected",
    "SecretRequired",
    "SimpleAckConnector",
    "SimpleAckListener",
    "TokenConnector",
    "TokenListener",
    "connect_authenticator",
    "listen_authenticator",
    "token_mac",
    "validate_tunnel_name",
]

#: Configuration name of the credential-free snocat 0.8 scheme.
SCHEME_SIMPLE_ACK: Final = "simple-ack"
#: Configuration name of the pre-shared-token scheme (our addition).
SCHEME_TOKEN: Final = "token"
SCHEMES: Final = (SCHEME_SIMPLE_ACK, SCHEME_TOKEN)

#: Both hellos, and the SimpleAck answer, are exactly this many bytes.
HELLO_SIZE: Final = 64
#: What the token scheme's hello carries where SimpleAck's carries ``HELO``.
TOKEN_WIRE_NAME: Final = "snocat-token-v1"
NONCE_SIZE: Final = 32
MAX_TUNNEL_NAME_LENGTH: Final = DEFAULT_MAX_TUNNEL_NAME_LENGTH
#: Refusal reasons that cross the wire are cut to this many characters.
MAX_REASON_LENGTH: Final = DEFAULT_MAX_REASON_LENGTH

SIMPLE_ACK_HELLO: Final = b"HELO".ljust(HELLO_SIZE, b"\0")
SIMPLE_ACK_ANSWER: Final = b"HELO/HELO".ljust(HELLO_SIZE, b"\0")

_HELLO_TEXT_FALLBACK_SIZE: Final = 32
_SIMPLE_ACK_TEXT: Final = b"HELO"
# The reference listener checks only this prefix of the answer, and so do we.
_SIMPLE_ACK_ACCEPTED_PREFIX: Final = b"HELO/HELO\0"
_TOKEN_WIRE_NAME_BYTES: Final = TOKEN_WIRE_NAME.encode("ascii")
_TOKEN_HELLO_HEADER: Final = _TOKEN_WIRE_NAME_BYTES.ljust(HELLO_SIZE - NONCE_SIZE, b"\0")
# What a SimpleAck-only client (snocat 0.8) answers to the token hello: S/S + NULs.
_COMPAT_ANSWER_TO_TOKEN_HELLO: Final = (
    _TOKEN_WIRE_NAME_BYTES + b"/" + _TOKEN_WIRE_NAME_BYTES + b"\0"
)
_MAC_DOMAIN: Final = _TOKEN_WIRE_NAME_BYTES + b"\0"
_MAC_HEX_LENGTH: Final = 2 * hashlib.sha256().digest_size
_LOWER_HEX: Final = frozenset("0123456789abcdef")
# Verifying an unknown name costs the same HMAC and comparison as a known one.
_DUMMY_SECRET: Final = bytes(32)
_PEER_VISIBLE_CREDENTIAL_FAILURE: Final = "unknown tunnel name or wrong token"
_JSON_SEPARATORS: Final = (",", ":")
_PREVIEW_LENGTH: Final = 40

_REASON_CONNECT_WANTS_SIMPLE_ACK_GOT_TOKEN: Final = (
    "the aggregator requires token authentication; configure a token for this client"
)
_REASON_CONNECT_WANTS_TOKEN_GOT_SIMPLE_ACK: Final = (
    "the aggregator offers only SimpleAck (no credentials); this client requires token "
    "authentication: run the aggregator with token auth, or use --auth simple-ack to accept it"
)
_REASON_LISTEN_WANTS_TOKEN_GOT_SIMPLE_ACK: Final = (
    "peer answered with SimpleAck (a snocat 0.8 client?); this aggregator requires token "
    "authentication"
)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthEvent:
    """Base class of everything :meth:`Authenticator.next_event` returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretRequired(AuthEvent):
    """(Listen side, token scheme) The peer claims tunnel ``name``: look up its secret,
    then call :meth:`TokenListener.supply_credential` (or :meth:`TokenListener.reject`)."""

    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticated(AuthEvent):
    """Terminal: the peer is who it claims. ``name`` is the token's tunnel name; under
    SimpleAck it is the ``peer_name`` given to the listener, and ``""`` on the Connect
    side (SimpleAck tells the client nothing about itself).  ``features``: the wire
    additions both sides agreed on (:mod:`~snocat_proto._wire.features`)."""

    name: str
    features: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected(AuthEvent):
    """Terminal: authentication failed. ``reason`` is safe to log (never holds a
    secret) and says which side found what wrong, and what to change."""

    reason: str

    def __post_init__(self) -> None:
        if not self.reason:
            raise LocalProtocolError("Rejected needs a reason")


# --------------------------------------------------------------------------- helpers


def validate_tunnel_name(name: str, max_length: int = DEFAULT_MAX_TUNNEL_NAME_LENGTH) -> None:
    """Raise :class:`LocalProtocolError` unless ``name`` may name a tunnel.

    1 to ``max_length`` (``Limits.max_tunnel_name_length``) characters, all
    printable, none of them whitespace or ``/``: names are written as
    ``NAME SECRET`` lines in tokens files and appear in logs.
    """
    if not isinstance(name, str):
        raise LocalProtocolError(f"a tunnel name must be a str, not {type(name).__name__}")
    if not 1 <= len(name) <= max_length:
        raise LocalProtocolError(
            f"a tunnel name must be 1 to {max_length} characters long, not {len(name)}"
        )
    for position, char in enumerate(name):
        if char == "/" or char.isspace() or not char.isprintable():
            raise LocalProtocolError(
                "a tunnel name may not contain whitespace, control or unprintable "
                f"characters, or '/' (found {char!r} at position {position})"
            )


def token_mac(secret: bytes, nonce: bytes, name: str) -> bytes:
    """HMAC-SHA256 that proves knowledge of ``secret`` for tunnel ``name`` under ``nonce``."""
    message = _MAC_DOMAIN + nonce + name.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).digest()


def _sanitize(text: str, limit: int) -> str:
    """Printable characters only, at most ``limit`` of them: safe for logs and the wire."""
    cleaned = "".join(char if char.isprintable() else "?" for char in text)
    if len(cleaned) > limit:
        cleaned = cleaned[: max(limit - 3, 0)] + "..."
    return cleaned


def _preview(data: bytes) -> str:
    """A short, quoted, loggable rendering of bytes the peer sent."""
    return repr(_sanitize(data.decode("utf-8", errors="replace"), _PREVIEW_LENGTH))


def _hello_text(hello: bytes) -> bytes:
    """The text part of a hello as the reference reads it: up to the first NUL,
    or the first 32 bytes if there is none."""
    end = hello.find(b"\0")
    return hello[:end] if end >= 0 else hello[:_HELLO_TEXT_FALLBACK_SIZE]


def _encode_json(value: dict[str, object]) -> bytes:
    # Compact, UTF-8, non-ASCII left unescaped: a 128-character name always fits 1024 bytes.
    return json.dumps(value, separators=_JSON_SEPARATORS, ensure_ascii=False).encode("utf-8")


def _decode_json_object(payload: bytes) -> dict[str, object] | None:
    """The JSON object in ``payload``, or ``None`` for anything else (never raises)."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        return None
    return value if isinstance(value, dict) else None


def _result_payload(
    reason: str | None, limits: Limits, features: frozenset[str] = frozenset()
) -> bytes:
    """``{"ok":true}`` (with the agreed ``features``, if any), or
    ``{"ok":false,"reason":...}`` cut to fit ``limit`` bytes."""
    if reason is None:
        if features:
            return _encode_json({"ok": True, "features": sorted(features)})
        return _encode_json({"ok": True})
    reason = _sanitize(reason, limits.max_reason_length)
    payload = _encode_json({"ok": False, "reason": reason})
    while len(payload) > limits.max_auth_message_size and reason:
        reason = reason[: len(reason) // 2]
        payload = _encode_json({"ok": False, "reason": reason})
    return payload


# --------------------------------------------------------------------------- base


class Authenticator(ABC):
    """One side of one authentication exchange, fed and drained by the tunnel code."""

    #: The configuration name of the scheme (:data:`SCHEME_SIMPLE_ACK` or :data:`SCHEME_TOKEN`).
    scheme: ClassVar[str]

    def __init__(self) -> None:
        self._received = bytearray()
        self._outgoing = bytearray()
        self._events: deque[AuthEvent] = deque()
        self._finished = False
        self._eof_received = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} scheme={self.scheme!r} finished={self._finished}>"

    @property
    def is_finished(self) -> bool:
        """True once :class:`Authenticated` or :class:`Rejected` has been queued."""
        return self._finished

    def handshake_done(self, *, peer_certificate: x509.Certificate | None) -> None:
        """The QUIC handshake completed (before any byte of the exchange): a scheme
        that binds its proof to the TLS session learns the peer's certificate here."""
        return None  # the tunnel schemes bind nothing

    def data_to_send(self) -> bytes:
        """Drain the bytes to write to the auth stream."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def next_event(self) -> AuthEvent | None:
        return self._events.popleft() if self._events else None

    def receive_data(self, data: bytes) -> None:
        """Bytes the peer wrote on the auth stream."""
        # After EOF nothing can arrive; a transport that says otherwise (a reset racing
        # buffered data) must not crash the tunnel, so such bytes are dropped too.
        if self._finished or self._eof_received or not data:
            return
        self._received += data
        self._process()

    def receive_eof(self) -> None:
        """The peer closed its sending side of the auth stream."""
        if self._finished or self._eof_received:
            return
        self._eof_received = True
        self._on_eof()

    @abstractmethod
    def _process(self) -> None:
        """Consume what ``self._received`` holds, as far as the state allows."""

    @abstractmethod
    def _on_eof(self) -> None:
        """The peer will send nothing more."""

    def _next_frame(self, decoder: FrameDecoder) -> bytes | None:
        """Move the received bytes into ``decoder``; return its head frame if complete.

        Bytes after that frame go back to ``self._received``. Raises FrameTooLarge, and
        then keeps none of the bytes: the decoder would hold them until the tunnel is
        dropped, however many the peer sent."""
        data = bytes(self._received)
        self._received.clear()
        try:
            decoder.feed(data)
        except FrameTooLarge:
            decoder.take_remainder()
            raise
        payload = decoder.next_frame()
        if payload is not None:
            self._received += decoder.take_remainder()
        return payload

    def _succeed(self, name: str, features: frozenset[str] = frozenset()) -> None:
        self._finish(Authenticated(name=name, features=features))

    def _fail(self, reason: str) -> None:
        self._finish(Rejected(reason=reason))

    def _finish(self, event: AuthEvent) -> None:
        self._finished = True
        self._received.clear()
        self._events.append(event)


# --------------------------------------------------------------------------- SimpleAck


class _SimpleAckListenerState(Enum):
    AWAITING_ANSWER = auto()
    DONE = auto()


class SimpleAckListener(Authenticator):
    """Listen side of snocat 0.8's SimpleAck: says ``HELO``, wants ``HELO/HELO`` back.

    ``peer_name`` becomes the authenticated name (the reference uses the peer's
    socket address text). There is no result message: on failure, drop the stream.
    """

    scheme: ClassVar[str] = SCHEME_SIMPLE_ACK

    def __init__(self, peer_name: str) -> None:
        super().__init__()
        if not isinstance(peer_name, str):
            raise LocalProtocolError("peer_name must be a str")
        self._peer_name = peer_name
        self._state = _SimpleAckListenerState.AWAITING_ANSWER
        self._outgoing += SIMPLE_ACK_HELLO

    def _process(self) -> None:
        if self._state is not _SimpleAckListenerState.AWAITING_ANSWER:
            return
        if len(self._received) < HELLO_SIZE:
            return
        answer = bytes(self._received[:HELLO_SIZE])
        self._state = _SimpleAckListenerState.DONE
        if answer.startswith(_SIMPLE_ACK_ACCEPTED_PREFIX):
            self._succeed(self._peer_name)
        else:
            self._fail(_explain_bad_simple_ack_answer(answer))

    def _on_eof(self) -> None:
        self._state = _SimpleAckListenerState.DONE
        received = len(self._received)
        if received == 0:
            self._fail(
                "the client closed the auth channel without answering the SimpleAck hello; "
                "a client configured for token authentication does this: give this "
                "aggregator a tokens file (token auth), or run the client with "
                "--auth simple-ack"
            )
        else:
            self._fail(
                f"the client closed the auth channel after {received} of {HELLO_SIZE} bytes "
                "of its SimpleAck answer; it is not a snocat client, or a broken one"
            )


def _explain_bad_simple_ack_answer(answer: bytes) -> str:
    text = answer.split(b"\0", 1)[0]
    head, slash, tail = text.partition(b"/")
    if slash and head == tail and head:
        return (
            f"the client answered a different hello ({_preview(head)} instead of 'HELO'): "
            "it speaks another authentication scheme than this aggregator's SimpleAck; "
            "configure both sides with the same --auth scheme"
        )
    return (
        f"the client's SimpleAck answer is not 'HELO/HELO' followed by NUL bytes (it began "
        f"with {_preview(answer[:16])}); it is not a snocat client, or a broken one"
    )


class _SimpleAckConnectorState(Enum):
    AWAITING_HELLO = auto()
    DONE = auto()


class SimpleAckConnector(Authenticator):
    """Connect side of SimpleAck: answers ``HELO`` with ``HELO/HELO``.

    Stricter than the reference, which answers any hello ``S`` with ``S/S``: we answer
    only ``HELO``. A token hello is refused with advice; any other hello is refused as
    unknown. Either way, nothing is sent.
    """

    scheme: ClassVar[str] = SCHEME_SIMPLE_ACK

    def __init__(self) -> None:
        super().__init__()
        self._state = _SimpleAckConnectorState.AWAITING_HELLO

    def _process(self) -> None:
        if self._state is not _SimpleAckConnectorState.AWAITING_HELLO:
            return
        if len(self._received) < HELLO_SIZE:
            return
        hello_text = _hello_text(bytes(self._received[:HELLO_SIZE]))
        self._state = _SimpleAckConnectorState.DONE
        if hello_text == _SIMPLE_ACK_TEXT:
            self._outgoing += SIMPLE_ACK_ANSWER
            self._succeed("")
        elif hello_text == _TOKEN_WIRE_NAME_BYTES:
            self._fail(_REASON_CONNECT_WANTS_SIMPLE_ACK_GOT_TOKEN)
        else:
            self._fail(_unknown_hello_reason(hello_text))

    def _on_eof(self) -> None:
        self._state = _SimpleAckConnectorState.DONE
        self._fail(_hello_cut_short_reason(len(self._received)))


def _unknown_hello_reason(hello_text: bytes) -> str:
    return (
        f"the aggregator sent an unknown hello ({_preview(hello_text)}); this client speaks "
        f"'HELO' (SimpleAck) and '{TOKEN_WIRE_NAME}' only: is the address a snocat "
        "aggregator of a compatible version?"
    )


def _hello_cut_short_reason(received: int) -> str:
    return (
        f"the aggregator closed the auth channel after {received} of {HELLO_SIZE} bytes "
        "of its hello; it may have refused this client, or is not a snocat aggregator"
    )


# --------------------------------------------------------------------------- token


class _TokenListenerState(Enum):
    AWAITING_RESPONSE = auto()
    AWAITING_CREDENTIAL = auto()
    DONE = auto()


class TokenListener(Authenticator):
    """Listen side of the token scheme.

    Sends the hello (with the caller's fresh ``nonce``) at once, reads the client's
    response, reports :class:`SecretRequired`, and verifies the MAC once the
    application answers with :meth:`supply_credential` (or refuses with :meth:`reject`).
    On every failure after the hello it sends ``{"ok":false,...}`` before reporting.
    """

    scheme: ClassVar[str] = SCHEME_TOKEN

    def __init__(
        self, nonce: bytes, *, limits: Limits, features: frozenset[str] = FEATURES
    ) -> None:
        super().__init__()
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"the token nonce must be {NONCE_SIZE} bytes")
        self._nonce = nonce
        self._limits = limits
        self._features = features
        self._offered: frozenset[str] = frozenset()
        self._frames = FrameDecoder(limits.max_auth_message_size)
        self._state = _TokenListenerState.AWAITING_RESPONSE
        self._claimed_name: str | None = None
        self._claimed_mac = b""
        self._credential_requested = False
        self._decided = False
        self._outgoing += _TOKEN_HELLO_HEADER + nonce

    @property
    def claimed_name(self) -> str | None:
        """The tunnel name the client claims, once :class:`SecretRequired` is queued."""
        return self._claimed_name

    def supply_credential(self, secret: bytes | None) -> None:
        """Answer :class:`SecretRequired`: the claimed name's secret, or ``None`` if
        the name is unknown (verified in the same time as a wrong secret)."""
        self._check_decision("supply_credential")
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise LocalProtocolError("a token secret must be non-empty bytes (or None)")
        if self._finished:
            return  # the peer broke the exchange while the application was deciding
        self._decided = True
        name = self._claimed_name
        assert name is not None  # set together with _credential_requested
        expected = token_mac(_DUMMY_SECRET if secret is None else secret, self._nonce, name)
        matches = hmac.compare_digest(expected, self._claimed_mac)
        self._state = _TokenListenerState.DONE
        if matches and secret is not None:
            agreed = self._offered & self._features
            self._outgoing += encode_frame(_result_payload(None, self._limits, agreed))
            self._succeed(name, agreed)
        else:
            self._refuse(
                _PEER_VISIBLE_CREDENTIAL_FAILURE,
                f"tunnel {name!r}: the client presented an unknown tunnel name or a wrong "
                "token; check that its token matches this aggregator's tokens file",
            )

    def reject(self, reason: str) -> None:
        """Refuse the client for the application's own ``reason`` (e.g. a tunnel limit).

        ``reason`` is sent to the client (sanitized, cut to 200 characters): keep
        secrets out of it. Allowed any time before the exchange ends."""
        if not isinstance(reason, str) or not reason:
            raise LocalProtocolError("reject() needs a non-empty reason")
        if self._decided:
            raise LocalProtocolError("the credential decision was already made")
        if self._finished:
            return
        self._decided = True
        self._state = _TokenListenerState.DONE
        shown = _sanitize(reason, self._limits.max_reason_length)
        who = f"tunnel {self._claimed_name!r}" if self._claimed_name is not None else "client"
        self._refuse(shown, f"{who} refused by this aggregator: {shown}")

    def _check_decision(self, method: str) -> None:
        if not self._credential_requested:
            raise LocalProtocolError(f"{method}() called before SecretRequired")
        if self._decided:
            raise LocalProtocolError(f"{method}() called after the credential decision")

    def _refuse(self, peer_reason: str, log_reason: str) -> None:
        payload = _result_payload(peer_reason, self._limits)
        self._outgoing += encode_frame(payload)
        self._fail(log_reason)

    def _process(self) -> None:
        if self._state is _TokenListenerState.AWAITING_RESPONSE:
            self._read_response()
        elif self._state is _TokenListenerState.AWAITING_CREDENTIAL and self._received:
            # No byte count in the reason: it would depend on how the bytes were cut.
            self._state = _TokenListenerState.DONE
            self._refuse(
                "unexpected bytes after the token response",
                "the client sent unexpected bytes after its token response, before the "
                "result; it is a broken client",
            )

    def _read_response(self) -> None:
        # Checked before framing, since these bytes read as a ~1.9 GB length prefix. While
        # the bytes so far match that answer's start, we cannot tell yet, so we wait.
        if self._frames.buffered == 0:
            head = bytes(self._received[: len(_COMPAT_ANSWER_TO_TOKEN_HELLO)])
            if _COMPAT_ANSWER_TO_TOKEN_HELLO.startswith(head):
                if len(head) < len(_COMPAT_ANSWER_TO_TOKEN_HELLO):
                    return
                self._state = _TokenListenerState.DONE
                self._refuse(
                    "SimpleAck answer to a token hello", _REASON_LISTEN_WANTS_TOKEN_GOT_SIMPLE_ACK
                )
                return
        try:
            payload = self._next_frame(self._frames)
        except FrameTooLarge as error:
            self._state = _TokenListenerState.DONE
            self._refuse(
                "token response too large",
                f"the client's token response {error.reason}; it is not a "
                f"{TOKEN_WIRE_NAME} client, or a broken one",
            )
            return
        if payload is None:
            return
        parsed = _parse_token_response(payload, self._limits)
        if isinstance(parsed, str):
            self._state = _TokenListenerState.DONE
            self._refuse(
                f"malformed token response: {parsed}",
                f"the client's token response {parsed}; it is not a {TOKEN_WIRE_NAME} "
                "client, or a broken one",
            )
            return
        self._claimed_name, self._claimed_mac, self._offered = parsed
        self._credential_requested = True
        self._state = _TokenListenerState.AWAITING_CREDENTIAL
        self._events.append(SecretRequired(name=self._claimed_name))
        self._process()  # bytes after the response, if any, are a violation

    def _on_eof(self) -> None:
        if self._state is _TokenListenerState.AWAITING_RESPONSE:
            received = len(self._received) + self._frames.buffered
            self._state = _TokenListenerState.DONE
            self._fail(
                f"the client closed the auth channel after {received} byte(s), before a "
                "complete token response; a SimpleAck-only client (--auth simple-ack) "
                "does this: give it a token, or run this aggregator with SimpleAck"
            )
        # AWAITING_CREDENTIAL: the client has said everything; the result can still go out.


def _parse_token_response(
    payload: bytes, limits: Limits
) -> tuple[str, bytes, frozenset[str]] | str:
    """``(name, mac, offered features)`` from a response payload, or what is wrong."""
    message = _decode_json_object(payload)
    if message is None:
        return "is not a UTF-8 JSON object"
    name = message.get("name")
    mac = message.get("mac")
    if not isinstance(name, str):
        return 'has no "name" string'
    if not isinstance(mac, str) or len(mac) != _MAC_HEX_LENGTH or not _LOWER_HEX.issuperset(mac):
        return f'has no "mac" of {_MAC_HEX_LENGTH} lowercase hex digits'
    try:
        validate_tunnel_name(name, limits.max_tunnel_name_length)
    except LocalProtocolError as error:
        return f"claims an invalid tunnel name: {error.reason}"
    return name, bytes.fromhex(mac), parse_features(message.get("features"))


class _TokenConnectorState(Enum):
    AWAITING_HELLO = auto()
    AWAITING_RESULT = auto()
    DONE = auto()


class TokenConnector(Authenticator):
    """Connect side of the token scheme: proves ``secret`` for tunnel ``name``.

    Refuses a SimpleAck aggregator (it would learn no credential) and sends nothing then.
    """

    scheme: ClassVar[str] = SCHEME_TOKEN

    def __init__(
        self,
        name: str,
        secret: bytes,
        *,
        limits: Limits,
        features: frozenset[str] = FEATURES,
    ) -> None:
        super().__init__()
        validate_tunnel_name(name, limits.max_tunnel_name_length)
        if not isinstance(secret, bytes) or not secret:
            raise LocalProtocolError("a token secret must be non-empty bytes")
        self._features = features
        sample = self._response("0" * _MAC_HEX_LENGTH, name)
        if len(sample) > limits.max_auth_message_size:
            raise LocalProtocolError(
                f"the token response for this name takes {len(sample)} bytes, more than "
                f"Limits.max_auth_message_size ({limits.max_auth_message_size})"
            )
        self._name = name
        self._secret = secret
        self._limits = limits
        self._frames = FrameDecoder(limits.max_auth_message_size)
        self._state = _TokenConnectorState.AWAITING_HELLO

    def _response(self, mac: str, name: str) -> bytes:
        message: dict[str, object] = {"name": name, "mac": mac}
        if self._features:
            message["features"] = sorted(self._features)
        return _encode_json(message)

    def _finish(self, event: AuthEvent) -> None:
        self._secret = b""  # whatever the outcome, the secret is needed no longer
        super()._finish(event)

    def __repr__(self) -> str:
        return (
            f"<TokenConnector name={self._name!r} state={self._state.name} "
            f"finished={self._finished}>"
        )

    def _process(self) -> None:
        if self._state is _TokenConnectorState.AWAITING_HELLO:
            self._read_hello()
        if self._state is _TokenConnectorState.AWAITING_RESULT:
            self._read_result()

    def _read_hello(self) -> None:
        if len(self._received) < HELLO_SIZE:
            return
        hello = bytes(self._received[:HELLO_SIZE])
        del self._received[:HELLO_SIZE]
        hello_text = _hello_text(hello)
        if hello_text == _SIMPLE_ACK_TEXT:
            self._state = _TokenConnectorState.DONE
            self._fail(_REASON_CONNECT_WANTS_TOKEN_GOT_SIMPLE_ACK)
        elif hello[: len(_TOKEN_HELLO_HEADER)] == _TOKEN_HELLO_HEADER:
            nonce = hello[len(_TOKEN_HELLO_HEADER) :]
            mac = token_mac(self._secret, nonce, self._name).hex()
            self._secret = b""  # one hello per exchange: the secret is needed no longer
            self._outgoing += encode_frame(self._response(mac, self._name))
            self._state = _TokenConnectorState.AWAITING_RESULT
        elif hello_text == _TOKEN_WIRE_NAME_BYTES:
            self._state = _TokenConnectorState.DONE
            self._fail(
                f"the aggregator's {TOKEN_WIRE_NAME} hello is malformed (bytes after the "
                "name are not all NUL); it is a broken aggregator"
            )
        else:
            self._state = _TokenConnectorState.DONE
            self._fail(_unknown_hello_reason(hello_text))

    def _read_result(self) -> None:
        try:
            payload = self._next_frame(self._frames)
        except FrameTooLarge as error:
            self._state = _TokenConnectorState.DONE
            self._fail(f"the aggregator's token result {error.reason}; it is a broken aggregator")
            return
        if payload is None:
            return
        self._state = _TokenConnectorState.DONE
        result = _decode_json_object(payload)
        ok = None if result is None else result.get("ok")
        if ok is True:
            assert result is not None
            # Only what we offered: an aggregator cannot turn on what we do not speak.
            self._succeed(self._name, parse_features(result.get("features")) & self._features)
        elif ok is False:
            assert result is not None
            reason = result.get("reason")
            shown = (
                _sanitize(reason, self._limits.max_reason_length)
                if isinstance(reason, str) and reason
                else "(no reason given)"
            )
            self._fail(f"aggregator refused the credentials: {shown}")
        else:
            self._fail(
                'the aggregator\'s token result is not {"ok": true|false} JSON '
                f"(it began with {_preview(payload[:16])}); it is a broken aggregator"
            )

    def _on_eof(self) -> None:
        if self._state is _TokenConnectorState.AWAITING_HELLO:
            self._state = _TokenConnectorState.DONE
            self._fail(_hello_cut_short_reason(len(self._received)))
        elif self._state is _TokenConnectorState.AWAITING_RESULT:
            self._state = _TokenConnectorState.DONE
            self._fail(
                "the aggregator closed the auth channel before sending the token result; "
                "it dropped this client without a reason (see the aggregator's log)"
            )


# --------------------------------------------------------------------------- factories


@dataclass(frozen=True, slots=True, repr=False)
class ClientCredentials:
    """How the Connect side authenticates. Its ``repr`` never shows the secret."""

    scheme: str
    name: str | None = None
    secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.scheme == SCHEME_SIMPLE_ACK:
            if self.name is not None or self.secret is not None:
                raise LocalProtocolError("the simple-ack scheme carries no name or secret")
        elif self.scheme == SCHEME_TOKEN:
            if self.name is None:
                raise LocalProtocolError("the token scheme needs a tunnel name")
            validate_tunnel_name(self.name)
            if not isinstance(self.secret, bytes) or not self.secret:
                raise LocalProtocolError("the token scheme needs a non-empty secret")
        else:
            raise LocalProtocolError(_unknown_scheme(self.scheme))

    @classmethod
    def simple_ack(cls) -> ClientCredentials:
        return cls(SCHEME_SIMPLE_ACK)

    @classmethod
    def token(cls, name: str, secret: bytes) -> ClientCredentials:
        return cls(SCHEME_TOKEN, name, secret)

    def __repr__(self) -> str:
        secret = "None" if self.secret is None else "<hidden>"
        return f"ClientCredentials(scheme={self.scheme!r}, name={self.name!r}, secret={secret})"

    __str__ = __repr__


def _unknown_scheme(scheme: object) -> str:
    return f"unknown authentication scheme {scheme!r} (known: {', '.join(SCHEMES)})"


def listen_authenticator(
    scheme: str,
    *,
    peer_name: str,
    nonce: bytes,
    limits: Limits,
    features: frozenset[str] = FEATURES,
) -> Authenticator:
    """The Listen side's authenticator for ``scheme``; its hello is ready to send.

    ``peer_name`` names a SimpleAck tunnel; ``nonce`` (32 fresh random bytes) is used by
    the token scheme only."""
    if scheme == SCHEME_SIMPLE_ACK:
        return SimpleAckListener(peer_name)
    if scheme == SCHEME_TOKEN:
        return TokenListener(nonce, limits=limits, features=features)
    raise LocalProtocolError(_unknown_scheme(scheme))


def connect_authenticator(
    credentials: ClientCredentials, *, limits: Limits, features: frozenset[str] = FEATURES
) -> Authenticator:
    """The Connect side's authenticator for ``credentials``."""
    if credentials.scheme == SCHEME_TOKEN:
        assert credentials.name is not None and credentials.secret is not None
        return TokenConnector(
            credentials.name, credentials.secret, limits=limits, features=features
        )
    if credentials.scheme == SCHEME_SIMPLE_ACK:
        return SimpleAckConnector()
    raise LocalProtocolError(_unknown_scheme(credentials.scheme))
