"""The one seam between snocat and its QUIC engine (aioquic).

Everything the rest of the core needs from aioquic is imported from here, so that
another engine with the same sans-IO surface (qh3) can be offered by changing this
module alone.  It also repairs the one thing aioquic does not do for us: receive
flow control.  aioquic doubles its receive windows whenever the peer has used half
of them, whether or not the application consumed the data, so a slow reader lets a
fast sender grow memory without bound (aioquic issue 328 is the send-side twin).
:class:`QuicEngine` grants credit only for data the application acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    TRANSPORT_CLOSE_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import (
    PACKET_NUMBER_SEND_SIZE,
    QuicDeliveryState,
    QuicPacketBuilder,
)
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStream
from cryptography import x509

from .limits import Limits
from .path_mtu import BASE_DATAGRAM_SIZE, PathMtuSearch

__all__ = [
    "ALPN",
    "DATAGRAM_FRAME_SIZE",
    "SMALLEST_MAX_DATAGRAM_SIZE",
    "EngineConfiguration",
    "NetworkAddress",
    "PacketHeader",
    "QuicConfiguration",
    "QuicEngine",
    "QuicErrorCode",
    "RetryTokens",
    "encode_initial_close",
    "encode_version_negotiation",
    "parse_packet_header",
    "quic_configuration",
    "quic_events",
]

#: The only ALPN either snocat side offers (snocat 0.8 compat).
ALPN = "ms-snocat-1"

#: The ``max_datagram_frame_size`` transport parameter we send when DATAGRAM frames are
#: on (RFC 9221 recommends 65535: "any DATAGRAM frame that fits in a packet").
DATAGRAM_FRAME_SIZE = 65535
#: The AEAD tag of every QUIC version 1 packet protection (RFC 9001 section 5.3).
AEAD_TAG_SIZE = 16

#: How far in the past :meth:`QuicEngine.acknowledge_now` puts an ACK's due time.
ACK_OVERDUE = 0.001

#: How far past a due time-threshold loss check looks again, when rounding kept the
#: packet that armed it from being declared lost (see QuicEngine.handle_timer).
LOSS_TIME_SLACK = 1e-6

#: Every private name of aioquic that snocat relies on, by what it is read from.  This
#: module is the only one that touches them (ruff's SLF001 keeps it so), and
#: tests/test_aioquic_compat.py checks each on a live connection: an aioquic release
#: that renames one fails there, naming it.  pyproject.toml pins aioquic to the
#: releases that test passes on.
AIOQUIC_PRIVATES: dict[str, tuple[str, ...]] = {
    "aioquic.quic.connection.QuicConnection": (
        "_close_event",
        "_crypto_buffers",
        "_cryptos",
        "_datagrams_pending",
        "_discard_epoch",
        "_handshake_complete",
        "_host_cids",
        "_idle_timeout",
        "_is_client",
        "_local_active_connection_id_limit",
        "_local_max_data",
        "_local_max_streams_bidi",
        "_local_max_streams_uni",
        "_loss",
        "_max_datagram_size",
        "_network_paths",
        "_packet_number",
        "_parse_transport_parameters",
        "_peer_cid",
        "_QuicConnection__frame_handlers",
        "_remote_max_datagram_frame_size",
        "_spaces",
        "_spin_bit",
        "_state",
        "_stream_is_discarded",
        "_streams",
        "_version",
        "_write_connection_limits",
        "_write_stream_limits",
    ),
    "aioquic.quic.connection.QuicConnection.tls": ("_peer_certificate",),
    "aioquic.quic.recovery.QuicPacketRecovery": (
        "_cc",
        "_get_loss_space",
        "_pacer",
        "_time_of_last_sent_ack_eliciting_packet",
    ),
    "aioquic.quic.recovery.QuicPacketPacer": ("_max_datagram_size",),
    "aioquic.quic.congestion.base.QuicCongestionControl": ("_max_datagram_size",),
    "aioquic.quic.stream.QuicStreamSender": ("_buffer", "_buffer_fin", "_reset_error_code"),
    "aioquic.asyncio.protocol.QuicConnectionProtocol": ("_quic",),
    "aioquic._buffer": ("Buffer",),
}

#: aioquic builds a table of frame handlers per connection with a new frozenset of
#: epochs in each entry; the same few sets, shared, save kilobytes per connection.
_SHARED_EPOCH_SETS: dict[frozenset[Any], frozenset[Any]] = {}


@dataclass
class EngineConfiguration(QuicConfiguration):
    """aioquic's configuration, and what :class:`QuicEngine` adds to it."""

    #: Path MTU discovery (RFC 8899) grows datagrams from 1200 B up to this size (None:
    #: off, every datagram is ``max_datagram_size``).
    path_mtu_ceiling: int | None = None


def quic_configuration(
    *,
    is_client: bool,
    limits: Limits,
    server_name: str | None = None,
    idle_timeout: float = 30.0,
    max_datagram_size: int = SMALLEST_MAX_DATAGRAM_SIZE,
    alpn_protocols: Sequence[str] = (ALPN,),
    datagrams: bool = False,
    path_mtu_discovery: bool = False,
) -> EngineConfiguration:
    """A QUIC configuration with snocat's ALPN (an aggregator node of a fleet also
    offers the node-to-node one) and windows; certificates are the caller's.

    ``datagrams`` sends the ``max_datagram_frame_size`` transport parameter (RFC 9221),
    which the ``udp-datagrams`` addition needs (docs/protocol.md 3.17).  It goes out in
    the handshake, before any authentication, so only a side that can agree on that
    addition turns it on (:func:`~snocat_proto._wire.udp_flows.advertise_datagrams`):
    off, the transport parameters are exactly the compat profile's.

    ``path_mtu_discovery`` makes ``max_datagram_size`` a ceiling: datagrams start at
    1200 B and grow as probes show the path carries more (:mod:`.path_mtu`).  The
    probes are PING and PADDING frames, so nothing on the wire changes."""
    discover = path_mtu_discovery and max_datagram_size > BASE_DATAGRAM_SIZE
    return EngineConfiguration(
        alpn_protocols=list(alpn_protocols),
        supported_versions=[QuicProtocolVersion.VERSION_1],  # snocat 0.8 speaks v1 only
        is_client=is_client,
        server_name=server_name,
        idle_timeout=idle_timeout,
        max_datagram_size=BASE_DATAGRAM_SIZE if discover else max_datagram_size,
        max_stream_data=limits.stream_receive_window,
        max_data=min(limits.pre_auth_receive_window, limits.tunnel_receive_window),
        max_datagram_frame_size=DATAGRAM_FRAME_SIZE if datagrams else None,
        path_mtu_ceiling=max_datagram_size if discover else None,
    )


class QuicEngine(QuicConnection):
    """aioquic's connection, with receive credit granted only for consumed data."""

    def __init__(self, *, configuration: QuicConfiguration, limits: Limits, **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        self._limits = limits
        self._stream_window = configuration.max_stream_data
        self._connection_window = configuration.max_data
        self._consumed: dict[int, int] = {}
        self._consumed_total = 0
        self._set_peer_stream_limit(limits.pre_auth_max_streams)
        # We use no unidirectional streams: a peer that opens one breaks the limit.
        self._local_max_streams_uni.value = self._local_max_streams_uni.sent = 0
        self._local_active_connection_id_limit = limits.active_connection_id_limit
        self._datagrams_on = configuration.max_datagram_frame_size is not None
        #: DATAGRAM payloads dropped from the send queue because they no longer fit a
        #: packet (the path's datagram size shrank after they were queued), or because
        #: the peer takes none (queued with aioquic's own, unchecked, call).
        self.stranded_datagrams = 0
        self._share_frame_handler_epochs()
        ceiling = getattr(configuration, "path_mtu_ceiling", None)
        #: Path MTU discovery, when it is on (:mod:`.path_mtu`).
        self.path_mtu: PathMtuSearch | None = (
            None if ceiling is None else PathMtuSearch(ceiling=ceiling, limits=limits)
        )

    # Memory per connection ---------------------------------------------------

    def _share_frame_handler_epochs(self) -> None:
        handlers = self.__dict__.get("_QuicConnection__frame_handlers")
        if handlers is None:  # another aioquic layout: nothing to share
            return
        for frame_type, (handler, epochs) in handlers.items():
            handlers[frame_type] = (handler, _SHARED_EPOCH_SETS.setdefault(epochs, epochs))

    def _discard_epoch(self, epoch: tls.Epoch) -> None:
        super()._discard_epoch(epoch)
        if epoch is not tls.Epoch.HANDSHAKE:
            return
        # Both sides discard the Handshake keys once the handshake is confirmed
        # (RFC 9001 section 4.9.2): the Initial and Handshake buffers will not be
        # written again and 1-RTT CRYPTO data is at most a session ticket.
        buffers = self._crypto_buffers
        for kind in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
            buffers[kind] = Buffer(capacity=0)
        if buffers[tls.Epoch.ONE_RTT].tell() == 0:
            buffers[tls.Epoch.ONE_RTT] = Buffer(capacity=self._limits.post_handshake_crypto_buffer)

    # Credit and limits -------------------------------------------------------

    def open_windows(self, *, connection_window: int, max_streams: int) -> None:
        """Raise the windows to their authenticated size (they never shrink)."""
        self._connection_window = max(self._connection_window, connection_window)
        self._set_peer_stream_limit(max_streams)

    def acknowledge_received(self, stream_id: int, amount: int) -> None:
        """The application consumed ``amount`` bytes of the stream: the peer may send more."""
        self._consumed[stream_id] = self._consumed.get(stream_id, 0) + amount
        self._consumed_total += amount

    def release_stream(self, stream_id: int, received: int) -> int:
        """Return the connection credit of a stream the application is done with.

        Bytes the peer sent that will never be consumed (a reset, or data left unread
        when the stream closed) would otherwise shrink the connection window for good.
        Returns the stream offset credited up to: bytes below it that are delivered
        later (they arrived out of order) are already paid for.
        """
        consumed = self._consumed.pop(stream_id, 0)
        stream = self._streams.get(stream_id)
        if stream is not None:
            received = max(received, stream.receiver.highest_offset)
        self._consumed_total += max(0, received - consumed)
        return max(received, consumed)

    def credit_update_due(self, stream_id: int) -> bool:
        """Whether acknowledged data has made a window update worth sending now
        (MAX_STREAM_DATA for the stream, or MAX_DATA): then the caller should transmit.
        Otherwise the new credit waits for the next packet that goes out anyway."""
        stream = self._streams.get(stream_id)
        if (
            stream is not None
            and stream.max_stream_data_local
            and stream.max_stream_data_local - self._consumed.get(stream_id, 0)
            < self._stream_window // 2
        ):
            return True
        return self._local_max_data.value - self._consumed_total < self._connection_window // 2

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream that the peer has not acknowledged yet."""
        return send_buffered(self, stream_id)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented in the handshake (None before, or none)."""
        certificate = getattr(self.tls, "_peer_certificate", None)
        return certificate if isinstance(certificate, x509.Certificate) else None

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        if self._state in END_STATES:
            return
        space = self._loss._get_loss_space()
        if space is not None and space.loss_time is not None and space.loss_time <= now:
            # aioquic declares a packet lost if ``sent_time <= now - delay`` but times
            # it for ``sent_time + delay``: the two can disagree by a rounding error,
            # and the timer stays due with nothing lost.  A clock that does not move
            # between the calls (a simulation, a fuzz harness) would spin forever.
            self._loss.on_loss_detection_timeout(now=now + LOSS_TIME_SLACK)

    def acknowledge_now(self, now: float) -> None:
        """Send the pending ACK with the next datagrams, not after the ACK delay."""
        space = self._spaces[tls.Epoch.ONE_RTT]
        if space.ack_at is not None and space.ack_at >= now:
            # Strictly before ``now``: aioquic paces packets unless an ACK is overdue,
            # and a paced ACK due exactly now would keep its timer firing in place.
            space.ack_at = now - ACK_OVERDUE

    @property
    def idle_timeout(self) -> float:
        """The idle timeout in force: the shorter of both ends' (or 3 PTOs, if longer)."""
        return self._idle_timeout()

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # DATAGRAM frames (RFC 9221) ------------------------------------------------

    @property
    def datagrams_negotiated(self) -> bool:
        """Both ends sent ``max_datagram_frame_size``: DATAGRAM frames may flow both ways."""
        return self._datagrams_on and self._remote_max_datagram_frame_size is not None

    def max_datagram_payload(self) -> int:
        """The largest DATAGRAM payload that fits one packet to the peer now; 0 when
        the peer takes none.

        aioquic neither checks a datagram against the peer's limit nor drops one that
        can never fit a packet: that one stays at the head of its queue and every
        datagram after it waits forever.  So nothing larger than this is queued."""
        remote = self._remote_max_datagram_frame_size
        if remote is None:
            return 0
        # A 1-RTT packet: flags, the peer's connection ID, the packet number; the tag.
        overhead = 1 + len(self._peer_cid.cid) + PACKET_NUMBER_SEND_SIZE + AEAD_TAG_SIZE
        frame = min(self._max_datagram_size - overhead, remote)
        payload = frame - 1 - _varint_size(frame)  # type byte, length, payload
        while payload > 0 and 1 + _varint_size(payload) + payload > frame:
            payload -= 1
        return max(payload, 0)

    @property
    def datagrams_queued(self) -> int:
        """DATAGRAM payloads waiting for room in the congestion window."""
        return datagrams_queued(self)

    def send_datagram(self, data: bytes) -> None:
        """Queue a DATAGRAM frame; the caller checked :meth:`max_datagram_payload`."""
        self._datagrams_pending.append(data)

    def _drop_stranded_datagrams(self) -> None:
        pending = self._datagrams_pending
        limit = self.max_datagram_payload()
        while pending and len(pending[0]) > limit:
            pending.popleft()
            self.stranded_datagrams += 1

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        if self.path_mtu is not None:
            return self._datagrams_and_probes(now)
        return self._datagrams_to_send(now)

    def _datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        if self._datagrams_pending:
            self._drop_stranded_datagrams()
        paths = self._network_paths
        if self._is_client or not paths or paths[0].is_validated:
            return super().datagrams_to_send(now)
        # aioquic builds its CONNECTION_CLOSE without the 3x budget of an unvalidated
        # address (RFC 9000 section 8.1); hold every datagram to it, the close included.
        path = paths[0]
        budget = 3 * path.bytes_received - path.bytes_sent
        datagrams = super().datagrams_to_send(now)
        kept = []
        for datagram, addr in datagrams:
            if len(datagram) > budget:
                path.bytes_sent -= len(datagram)
                continue
            budget -= len(datagram)
            kept.append((datagram, addr))
        return kept

    # Path MTU discovery (RFC 8899; the search itself is path_mtu.py) -------------------

    def get_timer(self) -> float | None:
        timer = super().get_timer()
        search = self.path_mtu
        if search is None or self._state in END_STATES:
            return timer
        due = search.get_timer()
        if due is None:
            return timer
        return due if timer is None else min(timer, due)

    def _datagrams_and_probes(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        search = self.path_mtu
        assert search is not None
        probe: list[tuple[bytes, NetworkAddress]] = []
        if self._state not in END_STATES and self._handshake_complete and self._network_paths:
            search.start()
            size = search.probe_size(now)
            if size is not None and self._network_paths[0].is_validated:
                probe = self._send_path_mtu_probe(size, now)
        first = self._packet_number
        datagrams = self._datagrams_to_send(now)
        if self._max_datagram_size > search.base and self._packet_number > first:
            self._watch_full_size_packets(first)
        # The probe goes last: it never starts a GSO run that datagrams of the size in
        # use would join (a segment size the interface cannot carry fails the call).
        return datagrams + probe if probe else datagrams

    def _send_path_mtu_probe(self, size: int, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """One PING padded to ``size``, alone in its datagram, tracked for loss like
        any packet but not counted in flight: a lost probe says the path is too narrow,
        not congested (RFC 9000 section 14.4), and must not shrink the window."""
        crypto = self._cryptos[tls.Epoch.ONE_RTT]
        if not crypto.send.is_valid() or self._version is None:
            return []
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            spin_bit=self._spin_bit,
            version=self._version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        builder.start_frame(
            QuicFrameType.PING, handler=self._on_probe_delivery, handler_args=(size, now)
        )
        room = builder.remaining_buffer_space
        if room > 0:
            builder.start_frame(QuicFrameType.PADDING, capacity=room).push_bytes(bytes(room - 1))
        datagrams, packets = builder.flush()
        self._packet_number = builder.packet_number
        space = self._spaces[tls.Epoch.ONE_RTT]
        for packet in packets:
            packet.sent_time = now
            packet.in_flight = False
            self._loss.on_packet_sent(packet=packet, space=space)
        # Out of flight, the probe would not move the probe timeout, which could then
        # be long past (an idle tunnel) and declare it lost as soon as it is sent.
        self._loss._time_of_last_sent_ack_eliciting_packet = now
        assert self.path_mtu is not None
        self.path_mtu.probe_sent(size, now)
        addr = self._network_paths[0].addr
        return [(bytes(datagram), addr) for datagram in datagrams]

    def _on_probe_delivery(self, delivery: QuicDeliveryState, size: int, sent: float) -> None:
        search = self.path_mtu
        assert search is not None
        if delivery == QuicDeliveryState.ACKED:
            search.probe_acked(size, sent)
        else:
            search.probe_lost(size, sent)
        self._apply_path_mtu()

    def _watch_full_size_packets(self, first: int) -> None:
        """Follow the ack-eliciting packets from number ``first`` on that are larger
        than the base size, for black hole detection."""
        sent = self._spaces[tls.Epoch.ONE_RTT].sent_packets
        base = BASE_DATAGRAM_SIZE
        handler = self._on_full_size_delivery
        for number in reversed(sent):
            if number < first:
                break
            packet = sent[number]
            if packet.sent_bytes > base and packet.in_flight:
                packet.delivery_handlers.append((handler, (packet.sent_bytes, number)))

    def _on_full_size_delivery(self, delivery: QuicDeliveryState, size: int, number: int) -> None:
        search = self.path_mtu
        assert search is not None
        if delivery == QuicDeliveryState.ACKED:
            search.packet_acked(size)
        else:
            before = search.size
            search.packet_lost(size, number)
            if search.size != before:
                self._apply_path_mtu()

    def _apply_path_mtu(self) -> None:
        search = self.path_mtu
        assert search is not None
        size = search.size
        if size == self._max_datagram_size:
            return
        # The recovery's congestion controller and pacer count in datagrams too.
        self._max_datagram_size = size
        recovery = self._loss
        recovery._pacer._max_datagram_size = size
        controller = recovery._cc
        if hasattr(controller, "_max_datagram_size"):
            controller._max_datagram_size = size
        if hasattr(controller, "additive_increase_factor"):  # cubic
            controller.additive_increase_factor = size

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        if self.path_mtu is None:
            return
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        if parameters.max_udp_payload_size is not None:
            self.path_mtu.limit_to_peer(parameters.max_udp_payload_size)
            self._apply_path_mtu()

    def stream_was_discarded(self, stream_id: int) -> bool:
        """The stream existed and the engine has since dropped all of its state."""
        return self._stream_is_discarded(stream_id)

    def can_send(self, stream_id: int) -> bool:
        """Whether data or a FIN may still be written (not reset, not already ended)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return not self._stream_is_discarded(stream_id)
        sender = stream.sender
        return sender._reset_error_code is None and sender._buffer_fin is None

    @property
    def is_terminated(self) -> bool:
        return self._state is QuicConnectionState.TERMINATED

    @property
    def close_reason(self) -> tuple[int, str, bool, bool] | None:
        """``(code, reason, by_peer, application)`` as soon as a close has begun, else None.

        ``application`` tells an application close (our :class:`CloseCode` values) from
        a QUIC transport error, whose codes overlap them (RFC 9000 section 20).

        aioquic reports the close only after the closing period (three probe
        timeouts); applications want to know at once, e.g. to show why.
        """
        event = self._close_event
        if event is None:
            return None
        by_peer = self._state is QuicConnectionState.DRAINING
        # aioquic leaves frame_type None exactly for application closes.
        return event.error_code, event.reason_phrase, by_peer, event.frame_type is None

    @property
    def host_connection_ids(self) -> list[bytes]:
        return [c.cid for c in self._host_cids]

    def _set_peer_stream_limit(self, max_streams: int) -> None:
        limit = self._local_max_streams_bidi
        if self._handshake_complete or self._state is not QuicConnectionState.FIRSTFLIGHT:
            limit.value = max(limit.value, max_streams)
        else:
            # Before the transport parameters go out, the initial value may drop too.
            limit.value = limit.sent = max_streams

    def _write_stream_limits(self, builder: Any, space: Any, stream: QuicStream) -> None:
        if stream.max_stream_data_local:
            # Re-open the window once less than half of it is left, not on every read:
            # one MAX_STREAM_DATA per half window, as the parent does.
            consumed = self._consumed.get(stream.stream_id or 0, 0)
            if stream.max_stream_data_local - consumed < self._stream_window // 2:
                stream.max_stream_data_local = consumed + self._stream_window
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return  # nothing to send: the common case, once per stream and packet
        # The parent doubles the window once the peer's highest offset passes half of it;
        # hiding the offset keeps it from doing so while it still sends our update.
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        max_data = self._local_max_data
        if max_data.value - self._consumed_total < self._connection_window // 2:
            max_data.value = self._consumed_total + self._connection_window
        used, max_data.used = max_data.used, 0
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            max_data.used = used


def _varint_size(value: int) -> int:
    """Bytes of a QUIC variable-length integer (RFC 9000 section 16)."""
    if value < 0x40:
        return 1
    if value < 0x4000:
        return 2
    return 4 if value < 0x4000_0000 else 8


# Plain aioquic connections (benchmarks compare snocat with them) ------------------


def send_buffered(connection: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream of any aioquic connection that the peer has not
    acknowledged yet (aioquic's send buffer is unbounded: aioquic issue 328)."""
    stream = connection._streams.get(stream_id)
    return 0 if stream is None else len(stream.sender._buffer)


def datagrams_queued(connection: QuicConnection) -> int:
    """DATAGRAM frames any aioquic connection holds, waiting for congestion window."""
    return len(connection._datagrams_pending)


def handshake_complete(connection: QuicConnection) -> bool:
    return bool(connection._handshake_complete)


def protocol_connection(protocol: Any) -> QuicConnection:
    """The connection behind aioquic's asyncio ``QuicConnectionProtocol``."""
    connection: QuicConnection = protocol._quic
    return connection


# Stateless server replies ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """What the server endpoint needs to know of a datagram before it has a connection."""

    is_initial: bool
    is_version_negotiation: bool
    version: int | None
    destination_cid: bytes
    source_cid: bytes
    token: bytes


def parse_packet_header(data: bytes, *, cid_length: int) -> PacketHeader | None:
    """The QUIC header of a datagram, or None when it is not a QUIC packet."""
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
    except ValueError:
        return None
    return PacketHeader(
        is_initial=header.packet_type == QuicPacketType.INITIAL,
        is_version_negotiation=header.packet_type == QuicPacketType.VERSION_NEGOTIATION,
        version=header.version,
        destination_cid=header.destination_cid,
        source_cid=header.source_cid,
        token=header.token,
    )


def encode_version_negotiation(header: PacketHeader, versions: list[int]) -> bytes:
    return encode_quic_version_negotiation(
        source_cid=header.destination_cid,
        destination_cid=header.source_cid,
        supported_versions=versions,
    )


class RetryTokens:
    """Creates and checks Retry tokens, which prove a client owns its address.

    ``random_bytes`` makes the Retry's connection IDs (the endpoint's source of
    randomness, so a simulation can fix it)."""

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self._handler = QuicRetryTokenHandler()
        self._random_bytes = random_bytes

    def retry_packet(self, header: PacketHeader, addr: NetworkAddress, now: float) -> bytes:
        assert header.version is not None
        source_cid = self._random_bytes(8)
        return encode_quic_retry(
            version=header.version,
            source_cid=source_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=self._handler.create_token(
                address=addr,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=source_cid,
                now=now,
            ),
        )

    def validate(self, header: PacketHeader, addr: NetworkAddress, now: float) -> bytes | None:
        """The original destination connection ID, or None for a bad or stale token."""
        try:
            return self._handler.validate_token(
                address=addr, destination_cid=header.destination_cid, token=header.token, now=now
            )
        except ValueError:
            return None


def encode_initial_close(header: PacketHeader, error_code: int, reason: str = "") -> bytes:
    """A server Initial that closes a connection attempt, with no state kept: with
    INVALID_TOKEN (RFC 9000 section 8.1.3), or CONNECTION_REFUSED and a reason."""
    assert header.version is not None
    phrase = reason.encode()
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=header.destination_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(
        QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY + len(phrase)
    )
    buf.push_uint_var(error_code)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return bytes(datagrams[0])
