"""What a binding's pump does after every input, once for both bindings.

After a datagram, a timer or an application call, a pump drains the endpoint's
events (handing stream events to their streams and the rest to the application),
transmits what the endpoint produced, and re-arms its timer.  :class:`Pump` is that
loop and its bookkeeping: the :class:`~snocat_proto._service.stream_table.StreamTable`,
the re-entrancy (an event handler that accepts a stream flushes again from inside
the flush), and the deadline.  The binding owns the socket and the waiting: it
calls :meth:`Pump.flush` with the time and a way to send, and wakes its timer when
the call says the deadline moved earlier.  Nothing here waits, locks or reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .._wire.address import RouteAddress
from .._wire.endpoint import Endpoint
from .._wire.events import StreamRequested, TunnelEvent
from .._wire.network import NetworkAddress
from .._wire.tunnel import TunnelConnection
from .stream_table import BoundStream, StreamTable

__all__ = ["EventHandler", "Pump", "Send", "StreamFactory"]

S = TypeVar("S", bound=BoundStream)

#: Called with every tunnel-level event; for StreamRequested the new stream comes along.
EventHandler = Callable[[TunnelConnection, TunnelEvent, S | None], None]
#: Builds the binding's stream object: ``(tunnel, stream_id, address, accepted)``.
StreamFactory = Callable[[TunnelConnection, int, RouteAddress, bool], S]
#: Transmits datagrams (the binding's socket).
Send = Callable[[list[tuple[bytes, NetworkAddress]]], None]


class Pump(Generic[S]):
    """The drain-transmit-rearm loop of one endpoint; see the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        on_event: EventHandler[S],
        new_stream: StreamFactory[S],
    ) -> None:
        self.endpoint = endpoint
        self.streams: StreamTable[S] = StreamTable()
        #: The deadline the binding's timer is armed for (None: no timer).
        self.timer_at: float | None = None
        self._on_event = on_event
        self._new_stream = new_stream
        self._flushing = False
        self._flush_again = False

    def flush(self, now: float, send: Send, tunnel: TunnelConnection | None = None) -> bool:
        """Drain events and send datagrams until the endpoint is quiet; re-arm.

        Pass the ``tunnel`` an application call changed, so its output is sent.
        Returns True when the deadline moved earlier (or appeared): the binding then
        wakes its timer.  A deadline that moved later is found when the armed one
        expires, as most do, packet after packet."""
        if tunnel is not None:
            self.endpoint.mark_dirty(tunnel)
        if self._flushing:  # called from an event handler: the running flush goes on
            self._flush_again = True
            return False
        self._flushing = True
        try:
            while True:
                self._flush_again = False
                while (item := self.endpoint.next_event()) is not None:
                    self._dispatch(*item)
                send(self.endpoint.datagrams_to_send(now))
                if not self._flush_again:
                    break
        finally:
            self._flushing = False
        timer_at = self.endpoint.get_timer()
        previous, self.timer_at = self.timer_at, timer_at
        return timer_at is not None and (previous is None or timer_at < previous)

    def handle_timer(self, now: float, send: Send) -> None:
        """The armed deadline passed: let the endpoint act on it, then flush."""
        self.endpoint.handle_timer(now)
        self.timer_at = None  # re-arm even at the same deadline
        self.flush(now, send)

    def internal_errors(self) -> list[BaseException]:
        """Errors the endpoint caught in one tunnel (it closed that tunnel; the rest
        carry on), for the binding to log once."""
        errors = self.endpoint.internal_errors
        caught = list(errors)
        errors.clear()
        return caught

    # Streams -------------------------------------------------------------------

    def open_stream(self, tunnel: TunnelConnection, address: RouteAddress) -> S:
        """Open a stream to ``address`` on ``tunnel`` (flush afterwards)."""
        stream_id = tunnel.open_stream(address)
        return self._add(tunnel, stream_id, address, accepted=False)

    def accept(self, stream: S) -> None:
        """Accept a stream the peer opened (flush afterwards)."""
        stream.tunnel.accept_stream(stream.stream_id)

    def refuse(self, stream: S) -> None:
        """Refuse a stream the peer opened (flush afterwards)."""
        stream.tunnel.refuse_stream(stream.stream_id)
        self.streams.forget(stream)

    def _add(
        self, tunnel: TunnelConnection, stream_id: int, address: RouteAddress, *, accepted: bool
    ) -> S:
        stream = self._new_stream(tunnel, stream_id, address, accepted)
        self.streams.add(stream)
        return stream

    def _dispatch(self, tunnel: TunnelConnection, event: TunnelEvent) -> None:
        if self.streams.deliver(tunnel, event):
            return
        new_stream = None
        if isinstance(event, StreamRequested):
            new_stream = self._add(tunnel, event.stream_id, event.address, accepted=True)
        self._on_event(tunnel, event, new_stream)
