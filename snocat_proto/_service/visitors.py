"""The start of a visitor's connection on a public listener, and what it is answered.

This module owns the decisions an aggregator makes about one visitor before it
forwards a byte, for every public listener: the per-tunnel TCP ports, and the shared
``--http`` / ``--tls`` listeners of docs/protocol.md 3.14.  Sockets, clocks and
tasks stay in the binding, which feeds :class:`VisitorStart` what it reads and does
what it answers:

* **Whose connection.** From a load balancer the operator trusts
  (``--accept-proxy-protocol-from``) a PROXY protocol header is required and gives the
  visitor's address (3.14.5); from anyone else, when the option is in use, a
  connection that starts with a PROXY header is refused (:class:`ProxyHeaderGuard`
  on a per-tunnel port, where nothing else is read); otherwise the visitor is the
  connection's peer.
* **Which tunnel**, on a shared listener: the ClientHello's SNI or the first request's
  ``Host`` (:mod:`~snocat_proto._wire.sni`, :mod:`~snocat_proto._wire.http_host`),
  ``NAME.DOMAIN`` -> ``NAME`` (:mod:`~snocat_proto._wire.names`).  The bytes read are
  kept, to be forwarded first (every one of them, less a PROXY header).
* **What a refusal sounds like** (:func:`refusal`): a small HTTP response, the TLS
  ``unrecognized_name`` alert, or a plain close; each with a :class:`Failure` class,
  which ``snocat_name_routing_failures_total{reason}`` counts.

The bounds are :class:`~snocat_proto._wire.limits.Limits`: ``max_sniff_bytes``,
``max_http_header_bytes``, ``max_proxy_header_bytes`` (bytes), ``sniff_timeout`` (time,
the binding's clock: it calls :meth:`VisitorStart.timed_out`) and
``max_sniffing_visitors`` (the binding counts them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from .._wire.errors import LocalProtocolError
from .._wire.http_host import (
    HTTP2Preface,
    RequestHead,
    RequestHeadError,
    RequestHeadParser,
    RequestHeadTooLarge,
    http_error_response,
)
from .._wire.limits import Limits
from .._wire.names import TunnelDomain
from .._wire.peek import NeedMore
from .._wire.proxy_protocol import (
    V1_PREFIX,
    V2_SIGNATURE,
    ProxyAddresses,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
)
from .._wire.sni import (
    ClientHelloError,
    ClientHelloParser,
    ClientHelloTooLarge,
    ServerNameFound,
    encode_unrecognized_name_alert,
)

__all__ = [
    "FAILURES",
    "REFUSAL_LINGER_BYTES",
    "REFUSAL_LINGER_SECONDS",
    "Failure",
    "Forward",
    "ListenerKind",
    "ProxyHeaderGuard",
    "ProxyHeaderRefused",
    "Refuse",
    "TrustedNetworks",
    "VisitorStart",
    "refusal",
]

#: After a refusal the aggregator half-closes, then reads and drops what the visitor
#: still sends, for at most this long and this many bytes, before it closes: closing a
#: socket with unread data sends a TCP reset, which can destroy the reply before the
#: visitor reads it (a 431 to a head larger than what was read).
REFUSAL_LINGER_SECONDS = 2.0
REFUSAL_LINGER_BYTES = 64 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListenerKind(Enum):
    """A public listener: a tunnel's own port, or a shared one routing by name."""

    PORT = "port"
    HTTP = "http"
    TLS = "tls"


class Failure(Enum):
    """Why a visitor was not forwarded: the ``reason`` label of
    ``snocat_name_routing_failures_total``."""

    #: The host names no tunnel: outside the domain, the bare domain, two labels, a
    #: name no token lists and no tunnel has (HTTP 404; TLS alert).
    UNKNOWN_NAME = "unknown_name"
    #: A name the tokens list whose tunnel is not connected (502; alert).
    OFFLINE = "offline"
    #: The tunnel is up but publishes no HTTP (or TLS) target by name (502; alert).
    NO_SERVICE = "no_service"
    #: The client refused the stream: its target did not answer (502; alert).
    REFUSED = "refused"
    #: A ClientHello without SNI (alert).
    NO_NAME = "no_name"
    #: Not HTTP/1.x or not TLS, a malformed head or ClientHello (400; closed).
    BAD_REQUEST = "bad_request"
    #: Over ``max_http_header_bytes`` (431) or ``max_sniff_bytes`` (closed).
    TOO_LARGE = "too_large"
    #: Nothing decided within ``sniff_timeout`` (408 to a partial head; else closed).
    TIMEOUT = "timeout"
    #: ``max_sniffing_visitors`` were being read already (503; closed).
    BUSY = "busy"
    #: A PROXY header from a peer not trusted to send one, or a missing or malformed
    #: one from a trusted load balancer (closed).
    PROXY_HEADER = "proxy_header"
    #: The aggregator is shutting down (503; closed).
    SHUTTING_DOWN = "shutting_down"


#: Every reason, in the order the metrics export them (each from the start, at 0).
FAILURES: tuple[Failure, ...] = tuple(Failure)


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward this visitor: to the tunnel ``name`` (a shared listener; lower-case)
    or the listener's own tunnel (``name`` None), ``data`` first (what was read, less a
    PROXY header: possibly nothing), then whatever follows.  ``visitor``: its address
    and the public address it reached; ``host``: the host it asked for."""

    name: str | None
    host: str | None
    visitor: ProxyAddresses
    data: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward: send ``reply`` (maybe nothing), then close gracefully."""

    failure: Failure
    reply: bytes
    #: What happened, for the log (never sent).
    detail: str


class TrustedNetworks:
    """``--accept-proxy-protocol-from``: the networks whose connections must start
    with a PROXY protocol header.  ``bool()`` is whether any is configured."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str | Network] = ()) -> None:
        parsed: list[Network] = []
        for network in networks:
            if isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                parsed.append(network)
                continue
            try:
                parsed.append(ipaddress.ip_network(str(network), strict=False))
            except ValueError:
                raise LocalProtocolError(
                    f"--accept-proxy-protocol-from {str(network)[:64]!r} is not an IP "
                    "network (e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)"
                ) from None
        self._networks = tuple(parsed)

    @property
    def networks(self) -> tuple[Network, ...]:
        return self._networks

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``address`` (an IPv4-mapped IPv6 address counts as IPv4) is in one."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedNetworks) and other._networks == self._networks

    def __hash__(self) -> int:
        return hash(self._networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self._networks]!r})"


class ProxyHeaderRefused(ProxyHeaderError):
    """A connection from a peer not trusted to send a PROXY header starts with one."""


class ProxyHeaderGuard:
    """Refuses a connection that starts with a PROXY header, letting every other byte
    through at once.

    For a per-tunnel port, from peers outside ``--accept-proxy-protocol-from``: the
    visitor's bytes are forwarded as they come (a protocol whose server speaks first
    must not wait), except while they are still a prefix of ``PROXY `` or of the v2
    signature (at most 11 bytes held)."""

    __slots__ = ("_decided", "_held")

    def __init__(self) -> None:
        self._held = b""
        self._decided = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward now (maybe none); :class:`ProxyHeaderRefused` if the
        connection starts with a PROXY header."""
        if self._decided:
            return data
        held = self._held + data
        if _starts_with_proxy_header(held):
            self._held = b""
            self._decided = True
            raise ProxyHeaderRefused(
                "the connection starts with a PROXY protocol header, from an address "
                "--accept-proxy-protocol-from does not list"
            )
        if _could_start_proxy_header(held):
            self._held = held
            return b""
        self._held = b""
        self._decided = True
        return held

    def end(self) -> bytes:
        """The visitor ended its sending: what was held, to forward before the end."""
        held, self._held = self._held, b""
        self._decided = True
        return held


def _starts_with_proxy_header(data: bytes) -> bool:
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def _could_start_proxy_header(data: bytes) -> bool:
    return V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data)


class _Stage(Enum):
    PROXY_HEADER = "proxy header"
    SNIFF = "sniff"
    DONE = "done"


class VisitorStart:
    """What to do with one visitor of a public listener; see the module docstring.

    ``connection``: the TCP connection's own endpoints (its peer as ``source``, our
    listening address as ``destination``).  ``trusted``: the peer is a load balancer
    that must send a PROXY header; ``guard``: (not trusted) a PROXY header must be
    refused.  Call :meth:`start` first; while it answers None, read (at most
    :attr:`read_size` bytes) and feed :meth:`receive_data`, :meth:`receive_eof` or,
    at ``sniff_timeout``, :meth:`timed_out`, until one answers."""

    def __init__(
        self,
        kind: ListenerKind,
        *,
        limits: Limits,
        connection: ProxyAddresses,
        domain: TunnelDomain | None = None,
        trusted: bool = False,
        guard: bool = False,
    ) -> None:
        if kind is not ListenerKind.PORT and domain is None:
            raise LocalProtocolError("a shared listener needs the domain it serves")
        self.kind = kind
        self._limits = limits
        self._domain = domain
        self._visitor = connection
        self._guard = guard and not trusted
        self._data = bytearray()
        self._sniffer: ClientHelloParser | RequestHeadParser | None = None
        self._proxy: ProxyHeaderParser | None = None
        if trusted:
            self._stage = _Stage.PROXY_HEADER
            self._proxy = ProxyHeaderParser(limits=limits)
        else:
            self._stage = _Stage.SNIFF
            self._begin_sniffing()

    @property
    def read_size(self) -> int:
        """How many bytes to read next: enough for the rest of the current bound,
        so that what is kept never passes it by more than one byte."""
        if self._stage is _Stage.PROXY_HEADER:
            return self._limits.max_proxy_header_bytes + 1
        if self.kind is ListenerKind.TLS:
            return self._limits.max_sniff_bytes + 1
        return self._limits.max_http_header_bytes + 1

    @property
    def guarding(self) -> bool:
        """Whether the forwarded bytes of a per-tunnel port go through a
        :class:`ProxyHeaderGuard` (the binding's relay applies it)."""
        return self.kind is ListenerKind.PORT and self._guard

    def start(self) -> Forward | None:
        """The decision when no byte is needed: a per-tunnel port whose peer owes no
        PROXY header is forwarded at once (a server may speak first)."""
        if self._stage is _Stage.SNIFF and self.kind is ListenerKind.PORT:
            return self._forward(None, None)
        return None

    def receive_data(self, data: bytes) -> Forward | Refuse | None:
        """Feed what was read; the decision, or None: read more."""
        if self._stage is _Stage.DONE:
            raise LocalProtocolError("the visitor's start was decided already")
        if not data:
            return None
        self._data += data
        if self._stage is _Stage.PROXY_HEADER:
            return self._read_proxy_header(data)
        return self._sniff(data)

    def receive_eof(self) -> Forward | Refuse:
        """The visitor ended its sending before a decision."""
        if self._stage is _Stage.DONE:
            raise LocalProtocolError("the visitor's start was decided already")
        self._stage = _Stage.DONE
        if self._proxy is not None and not self._proxy.done:
            return self._refuse_proxy("the connection ended before its PROXY protocol header")
        if self.kind is ListenerKind.PORT:
            return self._forward(None, None)  # after a header: an empty connection
        return self._refuse(
            Failure.BAD_REQUEST,
            f"the connection ended after {len(self._data)} bytes, before a decision",
            reply=False,
        )

    def timed_out(self) -> Refuse:
        """``sniff_timeout`` passed without a decision."""
        partial = bool(self._data)
        self._stage = _Stage.DONE
        seconds = f"{self._limits.sniff_timeout:g}"
        detail = f"nothing decided within {seconds} s ({len(self._data)} bytes read)"
        if self.kind is ListenerKind.HTTP and partial and self._sniffer is not None:
            reply = http_error_response(
                408, "Request Timeout", f"no complete request head within {seconds} s"
            )
            return Refuse(Failure.TIMEOUT, reply, detail)
        return Refuse(Failure.TIMEOUT, b"", detail)

    # The stages ---------------------------------------------------------------------

    def _begin_sniffing(self) -> None:
        if self.kind is ListenerKind.TLS:
            self._sniffer = ClientHelloParser(limits=self._limits)
        elif self.kind is ListenerKind.HTTP:
            self._sniffer = RequestHeadParser(limits=self._limits)

    def _read_proxy_header(self, data: bytes) -> Forward | Refuse | None:
        assert self._proxy is not None
        try:
            result = self._proxy.feed(data)
        except ProxyHeaderError as exc:
            return self._refuse_proxy(f"a trusted peer sent no valid PROXY header: {exc.reason}")
        if isinstance(result, NeedMore):
            return None
        self._take_header(result)
        self._stage = _Stage.SNIFF
        self._begin_sniffing()
        if self.kind is ListenerKind.PORT:
            return self._forward(None, None)
        return self._sniff(bytes(self._data)) if self._data else None

    def _take_header(self, header: ProxyHeader) -> None:
        if header.addresses is not None:
            self._visitor = header.addresses
        del self._data[: header.size]

    def _sniff(self, data: bytes) -> Forward | Refuse | None:
        if self._guard and self.kind is not ListenerKind.PORT:
            if _starts_with_proxy_header(bytes(self._data)):
                return self._refuse_proxy(
                    "the connection starts with a PROXY protocol header, from an address "
                    "--accept-proxy-protocol-from does not list"
                )
            if _could_start_proxy_header(bytes(self._data)):
                return None
            # Decided: not a header.  The parser gets every byte so far (at most 11
            # were held back, none of them fed yet).
            self._guard = False
            data = bytes(self._data)
        assert self._sniffer is not None
        try:
            result = self._sniffer.feed(data)
        except ClientHelloError as exc:
            failure = (
                Failure.TOO_LARGE if isinstance(exc, ClientHelloTooLarge) else Failure.BAD_REQUEST
            )
            return self._refuse(failure, f"no ClientHello to route by: {exc.reason}", reply=False)
        except RequestHeadError as exc:
            return self._refuse_head(exc)
        if isinstance(result, NeedMore):
            return None
        if isinstance(result, ServerNameFound):
            return self._route(result.server_name)
        assert isinstance(result, RequestHead)
        return self._route(result.route_host)

    def _route(self, host: str | None) -> Forward | Refuse:
        if host is None:
            return self._refuse(Failure.NO_NAME, "the ClientHello names no server (no SNI)")
        assert self._domain is not None
        name = self._domain.name_for(host)
        if name is None:
            return refusal(self.kind, Failure.UNKNOWN_NAME, host=host)
        return self._forward(name, host)

    def _forward(self, name: str | None, host: str | None) -> Forward:
        self._stage = _Stage.DONE
        return Forward(name=name, host=host, visitor=self._visitor, data=bytes(self._data))

    def _refuse(self, failure: Failure, detail: str, *, reply: bool = True) -> Refuse:
        self._stage = _Stage.DONE
        if not reply:
            return Refuse(failure, b"", detail)
        return refusal(self.kind, failure, detail=detail)

    def _refuse_proxy(self, detail: str) -> Refuse:
        self._stage = _Stage.DONE
        return Refuse(Failure.PROXY_HEADER, b"", detail)

    def _refuse_head(self, error: RequestHeadError) -> Refuse:
        self._stage = _Stage.DONE
        if isinstance(error, HTTP2Preface):
            # An HTTP/1.1 reply means nothing to an HTTP/2 client (3.14.4).
            return Refuse(Failure.BAD_REQUEST, b"", error.reason)
        if isinstance(error, RequestHeadTooLarge):
            reply = http_error_response(
                431,
                "Request Header Fields Too Large",
                f"the request head is larger than {self._limits.max_http_header_bytes} bytes",
            )
            return Refuse(Failure.TOO_LARGE, reply, error.reason)
        reply = http_error_response(error.status, "Bad Request", error.reason)
        return Refuse(Failure.BAD_REQUEST, reply, error.reason)


_SERVICE_NAMES = {ListenerKind.HTTP: "HTTP", ListenerKind.TLS: "TLS"}


def refusal(
    kind: ListenerKind,
    failure: Failure,
    *,
    name: str | None = None,
    host: str | None = None,
    detail: str = "",
) -> Refuse:
    """How ``kind``'s listener refuses a visitor for ``failure`` (3.14.4): the HTTP
    response naming the problem, the TLS alert, or nothing (a plain close)."""
    service = _SERVICE_NAMES.get(kind, "")
    messages = {
        Failure.UNKNOWN_NAME: (
            (404, "Not Found", f"no tunnel named {name}")
            if name is not None
            else (404, "Not Found", f"no tunnel at {host}")
        ),
        Failure.OFFLINE: (502, "Bad Gateway", f"tunnel {name} is offline"),
        Failure.NO_SERVICE: (502, "Bad Gateway", f"tunnel {name} publishes no {service} service"),
        Failure.REFUSED: (
            502,
            "Bad Gateway",
            f"tunnel {name} could not reach its {service} target",
        ),
        Failure.BUSY: (503, "Service Unavailable", "too many connections are starting; try again"),
        Failure.SHUTTING_DOWN: (503, "Service Unavailable", "the aggregator is shutting down"),
    }
    text = detail or (messages[failure][2] if failure in messages else failure.value)
    if kind is ListenerKind.HTTP and failure in messages:
        status, reason, message = messages[failure]
        return Refuse(failure, http_error_response(status, reason, message), text)
    if kind is ListenerKind.HTTP and failure is Failure.BAD_REQUEST:
        return Refuse(failure, http_error_response(400, "Bad Request", text), text)
    if kind is ListenerKind.TLS and failure in _ALERTED:
        return Refuse(failure, encode_unrecognized_name_alert(), text)
    return Refuse(failure, b"", text)


#: The TLS refusals that get the ``unrecognized_name`` alert (3.14.4): the ClientHello
#: was fine, but its name reaches no connected tunnel.
_ALERTED = frozenset(
    {
        Failure.UNKNOWN_NAME,
        Failure.OFFLINE,
        Failure.NO_SERVICE,
        Failure.REFUSED,
        Failure.NO_NAME,
    }
)
