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

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic._buffer import Buffer
from aioquic.buffer import size_uint_var
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    RESET_STREAM_FRAME_CAPACITY,
    STOP_SENDING_FRAME_CAPACITY,
    TRANSPORT_CLOSE_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionState,
    QuicNetworkPath,
    QuicReceiveContext,
    stream_is_client_initiated,
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
    QuicPacketBuilderStop,
)
from aioquic.quic.recovery import QuicPacketSpace
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

#: Streams one packet takes STREAM frames from, at most (issue 16).  aioquic tries
#: every stream for every packet it builds, so the work per packet grows with the
#: streams of a tunnel; :meth:`QuicEngine._write_application` serves a queue of the
#: streams that have something to send, round robin, and stops after this many.
STREAMS_PER_PACKET = 4

#: Every private name of aioquic that snocat relies on, by what it is read from.  This
#: module is the only one that touches them (ruff's SLF001 keeps it so), and
#: tests/test_aioquic_compat.py checks each on a live connection: an aioquic release
#: that renames one fails there, naming it.  pyproject.toml pins aioquic to the
#: releases that test passes on.
AIOQUIC_PRIVATES: dict[str, tuple[str, ...]] = {
    "aioquic.quic.connection.QuicConnection": (
        "_close_event",
        "_configuration",
        "_crypto_buffers",
        "_crypto_streams",
        "_cryptos",
        "_datagrams_pending",
        "_discard_epoch",
        "_handle_max_data_frame",
        "_handle_max_stream_data_frame",
        "_handle_reset_stream_frame",
        "_handle_stop_sending_frame",
        "_handle_stream_frame",
        "_handshake_complete",
        "_handshake_done_pending",
        "_host_cids",
        "_idle_timeout",
        "_is_client",
        "_local_active_connection_id_limit",
        "_local_max_data",
        "_local_max_streams_bidi",
        "_local_max_streams_uni",
        "_logger",
        "_loss",
        "_max_datagram_size",
        "_network_paths",
        "_on_max_stream_data_delivery",
        "_pacing_at",
        "_packet_number",
        "_parse_transport_parameters",
        "_peer_cid",
        "_ping_pending",
        "_probe_pending",
        "_QuicConnection__frame_handlers",
        "_quic_logger",
        "_remote_max_data",
        "_remote_max_data_used",
        "_remote_max_datagram_frame_size",
        "_remote_max_streams_bidi",
        "_remote_max_streams_uni",
        "_retire_connection_ids",
        "_spaces",
        "_spin_bit",
        "_state",
        "_stream_is_discarded",
        "_stream_limit",
        "_streams",
        "_streams_blocked_bidi",
        "_streams_blocked_pending",
        "_streams_blocked_uni",
        "_streams_queue",
        "_unblock_streams",
        "_version",
        "_write_ack_frame",
        "_write_application",
        "_write_connection_limits",
        "_write_crypto_frame",
        "_write_datagram_frame",
        "_write_handshake_done_frame",
        "_write_new_connection_id_frame",
        "_write_path_challenge_frame",
        "_write_path_response_frame",
        "_write_ping_frame",
        "_write_retire_connection_id_frame",
        "_write_stream_limits",
        "_write_streams_blocked_frame",
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
        #: Streams that may have something to send (data, a FIN, RESET_STREAM,
        #: STOP_SENDING) or are finished and wait to be discarded, in service order:
        #: the first ``_fresh`` of them are in their first turn (they were given work
        #: while not queued), the rest take regular turns; the first one's turn has
        #: used ``_turn_sent`` bytes.
        self._send_queue: deque[QuicStream] = deque()
        self._queued: set[int] = set()
        self._fresh = 0
        self._turn_sent = 0
        #: Streams with data held back by the peer's MAX_DATA (not the stream's own
        #: window): queued again when it grows.
        self._waiting_for_max_data: dict[int, QuicStream] = {}
        #: Streams whose MAX_STREAM_DATA is due (credit returned, or the last one lost).
        self._window_updates_due: dict[int, QuicStream] = {}
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
        consumed = self._consumed[stream_id] = self._consumed.get(stream_id, 0) + amount
        self._consumed_total += amount
        stream = self._streams.get(stream_id)
        if (
            stream is not None
            and stream.max_stream_data_local
            and stream.max_stream_data_local - consumed < self._stream_window // 2
        ):
            self._window_updates_due[stream_id] = stream

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

    # Stream scheduling (issue 16) ------------------------------------------------
    #
    # aioquic's _write_application tries every stream, and checks every stream's
    # window, for each packet it builds: with N streams a packet costs O(N).  Here a
    # stream joins ``_send_queue`` when something gives it work (data or a FIN
    # written, a reset or STOP_SENDING asked for or received, a frame of it lost, a
    # window of the peer's opened, both halves finished), and leaves it when a visit
    # finds it has none; a packet visits at most STREAMS_PER_PACKET of them.  A stream
    # that joins is served first (after the others that just joined) for
    # ``Limits.stream_first_turn`` bytes, then takes ``stream_send_turn`` turns with
    # the rest, as fq_codel serves new flows ahead of old ones.  Window updates are
    # written for the streams whose update is due, not checked for all.

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        self._queue_stream_id(stream_id)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        super().reset_stream(stream_id, error_code)
        self._queue_stream_id(stream_id)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        super().stop_stream(stream_id, error_code)
        self._queue_stream_id(stream_id)

    def _queue_stream_id(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._queue_stream(stream)

    def _queue_stream(self, stream: QuicStream) -> None:
        """Give a stream that may have something to send (or is finished) a place in
        the send queue, unless it has one or has been discarded already: behind the
        other streams in their first turn, ahead of those taking regular turns."""
        stream_id = stream.stream_id or 0
        if stream_id in self._queued or self._streams.get(stream_id) is not stream:
            return
        self._queued.add(stream_id)
        if self._fresh == 0:
            self._turn_sent = 0  # it goes first: the stream it displaces starts over
        self._send_queue.insert(self._fresh, stream)
        self._fresh += 1

    def _unqueue(self, index: int) -> None:
        queue = self._send_queue
        self._queued.discard(queue[index].stream_id or 0)
        del queue[index]
        if index < self._fresh:
            self._fresh -= 1
        if index == 0:
            self._turn_sent = 0

    def _end_turn(self) -> None:
        """The first stream's turn is over: to the back of the queue."""
        self._send_queue.rotate(-1)
        if self._fresh:
            self._fresh -= 1
        self._turn_sent = 0

    def _discard_stream(self, stream: QuicStream) -> None:
        """Forget a finished stream, as aioquic's scheduler does."""
        stream_id = stream.stream_id or 0
        self._logger.debug("Stream %d discarded", stream_id)
        self._streams.pop(stream_id)
        if stream_is_client_initiated(stream_id) != self._is_client:
            # Let the peer open a new stream for each one that closes (RFC 9000
            # section 4.6).
            self._stream_limit(stream_id).value += 1
        self._waiting_for_max_data.pop(stream_id, None)
        self._window_updates_due.pop(stream_id, None)

    # What gives a stream work, from the peer.

    def _handle_stream_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_stream_id(buf)
        super()._handle_stream_frame(context, frame_type, buf)
        stream = self._streams.get(stream_id)
        if stream is not None and stream.is_finished:
            self._queue_stream(stream)  # to be discarded

    def _handle_reset_stream_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_stream_id(buf)
        super()._handle_reset_stream_frame(context, frame_type, buf)
        stream = self._streams.get(stream_id)
        if stream is not None and stream.is_finished:
            self._queue_stream(stream)

    def _handle_stop_sending_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_stream_id(buf)
        super()._handle_stop_sending_frame(context, frame_type, buf)
        self._queue_stream_id(stream_id)  # aioquic resets its sending half

    def _handle_max_stream_data_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_stream_id(buf)
        super()._handle_max_stream_data_frame(context, frame_type, buf)
        self._queue_stream_id(stream_id)

    def _handle_max_data_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        before = self._remote_max_data
        super()._handle_max_data_frame(context, frame_type, buf)
        if self._remote_max_data > before and self._waiting_for_max_data:
            waiting = list(self._waiting_for_max_data.values())
            self._waiting_for_max_data.clear()
            for stream in waiting:
                self._queue_stream(stream)

    def _unblock_streams(self, is_unidirectional: bool) -> None:
        blocked = list(
            self._streams_blocked_uni if is_unidirectional else self._streams_blocked_bidi
        )
        super()._unblock_streams(is_unidirectional)
        for stream in blocked:
            if not stream.is_blocked:
                self._queue_stream(stream)

    # What gives a stream work, from our own frames' fate.

    def _on_stream_data_delivery(
        self, delivery: QuicDeliveryState, stream: QuicStream, start: int, stop: int, fin: bool
    ) -> None:
        stream.sender.on_data_delivery(delivery, start, stop, fin)
        if delivery != QuicDeliveryState.ACKED or stream.is_finished:
            self._queue_stream(stream)  # to resend, or to discard

    def _on_reset_stream_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        stream.sender.on_reset_delivery(delivery)
        if delivery != QuicDeliveryState.ACKED or stream.is_finished:
            self._queue_stream(stream)

    def _on_stop_sending_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        stream.receiver.on_stop_sending_delivery(delivery)
        if delivery != QuicDeliveryState.ACKED:
            self._queue_stream(stream)

    def _on_max_stream_data_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        stream_id = stream.stream_id or 0
        if delivery != QuicDeliveryState.ACKED and self._streams.get(stream_id) is stream:
            self._window_updates_due[stream_id] = stream

    # The packets.

    def _write_application(
        self, builder: QuicPacketBuilder, network_path: QuicNetworkPath, now: float
    ) -> None:
        """aioquic's, frame for frame and in the same order, but for two steps: window
        updates only for the streams that have one due, and stream frames from the
        send queue (:meth:`_write_queued_streams`)."""
        if self._streams_queue:
            # aioquic queues each stream it creates for its own scheduler; ours is
            # fed by what gives a stream work, so that list would only grow.
            self._streams_queue.clear()
        crypto_stream: QuicStream | None = None
        if self._cryptos[tls.Epoch.ONE_RTT].send.is_valid():
            crypto = self._cryptos[tls.Epoch.ONE_RTT]
            crypto_stream = self._crypto_streams[tls.Epoch.ONE_RTT]
            packet_type = QuicPacketType.ONE_RTT
        elif self._cryptos[tls.Epoch.ZERO_RTT].send.is_valid():
            crypto = self._cryptos[tls.Epoch.ZERO_RTT]
            packet_type = QuicPacketType.ZERO_RTT
        else:
            return
        space = self._spaces[tls.Epoch.ONE_RTT]

        while True:
            # apply pacing, except if we have ACKs to send
            if space.ack_at is None or space.ack_at >= now:
                self._pacing_at = self._loss._pacer.next_send_time(now=now)
                if self._pacing_at is not None:
                    break
            builder.start_packet(packet_type, crypto)

            # ACK, which a server sends for 0-RTT packets before the handshake
            # completes (RFC 9000 section 13.2.1), but not in 0-RTT packets.
            if (
                packet_type == QuicPacketType.ONE_RTT
                and space.ack_at is not None
                and space.ack_at <= now
            ):
                self._write_ack_frame(builder=builder, space=space, now=now)

            if self._handshake_complete:
                # PATH_CHALLENGE, while the active path is not validated, which only
                # happens on a server whose client migrated (RFC 9000 section 9.3).
                if not (network_path.is_validated or network_path.local_challenge_sent):
                    self._write_path_challenge_frame(builder=builder, network_path=network_path)
                    # RFC 9000 section 8.2.4: abandon path validation after three
                    # times the larger of the current PTO and a new path's PTO.
                    if network_path.validation_deadline is None:
                        network_path.validation_deadline = now + 3 * max(
                            self._loss.get_probe_timeout(),
                            2 * self._configuration.initial_rtt,
                        )

                # HANDSHAKE_DONE
                if self._handshake_done_pending:
                    self._write_handshake_done_frame(builder=builder)
                    self._handshake_done_pending = False

                # PATH RESPONSE
                while len(network_path.remote_challenges) > 0:
                    self._write_path_response_frame(
                        builder=builder, challenge=network_path.remote_challenges[0]
                    )
                    network_path.remote_challenges.popleft()

                # NEW_CONNECTION_ID
                for connection_id in self._host_cids:
                    if not connection_id.was_sent:
                        self._write_new_connection_id_frame(
                            builder=builder, connection_id=connection_id
                        )

                # RETIRE_CONNECTION_ID
                for sequence_number in self._retire_connection_ids[:]:
                    self._write_retire_connection_id_frame(
                        builder=builder, sequence_number=sequence_number
                    )
                    self._retire_connection_ids.pop(0)

                # STREAMS_BLOCKED
                if self._streams_blocked_pending:
                    if self._streams_blocked_bidi:
                        self._write_streams_blocked_frame(
                            builder=builder,
                            frame_type=QuicFrameType.STREAMS_BLOCKED_BIDI,
                            limit=self._remote_max_streams_bidi,
                        )
                    if self._streams_blocked_uni:
                        self._write_streams_blocked_frame(
                            builder=builder,
                            frame_type=QuicFrameType.STREAMS_BLOCKED_UNI,
                            limit=self._remote_max_streams_uni,
                        )
                    self._streams_blocked_pending = False

                # MAX_DATA and MAX_STREAMS
                self._write_connection_limits(builder=builder, space=space)

            # stream-level limits: only those due (aioquic checks every stream)
            if self._window_updates_due:
                self._write_window_updates(builder, space)

            # PING (user-request)
            if self._ping_pending:
                self._write_ping_frame(builder, self._ping_pending)
                self._ping_pending.clear()

            # PING (probe)
            if self._probe_pending:
                self._write_ping_frame(builder, comment="probe")
                self._probe_pending = False

            # CRYPTO
            if crypto_stream is not None and not crypto_stream.sender.buffer_is_empty:
                self._write_crypto_frame(builder=builder, space=space, stream=crypto_stream)

            # DATAGRAM
            while self._datagrams_pending:
                try:
                    self._write_datagram_frame(
                        builder=builder,
                        data=self._datagrams_pending[0],
                        frame_type=QuicFrameType.DATAGRAM_WITH_LENGTH,
                    )
                    self._datagrams_pending.popleft()
                except QuicPacketBuilderStop:
                    break

            # STREAM, RESET_STREAM, STOP_SENDING (aioquic tries every stream)
            discarded = self._write_queued_streams(builder, space) if self._send_queue else False

            if builder.packet_is_empty:
                # Discarded streams may let the peer open new ones, which the next
                # packet announces with MAX_STREAMS.
                if not discarded:
                    break
            else:
                self._loss._pacer.update_after_send(now=now)

    def _write_window_updates(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        due = self._window_updates_due
        for stream_id, stream in list(due.items()):
            if self._streams.get(stream_id) is stream:
                self._write_stream_limits(builder=builder, space=space, stream=stream)
            del due[stream_id]  # not reached if the packet was full: due still

    def _write_queued_streams(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> bool:
        """Frames of at most STREAMS_PER_PACKET streams from the front of the send
        queue; True if a finished stream was discarded.

        The first stream keeps its turn from packet to packet until it has sent
        ``Limits.stream_first_turn`` bytes (in its first turn) or ``stream_send_turn``
        bytes, then goes to the back; the next ones fill what room it leaves.  A
        stream leaves the queue when it has nothing to send, or flow control holds
        the rest (the window's update queues it again)."""
        queue = self._send_queue
        limits = self._limits
        discarded = False
        index = 0
        for _ in range(STREAMS_PER_PACKET):
            if index >= len(queue):
                break
            stream = queue[index]
            if stream.is_finished:
                self._unqueue(index)
                self._discard_stream(stream)
                discarded = True
                continue
            if stream.receiver.stop_pending:
                self._write_stop_sending(builder, stream)
            sender = stream.sender
            if sender.reset_pending:
                self._write_reset_stream(builder, stream)
                self._unqueue(index)  # the reset's delivery queues it again
                continue
            if stream.is_blocked or sender.buffer_is_empty:
                self._unqueue(index)
                continue
            allowed = sender.highest_offset + self._remote_max_data - self._remote_max_data_used
            max_offset = min(allowed, stream.max_stream_data_remote)
            written = self._write_stream_data(builder, space, stream, max_offset)
            if written < 0:
                if sender.buffer_is_empty:
                    self._unqueue(index)  # nothing was left to send
                elif sender.next_offset >= max_offset:
                    self._unqueue(index)  # flow control holds the rest
                    if allowed < stream.max_stream_data_remote:
                        self._waiting_for_max_data[stream.stream_id or 0] = stream
                else:
                    break  # no room left in this packet: the stream keeps its place
                continue
            rotated = False
            if index == 0:
                self._turn_sent += written
                turn = limits.stream_first_turn if self._fresh else limits.stream_send_turn
                if self._turn_sent >= turn:
                    self._end_turn()
                    rotated = True
            if builder.remaining_flight_space <= 0:
                break
            if not rotated:
                index += 1
        return discarded

    def _write_stream_data(
        self,
        builder: QuicPacketBuilder,
        space: QuicPacketSpace,
        stream: QuicStream,
        max_offset: int,
    ) -> int:
        """aioquic's _write_stream_frame, with a delivery handler that queues the
        stream again when the frame is lost or the stream is finished.  Returns the
        data bytes the frame carries, or -1 when no frame was written."""
        sender = stream.sender
        stream_id = stream.stream_id or 0
        next_offset = sender.next_offset
        # the frame data size is constrained by our peer's MAX_DATA and
        # the space available in the current packet
        frame_overhead = (
            3 + size_uint_var(stream_id) + (size_uint_var(next_offset) if next_offset else 0)
        )
        previous_send_highest = sender.highest_offset
        frame = sender.get_frame(builder.remaining_flight_space - frame_overhead, max_offset)
        if frame is None:
            return -1
        frame_type = QuicFrameType.STREAM_BASE | 2  # length
        if frame.offset:
            frame_type |= 4
        if frame.fin:
            frame_type |= 1
        buf = builder.start_frame(
            frame_type,
            capacity=frame_overhead,
            handler=self._on_stream_data_delivery,
            handler_args=(stream, frame.offset, frame.offset + len(frame.data), frame.fin),
        )
        buf.push_uint_var(stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint16(len(frame.data) | 0x4000)
        buf.push_bytes(frame.data)
        frames = builder.quic_logger_frames
        if self._quic_logger is not None and frames is not None:
            frames.append(self._quic_logger.encode_stream_frame(frame, stream_id=stream_id))
        self._remote_max_data_used += sender.highest_offset - previous_send_highest
        return len(frame.data)

    def _write_reset_stream(self, builder: QuicPacketBuilder, stream: QuicStream) -> None:
        """aioquic's _write_reset_stream_frame, with our delivery handler."""
        buf = builder.start_frame(
            frame_type=QuicFrameType.RESET_STREAM,
            capacity=RESET_STREAM_FRAME_CAPACITY,
            handler=self._on_reset_stream_delivery,
            handler_args=(stream,),
        )
        frame = stream.sender.get_reset_frame()
        buf.push_uint_var(frame.stream_id)
        buf.push_uint_var(frame.error_code)
        buf.push_uint_var(frame.final_size)
        frames = builder.quic_logger_frames
        if self._quic_logger is not None and frames is not None:
            frames.append(
                self._quic_logger.encode_reset_stream_frame(
                    error_code=frame.error_code,
                    final_size=frame.final_size,
                    stream_id=frame.stream_id,
                )
            )

    def _write_stop_sending(self, builder: QuicPacketBuilder, stream: QuicStream) -> None:
        """aioquic's _write_stop_sending_frame, with our delivery handler."""
        buf = builder.start_frame(
            frame_type=QuicFrameType.STOP_SENDING,
            capacity=STOP_SENDING_FRAME_CAPACITY,
            handler=self._on_stop_sending_delivery,
            handler_args=(stream,),
        )
        frame = stream.receiver.get_stop_frame()
        buf.push_uint_var(frame.stream_id)
        buf.push_uint_var(frame.error_code)
        frames = builder.quic_logger_frames
        if self._quic_logger is not None and frames is not None:
            frames.append(
                self._quic_logger.encode_stop_sending_frame(
                    error_code=frame.error_code, stream_id=frame.stream_id
                )
            )

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


def _peek_stream_id(buf: Buffer) -> int:
    """The stream ID a frame starts with, leaving the buffer where it was."""
    start = buf.tell()
    stream_id: int = buf.pull_uint_var()
    buf.seek(start)
    return stream_id


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
