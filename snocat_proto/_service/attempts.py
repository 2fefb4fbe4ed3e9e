"""How a client's connection attempt ended, and whether another attempt can help.

Shared by every binding's client, so that both tell a user the same thing: a
rejected credential or an untrusted certificate is fatal (retrying cannot fix it),
silence or a lost tunnel is worth another attempt.  Each verdict is an
:class:`AttemptEnd` that names the error class a binding raises (:class:`ErrorKind`)
and its message; the binding maps the kind to its own exception types.

Also here: the tunnel an attempt dials, as a :class:`ClientConfig` describes it
(:func:`connect_tunnel`, the client's counterpart of the server's
``server_endpoint``), and the certificate pin check that runs as the handshake
completes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum, auto

from .._wire.auth import connect_authenticator
from .._wire.certificates import (
    describe_verification_failure,
    fingerprint,
    install_trust,
    parse_fingerprint,
)
from .._wire.codes import CloseCode
from .._wire.engine import QuicErrorCode, quic_configuration
from .._wire.events import ConnectionTerminated
from .._wire.network import NetworkAddress
from .._wire.tunnel import TunnelConnection
from .config import ClientConfig

__all__ = [
    "AttemptEnd",
    "ErrorKind",
    "check_pinned_certificate",
    "connect_tunnel",
    "diagnose_early_close",
    "enforce_pin",
    "local_socket_failure",
    "lost_tunnel",
    "no_answer",
    "port_refused",
    "unreachable",
    "unresolvable",
]

#: aioquic closes a failed TLS handshake with CRYPTO_ERROR (0x100) plus the alert number.
CRYPTO_ERROR_FIRST = 0x100
CRYPTO_ERROR_LAST = 0x1FF


def connect_tunnel(config: ClientConfig, address: NetworkAddress, now: float) -> TunnelConnection:
    """The Connect side of one attempt: QUIC settings, trust, key log and credentials
    from ``config``, dialling ``address`` (its first datagrams are ready at once)."""
    configuration = quic_configuration(
        is_client=True,
        limits=config.limits,
        server_name=config.server_name,
        idle_timeout=config.idle_timeout,
        max_datagram_size=config.datagram_size,
        path_mtu_discovery=config.path_mtu_discovery,
        datagrams=config.datagrams,
    )
    install_trust(configuration, authority_pem=config.authority_pem, pinned=config.fingerprint)
    if config.secrets_log_file is not None:
        configuration.secrets_log_file = config.secrets_log_file
    return TunnelConnection.connect(
        configuration,
        address=address,
        authenticator=connect_authenticator(
            config.credentials, limits=config.limits, features=config.features
        ),
        limits=config.limits,
        now=now,
        keepalive_interval=config.keepalive_interval,
    )


class ErrorKind(Enum):
    """Which error a binding raises for an :class:`AttemptEnd`."""

    #: The aggregator cannot give a target the public port it needs.
    PORT = auto()
    #: The credential was refused, or the schemes differ.
    AUTHENTICATION = auto()
    #: The aggregator was not reached or not trusted.
    CONNECT = auto()
    #: An authenticated tunnel was lost (``code`` and ``close_reason`` say how).
    TUNNEL_CLOSED = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptEnd:
    """One attempt's end: retry it (unless ``fatal``), or raise ``kind(message)``."""

    fatal: bool
    kind: ErrorKind
    message: str
    #: One line for logs and the ``Reconnecting`` activity.
    reason: str
    #: Nothing answered at the address tried: the next attempt tries the next one.
    no_answer: bool = False
    #: For :attr:`ErrorKind.TUNNEL_CLOSED`: the close code and reason.
    code: int = 0
    close_reason: str = ""


def check_pinned_certificate(tunnel: TunnelConnection, pinned: str) -> str | None:
    """None if the peer's certificate has the SHA-256 fingerprint ``pinned``, else why not.

    aioquic has no hook for pinning: the configuration skips chain verification
    (:func:`~snocat_proto.certificates.install_trust` with ``pinned``) and this runs
    once the handshake completed, before any authentication byte is sent.
    """
    expected = parse_fingerprint(pinned)
    certificate = tunnel.peer_certificate
    if certificate is None:
        return "certificate fingerprint mismatch: the aggregator presented no certificate"
    actual = fingerprint(certificate)
    if actual != expected:
        return f"certificate fingerprint mismatch: expected {expected}, the aggregator has {actual}"
    return None


def unresolvable(host: str, detail: str) -> AttemptEnd:
    """The aggregator's host name did not resolve (retryable: DNS may come back)."""
    reason = f"cannot resolve {host}: {detail}"
    return AttemptEnd(
        fatal=False,
        kind=ErrorKind.CONNECT,
        message=f"{reason}; check the aggregator's host name",
        reason=reason,
    )


def local_socket_failure(server_label: str, detail: str) -> AttemptEnd:
    """No UDP socket could be opened for the attempt (fatal: nothing remote to retry)."""
    return _fatal(ErrorKind.CONNECT, f"cannot open a UDP socket for {server_label}: {detail}")


def no_answer(server_label: str, detail: str) -> AttemptEnd:
    """Nothing answered at ``server_label`` (``detail``: for how long, or the close)."""
    reason = f"no answer from {server_label} {detail}"
    return AttemptEnd(
        fatal=False,
        kind=ErrorKind.CONNECT,
        message=f"{reason}: is the aggregator running there, and is UDP allowed through?",
        reason=reason,
        no_answer=True,
    )


def port_refused(target: object, reason: str) -> AttemptEnd:
    """The aggregator denied ``target`` its public port and waiting cannot help (the
    port asked for is outside its range, or the client does not retry)."""
    return _fatal(ErrorKind.PORT, f"no public port for {target}: {reason}")


def unreachable(server_label: str, detail: str) -> AttemptEnd:
    """The network said that nothing listens at ``server_label`` (an ICMP port or
    host unreachable, before any answer): worth another attempt, the next address."""
    reason = f"nothing answers at {server_label}: {detail}"
    return AttemptEnd(
        fatal=False,
        kind=ErrorKind.CONNECT,
        message=f"{reason}; is the aggregator running there (its --quic address)?",
        reason=reason,
        no_answer=True,
    )


def diagnose_early_close(
    closed: ConnectionTerminated,
    *,
    handshake_done: bool,
    pin_problem: str | None,
    server_label: str,
    server_name: str,
) -> AttemptEnd:
    """A tunnel that closed before authentication: fatal, or worth another attempt."""
    if pin_problem is not None:
        return _fatal(
            ErrorKind.CONNECT,
            f"{pin_problem}; check --fingerprint against the aggregator's certificate",
        )
    if closed.application and closed.code == CloseCode.AUTHENTICATION_FAILED:
        # The core's reasons already say what to change, on either side.
        who = "the aggregator refused authentication" if closed.by_peer else "authentication failed"
        reason = closed.reason or (
            "no reason given; check the tunnel name and token, and that both sides use "
            "the same authentication scheme"
        )
        return _fatal(ErrorKind.AUTHENTICATION, f"{who}: {reason}")
    if not closed.application and CRYPTO_ERROR_FIRST <= closed.code <= CRYPTO_ERROR_LAST:
        alert = closed.code - CRYPTO_ERROR_FIRST
        detail = describe_verification_failure(closed.reason) or f"TLS alert {alert}"
        if closed.by_peer:
            return _fatal(
                ErrorKind.CONNECT,
                f"the aggregator at {server_label} aborted the TLS handshake "
                f"({detail}); is it a snocat aggregator (ALPN ms-snocat-1)?",
            )
        return _fatal(
            ErrorKind.CONNECT,
            f"the aggregator's certificate is not trusted ({detail}): pass the "
            "certificate or CA that signed it with --authority, pin it with "
            f"--fingerprint, or check that it is issued for {server_name!r} (--san)",
        )
    if (
        closed.by_peer
        and not closed.application
        and closed.code == QuicErrorCode.CONNECTION_REFUSED
    ):
        # E.g. over the aggregator's handshake rate: worth another attempt, later.
        reason = (
            f"the aggregator at {server_label} refused the connection: "
            f"{closed.reason or 'no reason given'}"
        )
        return AttemptEnd(fatal=False, kind=ErrorKind.CONNECT, message=reason, reason=reason)
    detail = f"(code {closed.code:#x}): {closed.reason or 'no reason given'}"
    if not handshake_done:
        return no_answer(server_label, detail)
    reason = f"tunnel closed before authentication {detail}"
    return AttemptEnd(
        fatal=False,
        kind=ErrorKind.CONNECT,
        message=f"{reason}; connecting to {server_label}",
        reason=reason,
    )


def lost_tunnel(closed: ConnectionTerminated) -> AttemptEnd:
    """An authenticated tunnel closed: retryable, unless the aggregator withdrew the
    credential (its token was revoked or changed) or another client took the name
    over, which another attempt cannot fix."""
    if closed.application and closed.code == CloseCode.AUTHENTICATION_FAILED:
        return _fatal(
            ErrorKind.AUTHENTICATION,
            f"the aggregator withdrew this tunnel's credential: {closed.reason}",
        )
    if closed.application and closed.code == CloseCode.TAKEN_OVER:
        # Reconnecting would take the name back from the client that has it now.
        end = _fatal(ErrorKind.TUNNEL_CLOSED, closed.reason)
        return replace(end, code=closed.code, close_reason=closed.reason)
    return AttemptEnd(
        fatal=False,
        kind=ErrorKind.TUNNEL_CLOSED,
        message=closed.reason,
        reason=f"tunnel closed (code {closed.code:#x}): {closed.reason or 'no reason given'}",
        code=closed.code,
        close_reason=closed.reason,
    )


def _fatal(kind: ErrorKind, message: str) -> AttemptEnd:
    return AttemptEnd(fatal=True, kind=kind, message=message, reason=message)


def enforce_pin(tunnel: TunnelConnection, pinned: str | None) -> str | None:
    """After the handshake: if ``pinned`` is set and the aggregator's certificate does
    not match it, close the tunnel (:attr:`CloseCode.REFUSED`) and say why (the
    binding then flushes the tunnel); None if there is nothing wrong."""
    if pinned is None:
        return None
    problem = check_pinned_certificate(tunnel, pinned)
    if problem is not None:
        tunnel.close(CloseCode.REFUSED, problem)
    return problem
