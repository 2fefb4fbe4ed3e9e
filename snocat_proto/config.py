"""Every bound and timeout of the core, in one typed place.

The defaults are safe for an aggregator that faces the internet; values that the
snocat 0.8 reference fixes on the wire (the 2048-byte address limit, the 256-byte
``proxyme`` subject) are the defaults here too, so the compat profile holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LocalProtocolError

#: The reference acceptor refuses route addresses longer than this.
COMPAT_MAX_ADDRESS_SIZE = 2048
#: The reference ``proxyme`` server reads at most this many bytes of the subject.
COMPAT_MAX_PROXYME_SUBJECT_SIZE = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on what one tunnel may buffer or be sent."""

    #: Largest route address (the NYAN address frame's payload), in bytes.
    max_address_size: int = COMPAT_MAX_ADDRESS_SIZE
    #: Largest frame of any other kind (the proxyme response and grant).
    max_frame_size: int = 64 * 1024
    #: Largest authentication message (token response, result), in bytes.
    max_auth_message_size: int = 1024
    #: Largest ``proxyme`` subject the server reads.
    max_proxyme_subject_size: int = COMPAT_MAX_PROXYME_SUBJECT_SIZE
    #: Bidirectional streams the peer may have open at once (QUIC MAX_STREAMS).
    max_streams_per_tunnel: int = 256
    #: Streams the peer opened whose route decision the application has not made yet.
    #: As many as the peer may open: a forwarded burst waits for its local connects
    #: rather than being reset; bounded by max_streams_per_tunnel all the same.
    max_pending_requests: int = 256
    #: Bytes one stream may hold unacknowledged in its send buffer.
    stream_send_buffer: int = 256 * 1024
    #: Bytes all streams of one tunnel may hold unacknowledged together.
    tunnel_send_buffer: int = 4 * 1024 * 1024
    #: Receive window of one stream: bytes the peer may send before we consume them.
    stream_receive_window: int = 256 * 1024
    #: Receive window of the whole tunnel.
    tunnel_receive_window: int = 4 * 1024 * 1024
    #: Seconds from the tunnel's first packet to a completed authentication (the QUIC
    #: handshake included): a peer that stalls anywhere before that is dropped.
    auth_timeout: float = 10.0
    #: Seconds a stream may take to finish its NYAN negotiation.
    negotiation_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not value > 0:
                raise LocalProtocolError(f"Limits.{name} must be positive, not {value!r}")
        if self.stream_send_buffer > self.tunnel_send_buffer:
            raise LocalProtocolError("stream_send_buffer may not exceed tunnel_send_buffer")
        if self.stream_receive_window > self.tunnel_receive_window:
            raise LocalProtocolError("stream_receive_window may not exceed tunnel_receive_window")
