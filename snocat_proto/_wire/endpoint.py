"""The server endpoint: one UDP socket's datagrams, many tunnels.

:class:`ServerEndpoint` does what aioquic leaves to its asyncio ``QuicServer``, but
without I/O, so every adapter shares it: it routes each datagram to its tunnel by
destination connection ID, creates tunnels for new Initial packets (after a Retry
round trip that proves the client's address, on by default), holds each proven
address to a rate of full handshakes, answers unknown QUIC versions with Version
Negotiation, drops stray packets, and forgets tunnels once they have terminated.
Its events are ``(tunnel, event)`` pairs.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from .auth import Authenticator
from .codes import CloseCode
from .engine import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    NetworkAddress,
    PacketHeader,
    QuicConfiguration,
    QuicEngine,
    QuicErrorCode,
    RetryTokens,
    encode_initial_close,
    encode_version_negotiation,
    parse_packet_header,
)
from .errors import LocalProtocolError
from .events import ConnectionTerminated, TunnelEvent
from .handshake_rate import DEFAULT_HANDSHAKE_RATE, HandshakeBuckets, HandshakeRate
from .limits import Limits
from .network import format_address
from .tunnel import LISTEN_KEEPALIVE_INTERVAL, Role, TunnelConnection

#: Builds the Listen-side authenticator of a new tunnel from the peer's address text.
#: Builds a new tunnel's authenticator from the peer's address text; or, where several
#: ALPNs are offered, one per ALPN (the handshake picks).
AuthenticatorFactory = Callable[[str], Authenticator | Mapping[str, Authenticator]]
#: The reason phrase of the CONNECTION_REFUSED close sent to a source over its rate.
TOO_MANY_HANDSHAKES = "too many new connections from this address; try again later"


class ServerEndpoint:
    """Demultiplexes one socket's datagrams to Listen-side :class:`TunnelConnection` s."""

    def __init__(
        self,
        configuration: QuicConfiguration,
        *,
        authenticator_factory: AuthenticatorFactory,
        limits: Limits,
        retry: bool = True,
        max_tunnels: int | None = None,
        keepalive_interval: float | None = LISTEN_KEEPALIVE_INTERVAL,
        handshake_rate: HandshakeRate | None = DEFAULT_HANDSHAKE_RATE,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``handshake_rate`` holds each client address (IPv6: each /64) to a rate of
        new tunnels, None: no limit.  It needs ``retry``: without Retry a source
        address may be forged, and a limit would let anyone lock a victim out."""
        if configuration.is_client:
            raise LocalProtocolError("the server endpoint needs a server configuration")
        self._configuration = configuration
        self._authenticator_factory = authenticator_factory
        self._limits = limits
        self._retry = RetryTokens(random_bytes) if retry else None
        self._handshakes = (
            HandshakeBuckets(handshake_rate, max_sources=limits.handshake_rate_sources)
            if retry and handshake_rate is not None
            else None
        )
        self._max_tunnels = max_tunnels
        self._keepalive_interval = keepalive_interval
        self._by_cid: dict[bytes, TunnelConnection] = {}
        self._tunnels: dict[TunnelConnection, list[bytes]] = {}
        self._stateless: deque[tuple[bytes, NetworkAddress]] = deque()
        # Tunnels touched since they were last drained: of events, and of datagrams.
        self._dirty: dict[TunnelConnection, None] = {}
        self._unsent: dict[TunnelConnection, None] = {}
        # Every tunnel's deadline as last seen, and a heap of them: finding the next
        # deadline must not cost a look at every tunnel (thousands may be idle).
        # Entries that no longer match ``_deadlines`` are stale and skipped.
        self._deadlines: dict[TunnelConnection, float | None] = {}
        # Tunnels touched since their deadline was last read.
        self._retime: dict[TunnelConnection, None] = {}
        self._timer_heap: list[tuple[float, int, TunnelConnection]] = []
        self._timer_order = itertools.count()
        self._closing = False
        #: Datagrams dropped because they belonged to no tunnel and could start none.
        self.dropped_datagrams = 0
        #: Connection attempts refused because their address was over its handshake rate.
        self.refused_handshakes = 0
        #: Tunnels created: Initials past Retry and the handshake rate (handshakes begun).
        self.started_handshakes = 0
        #: Tunnels closed because handling them raised (``internal_errors`` keeps the
        #: latest exceptions, and the pump drains it; this count stays).
        self.failed_tunnels = 0
        #: The latest failures inside a tunnel (a bug, not the peer's fault: peers only
        #: cause ProtocolErrors, handled inside). That tunnel was closed; others go on.
        self.internal_errors: deque[BaseException] = deque(maxlen=16)
        #: Tunnels that failed: they send what they have once more, then are dropped
        #: (their state is suspect, and a timer that raises would fire forever).
        self._failed: dict[TunnelConnection, None] = {}
        #: ConnectionTerminated for failed tunnels that could not even report their close.
        self._orphan_events: deque[tuple[TunnelConnection, TunnelEvent]] = deque()

    # The adapter's surface ---------------------------------------------------

    @property
    def tunnels(self) -> Iterator[TunnelConnection]:
        return iter(list(self._tunnels))

    def __len__(self) -> int:
        return len(self._tunnels)

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        if data and data[0] & 0xC0 == 0x40:
            # A short header (with the fixed bit): the destination CID comes right
            # after the first byte, so an established tunnel needs no header parse.
            cid_length = self._configuration.connection_id_length
            tunnel = self._by_cid.get(data[1 : 1 + cid_length])
            if tunnel is not None:
                self._guarded(tunnel, tunnel.receive_datagram, data, addr, now)
                self._after_input(tunnel)
                return
        header = parse_packet_header(data, cid_length=self._configuration.connection_id_length)
        if header is None:
            self.dropped_datagrams += 1
            return
        if (
            not header.is_version_negotiation
            and header.version is not None
            and header.version not in self._configuration.supported_versions
        ):
            # Only a datagram large enough to be an Initial deserves an answer
            # (RFC 9000 section 6.1), which also keeps it from amplifying.
            if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:
                versions = list(self._configuration.supported_versions)
                self._stateless.append((encode_version_negotiation(header, versions), addr))
            else:
                self.dropped_datagrams += 1
            return
        tunnel = self._by_cid.get(header.destination_cid)
        if tunnel is None:
            tunnel = self._new_tunnel(header, data, addr, now)
            if tunnel is None:
                return
        self._guarded(tunnel, tunnel.receive_datagram, data, addr, now)
        self._after_input(tunnel)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        datagrams = list(self._stateless)
        self._stateless.clear()
        unsent, self._unsent = self._unsent, {}
        for tunnel in unsent:
            try:
                datagrams.extend(tunnel.datagrams_to_send(now))
            except Exception as exc:
                self._fail(tunnel, exc)
            self._dirty[tunnel] = None
            self._retime[tunnel] = None  # sending arms loss and pacing timers
            if tunnel in self._failed:
                self._forget(tunnel)
        return datagrams

    def get_timer(self) -> float | None:
        self._rearm_touched()
        heap = self._timer_heap
        while heap:
            deadline, _, tunnel = heap[0]
            if self._deadlines.get(tunnel) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> None:
        self._rearm_touched()
        heap = self._timer_heap
        due: dict[TunnelConnection, None] = {}
        while heap and heap[0][0] <= now:
            deadline, _, tunnel = heapq.heappop(heap)
            if self._deadlines.get(tunnel) == deadline:
                due[tunnel] = None
        for tunnel in due:
            self._deadlines[tunnel] = None  # re-armed by _after_input
            timer = tunnel.get_timer()
            if timer is not None and timer <= now:
                self._guarded(tunnel, tunnel.handle_timer, now)
            self._after_input(tunnel)

    def next_event(self) -> tuple[TunnelConnection, TunnelEvent] | None:
        """The next ``(tunnel, event)``, across all tunnels, or None."""
        if self._orphan_events:
            return self._orphan_events.popleft()
        while self._dirty:
            tunnel = next(iter(self._dirty))
            event = tunnel.next_event()
            if event is not None:
                return tunnel, event
            del self._dirty[tunnel]
            self._forget_if_terminated(tunnel)
        return None

    def close(self, code: int, reason: str) -> None:
        """Close every tunnel and refuse new ones (graceful shutdown's last step)."""
        self._closing = True
        for tunnel in list(self._tunnels):
            tunnel.close(code, reason)
            self._after_input(tunnel)

    def mark_dirty(self, tunnel: TunnelConnection) -> None:
        """Call after an application call on ``tunnel``, so its events are drained."""
        self._after_input(tunnel)

    # Internals ---------------------------------------------------------------

    def _new_tunnel(
        self, header: PacketHeader, data: bytes, addr: NetworkAddress, now: float
    ) -> TunnelConnection | None:
        if not header.is_initial or len(data) < SMALLEST_MAX_DATAGRAM_SIZE or self._closing:
            self.dropped_datagrams += 1
            return None
        if self._max_tunnels is not None and len(self._tunnels) >= self._max_tunnels:
            self.dropped_datagrams += 1
            return None
        original_cid: bytes | None = header.destination_cid
        retry_source_cid: bytes | None = None
        if self._retry is not None:
            if not header.token:
                self._stateless.append((self._retry.retry_packet(header, addr, now), addr))
                return None
            original_cid = self._retry.validate(header, addr, now)
            if original_cid is None:
                close = encode_initial_close(header, QuicErrorCode.INVALID_TOKEN)
                self._stateless.append((close, addr))
                return None
            if self._handshakes is not None and not self._handshakes.allow(addr, now):
                self.refused_handshakes += 1
                close = encode_initial_close(
                    header, QuicErrorCode.CONNECTION_REFUSED, TOO_MANY_HANDSHAKES
                )
                self._stateless.append((close, addr))
                return None
            retry_source_cid = header.destination_cid
        engine = QuicEngine(
            configuration=self._configuration,
            limits=self._limits,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_source_cid,
        )
        tunnel = TunnelConnection(
            engine,
            role=Role.LISTEN,
            authenticator=self._authenticator_factory(format_address(addr)),
            limits=self._limits,
            now=now,
            keepalive_interval=self._keepalive_interval,
        )
        cids = [header.destination_cid, engine.host_cid]
        self.started_handshakes += 1
        self._tunnels[tunnel] = cids
        for cid in cids:
            self._by_cid[cid] = tunnel
        return tunnel

    def _guarded(self, tunnel: TunnelConnection, call: Callable[..., None], *args: object) -> None:
        """Feed one tunnel; a failure there closes that tunnel only, never the endpoint."""
        try:
            call(*args)
        except Exception as exc:
            self._fail(tunnel, exc)

    def _fail(self, tunnel: TunnelConnection, exc: Exception) -> None:
        self.internal_errors.append(exc)
        if tunnel in self._failed:
            return
        self._failed[tunnel] = None
        self.failed_tunnels += 1
        reason = "internal error in the aggregator"
        try:
            tunnel.close(CloseCode.INTERNAL_ERROR, reason)
        except Exception:
            # Not even closing worked: the application still hears that the tunnel is gone.
            closed = ConnectionTerminated(
                code=CloseCode.INTERNAL_ERROR, reason=reason, by_peer=False, application=True
            )
            self._orphan_events.append((tunnel, closed))

    def _after_input(self, tunnel: TunnelConnection) -> None:
        cids = self._tunnels.get(tunnel)
        if cids is None:
            return
        for issued, cid in tunnel.pop_connection_id_changes():
            if issued:
                cids.append(cid)
                self._by_cid[cid] = tunnel
            elif self._by_cid.get(cid) is tunnel:
                del self._by_cid[cid]
                cids.remove(cid)
        self._dirty[tunnel] = None
        self._unsent[tunnel] = None
        self._retime[tunnel] = None

    def _rearm_touched(self) -> None:
        touched, self._retime = self._retime, {}
        for tunnel in touched:
            if tunnel in self._tunnels:
                self._rearm(tunnel)

    def _rearm(self, tunnel: TunnelConnection) -> None:
        deadline = tunnel.get_timer()
        if deadline == self._deadlines.get(tunnel):
            return
        self._deadlines[tunnel] = deadline
        if deadline is None:
            return
        heap = self._timer_heap
        if len(heap) > 2 * len(self._deadlines) + 64:
            # Mostly stale entries (busy tunnels move their deadline on every packet).
            heap[:] = [entry for entry in heap if self._deadlines.get(entry[2]) == entry[0]]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, next(self._timer_order), tunnel))

    def _forget_if_terminated(self, tunnel: TunnelConnection) -> None:
        if tunnel.is_terminated:
            self._forget(tunnel)

    def _forget(self, tunnel: TunnelConnection) -> None:
        self._failed.pop(tunnel, None)
        self._unsent.pop(tunnel, None)
        self._deadlines.pop(tunnel, None)
        self._retime.pop(tunnel, None)
        for cid in self._tunnels.pop(tunnel, []):
            if self._by_cid.get(cid) is tunnel:
                del self._by_cid[cid]


class ClientEndpoint:
    """Wraps the Connect side's :class:`TunnelConnection` to look like an endpoint."""

    def __init__(self, tunnel: TunnelConnection) -> None:
        self.tunnel = tunnel
        #: Always empty: the one tunnel's errors end the attempt (as a server's end a tunnel).
        self.internal_errors: deque[BaseException] = deque(maxlen=16)

    @property
    def tunnels(self) -> list[TunnelConnection]:
        return [] if self.tunnel.is_terminated else [self.tunnel]

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        self.tunnel.receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        return self.tunnel.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        return self.tunnel.get_timer()

    def handle_timer(self, now: float) -> None:
        self.tunnel.handle_timer(now)

    def next_event(self) -> tuple[TunnelConnection, TunnelEvent] | None:
        event = self.tunnel.next_event()
        return None if event is None else (self.tunnel, event)

    def mark_dirty(self, tunnel: TunnelConnection) -> None:
        """Nothing to track: the one tunnel is always drained."""


class Endpoint(Protocol):
    """What both endpoints offer an adapter's pump."""

    #: Errors caught while handling one tunnel (closed with INTERNAL_ERROR), to log.
    internal_errors: deque[BaseException]

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> tuple[TunnelConnection, TunnelEvent] | None: ...
    def mark_dirty(self, tunnel: TunnelConnection) -> None: ...
