"""Which stream object a binding's pump hands each stream event to.

Every binding keeps its open streams (anyio's, the blocking ones) by tunnel and
stream ID, gives each its events, and drops them when the stream or the tunnel
ends.  :class:`StreamTable` is that book, once.  It also returns the credit of data
that arrives for a stream nobody holds any more (the application closed it while
bytes were in flight): unread, those bytes would shrink the tunnel's window for good.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from .._wire.events import STREAM_EVENTS, ConnectionTerminated, DataReceived, TunnelEvent
from .._wire.tunnel import TunnelConnection

__all__ = ["BoundStream", "StreamTable"]


class BoundStream(Protocol):
    """What the table needs of a binding's stream."""

    @property
    def tunnel(self) -> TunnelConnection: ...

    @property
    def stream_id(self) -> int: ...

    def on_event(self, event: TunnelEvent) -> None: ...

    def on_tunnel_closed(self, code: int, reason: str) -> None: ...


S = TypeVar("S", bound=BoundStream)


class StreamTable(Generic[S]):
    """The streams a pump has handed out, by ``(tunnel, stream_id)``."""

    def __init__(self) -> None:
        self._streams: dict[tuple[TunnelConnection, int], S] = {}

    def add(self, stream: S) -> None:
        self._streams[stream.tunnel, stream.stream_id] = stream

    def forget(self, stream: S) -> None:
        if self._streams.get((stream.tunnel, stream.stream_id)) is stream:
            del self._streams[stream.tunnel, stream.stream_id]

    def holds(self, stream: S) -> bool:
        """Whether ``stream`` still gets its events."""
        return self._streams.get((stream.tunnel, stream.stream_id)) is stream

    def of(self, tunnel: TunnelConnection) -> list[S]:
        return [s for (t, _), s in self._streams.items() if t is tunnel]

    def deliver(self, tunnel: TunnelConnection, event: TunnelEvent) -> bool:
        """Give a stream event to its stream; False for an event of the tunnel itself.

        A :class:`~snocat_proto.events.ConnectionTerminated` also ends every stream of the
        tunnel (and still returns False: the application hears of it too)."""
        if isinstance(event, STREAM_EVENTS):
            stream = self._streams.get((tunnel, event.stream_id))
            if stream is not None:
                stream.on_event(event)
            elif isinstance(event, DataReceived):
                # Nobody will read it: return the credit.
                tunnel.acknowledge_received_data(event.stream_id, len(event.data))
            return True
        if isinstance(event, ConnectionTerminated):
            for stream in self.of(tunnel):
                stream.on_tunnel_closed(event.code, event.reason)
                self.forget(stream)
        return False
