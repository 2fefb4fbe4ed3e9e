"""Every bound of snocat, in one typed place: what a peer, a visitor or a slow reader
can make a tunnel, an endpoint or a binding hold.

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
#: Tunnel names are written as ``NAME SECRET`` lines and appear in logs.
DEFAULT_MAX_TUNNEL_NAME_LENGTH = 128
#: Refusal reasons are sent to the peer and logged.
DEFAULT_MAX_REASON_LENGTH = 200
#: A PROXY protocol v2 header with the largest address block (AF_UNIX: 16 + 216).
MIN_PROXY_HEADER_BYTES = 232
#: Linux takes at most this many segments in one UDP GSO call (UDP_MAX_SEGMENTS).
MAX_UDP_SEGMENTS = 64


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

    # Before authentication ----------------------------------------------------
    #: Bytes of the tunnel window a peer may use before it has authenticated: enough
    #: for the auth exchange, too little to hold resources.
    pre_auth_receive_window: int = 64 * 1024
    #: Streams a peer may open before it has authenticated.
    pre_auth_max_streams: int = 4
    #: Longest tunnel name, in characters (token scheme).
    max_tunnel_name_length: int = DEFAULT_MAX_TUNNEL_NAME_LENGTH
    #: Longest refusal reason sent to the peer or shown from it, in characters.
    max_reason_length: int = DEFAULT_MAX_REASON_LENGTH

    # QUIC engine ----------------------------------------------------------------
    #: Connection IDs we ask the peer to keep issued to us: the minimum RFC 9000 allows
    #: (section 18.2), one in use and one spare for a migration.  aioquic asks for 8,
    #: each a few hundred bytes on both sides and a routing entry at the aggregator.
    active_connection_id_limit: int = 2
    #: Room for TLS output after the handshake, where QUIC has none (no KeyUpdate, no
    #: post-handshake authentication); aioquic keeps 16 KiB for each of three epochs.
    post_handshake_crypto_buffer: int = 1024

    # Streams and relays ----------------------------------------------------------
    #: Room a full stream send buffer must regain before the stream is reported
    #: writable again (at most half of ``stream_send_buffer`` is used).
    writable_threshold: int = 16 * 1024
    #: Bytes one relay direction reads at once, so holds per copy.
    relay_chunk_size: int = 256 * 1024
    #: (Connect side) While streams are open the Connect side also pings after this
    #: much silence, doubling it up to the keep-alive interval while the silence lasts
    #: and starting over when stream data arrives.  After a NAT rebinding the
    #: aggregator's packets go to the lapsed mapping, and only a packet from the
    #: client's new address lets it follow (RFC 9000, 9.3); a client that is only
    #: receiving has nothing else to send, so without this a download would stall
    #: until the keep-alive.  An idle session costs four more PINGs (docs/protocol.md 3.7).
    silence_probe_interval: float = 1.0
    #: Seconds a keep-alive or silence probe (Connect side) may go unanswered (aioquic
    #: retransmits it meanwhile) before the aggregator counts as gone and the tunnel is
    #: closed.  With streams open the first probe goes out after 1 s of silence, so a
    #: dead aggregator is noticed within 4 s; an idle tunnel, 3 s after its keep-alive
    #: (18 s by default), within its idle timeout.  A live peer answers every PING
    #: within a round trip, so a quiet tunnel is never closed for it.  Either side: a
    #: stream opened counts as a probe too (an aggregator learns so that a client was
    #: killed when a visitor comes for it).
    probe_answer_timeout: float = 3.0

    # UDP flows (udp-datagrams, docs/protocol.md 3.17) ------------------------------
    #: Flows one tunnel may have at once, set up or being set up, counting both sides'.
    #: Each holds one stream of the peer's ``max_streams_per_tunnel``: keep this well
    #: below it, so that TCP streams always have room.
    udp_max_flows: int = 128
    #: (Opener) At ``udp_max_flows``, a new visitor's flow ends the quietest open one
    #: of ours if it has been quiet (no datagram either way) this many seconds, as
    #: conntrack drops early: spoofed sources fill the table, but hold it only this
    #: long rather than the idle timeout, and a busy flow is never ended for them.
    udp_flow_evict_after: float = 5.0
    #: Datagrams one flow may queue while its setup is under way (one round trip).
    udp_flow_queue: int = 16
    #: Datagrams one tunnel may have handed to QUIC that wait for room in the congestion
    #: window: aioquic's queue is unbounded and holds them however stale they get, and
    #: on a lossy path (each lost datagram shrinks the window) every one queued is
    #: latency.  As many as a pump reads at once (``udp_receive_batch``).
    udp_send_queue: int = 64
    #: Seconds without a datagram either way after which a flow ends (on each side).
    udp_flow_idle_timeout: float = 60.0
    #: Datagrams a second one tunnel sends, and takes from the peer (each direction its
    #: own token bucket): QUIC writes DATAGRAM frames ahead of stream data in every
    #: packet, so an unbounded flood would starve the tunnel's streams.
    udp_datagrams_per_second: float = 10_000.0
    #: Bytes a second (flow IDs included), each direction, per tunnel: 64 Mbit/s.
    udp_bytes_per_second: float = 8 * 1024 * 1024
    #: Seconds of either rate a bucket holds, so a burst can go at once.
    udp_rate_burst: float = 0.25
    #: (Aggregator) Seconds a visitor whose flow the client refused is held off (its
    #: datagrams dropped and counted as ``refused``) before its next datagram opens a
    #: flow again; twice as long after each further refusal in a row, at most
    #: ``udp_refused_hold_max``.  Without it every round trip of such a visitor was a
    #: flow setup over the tunnel and two log lines.
    udp_refused_hold: float = 1.0
    udp_refused_hold_max: float = 30.0
    #: Visitors held off per UDP port at once (the oldest forgotten first).
    udp_refused_remembered: int = 1024

    # Endpoints and bindings -------------------------------------------------------
    #: Client addresses (IPv6: /64s) the handshake-rate table tracks at once.
    handshake_rate_sources: int = 65536
    #: (Aggregator) Seconds a tunnel that took a name over waits for the old tunnel's
    #: ports to be freed, so that it gets them, before it takes other ports.
    takeover_port_wait: float = 5.0
    #: Datagrams a pump reads per wake-up before it flushes the core's output.
    udp_receive_batch: int = 64
    #: Events one subscriber (activity feed, registry) may leave unread; past it the
    #: subscription is closed as a laggard (and counted), never left to grow.
    max_subscriber_backlog: int = 10_000

    # Shared listeners (the connection-start parsers: sni, http_host, proxy_protocol) -
    #: Bytes a shared TLS listener peeks at for the ClientHello, its record headers
    #: included.  A ClientHello with post-quantum key shares is about 1.5-2 KiB; big
    #: extensions (many session tickets, long ALPN lists) take it to several KiB.
    max_sniff_bytes: int = 16 * 1024
    #: Bytes of an HTTP/1.x request head (request line, header lines, the empty line
    #: that ends them) a shared HTTP listener reads to find ``Host``.  A head of
    #: exactly this size is read; one byte more is refused (431).
    max_http_header_bytes: int = 16 * 1024
    #: Largest PROXY protocol v2 header accepted (16 bytes, addresses, TLVs); v1 lines
    #: are bounded at 107 bytes by the spec.  At least 232: the largest address block.
    max_proxy_header_bytes: int = 4096
    #: Seconds a public listener waits for the bytes that decide where a visitor goes
    #: (the ClientHello, the request head, a trusted load balancer's PROXY header),
    #: counted from the accept: a visitor that trickles or sends nothing is cut off
    #: then, whatever it sent (408 to a partial HTTP head, else a plain close).
    sniff_timeout: float = 10.0
    #: Visitors of the aggregator's public listeners that are being read before a
    #: decision at once (shared listeners, PROXY headers); past it a new one is closed
    #: at once (503 on ``--http``), so silent connections cannot pile up.  Each is a
    #: task (a thread in the blocking binding) for at most ``sniff_timeout``.
    max_sniffing_visitors: int = 512

    # UDP I/O and path MTU discovery (issue 16, docs/performance.md) ---------------
    #: Datagrams a pump moves in one system call: sent to one peer with UDP GSO, taken
    #: coalesced with UDP GRO, where the kernel has them.  1 turns both off (one
    #: datagram per ``sendto`` / ``recvfrom``); at most 64, the kernel's limit.
    udp_segments_per_call: int = 16
    #: Path MTU discovery (RFC 8899): probes of one size lost in a row before the
    #: path counts as not carrying it (MAX_PROBES).
    path_mtu_probes: int = 3
    #: Seconds after a search settled before the next one tries larger sizes again
    #: (PMTU_RAISE_TIMER), and after a black hole before it is tried again at all.
    path_mtu_raise_interval: float = 600.0
    #: Bursts of lost full-size packets, with none acknowledged since, after which the
    #: path counts as a black hole for that size and the datagram size drops to 1200.
    path_mtu_black_hole_bursts: int = 3
    #: The search stops once the largest size carried and the smallest one lost are
    #: this many bytes apart.
    path_mtu_search_resolution: int = 16

    # Many streams in one tunnel (issue 16, docs/performance.md) -------------------
    #: Bytes of STREAM data one stream sends in its turn before the next stream with
    #: data waiting gets one.  Long runs per stream are what lets the receiving end
    #: read and write in large pieces (at 8 datagrams a turn, 64 connections cost the
    #: client about a fifth more CPU per MB than one); a stream that has just been
    #: given work is served ahead of them (``stream_first_turn``), so a long turn does
    #: not make a new stream wait behind every busy one.
    stream_send_turn: int = 64 * 1024
    #: Bytes a stream that has just been given work (it had nothing queued to send)
    #: sends ahead of the streams taking regular turns, before it joins them at the
    #: back: what a new request or a keystroke waits for is the other new streams'
    #: first turns, not every bulk stream's turn.
    stream_first_turn: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not value > 0:
                raise LocalProtocolError(f"Limits.{name} must be positive, not {value!r}")
        if self.stream_send_buffer > self.tunnel_send_buffer:
            raise LocalProtocolError("stream_send_buffer may not exceed tunnel_send_buffer")
        if self.stream_receive_window > self.tunnel_receive_window:
            raise LocalProtocolError("stream_receive_window may not exceed tunnel_receive_window")
        if self.udp_refused_hold > self.udp_refused_hold_max:
            raise LocalProtocolError("udp_refused_hold may not exceed udp_refused_hold_max")
        if self.active_connection_id_limit < 2:
            raise LocalProtocolError("active_connection_id_limit must be at least 2 (RFC 9000)")
        if self.udp_segments_per_call > MAX_UDP_SEGMENTS:
            raise LocalProtocolError(
                f"udp_segments_per_call may not exceed {MAX_UDP_SEGMENTS} (the kernel's limit)"
            )
        if self.max_proxy_header_bytes < MIN_PROXY_HEADER_BYTES:
            raise LocalProtocolError(
                f"max_proxy_header_bytes must be at least {MIN_PROXY_HEADER_BYTES}: "
                "every address block of the PROXY protocol must fit"
            )
