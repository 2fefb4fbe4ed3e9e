"""How two aggregator nodes of one fleet prove it to each other (ALPN ``snocat-fleet-1``).

A node-to-node link is a QUIC connection with its own ALPN, on the same UDP port as the
tunnels (docs/fleet.md, docs/protocol.md 3.16).  Both sides prove that they know the
fleet's secret, each to the other, and bind the proof to the TLS session: the MACs
cover the SHA-256 fingerprint of the listening node's certificate as the connecting
node saw it.  A machine in the middle, which must present a certificate of its own,
can relay the messages but not make them verify; no certificate authority is needed.

On stream 1, as the token scheme (3.1), after the handshake:

1. L -> C: 64 bytes, ``snocat-fleet-v1`` NUL-padded to 32, then a fresh 32-byte nonce;
2. C -> L: ``frame({"node": NAME, "nonce": HEX32, "mac": HEX})``,
   MAC = HMAC-SHA256(secret, ``snocat-fleet-v1\\0client\\0`` || nonce_L || nonce_C ||
   fingerprint || NAME);
3. L -> C: ``frame({"ok": true, "node": NAME, "mac": HEX})``, MAC as above with
   ``server`` and nonce_C before nonce_L, or ``frame({"ok": false, "reason": TEXT})``.

Each side ends authenticated as the other node's name (scheme ``fleet``), or refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import ClassVar, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .auth import HELLO_SIZE, NONCE_SIZE, Authenticator, validate_tunnel_name
from .errors import FrameTooLarge, LocalProtocolError
from .framing import FrameDecoder, encode_frame
from .limits import Limits

__all__ = [
    "FLEET_ALPN",
    "FLEET_WIRE_NAME",
    "SCHEME_FLEET",
    "FleetConnector",
    "FleetListener",
    "certificate_digest",
]

#: The ALPN of node-to-node links (never offered by or to a tunnel client).
FLEET_ALPN: Final = "snocat-fleet-1"
FLEET_WIRE_NAME: Final = "snocat-fleet-v1"
#: The scheme a node-to-node link authenticates with.
SCHEME_FLEET: Final = "fleet"

_HEADER: Final = FLEET_WIRE_NAME.encode("ascii").ljust(HELLO_SIZE - NONCE_SIZE, b"\0")
_CLIENT_DOMAIN: Final = FLEET_WIRE_NAME.encode("ascii") + b"\0client\0"
_SERVER_DOMAIN: Final = FLEET_WIRE_NAME.encode("ascii") + b"\0server\0"
_MAC_HEX: Final = 2 * hashlib.sha256().digest_size
_REFUSED: Final = "not a node of this fleet"


def certificate_digest(certificate: x509.Certificate) -> bytes:
    """What the MACs bind the link to: SHA-256 of the listening node's certificate."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()


def _mac(
    secret: bytes, domain: bytes, first: bytes, second: bytes, digest: bytes, name: str
) -> str:
    message = domain + first + second + digest + name.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _load(payload: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _dump(value: dict[str, object]) -> bytes:
    return encode_frame(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise LocalProtocolError("a fleet secret must be at least 16 bytes")


class FleetListener(Authenticator):
    """The listening node's side.  ``certificate`` is its own TLS certificate."""

    scheme: ClassVar[str] = SCHEME_FLEET

    def __init__(
        self,
        nonce: bytes,
        *,
        secret: bytes,
        node: str,
        certificate: x509.Certificate,
        limits: Limits,
    ) -> None:
        super().__init__()
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"the fleet nonce must be {NONCE_SIZE} bytes")
        _check_secret(secret)
        validate_tunnel_name(node, limits.max_tunnel_name_length)
        self._nonce = nonce
        self._secret = secret
        self._node = node
        self._digest = certificate_digest(certificate)
        self._limits = limits
        self._frames = FrameDecoder(limits.max_auth_message_size)
        self._outgoing += _HEADER + nonce

    def _process(self) -> None:
        try:
            payload = self._next_frame(self._frames)
        except FrameTooLarge:
            self._refuse("the fleet proof is too large")
            return
        if payload is None:
            return
        message = _load(payload)
        node, nonce, mac = (
            (message.get("node"), message.get("nonce"), message.get("mac"))
            if message is not None
            else (None, None, None)
        )
        if not (isinstance(node, str) and isinstance(nonce, str) and isinstance(mac, str)):
            self._refuse("the fleet proof is not a node, nonce and mac")
            return
        try:
            validate_tunnel_name(node, self._limits.max_tunnel_name_length)
            their_nonce = bytes.fromhex(nonce)
        except (LocalProtocolError, ValueError):
            self._refuse("the fleet proof has a bad node name or nonce")
            return
        if len(their_nonce) != NONCE_SIZE or len(mac) != _MAC_HEX:
            self._refuse("the fleet proof has a bad nonce or mac")
            return
        expected = _mac(self._secret, _CLIENT_DOMAIN, self._nonce, their_nonce, self._digest, node)
        if not hmac.compare_digest(expected, mac):
            self._refuse(f"node {node!r} does not know the fleet secret (or the link was relayed)")
            return
        proof = _mac(
            self._secret, _SERVER_DOMAIN, their_nonce, self._nonce, self._digest, self._node
        )
        self._outgoing += _dump({"ok": True, "node": self._node, "mac": proof})
        self._secret = b""
        self._succeed(node)

    def _refuse(self, log_reason: str) -> None:
        self._outgoing += _dump({"ok": False, "reason": _REFUSED})
        self._secret = b""
        self._fail(f"fleet link refused: {log_reason}")

    def _on_eof(self) -> None:
        self._fail("the peer closed the fleet auth channel before proving anything")


class FleetConnector(Authenticator):
    """The connecting node's side; it learns the listener's certificate from the
    handshake (:meth:`handshake_done`) before it answers the hello."""

    scheme: ClassVar[str] = SCHEME_FLEET

    def __init__(self, nonce: bytes, *, secret: bytes, node: str, limits: Limits) -> None:
        super().__init__()
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"the fleet nonce must be {NONCE_SIZE} bytes")
        _check_secret(secret)
        validate_tunnel_name(node, limits.max_tunnel_name_length)
        self._nonce = nonce
        self._secret = secret
        self._node = node
        self._limits = limits
        self._digest: bytes | None = None
        self._their_nonce: bytes | None = None
        self._frames = FrameDecoder(limits.max_auth_message_size)

    def handshake_done(self, *, peer_certificate: x509.Certificate | None) -> None:
        if peer_certificate is not None:
            self._digest = certificate_digest(peer_certificate)

    def _process(self) -> None:
        if self._their_nonce is None:
            if len(self._received) < HELLO_SIZE:
                return
            hello = bytes(self._received[:HELLO_SIZE])
            del self._received[:HELLO_SIZE]
            if hello[: len(_HEADER)] != _HEADER:
                self._fail("the peer is not a fleet node (unexpected hello)")
                return
            if self._digest is None:
                self._fail("the peer presented no certificate to bind the fleet proof to")
                return
            self._their_nonce = hello[len(_HEADER) :]
            mac = _mac(
                self._secret,
                _CLIENT_DOMAIN,
                self._their_nonce,
                self._nonce,
                self._digest,
                self._node,
            )
            self._outgoing += _dump({"node": self._node, "nonce": self._nonce.hex(), "mac": mac})
        try:
            payload = self._next_frame(self._frames)
        except FrameTooLarge:
            self._fail("the peer's fleet result is too large")
            return
        if payload is None:
            return
        message = _load(payload)
        if message is None or message.get("ok") is not True:
            self._fail("the peer refused this node: check the fleet secret on both nodes")
            return
        node, their_mac = message.get("node"), message.get("mac")
        assert self._digest is not None and self._their_nonce is not None
        if not (isinstance(node, str) and isinstance(their_mac, str)):
            self._fail("the peer's fleet result has no node and mac")
            return
        expected = _mac(
            self._secret, _SERVER_DOMAIN, self._nonce, self._their_nonce, self._digest, node
        )
        if not hmac.compare_digest(expected, their_mac):
            self._fail(
                f"the peer {node!r} does not know the fleet secret (or the link was relayed)"
            )
            return
        self._secret = b""
        self._succeed(node)

    def _on_eof(self) -> None:
        self._fail("the peer closed the fleet auth channel before its result")
