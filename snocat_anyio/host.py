"""The pump: one UDP socket feeding one core endpoint, under anyio.

:class:`TunnelHost` is the whole I/O of a snocat endpoint, server or client: it
reads every waiting datagram into the core, drains the core's events, sends what
the core produced, and keeps one timer task that it wakes only when the core's
deadline changes (aioquic's ``asyncio/protocol.py`` pattern).  The socket is a
non-blocking stdlib socket, so sending never waits: a full send buffer is a lost
datagram, which QUIC recovers like any other.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable

import anyio
import anyio.abc

from snocat_proto._service.stream_table import StreamTable
from snocat_proto._wire.address import RouteAddress
from snocat_proto._wire.endpoint import Endpoint
from snocat_proto._wire.events import (
    StreamRequested,
    TunnelEvent,
)
from snocat_proto._wire.network import NetworkAddress
from snocat_proto._wire.tunnel import TunnelConnection
from snocat_sync.udp import receive_batch, send_datagrams

from .stream import TunnelStream

logger = logging.getLogger("snocat.host")

#: Called with every tunnel-level event; for StreamRequested the new stream comes along.
EventHandler = Callable[[TunnelConnection, TunnelEvent, TunnelStream | None], None]


class TunnelHost:
    """Runs ``endpoint`` on ``sock``; see the module docstring."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket, on_event: EventHandler) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self._on_event = on_event
        self._streams: StreamTable[TunnelStream] = StreamTable()
        self._timer_at: float | None = None
        self._timer_changed = anyio.Event()
        self._flushing = False
        self._flush_again = False
        self.datagrams_dropped = 0

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def run(self) -> None:
        """Pump until cancelled.  The socket stays open; closing it is the owner's job."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timer_loop)
            self.flush()
            await self._receive_loop()

    # Streams -----------------------------------------------------------------

    async def open_stream(self, tunnel: TunnelConnection, address: RouteAddress) -> TunnelStream:
        """Open a stream to ``address`` on ``tunnel``'s peer and wait for its answer.

        Raises :class:`StreamRefusedError` or :class:`TunnelClosedError`."""
        stream_id = tunnel.open_stream(address)
        stream = self._new_stream(tunnel, stream_id, address, accepted=False)
        self.flush(tunnel)
        try:
            await stream.wait_accepted()
        except BaseException:
            with anyio.CancelScope(shield=True):
                stream.reset()
            raise
        return stream

    def accept(self, stream: TunnelStream) -> None:
        stream.tunnel.accept_stream(stream.stream_id)
        self.flush(stream.tunnel)

    def refuse(self, stream: TunnelStream) -> None:
        stream.tunnel.refuse_stream(stream.stream_id)
        self._forget(stream)
        self.flush(stream.tunnel)

    def streams_of(self, tunnel: TunnelConnection) -> list[TunnelStream]:
        return self._streams.of(tunnel)

    def is_active(self, stream: TunnelStream) -> bool:
        """Whether ``stream`` still gets events (not closed, reset, refused or orphaned):
        once it does not, its byte counts are final."""
        return self._streams.holds(stream)

    # The pump ----------------------------------------------------------------

    def flush(self, tunnel: TunnelConnection | None = None) -> None:
        """Drain events and send datagrams until the core is quiet; re-arm the timer.

        Pass the ``tunnel`` an application call changed, so its output is sent."""
        errors = getattr(self.endpoint, "internal_errors", None)
        while errors:
            # The endpoint closed the tunnel concerned; the rest carry on.
            logger.error("internal error in a tunnel, which was closed", exc_info=errors.popleft())
        if tunnel is not None:
            self.endpoint.mark_dirty(tunnel)
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            while True:
                self._flush_again = False
                while (item := self.endpoint.next_event()) is not None:
                    self._dispatch(*item)
                self._send(self.endpoint.datagrams_to_send(anyio.current_time()))
                if not self._flush_again:
                    break
        finally:
            self._flushing = False
        timer_at = self.endpoint.get_timer()
        previous, self._timer_at = self._timer_at, timer_at
        if timer_at is not None and (previous is None or timer_at < previous):
            # Wake the timer task only for an earlier deadline: one that moved later
            # (as most do, packet after packet) is found when the armed one expires.
            self._timer_changed.set()

    async def _receive_loop(self) -> None:
        sock = self.sock
        while True:
            await anyio.wait_readable(sock)
            receive_batch(sock, self.endpoint.receive_datagram, anyio.current_time())
            self.flush()

    async def _timer_loop(self) -> None:
        while True:
            changed = self._timer_changed = anyio.Event()
            timer_at = self._timer_at
            if timer_at is None:
                await changed.wait()
                continue
            delay = timer_at - anyio.current_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await changed.wait()
                continue  # look again: the deadline may have moved either way
            self.endpoint.handle_timer(max(anyio.current_time(), timer_at))
            self._timer_at = None  # force re-arming even at the same deadline
            self.flush()

    def _send(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
        self.datagrams_dropped += send_datagrams(self.sock, datagrams)

    def _dispatch(self, tunnel: TunnelConnection, event: TunnelEvent) -> None:
        if self._streams.deliver(tunnel, event):
            return
        new_stream = None
        if isinstance(event, StreamRequested):
            new_stream = self._new_stream(tunnel, event.stream_id, event.address, accepted=True)
        self._on_event(tunnel, event, new_stream)

    def _new_stream(
        self, tunnel: TunnelConnection, stream_id: int, address: RouteAddress, *, accepted: bool
    ) -> TunnelStream:
        stream = TunnelStream(
            tunnel,
            stream_id,
            address,
            flush=functools.partial(self.flush, tunnel),
            forget=self._forget,
            accepted=accepted,
        )
        self._streams.add(stream)
        return stream

    def _forget(self, stream: TunnelStream) -> None:
        self._streams.forget(stream)
