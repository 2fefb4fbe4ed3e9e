"""The client endpoint: one UDP socket, one tunnel, the server endpoint's surface.

With :class:`ClientEndpoint` and :class:`~snocat_proto.endpoint.ServerEndpoint`
offering the same calls, an adapter needs one pump for both sides.
"""

from __future__ import annotations

from typing import Protocol

from .engine import NetworkAddress
from .events import TunnelEvent
from .tunnel import TunnelConnection


class ClientEndpoint:
    """Wraps the Connect side's :class:`TunnelConnection` to look like an endpoint."""

    def __init__(self, tunnel: TunnelConnection) -> None:
        self.tunnel = tunnel

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

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> tuple[TunnelConnection, TunnelEvent] | None: ...
    def mark_dirty(self, tunnel: TunnelConnection) -> None: ...
